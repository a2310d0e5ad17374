"""Pinned launch configurations of the kernels, per GPU architecture: no
autotuning at run time.

Autotuning cost 78 s of compilation on an H200 before the first training
step, and a fresh process could pick another configuration, i.e. another
order of float32 reductions: a resumed or multi-GPU run was then no longer
bit-exact. With the table the guarantee is: the same inputs give the same
bits in any fresh process on the same GPU model (same architecture, same
table entry, same visit order from the plan, no atomics in the loss).

The entries were chosen with the static kernel report
(``spml-fast bench kernels``: instructions and exps per pair, registers, no
spills, compiled for sm_90a / sm_80 on a CPU); ``benchmarks/results/kernels-*.md``
holds the figures. Until a GPU timing pass confirms them, the tile sizes are
the ones whose unmasked loop is shortest without spilling.

The three loss kernels share one tiling (BLOCK_N x BLOCK_M): the plan's
visit lists are made for it. Warps and stages are per kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Launch:
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ContrastConfig:
    block_n: int
    block_m: int
    forward: Launch
    grad_embeddings: Launch
    grad_prototypes: Launch
    entries_per_split: int          # dP: fewest pixel tiles per program of a dense column (partial sums)
    dp_programs: int                # dP: programs to aim for in all (about 4 per SM)
    column_masked: bool = True      # the kernels' column-masked loop (off where it would spill registers:
                                    # the plan then sends those tiles to the pair-masked loop)


@dataclass(frozen=True)
class NearestConfig:
    block_n: int
    block_m: int
    launch: Launch


# (architecture, largest BLOCK_D) -> config. Architectures: "sm90" (H100/H200), "sm80" (A100 and the
# Ampere/Ada cards), "interpret" (Triton's CPU interpreter: small tiles so that the tests' small
# problems still have several tiles, uniform and masked). D > 256 takes the tiled PyTorch path
# (ops/dispatch.py): dP's [BLOCK_M, D] float32 accumulator spills at D = 512 at any tile size.
CONTRAST = {
    ("interpret", 256): ContrastConfig(16, 16, Launch(1, 1), Launch(1, 1), Launch(1, 1), entries_per_split=2,
                                          dp_programs=8),
    ("sm90", 64): ContrastConfig(64, 128, Launch(4, 2), Launch(4, 2), Launch(8, 2), entries_per_split=32,
                                 dp_programs=528),
    # D = 128: 64 x 128 tiles spill in dE and dP; 64 x 64 does not, without the column-masked loop (with it
    # dE spills at 64 x 64, 64 x 32 and at 8 warps doubles its per-pair cost)
    ("sm90", 128): ContrastConfig(64, 64, Launch(4, 2), Launch(4, 2), Launch(4, 2), entries_per_split=32,
                                  dp_programs=528, column_masked=False),
    ("sm90", 256): ContrastConfig(16, 64, Launch(4, 1), Launch(4, 1), Launch(4, 1), entries_per_split=32,
                                  dp_programs=528),
    ("sm80", 64): ContrastConfig(64, 64, Launch(4, 2), Launch(4, 2), Launch(4, 2), entries_per_split=32,
                                 dp_programs=432),
    ("sm80", 128): ContrastConfig(32, 64, Launch(4, 2), Launch(4, 2), Launch(4, 2), entries_per_split=32,
                                  dp_programs=432),
    # D = 256: the forward's column-masked loop spills (8 bytes) and gains little over the pair-masked one
    ("sm80", 256): ContrastConfig(32, 64, Launch(4, 1), Launch(4, 1), Launch(4, 1), entries_per_split=32,
                                  dp_programs=432, column_masked=False),
}
NEAREST = {
    ("interpret", 256): NearestConfig(32, 32, Launch(1, 1)),
    ("sm90", 256): NearestConfig(64, 64, Launch(4, 2)),
    ("sm80", 256): NearestConfig(64, 64, Launch(4, 2)),
}


def architecture(device: torch.device) -> str:
    """"interpret" on the CPU, "sm90" on Hopper (and newer), "sm80" on Ampere/Ada (and older)."""
    if device.type != "cuda":
        return "interpret"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80"


def _lookup(table: dict, arch: str, block_d: int):
    widths = sorted(width for (name, width) in table if name == arch)
    for width in widths:
        if block_d <= width:
            return table[(arch, width)]
    raise ValueError(f"no pinned kernel configuration for {arch} with BLOCK_D = {block_d}")


def contrast_config(device: torch.device, block_d: int) -> ContrastConfig:
    return _lookup(CONTRAST, architecture(device), block_d)


def nearest_config(device: torch.device, block_d: int) -> NearestConfig:
    return _lookup(NEAREST, architecture(device), block_d)
