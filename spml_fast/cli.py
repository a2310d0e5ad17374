"""The ``spml-fast`` command line: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import os
import sys


def _add_bench(subparsers) -> None:
    from spml_fast.benchmarks.harness import SUITE_MODULES
    bench = subparsers.add_parser("bench", help="benchmark suites: tiled kernels against the dense baseline; "
                                                "'kernels': the static kernel report (no GPU needed)")
    bench.add_argument("suite", choices=[*SUITE_MODULES, "kernels", "all"])
    bench.add_argument("--quick", action="store_true", help="small shapes, about a minute")
    bench.add_argument("--json", metavar="FILE", help="write results as JSON")
    bench.add_argument("--markdown", metavar="FILE", help="write the markdown table")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    bench.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    bench.add_argument("--plots", metavar="DIR", help="write PNG plots (time and memory against size)")
    bench.add_argument("--memory-cap", type=float, default=8192, metavar="MIB",
                       help="train-step: report the largest crop whose peak stays under this (default 8192)")
    bench.set_defaults(run=run_bench)


def run_kernel_report(args) -> int:
    """``bench kernels``: compile every kernel for sm_90a and sm_80 on the CPU and report its machine code."""
    import json

    from tqdm import tqdm

    from spml_fast.benchmarks import kernel_report
    from spml_fast.io import save_text
    with tqdm(desc="compile", unit="kernel", file=sys.stderr) as bar:
        reports = kernel_report.as_dicts(kernel_report.run(progress=lambda r: bar.update()))
    environment = kernel_report.environment()
    table = kernel_report.to_markdown(reports, environment)
    print(table)
    if args.json:
        save_text(args.json, json.dumps(dict(environment=environment, kernels=reports), indent=1) + "\n")
    if args.markdown:
        save_text(args.markdown, table)
    failed = [r for r in reports if r.get("error")]
    return 1 if failed else 0


def run_bench(args) -> int:
    import torch
    if args.suite == "kernels":
        return run_kernel_report(args)
    from tqdm import tqdm

    from spml_fast.benchmarks import report
    from spml_fast.benchmarks.harness import SUITE_MODULES, baseline_of, environment, run_suite, summarize
    from spml_fast.io import save_text

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    suites = list(SUITE_MODULES) if args.suite == "all" else [args.suite]
    records, checks = [], []
    with tqdm(desc="bench", unit="measurement", file=sys.stderr) as bar:
        def progress(record):
            bar.set_postfix_str(f"{record.case} {record.impl}: {record.status}")
            bar.update()
        for suite in suites:
            suite_records, suite_checks = run_suite(suite, args.quick, device, args.repeats, progress)
            records += suite_records
            checks += suite_checks
    env = environment(device)
    options = dict(memory_cap_mb=args.memory_cap, device=env["device"], device_kind=device)
    summaries = {suite: summarize(suite, [r for r in records if r.suite == suite], options) for suite in suites}
    table = report.to_markdown(env, records, checks, {suite: baseline_of(suite) for suite in suites}, summaries)
    if args.plots:
        from spml_fast.benchmarks.plots import write_plots
        plots = write_plots(records, args.plots)
        table += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.relpath(p, os.path.dirname(args.markdown)) if args.markdown else p})"
                                  for p in plots) + "\n"
    print(table)
    if args.json:
        save_text(args.json, report.to_json(env, records, checks, summaries))
    if args.markdown:
        save_text(args.markdown, table)
    return 0


def _add_synth(subparsers) -> None:
    synth = subparsers.add_parser("synth", help="write the built-in synthetic dataset (SPML list-file layout)")
    synth.add_argument("--out", required=True, metavar="DIR")
    synth.add_argument("--train-images", type=int, default=160)
    synth.add_argument("--val-images", type=int, default=40)
    synth.add_argument("--size", type=int, default=96)
    synth.add_argument("--seed", type=int, default=0)
    _add_scene_flags(synth)
    synth.set_defaults(run=run_synth)


def _add_scene_flags(parser) -> None:
    from spml_fast.synth import SynthConfig
    defaults = SynthConfig()
    parser.add_argument("--shading", type=float, default=defaults.shading,
                        help="rim darkening of objects, 0 = flat (default %(default)s)")
    parser.add_argument("--scribble-margin", type=float, default=defaults.scribble_margin,
                        help="scribbles keep this fraction of an object's depth from its outline, 0 = anywhere "
                             "inside (default %(default)s)")


def run_synth(args) -> int:
    from spml_fast.synth import SynthConfig, write_dataset
    info = write_dataset(args.out, SynthConfig(args.train_images, args.val_images, args.size, args.seed,
                                               shading=args.shading, scribble_margin=args.scribble_margin))
    print(f"wrote {info['train']} training and {info['val']} validation scenes to {args.out}")
    return 0


def _add_cam(subparsers) -> None:
    cam = subparsers.add_parser("cam", help="CAM pseudo-labels from image tags (the tag supervision's label maps)")
    cam.add_argument("--data", required=True, metavar="ROOT")
    cam.add_argument("--list", default="train_tag.txt", metavar="FILE", help="images with tags (tags.json)")
    cam.add_argument("--classes", default="classes.txt", metavar="N|FILE")
    cam.add_argument("--out-list", default="train_cam.txt", metavar="FILE", help="written under ROOT")
    cam.add_argument("--iterations", type=int, default=400)
    cam.add_argument("--threshold", type=float, default=0.2)
    cam.set_defaults(run=run_cam)


def run_cam(args) -> int:
    from spml_fast.cam import CamConfig, write_cam_labels
    from spml_fast.data import read_classes
    classes = args.classes if args.classes.isdigit() or os.path.isabs(args.classes) else os.path.join(
        args.data, args.classes)
    info = write_cam_labels(args.data, args.list, args.out_list, len(read_classes(classes)),
                            CamConfig(iterations=args.iterations, threshold=args.threshold))
    print(f"wrote CAM pseudo-labels of {info['images']} images; list {info['list']}")
    return 0


def _add_train(subparsers) -> None:
    from spml_fast.config import PRESETS
    train = subparsers.add_parser("train", help="train an SPML embedding (or the pce baseline)")
    train.add_argument("--preset", required=True, choices=sorted(PRESETS))
    train.add_argument("--data", metavar="ROOT", help="data root (paths in the list are relative to it)")
    train.add_argument("--list", metavar="FILE", help="training list file (default: the preset's)")
    train.add_argument("--classes", metavar="N|FILE")
    train.add_argument("--out", metavar="RUN_DIR", default=None)
    train.add_argument("--iterations", type=int)
    train.add_argument("--crop", type=int)
    train.add_argument("--batch", type=int)
    train.add_argument("--device", choices=["cpu", "cuda"])
    train.add_argument("--pretrained", metavar="PATH", help="local ImageNet state dict of the backbone")
    train.add_argument("--workers", type=int)
    train.add_argument("--config", metavar="YAML", help="settings overriding the preset")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, e.g. relations.weight_image=0.2 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    train.add_argument("--skip-bad", action="store_true", help="skip missing/unreadable files with a warning")
    train.set_defaults(run=run_train)


def build_config(args):
    from spml_fast.config import PRESETS, apply_overrides, load_yaml_overrides
    config = PRESETS[args.preset]
    overrides = load_yaml_overrides(args.config) if args.config else {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = value
    flags = {"data_root": args.data, "train_list": args.list, "classes": args.classes,
             "optim.iterations": args.iterations, "augment.crop": args.crop, "optim.batch": args.batch,
             "device": args.device, "pretrained": args.pretrained, "workers": args.workers,
             "skip_bad": True if args.skip_bad else None}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return apply_overrides(config, overrides)


def run_train(args) -> int:
    from spml_fast.train import train
    config = build_config(args)
    if not config.data_root:
        raise ValueError("--data ROOT is required (or data_root in --config)")
    out = args.out or os.path.join("runs", config.preset)
    result = train(config, out, resume=args.resume)
    print(f"trained {result['iteration']} iterations; checkpoint {result['checkpoint']}; "
          + ", ".join(f"{k} {v:.4f}" for k, v in result["losses"].items()))
    return 0


def _add_eval(subparsers) -> None:
    evaluate = subparsers.add_parser("eval", help="mIoU of a trained run on a list")
    evaluate.add_argument("--checkpoint", required=True, metavar="RUN_DIR|FILE")
    evaluate.add_argument("--data", metavar="ROOT")
    evaluate.add_argument("--list", metavar="FILE")
    evaluate.add_argument("--classes", metavar="N|FILE", help="must match the run's classes when given")
    evaluate.add_argument("--bank", metavar="BANK", help="prototype bank (safetensors); default: built from "
                                                         "the run's training list")
    evaluate.add_argument("--window", type=int, help="sliding-window size for large images")
    evaluate.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--skip-bad", action="store_true", help="skip missing/unreadable files with a warning")
    evaluate.set_defaults(run=run_eval_command)


def run_eval_command(args) -> int:
    import json
    from spml_fast.data import read_classes
    from spml_fast.evaluate import format_table, run_eval
    result, class_names = run_eval(args.checkpoint, args.data, args.list, args.bank, args.device, args.window,
                                   progress=not args.json, skip_bad=args.skip_bad)
    if args.classes:
        given = read_classes(args.classes if args.classes.isdigit() or os.path.isabs(args.classes)
                             else os.path.join(args.data or ".", args.classes))
        if len(given) != len(class_names):
            raise ValueError(f"--classes gives {len(given)} classes, the run was trained with {len(class_names)}")
    if args.json:
        print(json.dumps(dict(result, classes=class_names)))
    else:
        print(format_table(result, class_names))
    return 0


def _add_demo(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="synth, train on synthetic-scribble and the pce baseline, eval, figure")
    demo.add_argument("--out", default="runs/demo", metavar="DIR")
    demo.add_argument("--iterations", type=int, default=None)
    _add_scene_flags(demo)
    demo.set_defaults(run=run_demo)


def _scenes(args):
    from spml_fast.synth import SynthConfig
    return SynthConfig(shading=args.shading, scribble_margin=args.scribble_margin)


def run_demo(args) -> int:
    from spml_fast.demo import demo
    demo(args.out, args.iterations, _scenes(args))
    return 0


def _add_experiments(subparsers) -> None:
    experiments = subparsers.add_parser("experiments", help="README tables: each supervision and the relation "
                                                            "ablation on the built-in data")
    experiments.add_argument("--out", default="runs/experiments", metavar="DIR")
    experiments.add_argument("--iterations", type=int, default=None)
    _add_scene_flags(experiments)
    experiments.set_defaults(run=run_experiments_command)


def run_experiments_command(args) -> int:
    from spml_fast.experiments import run_experiments, to_markdown
    print(to_markdown(run_experiments(args.out, args.iterations, _scenes(args))))
    return 0


def _add_predictor_flags(parser) -> None:
    parser.add_argument("--method", choices=["pixel-knn", "segment-knn", "classifier"], default="pixel-knn")
    parser.add_argument("--k", type=int, default=20, help="neighbours voting (k-NN methods); 1 = argmax")
    parser.add_argument("--window", type=int, help="sliding-window side for large images")
    parser.add_argument("--scales", default="1", help="multi-scale factors, comma-separated, e.g. 0.75,1,1.25")


def _predictor(args):
    from spml_fast.inference import PredictorConfig
    scales = tuple(float(s) for s in args.scales.split(",") if s.strip())
    return PredictorConfig(method=args.method, k=args.k, window=args.window, scales=scales)


def _add_run_and_list(parser, out_metavar: str) -> None:
    """--checkpoint RUN, --data ROOT, --list FILE, --out FILE.safetensors, --device: a run over a list."""
    parser.add_argument("--checkpoint", required=True, metavar="RUN")
    parser.add_argument("--data", metavar="ROOT")
    parser.add_argument("--list", metavar="FILE", help="labelled images (default: the run's bank/training list)")
    parser.add_argument("--out", required=True, metavar=out_metavar, help="output .safetensors")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def _add_bank(subparsers) -> None:
    bank = subparsers.add_parser("bank", help="prototype bank of a run (safetensors + JSON metadata)")
    _add_run_and_list(bank, "BANK")
    bank.add_argument("--max-size", type=int, help="cap: class-balanced random subsample to this many prototypes")
    bank.add_argument("--add", metavar="NAME", help="add class NAME to --bank from the list's masks "
                                                   "(1 = NAME, 0 = other), without retraining")
    bank.add_argument("--bank", metavar="BANK", help="existing bank to extend (with --add)")
    bank.set_defaults(run=run_bank)


def run_bank(args) -> int:
    from spml_fast.bank import add_class_from_list, build_run_bank, save_bank
    if args.add:
        if not (args.bank and args.list):
            raise ValueError("--add NAME needs --bank BANK (the bank to extend) and --list FILE (its masks)")
        bank = add_class_from_list(args.checkpoint, args.bank, args.add, args.data, args.list, args.device,
                                   args.max_size)
    else:
        bank = build_run_bank(args.checkpoint, args.data, args.list, args.device, args.max_size)
    save_bank(bank, args.out)
    counts = ", ".join(f"{n} {c}" for n, c in zip(bank.class_names, bank.counts()))
    print(f"wrote {args.out}: {bank.labels.numel()} prototypes, D = {bank.dim} ({counts})")
    return 0


def _add_train_classifier(subparsers) -> None:
    head = subparsers.add_parser("train-classifier", help="softmax classifier head on a run's frozen embeddings")
    _add_run_and_list(head, "HEAD")
    head.add_argument("--epochs", type=int, default=200)
    head.set_defaults(run=run_train_classifier)


def run_train_classifier(args) -> int:
    from spml_fast.classifier import ClassifierConfig, train_classifier_for_run
    result = train_classifier_for_run(args.checkpoint, args.out, args.data, args.list,
                                      ClassifierConfig(epochs=args.epochs), args.device)
    print(f"wrote {args.out}: fit on {result['pixels']} labelled pixels, training accuracy "
          f"{result['train_accuracy']:.3f}")
    return 0


def _add_export(subparsers) -> None:
    export = subparsers.add_parser("export", help="ONNX model, TensorRT engine or Triton repository, parity-checked")
    export.add_argument("--checkpoint", required=True, metavar="RUN")
    export.add_argument("--bank", metavar="BANK", help="prototype bank (k-NN segmenter)")
    export.add_argument("--classifier", metavar="HEAD", help="classifier head instead of a bank")
    export.add_argument("--format", choices=["onnx", "tensorrt", "triton-repo"], default="onnx")
    export.add_argument("--out", required=True, metavar="PATH", help="model.onnx, model.plan, or a repository DIR")
    export.add_argument("--k", type=int, default=20, help="neighbours voting; 1 = argmax")
    export.add_argument("--uint8-input", action="store_true", help="uint8 [B, H, W, 3] input, preprocessing inside")
    export.add_argument("--bank-as-input", action="store_true", help="the bank is a graph input, not a constant")
    export.add_argument("--extra-classes", type=int, default=8,
                        help="with --bank-as-input: score channels kept for classes added to the bank later")
    export.add_argument("--opset", type=int, default=18)
    export.add_argument("--name", default="spml_segmenter", help="Triton model name")
    export.add_argument("--max-batch", type=int, default=8, help="Triton max_batch_size")
    export.add_argument("--repo-model", choices=["onnx", "plan"], default="onnx",
                        help="Triton repository holds the ONNX model or a TensorRT engine")
    export.set_defaults(run=run_export)


def run_export(args) -> int:
    from spml_fast.export.onnx_export import ExportConfig
    from spml_fast.export.parity import ParityError, format_report
    from spml_fast.export.pipeline import export_run, load_deployable
    from spml_fast.export.triton_repo import ServingConfig
    deployable = load_deployable(args.checkpoint, args.bank, args.classifier)
    config = ExportConfig(k=args.k, uint8_input=args.uint8_input, bank_as_input=args.bank_as_input,
                          extra_classes=args.extra_classes, opset=args.opset)
    try:
        result = export_run(deployable, args.format, args.out, config,
                            ServingConfig(name=args.name, max_batch_size=args.max_batch), args.repo_model)
    except ParityError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for key in ("onnx", "tensorrt"):
        if key in result:
            print(format_report(result[key]))
    print(f"exported {args.format} to {result.get('repository', args.out)}")
    return 0


def _add_predict(subparsers) -> None:
    predict = subparsers.add_parser("predict", help="label-map PNGs and overlays of images")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    predict.add_argument("--checkpoint", metavar="RUN")
    predict.add_argument("--bank", metavar="BANK")
    predict.add_argument("--classifier", metavar="HEAD")
    predict.add_argument("--model", metavar="FILE", help="exported .onnx or TensorRT .plan instead of a run")
    predict.add_argument("--providers", choices=["auto", "tensorrt", "cuda", "cpu"], default="auto")
    predict.add_argument("--out", required=True, metavar="DIR")
    predict.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    _add_predictor_flags(predict)
    predict.set_defaults(run=run_predict)


def run_predict(args) -> int:
    from spml_fast.predict import make_labeller, predict_files
    labeller = make_labeller(args.checkpoint, args.bank, args.classifier, args.model, _predictor(args),
                             args.providers, args.device)
    written, failures = predict_files(args.images, args.out, labeller)
    print(f"wrote {written} label maps to {args.out}" + (f"; {len(failures)} skipped" if failures else ""))
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spml-fast", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_synth(subparsers)
    _add_cam(subparsers)
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_bank(subparsers)
    _add_train_classifier(subparsers)
    _add_export(subparsers)
    _add_predict(subparsers)
    _add_bench(subparsers)
    _add_demo(subparsers)
    _add_experiments(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from spml_fast.data import DataError
    try:
        return args.run(args)
    except (ValueError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
