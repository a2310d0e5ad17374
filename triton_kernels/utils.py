"""Shared Triton helpers: tile loads, the float32-accumulating dot, and the
label-defined membership of (pixel, segment) tiles on the plan of
``spml_fast.ops.contrast_plan``."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton's interpreter stores bfloat16 as uint16 and its tl.dot multiplies the
# bit patterns (triton-lang/triton#11584, unfixed in 3.9): under the
# interpreter, dot operands are upcast to float32 first. bf16 x bf16 products
# are exact in float32, so this matches the tensor-core result up to the
# order of accumulation. Compiled GPU code is unaffected.
UPCAST_DOT_OPERANDS: tl.constexpr = tl.constexpr(INTERPRET)
LOG2E = 1.4426950408889634          # exp(x) = exp2(x * LOG2E): the kernels work in log2 units
# the same constants for use inside kernels (a kernel reads only constexpr globals)
LOG2E_IN_KERNEL: tl.constexpr = tl.constexpr(LOG2E)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


def block_dim(dim: int) -> int:
    """Whole-row tile width for D: a power of two, >= 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(dim))


def ieee_dot(dtype: torch.dtype) -> bool:
    """float32 inputs use exact fp32 products (TF32 would cost ~1e-3 in the
    similarities, 1e-2 in the logits at kappa = 16); bf16/fp16 use tensor cores."""
    return dtype == torch.float32


