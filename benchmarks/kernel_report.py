"""Static kernel report: every Triton kernel of the library compiled for a
GPU on the CPU (Triton's own ptxas), read back with Triton's cuobjdump.

For each kernel x label mode x architecture x D, at the configuration the
library pins for it (``triton_kernels/configs.py``): registers, spilled
bytes (local memory), shared memory, and for each main tile loop (the
outermost loops that hold a tensor-core instruction, in code order: the
loss kernels' pass 1, uniform, pass 2, excluding, pass 3, column-masked (where
the configuration has it), pass 4, pair-masked) the instructions per
(pixel, segment) pair, the exps (MUFU) per pair and the tensor-core
instructions per pair:

    per pair = loop instructions / (BLOCK_N x BLOCK_M / (32 x num_warps))

i.e. per pair one thread handles in one iteration. An H100/H200 SM issues
128 simple instructions and 16 exps per clock, so a loop above 8 per pair
is bound by issue, not by the exp unit. This judges every kernel change on
machines without a GPU; ``tests/test_kernel_report.py`` holds the committed
figures (``benchmarks/results/kernels.json``) as upper bounds.

    spml-fast bench kernels --json benchmarks/results/kernels.json --markdown benchmarks/results/kernels.md
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Optional

ARCHITECTURES = {"sm90": 90, "sm80": 80}
# Groups (relation I) change the plan, not the kernels: "single" covers them.
MODES = {"single": dict(SET_MODE=False, NUM_WORDS=1), "set": dict(SET_MODE=True, NUM_WORDS=1)}
DIMS = (32, 64, 128, 256)
TENSOR_CORE_OPS = ("HGMMA", "HMMA", "WGMMA")


@dataclass
class Loop:
    instructions: int
    per_pair: float
    mufu_per_pair: float
    tensor_core_per_pair: float
    top_ops: list = field(default_factory=list)


@dataclass
class KernelReport:
    kernel: str
    mode: str
    arch: str
    dim: int
    dtype: str
    block_n: int
    block_m: int
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int                    # local memory (LOCAL + STACK of cuobjdump -res-usage)
    spill_instructions: int             # LDL / STL anywhere in the kernel
    shared_bytes: int
    loops: list                         # [Loop] in code order
    error: Optional[str] = None


def _tools():
    import triton
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(folder, "cuobjdump")
    if not os.path.exists(cuobjdump):
        raise RuntimeError(f"cuobjdump not found in {folder}: this Triton build ships no NVIDIA tools")
    return cuobjdump


def _signature(fn, pointer_types: dict, constexprs: dict) -> tuple[dict, dict]:
    signature, aligned = {}, []
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
            aligned.append(name)
        else:
            signature[name] = "fp32" if name in ("scale", "kappa") else "i32"
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return signature, attrs


def compile_kernel(fn, pointer_types: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    """The compiled kernel (``.asm["cubin"]``) for ``arch`` (90 -> sm_90a, 80 -> sm_80)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", arch, 32)
    signature, attrs = _signature(fn, pointer_types, constexprs)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=target, options=options.__dict__)


def read_sass(cubin: bytes) -> tuple[str, str]:
    cuobjdump = _tools()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    return usage, sass


