"""The visit plan's tile classification (``spml_fast.ops.contrast_plan``) on the device: two launches,
no host synchronisation, whatever the number of tiles.

``tile_summary_kernel``: one program per pixel tile reduces its pixels' slot ranges to the ten bounds
the tile pair tests need, stored as minima (maxima negated) in this order: lo min, -hi max, -lo max,
hi min, -positive lo max, positive hi min, -positive hi max and positive lo min (over pixels with
positives), own min, -own max; in set mode also the OR and AND of their class-set words, and further
programs do the same for the prototype tiles' words.

``visit_list_kernel``: one program per tile of one side (pixel tiles: the forward's and dE's rows;
prototype tiles, ``COLUMNS``: dP's columns) classifies its pairs with every tile of the other side,
``CHUNK`` at a time, and writes the visits compacted in loop order (uniform, excluding, column-masked,
pair-masked), each
loop's visits in tile order, with the running end of each loop: a prefix sum per chunk, no atomics.

The rule (``tile_loop``) is written once here; ``contrast_plan.visit_lists_reference`` is the same rule
in PyTorch for the CPU and the tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import bitwise_and, bitwise_or

BIG: tl.constexpr = tl.constexpr(2 ** 30)      # a bound no slot reaches (contrast_plan.BIG)
LOOPS: tl.constexpr = tl.constexpr(4)          # visited loops (contrast_plan.LOOPS)
CHUNK = 64


@triton.jit
def _low(values, used):
    """Minimum over the used rows (BIG if none)."""
    return tl.min(tl.where(used, values, BIG), axis=0)


@triton.jit
def tile_summary_kernel(
    pixel_ranges,                            # [n_pad, 5] int32 (own, lo, width, positive lo, width)
    pixel_words, prototype_words, kept_end,  # set mode: [n_pad, W] / [m_pad, W] int64; [tiles_m] int32
    summaries, tile_words,                   # out: [tiles_n, 10] int32; set mode [tiles_n + tiles_m, W, 2] int64
    tile_types,                              # out: [tiles_n] int8: masked visits take the column-masked loop
    tiles_n,
    SET_MODE: tl.constexpr, NUM_WORDS: tl.constexpr, COLUMN_MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    tile = tl.program_id(0)
    if tile < tiles_n:
        # A pixel tile. Slots without partners set no bound. Maxima are stored negated (all bounds are minima).
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row = pixel_ranges + rows.to(tl.int64) * 5
        own, lo, width = tl.load(row), tl.load(row + 1), tl.load(row + 2)
        live = width > 0
        positive_lo, positive_width = tl.load(row + 3), tl.load(row + 4)
        has_positives = live & (positive_width > 0)
        out = summaries + tile * 10
        tl.store(out + 0, _low(lo, live))
        tl.store(out + 1, _low(-(lo + width), live))
        tl.store(out + 2, _low(-lo, live))
        tl.store(out + 3, _low(lo + width, live))
        tl.store(out + 4, _low(-positive_lo, live))
        tl.store(out + 5, _low(positive_lo + positive_width, live))
        tl.store(out + 6, _low(-(positive_lo + positive_width), has_positives))
        tl.store(out + 7, _low(positive_lo, has_positives))
        tl.store(out + 8, _low(own, live))
        tl.store(out + 9, _low(-own, live))
        # one type: every slot has the ranges (and class set) of the first, which has partners
        first = pixel_ranges + tile.to(tl.int64) * BLOCK_N * 5
        same = (lo == tl.load(first + 1)) & (width == tl.load(first + 2)) & (positive_lo == tl.load(first + 3)) \
            & (positive_width == tl.load(first + 4))
        if SET_MODE:
            for word in tl.static_range(NUM_WORDS):
                words = tl.load(pixel_words + rows.to(tl.int64) * NUM_WORDS + word)
                tl.store(tile_words + (tile * NUM_WORDS + word) * 2, tl.reduce(tl.where(live, words, 0), 0, bitwise_or))
                tl.store(tile_words + (tile * NUM_WORDS + word) * 2 + 1,
                         tl.reduce(tl.where(live, words, -1), 0, bitwise_and))
                same = same & (words == tl.load(pixel_words + tile.to(tl.int64) * BLOCK_N * NUM_WORDS + word))
        one_type = (tl.min(same.to(tl.int32), axis=0) == 1) & (tl.load(first + 2) > 0)
        if COLUMN_MASKED:
            tl.store(tile_types + tile, one_type.to(tl.int8))
        else:
            tl.store(tile_types + tile, tl.zeros([], tl.int8))
    else:
        # A prototype tile (set mode only): its kept slots are a prefix, up to kept_end.
        prototype_tile = tile - tiles_n
        slots = prototype_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        kept = slots < tl.load(kept_end + prototype_tile)
        for word in tl.static_range(NUM_WORDS):
            words = tl.load(prototype_words + slots.to(tl.int64) * NUM_WORDS + word)
            tl.store(tile_words + (tile * NUM_WORDS + word) * 2, tl.reduce(tl.where(kept, words, 0), 0, bitwise_or))
            tl.store(tile_words + (tile * NUM_WORDS + word) * 2 + 1,
                     tl.reduce(tl.where(kept, words, -1), 0, bitwise_and))


@triton.jit
def tile_loop(summaries, tile_words, kept_end, pixel_tile_types, pixel_tile, prototype_tile, valid, tiles_n,
              SET_MODE: tl.constexpr, NUM_WORDS: tl.constexpr, BLOCK_M: tl.constexpr):
    """(loop, positive) of tile pairs: loop 0 uniform, 1 excluding, 2 column-masked (the pixel tile has one
    type), 3 pair-masked, 4 no visit; positive: a uniform pair's segments are all positives. One side is a
    scalar tile, the other a vector of tiles."""
    summary = summaries + pixel_tile * 10
    lo_min, hi_max_neg = tl.load(summary, mask=valid, other=BIG), tl.load(summary + 1, mask=valid, other=BIG)
    lo_max_neg, hi_min = tl.load(summary + 2, mask=valid, other=BIG), tl.load(summary + 3, mask=valid, other=BIG)
    own_min, own_max_neg = tl.load(summary + 8, mask=valid, other=BIG), tl.load(summary + 9, mask=valid, other=BIG)
    start = prototype_tile * BLOCK_M
    end = tl.maximum(tl.load(kept_end + prototype_tile, mask=valid, other=0), start)   # end of its kept slots
    visit = (lo_min < end) & (hi_max_neg < -start)            # some pixel has a partner in the tile
    partners = (lo_max_neg >= -start) & (hi_min >= end)       # every kept segment a partner of every pixel
    if SET_MODE:
        all_positive = tl.zeros_like(valid)
        all_negative = all_positive == 0
        for word in tl.static_range(NUM_WORDS):
            pixel_word = tile_words + (pixel_tile * NUM_WORDS + word) * 2
            prototype_word = tile_words + ((tiles_n + prototype_tile) * NUM_WORDS + word) * 2
            shared_by_all = tl.load(pixel_word + 1, mask=valid, other=0) & tl.load(prototype_word + 1, mask=valid,
                                                                                  other=0)
            shared_by_any = tl.load(pixel_word, mask=valid, other=0) & tl.load(prototype_word, mask=valid, other=0)
            all_positive = all_positive | (shared_by_all != 0)
            all_negative = all_negative & (shared_by_any == 0)
    else:
        all_positive = (tl.load(summary + 4, mask=valid, other=BIG) >= -start) & \
            (tl.load(summary + 5, mask=valid, other=BIG) >= end)
        all_negative = (tl.load(summary + 6, mask=valid, other=BIG) >= -start) | \
            (tl.load(summary + 7, mask=valid, other=BIG) >= end)
    uniform = visit & partners & (all_positive | all_negative)
    plain = (end == start + BLOCK_M) & ((own_min >= start + BLOCK_M) | (own_max_neg > -start))
    masked = tl.where(tl.load(pixel_tile_types + pixel_tile, mask=valid, other=0) != 0, 2, 3)
    loop = tl.where(uniform, tl.where(plain, 0, 1), tl.where(visit, masked, 4))
    return loop, (uniform & all_positive).to(tl.int32)


@triton.jit
def visit_list_kernel(
    summaries, tile_words, kept_end,          # from tile_summary_kernel; [tiles_m] int32
    pixel_tile_types,                         # [tiles_n] int8: the pixel tile holds one type
    entries, counts,                          # out: [tiles, other_tiles] int32, [tiles, LOOPS] int32
    other_tiles, tiles_n,
    COLUMNS: tl.constexpr, SET_MODE: tl.constexpr, NUM_WORDS: tl.constexpr, BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
):
    tile = tl.program_id(0)
    row = entries + tile.to(tl.int64) * other_tiles
    written = tl.zeros([], tl.int32)
    for kind in tl.static_range(LOOPS):                     # uniform, excluding, column-, pair-masked in turn
        for first in range(0, other_tiles, CHUNK):
            others = first + tl.arange(0, CHUNK)
            valid = others < other_tiles
            this = tile + tl.zeros([CHUNK], tl.int32)
            if COLUMNS:
                loop, positive = tile_loop(summaries, tile_words, kept_end, pixel_tile_types, others, this, valid,
                                           tiles_n, SET_MODE, NUM_WORDS, BLOCK_M)
            else:
                loop, positive = tile_loop(summaries, tile_words, kept_end, pixel_tile_types, this, others, valid,
                                           tiles_n, SET_MODE, NUM_WORDS, BLOCK_M)
            chosen = (valid & (loop == kind)).to(tl.int32)
            tl.store(row + written + tl.cumsum(chosen, 0) - 1, others * 2 + positive, mask=chosen != 0)
            written += tl.sum(chosen, 0)
        tl.store(counts + tile * LOOPS + kind, written)


def launch_visit_plan(pixel_ranges: torch.Tensor, pixel_words: torch.Tensor, prototype_words: torch.Tensor,
                      kept_end: torch.Tensor, set_mode: bool, column_masked: bool, block_n: int, block_m: int):
    """pixel_ranges [n_pad, 5] int32, kept_end [tiles_m] int32 (+ words in set mode) -> (row_entries
    [tiles_n, tiles_m], row_counts [tiles_n, 4], col_entries [tiles_m, tiles_n], col_counts [tiles_m, 4]
    int32, pixel_tile_types [tiles_n] bool); entries past a row's count are undefined."""
    device = pixel_ranges.device
    tiles_n, tiles_m = pixel_ranges.shape[0] // block_n, kept_end.shape[0]
    num_words = pixel_words.shape[1]
    summaries = torch.empty(tiles_n, 10, dtype=torch.int32, device=device)
    tile_words = torch.empty((tiles_n + tiles_m, num_words, 2) if set_mode else (1,), dtype=torch.int64,
                             device=device)
    tile_types = torch.empty(tiles_n, dtype=torch.int8, device=device)
    tile_summary_kernel[(tiles_n + (tiles_m if set_mode else 0),)](
        pixel_ranges, pixel_words, prototype_words, kept_end, summaries, tile_words, tile_types, tiles_n,
        SET_MODE=set_mode, NUM_WORDS=num_words, COLUMN_MASKED=column_masked, BLOCK_N=block_n, BLOCK_M=block_m)
    lists = []
    for columns, tiles, others in ((False, tiles_n, tiles_m), (True, tiles_m, tiles_n)):
        entries = torch.empty(tiles, others, dtype=torch.int32, device=device)
        counts = torch.empty(tiles, LOOPS.value, dtype=torch.int32, device=device)
        visit_list_kernel[(tiles,)](summaries, tile_words, kept_end, tile_types, entries, counts, others,
                                    tiles_n, COLUMNS=columns, SET_MODE=set_mode, NUM_WORDS=num_words,
                                    BLOCK_M=block_m, CHUNK=CHUNK)
        lists += [entries, counts]
    return (*lists, tile_types.view(torch.bool))