@triton.jit
def load_rows(ptr, offs_rows, mask_rows, offs_d, mask_d, stride_row, stride_d):
    """Load a [ROWS, BLOCK_D] tile of a row-major-ish [rows, D] matrix (any strides)."""
    return tl.load(ptr + offs_rows[:, None] * stride_row + offs_d[None, :] * stride_d,
                   mask=mask_rows[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def load_rows_transposed(ptr, offs_rows, mask_rows, offs_d, mask_d, stride_row, stride_d):
    """Load the same tile as [BLOCK_D, ROWS], ready to be the right operand of tl.dot."""
    return tl.load(ptr + offs_rows[None, :] * stride_row + offs_d[:, None] * stride_d,
                   mask=mask_rows[None, :] & mask_d[:, None], other=0.0)


@triton.jit
def load_tile(ptr, offs_rows, BLOCK_D: tl.constexpr):
    """[ROWS, BLOCK_D] of a contiguous, padded [rows, BLOCK_D] matrix: no masks."""
    return tl.load(ptr + offs_rows[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :])


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32."""
    if UPCAST_DOT_OPERANDS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _outer(pixel_values, prototype_values, TRANSPOSED: tl.constexpr):
    """Broadcast a pixel vector and a prototype vector to a tile: [pixels, prototypes], or
    [prototypes, pixels] when TRANSPOSED (the dP kernel's layout)."""
    if TRANSPOSED:
        return pixel_values[None, :], prototype_values[:, None]
    else:
        return pixel_values[:, None], prototype_values[None, :]


@triton.jit
def bitwise_or(a, b):
    """Combine function of ``tl.reduce``: OR of class-set words."""
    return a | b


@triton.jit
def bitwise_and(a, b):
    """Combine function of ``tl.reduce``: AND of class-set words."""
    return a & b


@triton.jit
def visit_bounds(visit_entries, visit_counts, tile, other_tiles):
    """A tile's visit row in the plan's [tiles, other_tiles] int32 matrix, and the ends of its uniform,
    excluding, column-masked and pair-masked visits (``visit_counts`` [tiles, 4] int32)."""
    counts = visit_counts + tile * 4
    return (visit_entries + tile.to(tl.int64) * other_tiles, tl.load(counts), tl.load(counts + 1),
            tl.load(counts + 2), tl.load(counts + 3))


@triton.jit
def _per_pixel(values, TRANSPOSED: tl.constexpr):
    """A pixel vector broadcast along the tile's segment axis."""
    if TRANSPOSED:
        return values[None, :]
    else:
        return values[:, None]


@triton.jit
def load_row_ranges(pixel_ranges, offs_n):
    """Per pixel of a tile, from the plan (``pixel_ranges`` [n_pad, 5] int32 slots): the own segment's
    slot, the first slot and the width of the range of segments it is contrasted with (its group), and
    of the range of its positives (single-label mode). Widths as unsigned: membership is then one
    unsigned compare, ``(column - lo) < width``."""
    row = pixel_ranges + offs_n * 5
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2).to(tl.uint32, bitcast=True), tl.load(row + 3),
            tl.load(row + 4).to(tl.uint32, bitcast=True))


@triton.jit
def _in_range(index, lo, width):
    """lo <= index < lo + width, as one unsigned compare."""
    return (index - lo).to(tl.uint32, bitcast=True) < width


@triton.jit
def tile_partners(offs_m, own, lo, width, TRANSPOSED: tl.constexpr):
    """Partner mask of a tile: the segment's slot is in the pixel's partner range (its group; empty slots
    lie outside every range) and is not its own segment. All the excluding loop needs, every segment
    there being of one set; the masked loop adds ``tile_positives``."""
    own_, index = _outer(own, offs_m.to(tl.int32), TRANSPOSED)
    return _in_range(index, _per_pixel(lo, TRANSPOSED), _per_pixel(width, TRANSPOSED)) & (index != own_)


@triton.jit
def words_intersect(pixel_words, pixel_rows, prototype_words, slots, NUM_WORDS: tl.constexpr):
    """Whether the class sets (``NUM_WORDS`` int64 words a row) of pixel rows and segment slots intersect,
    for vectors of offsets: a scalar row and [BM] slots, or [BN] rows and [BN] slots (tiles:
    ``tile_positives``)."""
    shared = tl.load(pixel_words + pixel_rows * NUM_WORDS) & tl.load(prototype_words + slots * NUM_WORDS)
    for word in tl.static_range(1, NUM_WORDS):
        shared = shared | (tl.load(pixel_words + pixel_rows * NUM_WORDS + word)
                           & tl.load(prototype_words + slots * NUM_WORDS + word))
    return shared != 0


@triton.jit
def tile_positives(offs_n, offs_m, positive_lo, positive_width, pixel_words, prototype_words,
                   SET_MODE: tl.constexpr, NUM_WORDS: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Whether the segment would be a positive of the pixel, as a tile mask: in single-label mode its slot
    is in the pixel's positive range, in set mode their class sets (int64 words) intersect. Meaningful
    for partners only (``tile_partners``): the loops combine both through the logits (-inf off the
    partners), so that no boolean tile lives across a reduction (the compiler would pack it into
    registers bit by bit)."""
    if SET_MODE:     # the words loaded as vectors, then broadcast (tile-shaped loads cost 5-10x here)
        words_i, words_s = _outer(tl.load(pixel_words + offs_n * NUM_WORDS),
                                  tl.load(prototype_words + offs_m * NUM_WORDS), TRANSPOSED)
        shared = words_i & words_s
        for word in tl.static_range(1, NUM_WORDS):
            words_i, words_s = _outer(tl.load(pixel_words + offs_n * NUM_WORDS + word),
                                      tl.load(prototype_words + offs_m * NUM_WORDS + word), TRANSPOSED)
            shared = shared | (words_i & words_s)
        return shared != 0
    else:
        first, index = _outer(positive_lo, offs_m.to(tl.int32), TRANSPOSED)
        return _in_range(index, first, _per_pixel(positive_width, TRANSPOSED))


@triton.jit
def column_members(start, type_row, pixel_ranges, pixel_words, prototype_words, prototype_keys,
                   SET_MODE: tl.constexpr, NUM_WORDS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Membership of the slots of the prototype tile starting at slot ``start`` for a pixel tile of one type
    (the plan's column-masked loop: every pixel there has the ranges and class set of the tile's first
    row, ``type_row``): (partner, positive) [BLOCK_M] bool each, positive implying partner.

    From the slots' keys (the plan's ``prototype_keys``: group << 32, | label + 1 in single-label mode)
    rather than from the ranges: computed on loaded data, the tile's column vectors are made once per
    thread and broadcast through shared memory; a range test on the column numbers would be redone for
    every pixel row a thread holds."""
    row = pixel_ranges + type_row * 5
    keys = tl.load(prototype_keys + start.to(tl.int64) + tl.arange(0, BLOCK_M))
    group = tl.load(prototype_keys + tl.load(row + 1).to(tl.int64)) >> 32     # the first slot of its group
    partner = (keys >> 32) == group
    if SET_MODE:
        positive = partner & words_intersect(pixel_words, type_row, prototype_words,
                                             start.to(tl.int64) + tl.arange(0, BLOCK_M), NUM_WORDS)
    else:           # the type's key is the key of the first slot of its positive range, if any
        has_positives = tl.load(row + 4) > 0
        positive = has_positives & (keys == tl.load(prototype_keys + tl.load(row + 3).to(tl.int64),
                                                    mask=has_positives, other=0))
    return partner, positive


@triton.jit
def own_membership(own, positive_lo, positive_width, pixel_words, prototype_words, offs_n, lo, width,
                   SET_MODE: tl.constexpr, NUM_WORDS: tl.constexpr):
    """Per pixel [BN]: whether its own segment is a partner and whether it is a positive (the forward's
    flags count the members of a tile less the own segment)."""
    partner = _in_range(own, lo, width) & (own >= 0)
    if SET_MODE:
        positive = words_intersect(pixel_words, offs_n, prototype_words, tl.where(partner, own, 0).to(tl.int64),
                                   NUM_WORDS)
    else:
        positive = _in_range(own, positive_lo, positive_width)
    return partner, partner & positive


@triton.jit
def own_prototype_rows(own_prototypes, stride_row, stride_col, segment, index, used, columns, dim):
    """[BN, len(columns)] float32: those columns of the prototype of each pixel's own segment,
    ``segment[index]``, read from the caller's [M, dim] prototypes (a segment that takes no part is a zero
    row in the plan's copies, but its prototype is still its pixels' own); 0 where not ``used``."""
    own_segment = tl.load(segment + index, mask=used, other=0)
    return tl.load(own_prototypes + own_segment[:, None] * stride_row + columns[None, :] * stride_col,
                   mask=used[:, None] & (columns < dim)[None, :], other=0.0).to(tl.float32)


@triton.jit
def own_similarity(embeddings, offs_n, own_prototypes, stride_row, stride_col, segment, index, used, dim,
                   BLOCK_D: tl.constexpr):
    """<e, p_own> in float32 for the ``used`` pixels of a tile ([BN]; 0 elsewhere): e from the plan's padded
    copy, p_own from the caller's prototypes (``own_prototype_rows``), 16 columns at a time (few
    registers, at the end of a kernel)."""
    total = tl.zeros(offs_n.shape, tl.float32)
    for first in range(0, BLOCK_D, 16):                 # a loop, not unrolled: one chunk's registers at a time
        columns = first + tl.arange(0, 16)
        pixel = tl.load(embeddings + offs_n[:, None] * BLOCK_D + columns[None, :]).to(tl.float32)
        total += tl.sum(pixel * own_prototype_rows(own_prototypes, stride_row, stride_col, segment, index, used,
                                                   columns, dim), axis=1)
    return total
