"""The visit plan of the Triton loss kernels: which (pixel tile, prototype
tile) pairs to compute, and with which loop. Built with device ops only:
no ``.item()``, ``nonzero``, ``unique`` or boolean indexing, every size known
from the inputs' shapes (a loss call never waits for the GPU, and a training
step can be captured in a CUDA graph).

Membership of a pair depends on the pixel's and the segment's *types*
(group and label, or group and class set) and on whether the segment is the
pixel's own. So the plan

1. sorts segments by (group, label) / (group, class set), the ones that
   cannot take part (unlabelled, single-label mode) last, and pixels by
   (group, label / class set, sorted position of the own segment), the
   non-participating ones last: a pixel's partners are then one contiguous
   range of sorted segments (its group), and in single-label mode so are its
   positives; the own segments of a pixel tile sit in one or two segment
   tiles;
2. places both orders in the kernels' padded rows ("slots"): each of the
   first ``ALIGNED_RUNS`` groups starts on a tile boundary (the rest of its
   last tile stays empty: zero rows, members of nothing), so that a tile
   rarely mixes two images. The padded lengths are bounds known from N and
   M; tiles past the data are empty and visit nothing;
3. classifies every tile pair from per-tile summaries of the pixels' ranges,
   never per pair:
   - UNIFORM: for every live pixel of the tile, every segment of the tile is
     a partner, and either all are positives or none is: the kernels'
     unmasked loop, no label loads (POSITIVE / NEGATIVE says which set);
   - EXCLUDING: uniform, but the tile holds a pixel's own segment or empty
     slots past the group's end: the same loop with one column test per pair
     (``column < partner_hi and column != own``), no label loads;
   - MASKED: a label boundary for these pixels, a group boundary, a pixel
     tile of several groups: membership per pair;
   - SKIP: no partner of any of the tile's pixels in the segment tile;
4. lists the visits of each pixel tile (forward, dE) and of each segment
   tile (dP) as rows of a dense [tiles, other tiles] int32 matrix, sorted
   UNIFORM, EXCLUDING, MASKED, the counts of each in ``[tiles, 3]``
   (entry = other tile x 2 + 1 if all pairs are positives).

Memory: O(N + M) for the orders, ranges and slots; 2 x tiles_n x tiles_m
int32 for the visit matrices (N = 2^20, M = 2^14 at 64 x 128 tiles: 8 MiB
each), plus the sorted, zero-padded copies of the embeddings and prototypes
that the kernels read without masks (``pixel_segment_triton``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SKIP, NEGATIVE, POSITIVE, MASKED = 0, 1, 2, 3            # tile kinds (tests and reports)
UNIFORM, EXCLUDING, MASKED_LOOP, NO_VISIT = 0, 1, 2, 3   # loops, in visit order
ALIGNED_RUNS = 256        # groups that start on a tile boundary (a bound on the padding: host-known sizes)
GROUP_SHIFT = 32          # single-label sort key: group << 32 | (label + 1)
NOT_KEPT = torch.iinfo(torch.int64).max
BIG = 2 ** 30


@dataclass
class ContrastPlan:
    """The visit plan (module docstring). Slots: rows of the kernels' padded orders."""

    block_n: int
    block_m: int
    pixel_slot: torch.Tensor            # [N] int64: slot of each pixel (non-participating ones too)
    prototype_slot: torch.Tensor        # [M] int64: slot of each segment
    live_pixels: torch.Tensor           # [n_pad] bool: the slot holds a participating pixel
    kept_prototypes: torch.Tensor       # [m_pad] bool: the slot holds a segment that can take part
    pixel_ranges: torch.Tensor          # [n_pad, 5] int32 slots: own (-1: none), partner range [lo, hi)
                                        # (the pixel's group), positive range [lo, hi) (single-label mode)
    pixel_words: torch.Tensor           # [n_pad, W] int64 class sets (set mode), else [1, 1]
    prototype_words: torch.Tensor       # [m_pad, W] int64 / [1, 1]
    row_entries: torch.Tensor           # [tiles_n, tiles_m] int32: prototype tile x 2 + positive, by loop
    row_counts: torch.Tensor            # [tiles_n, 3] int32: ends of the uniform, excluding, masked visits
    col_entries: torch.Tensor           # [tiles_m, tiles_n] int32: pixel tile x 2 + positive
    col_counts: torch.Tensor            # [tiles_m, 3] int32
    set_mode: bool
    num_pixels: int                     # N, M of the call (the dense sweep's size)
    num_prototypes: int

    @property
    def n_pad(self) -> int:
        return self.pixel_ranges.shape[0]

    @property
    def m_pad(self) -> int:
        return self.kept_prototypes.shape[0]

    @property
    def tiles_n(self) -> int:
        return self.row_entries.shape[0]

    @property
    def tiles_m(self) -> int:
        return self.row_entries.shape[1]

    @property
    def num_words(self) -> int:
        return self.pixel_words.shape[1]

    def describe(self) -> dict:
        """Tile-pair counts (reads the device: for reports and tests, never in the loss)."""
        counts = self.row_counts.long()
        uniform, excluding, masked = (int(counts[:, 0].sum()), int((counts[:, 1] - counts[:, 0]).sum()),
                                      int((counts[:, 2] - counts[:, 1]).sum()))
        dense = -(-self.num_pixels // self.block_n) * -(-self.num_prototypes // self.block_m)
        return dict(block_n=self.block_n, block_m=self.block_m, pixels=int(self.live_pixels.sum()),
                    prototypes=int(self.kept_prototypes.sum()), dense_tiles=dense, uniform_tiles=uniform,
                    excluding_tiles=excluding, masked_tiles=masked,
                    visited_fraction=(uniform + excluding + masked) / max(1, dense))

    def kinds(self) -> torch.Tensor:
        """[tiles_n, tiles_m] int64 SKIP / NEGATIVE / POSITIVE / MASKED, EXCLUDING tiles as their uniform
        kind (tests and reports; reads the device)."""
        kinds = torch.zeros(self.tiles_n, self.tiles_m, dtype=torch.int64)
        entries, counts = self.row_entries.cpu().long(), self.row_counts.cpu().long()
        for row in range(self.tiles_n):
            for visit in range(int(counts[row, 2])):
                entry = int(entries[row, visit])
                kinds[row, entry >> 1] = MASKED if visit >= counts[row, 1] else (POSITIVE if entry & 1 else NEGATIVE)
        return kinds


def aligned_runs(rows: int, block: int) -> int:
    """How many runs (groups) start on a tile boundary: at most one per tile of data, and ALIGNED_RUNS."""
    return min(-(-rows // block), ALIGNED_RUNS)


def padded_length(rows: int, block: int) -> int:
    """Slots for ``rows`` rows: every row, plus less than a tile of padding per aligned run."""
    return (-(-rows // block) + aligned_runs(rows, block)) * block


def build_plan(segment: torch.Tensor, pixel_labels: torch.Tensor, prototype_labels: torch.Tensor,
               pixel_groups: Optional[torch.Tensor], prototype_groups: Optional[torch.Tensor],
               block_n: int, block_m: int) -> ContrastPlan:
    """segment [N] int64; labels [N]/[M] int64 (single-label, -1 unlabelled; < 2^31) or [N, W]/[M, W]
    int64 class sets; groups [N]/[M] int64 in [0, 2^30) or None; tile sizes of the kernels."""
    device = segment.device
    set_mode = pixel_labels.dim() == 2
    num_pixels, num_prototypes = pixel_labels.shape[0], prototype_labels.shape[0]
    no_groups = pixel_groups is None

    # 1. Sort keys: one int64 (group << 32 | label + 1) in single-label mode, (group, words...) in set mode.
    if set_mode:
        pixel_live = torch.ones(num_pixels, dtype=torch.bool, device=device)
        prototype_kept = torch.ones(num_prototypes, dtype=torch.bool, device=device)
        pixel_group = pixel_labels.new_zeros(num_pixels) if no_groups else pixel_groups
        prototype_group = prototype_labels.new_zeros(num_prototypes) if no_groups else prototype_groups
        prototype_columns = [prototype_group, *prototype_labels.unbind(1)]
        pixel_columns = [pixel_group, *pixel_labels.unbind(1)]
    else:
        pixel_live, prototype_kept = pixel_labels >= 0, prototype_labels >= 0
        pixel_key = _single_key(pixel_labels, pixel_live, pixel_groups)
        prototype_key = _single_key(prototype_labels, prototype_kept, prototype_groups)
        prototype_columns, pixel_columns = [prototype_key], [pixel_key]
    prototype_order = _lexsort(prototype_columns)
    sorted_position = torch.empty_like(prototype_order)
    sorted_position[prototype_order] = torch.arange(num_prototypes, device=device)
    own_position = torch.where(prototype_kept[segment], sorted_position[segment], -1)
    pixel_order = _lexsort(pixel_columns + [own_position])

    # 2. Ranges in sorted segment positions, then slots.
    kept_sorted = prototype_kept[prototype_order]
    live_sorted = pixel_live[pixel_order]
    if set_mode:
        group_sorted = torch.where(kept_sorted, prototype_group[prototype_order], NOT_KEPT)
        pixel_group_sorted = pixel_group[pixel_order]
        positive_lo = positive_hi = torch.zeros_like(pixel_order)
    else:
        key_sorted = prototype_key[prototype_order]
        group_sorted = torch.where(kept_sorted, key_sorted >> GROUP_SHIFT, NOT_KEPT)
        pixel_key_sorted = pixel_key[pixel_order]
        pixel_group_sorted = pixel_key_sorted >> GROUP_SHIFT
        positive_lo = torch.searchsorted(key_sorted, pixel_key_sorted, right=False)
        positive_hi = torch.searchsorted(key_sorted, pixel_key_sorted, right=True)
    member_lo = torch.searchsorted(group_sorted, pixel_group_sorted, right=False)
    member_hi = torch.searchsorted(group_sorted, pixel_group_sorted, right=True)

    prototype_slot_sorted, m_pad = _slots(group_sorted, block_m)
    pixel_slot_sorted, n_pad = _slots(torch.where(live_sorted, pixel_group_sorted, NOT_KEPT), block_n)
    own_sorted = own_position[pixel_order]
    to_slot = torch.cat([prototype_slot_sorted, prototype_slot_sorted.new_zeros(1)])

    def slot_range(lo, hi):                                  # sorted [lo, hi) -> slots, empty -> (0, 0)
        empty = (hi <= lo) | ~live_sorted
        return (torch.where(empty, 0, to_slot[lo]), torch.where(empty, 0, to_slot[(hi - 1).clamp(min=0)] + 1))
    ranges_sorted = torch.stack([torch.where(live_sorted & (own_sorted >= 0), to_slot[own_sorted.clamp(min=0)], -1),
                                 *slot_range(member_lo, member_hi), *slot_range(positive_lo, positive_hi)], 1)
    pixel_ranges = _place(ranges_sorted.to(torch.int32), pixel_slot_sorted, n_pad, 0)
    live_pixels = _place(live_sorted, pixel_slot_sorted, n_pad, False)
    kept_prototypes = _place(kept_sorted, prototype_slot_sorted, m_pad, False)
    if set_mode:
        pixel_words = _place(pixel_labels[pixel_order], pixel_slot_sorted, n_pad, 0)
        prototype_words = _place(prototype_labels[prototype_order], prototype_slot_sorted, m_pad, 0)
    else:
        pixel_words = prototype_words = torch.zeros(1, 1, dtype=torch.int64, device=device)

    # 3-4. Tile loops and visit lists.
    loop, positive = _tile_loops(pixel_ranges, live_pixels, kept_prototypes, pixel_words, prototype_words,
                                 set_mode, block_n, block_m)
    row_entries, row_counts = _visit_lists(loop, positive)
    col_entries, col_counts = _visit_lists(loop.t(), positive.t())
    pixel_slot = torch.empty_like(pixel_order)
    pixel_slot[pixel_order] = pixel_slot_sorted
    prototype_slot = torch.empty_like(prototype_order)
    prototype_slot[prototype_order] = prototype_slot_sorted
    return ContrastPlan(block_n, block_m, pixel_slot, prototype_slot, live_pixels, kept_prototypes, pixel_ranges,
                        pixel_words, prototype_words, row_entries, row_counts, col_entries, col_counts, set_mode,
                        num_pixels, num_prototypes)


def _single_key(labels: torch.Tensor, kept: torch.Tensor, groups: Optional[torch.Tensor]) -> torch.Tensor:
    """[rows] int64 group << 32 | (label + 1); rows that cannot take part: NOT_KEPT (sorted last)."""
    key = labels + 1 if groups is None else (groups << GROUP_SHIFT) | (labels + 1)
    return torch.where(kept, key, NOT_KEPT)


def _lexsort(columns: list[torch.Tensor]) -> torch.Tensor:
    """Permutation sorting rows by ``columns`` (most significant first), ties in row order."""
    order = torch.argsort(columns[-1], stable=True)
    for column in reversed(columns[:-1]):
        order = order[torch.argsort(column[order], stable=True)]
    return order


def _slots(sorted_runs: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """sorted_runs [k] non-decreasing run keys -> (slot of each row [k] int64, padded length): each of
    the first ``ALIGNED_RUNS`` runs starts at a multiple of ``block``, later runs follow unpadded."""
    rows = sorted_runs.shape[0]
    index = torch.arange(rows, device=sorted_runs.device)
    starts = torch.ones_like(sorted_runs, dtype=torch.bool)
    starts[1:] = sorted_runs[1:] != sorted_runs[:-1]
    run = torch.cumsum(starts, 0) - 1                                       # run of each row
    run_start = torch.cummax(torch.where(starts, index, 0), 0).values       # its first row
    length = torch.zeros_like(index).index_add_(0, run, torch.ones_like(index))   # [rows]: runs <= rows
    padded = torch.where(index < aligned_runs(rows, block),
                         (length + block - 1) // block * block, length)
    base = torch.cumsum(padded, 0) - padded
    return base[run] + index - run_start, padded_length(rows, block)


def _place(values: torch.Tensor, slots: torch.Tensor, length: int, fill) -> torch.Tensor:
    """values [k, ...] at rows ``slots`` of a [length, ...] tensor filled with ``fill``."""
    out = values.new_full((length,) + tuple(values.shape[1:]), fill)
    out[slots] = values
    return out


def _tile_loops(pixel_ranges, live_pixels, kept_prototypes, pixel_words, prototype_words, set_mode: bool,
                block_n: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop of every tile pair ([tiles_n, tiles_m] int64: UNIFORM, EXCLUDING, MASKED_LOOP, NO_VISIT) and
    whether a uniform pair is all positives ([tiles_n, tiles_m] bool), from per-tile summaries of the live
    pixels' slot ranges. Conservative: a pair it cannot prove uniform is masked."""
    tiles_n, tiles_m = pixel_ranges.shape[0] // block_n, kept_prototypes.shape[0] // block_m
    live = live_pixels.view(tiles_n, block_n)
    ranges = pixel_ranges.view(tiles_n, block_n, 5).long()
    own, lo, hi, positive_lo, positive_hi = ranges.unbind(2)

    def low(values, where=live):                                 # min over the chosen rows of each tile
        return torch.where(where, values, BIG).amin(1)[:, None]

    def high(values, where=live):
        return torch.where(where, values, -BIG).amax(1)[:, None]
    start = (torch.arange(tiles_m, device=live.device) * block_m)[None, :]
    slot = torch.arange(kept_prototypes.shape[0], device=live.device)
    kept_end = torch.where(kept_prototypes, slot + 1, 0).view(tiles_m, block_m).amax(1)[None, :]
    kept_end = torch.maximum(kept_end, start)                    # end of the tile's kept segments
    visit = (low(lo) < kept_end) & (high(hi) > start)            # some live pixel has a partner in the tile
    partners = (high(lo) <= start) & (low(hi) >= kept_end)       # all its segments partners of all pixels
    if set_mode:
        pixel_any, pixel_all = _tile_bits(pixel_words, live, block_n)
        prototype_any, prototype_all = _tile_bits(prototype_words, kept_prototypes.view(tiles_m, block_m), block_m)
        all_positive = ((pixel_all[:, None, :] & prototype_all[None, :, :]) != 0).any(-1)
        all_negative = ((pixel_any[:, None, :] & prototype_any[None, :, :]) == 0).all(-1)
    else:
        has_positives = live & (positive_hi > positive_lo)
        all_positive = (high(positive_lo) <= start) & (low(positive_hi) >= kept_end)
        all_negative = (high(positive_hi, has_positives) <= start) | (low(positive_lo, has_positives) >= kept_end)
    uniform = visit & partners & (all_positive | all_negative)
    owns = live & (own >= 0)
    own_in_tile = (low(own, owns) < start + block_m) & (high(own, owns) >= start)
    plain = (kept_end == start + block_m) & ~own_in_tile
    loop = torch.where(uniform, torch.where(plain, UNIFORM, EXCLUDING), torch.where(visit, MASKED_LOOP, NO_VISIT))
    return loop, all_positive & uniform


def _tile_bits(words: torch.Tensor, rows_used: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of ``block`` rows: (OR, AND) of the used rows' class-set words, [tiles, W] int64 each
    (AND of no row: all ones, OR of no row: 0), from their bits."""
    tiles = rows_used.shape[0]
    shifts = torch.arange(64, device=words.device)
    bits = ((words.view(tiles, block, -1, 1) >> shifts) & 1).bool()         # [tiles, block, W, 64]
    used = rows_used[:, :, None, None]
    any_bits, all_bits = (bits & used).any(1), (bits | ~used).all(1)          # [tiles, W, 64]
    weights = torch.ones(64, dtype=torch.int64, device=words.device) << shifts   # bit 63 wraps to the sign
    return (any_bits.long() * weights).sum(-1), (all_bits.long() * weights).sum(-1)


def _visit_lists(loop: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's visits sorted by loop (uniform, excluding, masked; then by tile): ([rows, cols] int32
    entries = col x 2 + positive, [rows, 3] int32 ends of the three loops' visits)."""
    cols = loop.shape[1]
    entry = torch.arange(cols, device=loop.device)[None, :] * 2 + positive.long()
    ordered = torch.sort((loop * (2 * cols) + entry).to(torch.int32), dim=1).values
    ends = torch.stack([(loop <= kind).sum(1) for kind in (UNIFORM, EXCLUDING, MASKED_LOOP)], 1)
    return (ordered % (2 * cols)).contiguous(), ends.to(torch.int32).contiguous()
