"""Per-segment sums and pixel counts of embeddings (the numerator of the
segment prototype). One program per pixel tile adds its rows into a float32
[M, D] buffer with atomics: O(N * D) reads, O(M * D) memory, no one-hot."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import block_dim, load_rows


@triton.jit
def segment_sum_kernel(embeddings, segment, sums_out, counts_out, N, D, stride_en, stride_ed,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rows = load_rows(embeddings, offs_n, mask_n, offs_d, mask_d, stride_en, stride_ed).to(tl.float32)
    owner = tl.load(segment + offs_n, mask=mask_n, other=0)
    tl.atomic_add(sums_out + owner[:, None] * D + offs_d[None, :], rows, mask=mask_n[:, None] & mask_d[None, :])
    tl.atomic_add(counts_out + owner, tl.full([BLOCK_N], 1.0, tl.float32), mask=mask_n)


def launch_segment_sum(embeddings: torch.Tensor, segment: torch.Tensor, num_segments: int):
    """embeddings [N, D] float, segment [N] int64 in [0, M) -> (sums [M, D], counts [M]) float32."""
    num_pixels, dim = embeddings.shape
    sums = torch.zeros(num_segments, dim, device=embeddings.device, dtype=torch.float32)
    counts = torch.zeros(num_segments, device=embeddings.device, dtype=torch.float32)
    block_n = 32 if embeddings.device.type == "cpu" else 128
    segment_sum_kernel[(triton.cdiv(num_pixels, block_n),)](
        embeddings, segment, sums, counts, num_pixels, dim, embeddings.stride(0), embeddings.stride(1),
        BLOCK_N=block_n, BLOCK_D=block_dim(dim))
    return sums, counts
