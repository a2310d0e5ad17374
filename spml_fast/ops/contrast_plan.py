"""The visit plan of the Triton loss kernels: which (pixel tile, prototype
tile) pairs to compute, and with which loop. Built with device ops and two
small kernels (``triton_kernels.visit_plan``): no ``.item()``, ``nonzero``,
``unique`` or boolean indexing, every size known from the inputs' shapes (a
loss call never waits for the GPU; a training step can be captured in a
CUDA graph).

Membership of a pair depends on the pixel's and the segment's *types*
(group and label, or group and class set) and on whether the segment is the
pixel's own. So the plan

1. sorts segments by (group, label) / (group, class set), the unlabelled
   ones (single-label mode) last, and pixels by (group, label / class set,
   sorted position of the own segment), the unlabelled ones first: a pixel's
   partners are then one contiguous range of sorted segments (its group),
   in single-label mode so are its positives, and the own segments of a
   pixel tile sit in one or two segment tiles;
2. places the segments in the kernels' padded rows ("slots"): each group
   starts on a tile boundary (the rest of its last tile stays empty: zero
   rows, members of nothing), within a budget (``SEGMENT_PADDING``) of
   padding, so that a tile rarely mixes two images; every slot gets its
   segment's key (group << 32 | label + 1) for the kernels' column tests;
3. places the pixels likewise: each run of one type (group and label or
   class set) starts on a tile boundary, within ``PIXEL_PADDING`` (a
   quarter more tiles at most), the rest of its last tile repeating its last
   row (a zero row that takes no part): a pixel tile then holds one type, so
   that its masked tiles need a membership test per segment, not per pair;
4. classifies every tile pair from per-tile bounds of the pixels' ranges,
   never per pair (``triton_kernels.visit_plan.tile_loop``):
   - UNIFORM: for every pixel of the tile, every segment of the tile is a
     partner, and either all are positives or none is: the kernels'
     unmasked loop, no label loads;
   - EXCLUDING: uniform, but the tile holds a pixel's own segment or empty
     slots past its group: the same loop with one column test per pair;
   - COLUMN_MASKED: a label or group boundary, and the pixel tile holds one
     type: membership per segment (``pixel_tile_types``);
   - PAIR_MASKED: the same with several types in the pixel tile (a budget
     exhausted, or a configuration without the column loop): per pair;
   - NO_VISIT: no partner of any of the tile's pixels in the segment tile;
5. lists the visits of each pixel tile (forward, dE) and of each segment
   tile (dP) as rows of a dense [tiles, other tiles] int32 matrix, in loop
   order, with each loop's end in ``[tiles, LOOPS]``
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
import torch.nn.functional as F

SKIP, NEGATIVE, POSITIVE, MASKED = 0, 1, 2, 3            # tile kinds (tests and reports)
UNIFORM, EXCLUDING, COLUMN_MASKED, PAIR_MASKED, NO_VISIT = 0, 1, 2, 3, 4   # loops, in visit order
LOOPS = 4                 # visited loops: the visit counts' columns
# padding budgets that start runs on tile boundaries (tiles of data per tile of padding, most tiles):
SEGMENT_PADDING = (1, 256)   # segments: each group's run
PIXEL_PADDING = (4, 1024)    # pixels: each type's run (a pixel type pads half a tile on average)
GROUP_SHIFT = 32          # single-label sort key: group << 32 | (label + 1)
NOT_KEPT = torch.iinfo(torch.int64).max     # segments that cannot take part: sorted last, a group of their own
UNLABELLED = torch.iinfo(torch.int64).min   # pixels that do not take part: sorted first, in no segment's group
BIG = 2 ** 30             # slots stay below it (triton_kernels.visit_plan.BIG)
LAST_RUN = 2 ** 62        # a run key above every pixel's (keys < 2^62; exact as the float F.pad takes)


@dataclass
class ContrastPlan:
    """The visit plan (module docstring). Slots: rows of the kernels' padded orders; a pixel's slot is
    its sorted position."""

    block_n: int
    block_m: int
    pixel_order: torch.Tensor           # [N] int64: the pixel at each sorted position
    pixel_index: torch.Tensor           # [n_pad] int64: the participating pixel at each slot, else -1
    prototype_slot: torch.Tensor        # [M] int64: slot of each segment
    prototype_dropped: Optional[torch.Tensor]   # [M, 1] bool: the segment cannot take part (None: none)
    pixel_ranges: torch.Tensor          # [n_pad, 5] int32: own slot, partner range (first slot, width) (the
                                        # pixel's group), positive range (first slot, width) (single label)
    pixel_words: torch.Tensor           # [n_pad, W] int64 class sets (set mode), else [1, 1]
    prototype_words: torch.Tensor       # [m_pad, W] int64 / [1, 1]
    prototype_keys: torch.Tensor        # [m_pad] int64: group << 32 | label + 1 (set mode: group << 32);
                                        # empty slots and segments that cannot take part: NOT_KEPT
    row_entries: torch.Tensor           # [tiles_n, tiles_m] int32: prototype tile x 2 + positive, by loop
    row_counts: torch.Tensor            # [tiles_n, 4] int32: ends of the uniform, excluding, column-masked
                                        # and pair-masked visits
    col_entries: torch.Tensor           # [tiles_m, tiles_n] int32: pixel tile x 2 + positive
    col_counts: torch.Tensor            # [tiles_m, 4] int32
    pixel_tile_types: torch.Tensor      # [tiles_n] bool: the tile's masked visits take the column-masked loop
                                        # (every slot has the ranges and class set of its first, which has
                                        # partners)
    m_pad: int
    set_mode: bool

    @property
    def n_pad(self) -> int:
        return self.pixel_ranges.shape[0]

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
        counts = F.pad(self.row_counts.long(), (1, 0))
        uniform, excluding, column_masked, pair_masked = (int((counts[:, k + 1] - counts[:, k]).sum())
                                                          for k in range(LOOPS))
        num_pixels, num_prototypes = self.pixel_order.shape[0], self.prototype_slot.shape[0]
        dense = -(-num_pixels // self.block_n) * -(-num_prototypes // self.block_m)
        kept = num_prototypes - (0 if self.prototype_dropped is None else int(self.prototype_dropped.sum()))
        masked = column_masked + pair_masked
        return dict(block_n=self.block_n, block_m=self.block_m, pixels=int((self.pixel_index >= 0).sum()),
                    prototypes=kept, pixel_slots=self.n_pad, dense_tiles=dense, uniform_tiles=uniform,
                    excluding_tiles=excluding, masked_tiles=masked, column_masked_tiles=column_masked,
                    pair_masked_tiles=pair_masked, visited_fraction=(uniform + excluding + masked) / max(1, dense))

    def kinds(self) -> torch.Tensor:
        """[tiles_n, tiles_m] int64 SKIP / NEGATIVE / POSITIVE / MASKED (excluding tiles as their uniform
        kind), from the visit rows (tests and reports; reads the device)."""
        kinds = torch.zeros(self.tiles_n, self.tiles_m, dtype=torch.int64)
        entries, counts = self.row_entries.cpu().long(), self.row_counts.cpu().long()
        for row in range(self.tiles_n):
            for visit in range(int(counts[row, LOOPS - 1])):
                entry = int(entries[row, visit])
                kinds[row, entry >> 1] = MASKED if visit >= counts[row, 1] else (POSITIVE if entry & 1 else NEGATIVE)
        return kinds


def padded_slots(count: int, block: int, padding: tuple[int, int]) -> tuple[int, int]:
    """(slots, padding budget) for ``count`` rows in tiles of ``block``, ``padding`` = (tiles of data per
    tile of budget, most tiles of budget): every size from the shapes only."""
    per, most = padding
    tiles = -(-count // block)
    budget = min(-(-tiles // per), most) * block
    return tiles * block + budget, budget


def build_plan(segment: torch.Tensor, pixel_labels: torch.Tensor, prototype_labels: torch.Tensor,
               pixel_groups: Optional[torch.Tensor], prototype_groups: Optional[torch.Tensor],
               block_n: int, block_m: int, column_masked: bool = True) -> ContrastPlan:
    """segment [N] int64; labels [N]/[M] int64 (single-label, -1 unlabelled; < 2^31 - 1) or [N, W]/[M, W]
    int64 class sets; groups [N]/[M] int64 in [-2^30, 2^30) or None; tile sizes of the kernels;
    ``column_masked``: whether the kernels have the column-masked loop (``configs.ContrastConfig``)."""
    set_mode = pixel_labels.dim() == 2
    num_pixels, num_prototypes = pixel_labels.shape[0], prototype_labels.shape[0]
    n_pad, pixel_budget = padded_slots(num_pixels, block_n, PIXEL_PADDING)
    m_pad, budget = padded_slots(num_prototypes, block_m, SEGMENT_PADDING)

    # 1. Sort. Single-label: one int64 key per row; set mode: (group, words...) columns.
    if set_mode:
        prototype_dropped = None
        prototype_group = (torch.zeros_like(prototype_labels[:, 0]) if prototype_groups is None
                           else prototype_groups)
        prototype_order = _lexsort([prototype_group, *prototype_labels.unbind(1)])
    else:
        prototype_dropped = (prototype_labels < 0)[:, None]
        prototype_key = _single_key(prototype_labels, prototype_groups, NOT_KEPT)
        prototype_order = torch.argsort(prototype_key, stable=True)
    sorted_position = torch.argsort(prototype_order)                    # of each segment
    own_position = sorted_position[segment]
    if set_mode:
        pixel_group = torch.zeros_like(segment) if pixel_groups is None else pixel_groups
        pixel_order = _lexsort([pixel_group, *pixel_labels.unbind(1), own_position])
        group_sorted, pixel_group_sorted = prototype_group[prototype_order], pixel_group[pixel_order]
        key_sorted = group_sorted << GROUP_SHIFT
        pixel_words_sorted = pixel_labels[pixel_order]
        pixel_runs = _run_ids(torch.cat([pixel_group_sorted[:, None], pixel_words_sorted], 1))
    else:
        pixel_key = _single_key(pixel_labels, pixel_groups, UNLABELLED)   # sorted first, in no group
        pixel_order = _lexsort([pixel_key, own_position])
        key_sorted, pixel_key_sorted = prototype_key[prototype_order], pixel_key[pixel_order]
        group_sorted, pixel_group_sorted = key_sorted >> GROUP_SHIFT, pixel_key_sorted >> GROUP_SHIFT
        pixel_runs = pixel_key_sorted

    # 2. Slots of the sorted segments; ranges in slots: first slot and width.
    slot_sorted = _slots(group_sorted, block_m, budget)
    starts = F.pad(slot_sorted, (0, 1), value=m_pad)                    # [M + 1]: first slot of position k
    ends = F.pad(slot_sorted + 1, (1, 0))                               # [M + 1]: end slot of positions < k

    def slot_range(sorted_values, queries):              # segments whose sorted value equals the query
        first = starts[torch.searchsorted(sorted_values, queries)]
        return first, (ends[torch.searchsorted(sorted_values, queries, right=True)] - first).clamp_(min=0)
    lo, width = slot_range(group_sorted, pixel_group_sorted)
    positive_lo, positive_width = ((lo, torch.zeros_like(width)) if set_mode
                                   else slot_range(key_sorted, pixel_key_sorted))
    ranges = torch.stack([starts[own_position[pixel_order]], lo, width, positive_lo, positive_width], 1)
    pixel_index = pixel_order if set_mode else pixel_order.masked_fill(pixel_key_sorted == UNLABELLED, -1)
    # kept slots are a prefix of each tile: a tile's kept end is where its first non-kept slot would be
    kept_slots = slot_sorted if set_mode else slot_sorted.masked_fill(key_sorted == NOT_KEPT, BIG)
    tile_ends = torch.arange(block_m, m_pad + 1, block_m, device=segment.device)
    kept_end = ends[torch.searchsorted(kept_slots, tile_ends)].to(torch.int32)
    prototype_keys = torch.full((m_pad,), NOT_KEPT, dtype=torch.int64, device=segment.device)
    prototype_keys[slot_sorted] = key_sorted
    if set_mode:
        prototype_words = pixel_labels.new_zeros(m_pad, pixel_labels.shape[1])
        prototype_words[slot_sorted] = prototype_labels[prototype_order]
    else:
        prototype_words = torch.zeros(1, 1, dtype=torch.int64, device=segment.device)

    # 3. Slots of the sorted pixels: each run of one type starts on a tile boundary (within the budget); the
    # rest of its last tile repeats its last row (zero rows that take no part, pixel_index -1), so that the
    # tile holds one type and its masked tiles need a test per column only. A sentinel run after the last
    # one leaves the slots past its tile empty.
    slot = _slots(F.pad(pixel_runs, (0, 1), value=LAST_RUN), block_n, pixel_budget)     # [N + 1]
    # 1 + the sorted row each slot holds or repeats (slot[0] is 0): rows of the data padded by one
    # unused row in front and the sentinel (an empty range) behind
    source = torch.searchsorted(slot, torch.arange(n_pad, device=segment.device), right=True)
    pixel_ranges = F.pad(ranges, (0, 0, 1, 1))[source].to(torch.int32)
    pixel_index = torch.full((n_pad + 1,), -1, dtype=torch.int64, device=segment.device).index_put_(
        (slot[:-1],), pixel_index)[:n_pad]
    pixel_words = (F.pad(pixel_words_sorted, (0, 0, 1, 1))[source] if set_mode else prototype_words)

    # 4-5. Tile loops and visit lists (and which pixel tiles hold one type).
    lists = visit_lists(pixel_ranges, pixel_words, prototype_words, kept_end, set_mode, column_masked, block_n,
                        block_m)
    return ContrastPlan(block_n, block_m, pixel_order, pixel_index, slot_sorted[sorted_position], prototype_dropped,
                        pixel_ranges, pixel_words, prototype_words, prototype_keys, *lists, m_pad, set_mode)


def _run_ids(columns: torch.Tensor) -> torch.Tensor:
    """columns [rows, C] sorted rows -> [rows] int64 non-decreasing: the index of each row's run of equal
    rows."""
    return F.pad((columns[1:] != columns[:-1]).any(1).cumsum(0), (1, 0))


def _single_key(labels: torch.Tensor, groups: Optional[torch.Tensor], unlabelled: int) -> torch.Tensor:
    """[rows] int64 group << 32 | (label + 1) (as a sum: labels < 2^31 - 1); unlabelled rows (label < 0):
    ``unlabelled``."""
    key = labels + 1 if groups is None else (labels + 1).add_(groups, alpha=1 << GROUP_SHIFT)
    return key.masked_fill(labels < 0, unlabelled)


def _lexsort(columns: list[torch.Tensor]) -> torch.Tensor:
    """Permutation sorting rows by ``columns`` (most significant first), ties in row order."""
    order = torch.argsort(columns[-1], stable=True)
    for column in reversed(columns[:-1]):
        order = order[torch.argsort(column[order], stable=True)]
    return order


def _slots(sorted_runs: torch.Tensor, block: int, budget: int) -> torch.Tensor:
    """sorted_runs [k] non-decreasing run keys -> slot of each row [k] int64: after each run, padding up
    to the next multiple of ``block``, for the first runs whose padding fits in ``budget`` slots (the
    run across the budget is padded in part; later runs are not)."""
    index = torch.arange(sorted_runs.shape[0], device=sorted_runs.device)
    run_start = torch.searchsorted(sorted_runs, sorted_runs)
    run_end = torch.searchsorted(sorted_runs, sorted_runs, right=True)
    padding = (run_start - run_end) % block * (run_end == index + 1)       # at each run's last row
    return index + (torch.cumsum(padding, 0) - padding).clamp_(max=budget)


def _launchable(device: torch.device) -> bool:
    """The plan's kernels run on CUDA. On the CPU the same rule runs in PyTorch (``visit_lists_reference``):
    Triton's interpreter takes seconds per launch for these loop-heavy programs, so the loss tests use the
    PyTorch rule and ``tests/test_pixel_segment_loss_plan.py`` checks the kernels against it."""
    return device.type == "cuda"


def visit_lists(pixel_ranges, pixel_words, prototype_words, kept_end, set_mode: bool, column_masked: bool,
                block_n: int, block_m: int):
    """(row_entries, row_counts, col_entries, col_counts, pixel_tile_types): the plan's kernels on CUDA,
    else the same rule in PyTorch."""
    if _launchable(pixel_ranges.device):
        from spml_fast.triton_kernels.visit_plan import launch_visit_plan
        return launch_visit_plan(pixel_ranges, pixel_words, prototype_words, kept_end, set_mode, column_masked,
                                 block_n, block_m)
    return visit_lists_reference(pixel_ranges, pixel_words, prototype_words, kept_end, set_mode, column_masked,
                                 block_n, block_m)


def visit_lists_reference(pixel_ranges, pixel_words, prototype_words, kept_end, set_mode: bool,
                          column_masked: bool, block_n: int, block_m: int):
    """``triton_kernels.visit_plan``'s rule and lists in PyTorch (the same outputs; entries past a
    row's count are unspecified there, -1 here). Slots with an empty partner range take no part in the
    bounds."""
    tiles_n, tiles_m = pixel_ranges.shape[0] // block_n, kept_end.shape[0]
    rows = pixel_ranges.view(tiles_n, block_n, 5).long()
    own, lo, width, positive_lo, positive_width = rows.unbind(2)
    live = width > 0
    hi, positive_hi = lo + width, positive_lo + positive_width
    has_positives = live & (positive_width > 0)
    same = (rows[:, :, 1:] == rows[:, :1, 1:]).all(2)
    if set_mode:
        words = pixel_words.view(tiles_n, block_n, -1)
        same &= (words == words[:, :1]).all(2)
    pixel_tile_types = same.all(1) & live[:, 0] & column_masked

    def low(values, used=live):
        return torch.where(used, values, BIG).amin(1)[:, None]
    start = (torch.arange(tiles_m, device=rows.device) * block_m)[None, :]
    end = torch.maximum(kept_end.long()[None, :], start)
    visit = (low(lo) < end) & (low(-hi) < -start)
    partners = (low(-lo) >= -start) & (low(hi) >= end)
    if set_mode:
        pixel_or, pixel_and = _tile_words(pixel_words, live, block_n)
        kept = (torch.arange(prototype_words.shape[0], device=rows.device).view(tiles_m, block_m)
                < kept_end.long()[:, None])
        prototype_or, prototype_and = _tile_words(prototype_words, kept, block_m)
        all_positive = ((pixel_and[:, None, :] & prototype_and[None, :, :]) != 0).any(-1)
        all_negative = ((pixel_or[:, None, :] & prototype_or[None, :, :]) == 0).all(-1)
    else:
        all_positive = (low(-positive_lo) >= -start) & (low(positive_hi) >= end)
        all_negative = (low(-positive_hi, has_positives) >= -start) | (low(positive_lo, has_positives) >= end)
    uniform = visit & partners & (all_positive | all_negative)
    plain = (end == start + block_m) & ((low(own) >= start + block_m) | (low(-own) > -start))
    masked = torch.where(pixel_tile_types[:, None], COLUMN_MASKED, PAIR_MASKED)
    loop = torch.where(uniform, torch.where(plain, UNIFORM, EXCLUDING), torch.where(visit, masked, NO_VISIT))
    positive = (uniform & all_positive).long()
    lists = []
    for loops, flags in ((loop, positive), (loop.t(), positive.t())):
        others = loops.shape[1]
        entry = torch.arange(others, device=rows.device)[None, :] * 2 + flags
        ordered = torch.sort(loops * 2 * others + entry, dim=1).values
        entries = torch.where(ordered < 2 * others * NO_VISIT, ordered % (2 * others), -1)
        counts = torch.stack([(loops <= kind).sum(1) for kind in range(LOOPS)], 1)
        lists += [entries.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()]
    return (*lists, pixel_tile_types)


def _tile_words(words: torch.Tensor, used: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of ``block`` rows: (OR, AND) of the used rows' int64 class-set words, [tiles, W] each."""
    tiles = used.shape[0]
    shifts = torch.arange(64, device=words.device)
    bits = ((words.view(tiles, block, -1, 1) >> shifts) & 1).bool()         # [tiles, block, W, 64]
    used = used[:, :, None, None]
    weights = torch.ones(64, dtype=torch.int64, device=words.device) << shifts   # bit 63: the sign bit
    return (((bits & used).any(1).long() * weights).sum(-1), ((bits | ~used).all(1).long() * weights).sum(-1))