def main_loops(sass: str, pairs_per_thread: float, tensor_core: bool = True) -> list[Loop]:
    """The outermost loops holding a tensor-core instruction (any outermost loop with ``tensor_core``
    False: the tree filter's passes), in code order."""
    code = [(int(match.group(1), 16), match.group(2).strip()) for match in
            (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if match]
    opcode = lambda text: re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
    loops = []
    for address, text in code:
        target = re.search(r"BRA.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    with_mma = [(start, end) for start, end in loops
                if not tensor_core or any(start <= a <= end and opcode(t) in TENSOR_CORE_OPS for a, t in code)]
    outermost = [(s, e) for s, e in with_mma if not any(s2 <= s and e <= e2 and (s2, e2) != (s, e)
                                                         for s2, e2 in with_mma)]
    result = []
    for start, end in sorted(outermost):
        body = [opcode(t) for a, t in code if start <= a <= end]
        mix = collections.Counter(body)
        tensor = sum(mix[op] for op in TENSOR_CORE_OPS)
        result.append(Loop(len(body), round(len(body) / pairs_per_thread, 2), round(mix["MUFU"] / pairs_per_thread, 3),
                           round(tensor / pairs_per_thread, 3), mix.most_common(6)))
    return result


def _resources(usage: str, sass: str) -> dict:
    field = lambda name: int(match.group(1)) if (match := re.search(name + r":(\d+)", usage)) else 0
    spills = sum(1 for line in sass.splitlines() if re.search(r"\b(LDL|STL)\b", line))
    return dict(registers=field("REG"), spill_bytes=field("LOCAL") + field("STACK"), spill_instructions=spills,
                shared_bytes=field("SHARED"))


def _loss_pointers(dtype: str) -> dict:
    element = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}[dtype]
    pointers = dict(embeddings=element, prototypes=element, own_prototypes=element, pixel_ranges="*i32",
                    pixel_words="*i64", prototype_words="*i64", prototype_keys="*i64", visit_entries="*i32",
                    visit_counts="*i32", pixel_index="*i64", segment="*i64", flags="*i32")
    for name in ("outputs", "lse_all", "lse_positive", "pixel_grad", "grad_scale", "own_grad", "prototype_norm",
                 "own_out", "grad_out", "partial_out", "row_stats"):
        pointers[name] = "*fp32"
    return pointers


LOSS_KERNELS = ("forward", "forward_exact", "grad_embeddings", "grad_prototypes")


def loss_kernels():
    from spml_fast.triton_kernels.pixel_segment_bwd import grad_embeddings_kernel, grad_prototypes_kernel
    from spml_fast.triton_kernels.pixel_segment_fwd import pixel_segment_lse_kernel
    return {"forward": (pixel_segment_lse_kernel, "forward", dict(EXACT=False)),
            "forward_exact": (pixel_segment_lse_kernel, "forward", dict(EXACT=True)),     # the rare redo
            "grad_embeddings": (grad_embeddings_kernel, "grad_embeddings", {}),
            "grad_prototypes": (grad_prototypes_kernel, "grad_prototypes", {})}


def report_loss_kernel(name: str, mode: str, arch: str, dim: int, dtype: str = "bfloat16") -> KernelReport:
    from spml_fast.triton_kernels.configs import CONTRAST, _lookup
    from spml_fast.triton_kernels.utils import block_dim
    fn, launch_name, variant = loss_kernels()[name]
    block_d = block_dim(dim)
    config = _lookup(CONTRAST, arch, block_d)
    launch = getattr(config, launch_name)
    constexprs = dict(MODES[mode], **variant, IEEE=dtype == "float32", COLUMN_MASKED=config.column_masked,
                      BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_D=block_d)
    base = dict(kernel=name, mode=mode, arch=arch, dim=dim, dtype=dtype, block_n=config.block_n,
                block_m=config.block_m, num_warps=launch.num_warps, num_stages=launch.num_stages)
    try:
        compiled = compile_kernel(fn if hasattr(fn, "arg_names") else fn.fn, _loss_pointers(dtype), constexprs,
                                  ARCHITECTURES[arch], launch.num_warps, launch.num_stages)
        usage, sass = read_sass(compiled.asm["cubin"])
    except Exception as error:  # a kernel that does not compile is reported, and the test fails on it
        return KernelReport(**base, registers=0, spill_bytes=0, spill_instructions=0, shared_bytes=0, loops=[],
                            error=f"{type(error).__name__}: {error}"[:500])
    resources = _resources(usage, sass)
    resources["shared_bytes"] = max(resources["shared_bytes"], compiled.metadata.shared)
    pairs = config.block_n * config.block_m / (32 * launch.num_warps)
    return KernelReport(**base, **resources, loops=main_loops(sass, pairs))


def report_nearest_kernel(arch: str, dim: int, dtype: str = "bfloat16") -> KernelReport:
    from spml_fast.triton_kernels.configs import NEAREST, _lookup
    from spml_fast.triton_kernels.nearest_prototype import nearest_prototype_kernel
    from spml_fast.triton_kernels.utils import block_dim
    element = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}[dtype]
    config = _lookup(NEAREST, arch, block_dim(dim))
    constexprs = dict(HAS_GROUPS=False, IEEE=dtype == "float32", BLOCK_N=config.block_n, BLOCK_M=config.block_m,
                      BLOCK_D=block_dim(dim), K_PAD=32)
    pointers = dict(embeddings=element, prototypes=element, pixel_groups="*i64", prototype_groups="*i64",
                    values_out="*fp32", indices_out="*i64")
    fn = nearest_prototype_kernel
    compiled = compile_kernel(fn if hasattr(fn, "arg_names") else fn.fn, pointers, constexprs, ARCHITECTURES[arch],
                              config.launch.num_warps, config.launch.num_stages)
    usage, sass = read_sass(compiled.asm["cubin"])
    pairs = config.block_n * config.block_m / (32 * config.launch.num_warps)
    return KernelReport("nearest_prototype", "top-20", arch, dim, dtype, config.block_n, config.block_m,
                        config.launch.num_warps, config.launch.num_stages, **_resources(usage, sass),
                        loops=main_loops(sass, pairs))


def report_tree_filter_kernel(arch: str) -> KernelReport:
    """The tree filter: one program per (image, 32 channels), one warp, one channel per thread; its two
    loops are the passes (leaves -> root, root -> leaves), per (node, channel) = per loop iteration."""
    from spml_fast.triton_kernels.tree_filter import BLOCK_CHANNELS, LOADS_PER_NODE, tree_filter_kernel
    pointers = dict(order="*i64", parent="*i64", affinity="*fp32", subtree="*fp32", subtree_norm="*fp32",
                    whole="*fp32", whole_norm="*fp32", out="*fp32")
    fn = tree_filter_kernel
    compiled = compile_kernel(fn if hasattr(fn, "arg_names") else fn.fn, pointers, dict(BLOCK_C=BLOCK_CHANNELS),
                              ARCHITECTURES[arch], 1, 1)
    usage, sass = read_sass(compiled.asm["cubin"])
    loops = main_loops(sass, BLOCK_CHANNELS / 32, tensor_core=False)
    for loop in loops:       # ptxas unrolls the passes: count iterations by their 7 global loads each
        nodes = max(1.0, dict(loop.top_ops).get("LDG", LOADS_PER_NODE) / LOADS_PER_NODE)
        loop.per_pair, loop.mufu_per_pair = round(loop.per_pair / nodes, 2), round(loop.mufu_per_pair / nodes, 3)
    passes = [max(loops[:-1], key=lambda loop: loop.instructions), loops[-1]] if len(loops) > 2 else loops
    return KernelReport("tree_filter", "fwd", arch, BLOCK_CHANNELS, "float32", 1, BLOCK_CHANNELS, 1, 1,
                        **_resources(usage, sass), loops=passes)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def report_cases(cases: list[tuple]) -> list[dict]:
    """[(kernel, mode, arch, dim)] -> report dicts. Under TRITON_INTERPRET=1 the kernels are interpreter
    objects that cannot be compiled: the cases are then compiled in a child process without it."""
    if not interpreting():
        return [asdict(report_loss_kernel(*case)) for case in cases]
    import json
    import sys
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-m", "spml_fast.benchmarks.kernel_report", json.dumps(cases)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"kernel report subprocess failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(architectures=tuple(ARCHITECTURES), dims=DIMS, modes=tuple(MODES), kernels=None,
        progress=None) -> list[KernelReport]:
    if interpreting():
        raise RuntimeError("the static kernel report compiles real GPU code: run it without TRITON_INTERPRET=1")
    reports = []
    for arch in architectures:
        for dim in dims:
            for mode in modes:
                for name in kernels or loss_kernels():
                    reports.append(report_loss_kernel(name, mode, arch, dim))
                    if progress:
                        progress(reports[-1])
        for extra in (report_nearest_kernel(arch, 64), report_tree_filter_kernel(arch)):
            reports.append(extra)
            if progress:
                progress(reports[-1])
    return reports


def _loop_cell(loop: Optional[dict]) -> str:
    if loop is None:
        return "-"
    return f"{loop['per_pair']:.1f} / {loop['mufu_per_pair']:.2f} / {loop['tensor_core_per_pair']:.3f}"


def to_markdown(reports: list[dict], environment: dict) -> str:
    lines = [f"Static kernel report ({environment.get('triton', '')}; compiled on the CPU, bfloat16 inputs). "
             "Per (pixel, segment) pair and thread: instructions / MUFU (exp) / tensor-core instructions "
             "in the main loops; loss kernels: pass 1 = uniform tiles (no masks), pass 2 = excluding tiles (uniform "
             "less the own segment and empty slots: one column test per pair), pass 3 = column-masked tiles (the "
             "pixel tile holds one type: membership per segment; forward: the own segment per pair; absent where "
             "the configuration has no column-masked loop), pass 4 = pair-masked tiles (membership per pair; "
             "forward: one max per tile shared by both sets); forward_exact, the redo of flagged rows: one max "
             "per set; tree_filter (float32, no tensor cores): per (node, channel), pass 1 = leaves to root, "
             "pass 2 = root to leaves.", "",
             "| kernel | mode | arch | D | tile | warps/stages | registers | spills (B / LDL+STL) | shared B | pass 1 | "
             "pass 2 | pass 3 | pass 4 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        loops = r["loops"]
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {r['mode']} | {r['arch']} | {r['dim']} | - | - | error: "
                         f"{r['error'][:80]} | | | | | | |")
            continue
        if r["kernel"] in LOSS_KERNELS and len(loops) == 3:      # no column-masked loop: pass 3 is absent
            loops = loops[:2] + [None] + loops[2:]
        cells = " | ".join(_loop_cell(loops[k] if len(loops) > k else None) for k in range(4))
        lines.append(f"| {r['kernel']} | {r['mode']} | {r['arch']} | {r['dim']} | {r['block_n']}x{r['block_m']} | "
                     f"{r['num_warps']}/{r['num_stages']} | {r['registers']} | {r['spill_bytes']} / {r['spill_instructions']} | "
                     f"{r['shared_bytes']} | {cells} |")
    return "\n".join(lines) + "\n"


def _fractions(case: str, describe: dict) -> dict:
    visited = describe["uniform_tiles"] + describe["excluding_tiles"] + describe["masked_tiles"]
    share = lambda count: round(count / max(1, visited), 4)
    return dict(case=case, pixels=describe["pixels"], prototypes=describe["prototypes"],
                pixel_slots=describe["pixel_slots"], dense=describe["dense_tiles"], visited=visited,
                uniform=describe["uniform_tiles"], excluding=describe["excluding_tiles"],
                masked=describe["masked_tiles"], column_masked=describe["column_masked_tiles"],
                pair_masked=describe["pair_masked_tiles"], excluding_of_visited=share(describe["excluding_tiles"]),
                masked_of_visited=share(describe["masked_tiles"]),
                pair_masked_of_visited=share(describe["pair_masked_tiles"]),
                skipped_of_dense=round(1 - visited / max(1, describe["dense_tiles"]), 4))


def relation_plans(side: int = 512, images: int = 8) -> list[dict]:
    """The visit plans of one SPML training step as the trainer makes them (the preset's relations I, C,
    O with the memory bank, ``images`` crops of ``side`` x ``side``), at the sm90 tiles: built for real, the loss's
    kernels stubbed. [(relation, plan.describe())] in call order, I the call with groups."""
    from spml_fast.ops import pixel_segment_triton
    from .bench_host import kernels_stubbed, spml_step
    plans = []
    real = pixel_segment_triton.build_plan

    def recording(segment, pixel_labels, prototype_labels, pixel_groups, prototype_groups, *tiling):
        from spml_fast.triton_kernels.configs import CONTRAST
        sm90 = CONTRAST[("sm90", 64)]
        plan = real(segment, pixel_labels, prototype_labels, pixel_groups, prototype_groups, sm90.block_n,
                    sm90.block_m, sm90.column_masked)
        kind = "I" if pixel_groups is not None else ("O" if pixel_labels.dim() == 2 else "C")
        plans.append((kind, plan.describe()))
        return real(segment, pixel_labels, prototype_labels, pixel_groups, prototype_groups, *tiling)
    pixel_segment_triton.build_plan = recording
    try:
        with kernels_stubbed(loss_only=True):
            call = spml_step(side, images)
            call()
            plans.clear()
            call()                                   # the memory bank holds earlier batches now
    finally:
        pixel_segment_triton.build_plan = real
    return plans


def tile_fractions() -> list[dict]:
    """Uniform, masked and skipped tile pairs of the loss's visit plan at the sm90 tiles (64 x 128): the
    standard case (N = 262,144 pixels of 8 images, M = 8,192 segments, 21 classes) in single-label and set
    mode, and the relations of an SPML step as the trainer calls them."""
    from .bench_loss import _case, visit_plan
    standard = dict(num_pixels=262144, num_segments=8192, dtype="bfloat16", images=8)
    rows = [_fractions("standard, single label", visit_plan(_case("s", **standard))),
            _fractions("standard, set mode (tags)", visit_plan(_case("s", mode="set", **standard)))]
    rows += [_fractions(f"SPML step, relation {kind} (8 x 512 crops)", describe) for kind, describe in relation_plans()]
    return rows


def fractions_markdown(rows: list[dict]) -> str:
    lines = ["Visit plans at the sm90 tiles (64 x 128): tile pairs visited by each loop (uniform: pass 1, no "
             "masks; excluding: pass 2, uniform less the own segment and empty slots, one column test per pair; "
             "masked: pass 3, column-masked, the pixel tile holds one type, membership per segment, and pass 4, "
             "pair-masked, membership per pair), their shares of the visited pairs, and the skipped share of a "
             "dense sweep over the unpadded tiles (pixel slots: N plus the padding that starts each type's run "
             "on a tile).", "",
             "| case | pixels | pixel slots | segments | dense | uniform | excluding | column-masked | pair-masked | "
             "excluding / visited | masked / visited | pair-masked / visited | skipped / dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['pixels']} | {r['pixel_slots']} | {r['prototypes']} | {r['dense']} | "
                     f"{r['uniform']} | {r['excluding']} | {r['column_masked']} | {r['pair_masked']} | "
                     f"{100 * r['excluding_of_visited']:.1f} % | {100 * r['masked_of_visited']:.1f} % | "
                     f"{100 * r['pair_masked_of_visited']:.1f} % | {100 * r['skipped_of_dense']:.1f} % |")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import triton
    return dict(triton=f"triton {triton.__version__}")


def as_dicts(reports: list[KernelReport]) -> list[dict]:
    return [asdict(r) for r in reports]


if __name__ == "__main__":      # child process of ``report_cases``: JSON cases in, JSON reports out
    import json
    import sys
    print(json.dumps(report_cases([tuple(case) for case in json.loads(sys.argv[1])])))
