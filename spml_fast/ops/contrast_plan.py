"""The visit plan of the Triton loss kernels: which (pixel tile, prototype
tile) pairs to compute, and how.

Membership of a pair depends only on the pixel's and the segment's *types*
(group and label, or group and class set) and on whether the segment is the
pixel's own. So the plan

1. compacts: keeps the participating pixels (labelled ones in single-label
   mode, all in set mode) and the segments that can take part (labelled
   ones in single-label mode, all in set mode);
2. sorts segments by (group, label) and pixels by (group, label, position
   of the own segment), so that runs of equal type fill whole tiles and the
   own segments of a pixel tile sit in one or two prototype tiles; each
   group starts a new tile (empty slots between groups, outside every
   pixel's partner range), so a tile never mixes two images;
3. classifies every tile pair from per-tile summaries, never per pair:
   SKIP (group ranges disjoint: relation I visits only its own image's
   segments), POSITIVE / NEGATIVE (both tiles of one type, full, no own
   segment: every pair in S+ or every pair in S-; the kernels' unmasked
   loop, no label loads), or MASKED (a label or group boundary, an own
   segment, or the ragged edge: the masked loop);
4. lists the visits per pixel tile (forward, dE) and per prototype tile
   (dP) in CSR form, uniform tiles first: entry = other tile x 2 + (1 if
   POSITIVE);
5. counts each pixel's positives and negatives other than its own segment in
   O(N + M) from type histograms (the kernels need no counter in the loop).

Memory: O(N + M) for the order and keys, O(tiles_n x tiles_m) int8/int32
for the tile kinds and the lists (N = 2^20, M = 2^14 at 64 x 128 tiles: 2 M
entries), plus the sorted, zero-padded copies of the embeddings and
prototypes that the kernels read without masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .membership import participating_pixels, row_ids

SKIP, NEGATIVE, POSITIVE, MASKED = 0, 1, 2, 3


@dataclass
class ContrastPlan:
    block_n: int
    block_m: int
    pixel_rows: torch.Tensor            # [n] int64: original pixel index of each compacted, sorted pixel
    pixel_slots: torch.Tensor           # [n] int64: its row in the kernels' padded order (``n_pad`` rows)
    prototype_rows: torch.Tensor        # [m] int64: original index of each kept, sorted segment
    prototype_slots: torch.Tensor       # [m] int64: its row in the padded order (``m_pad`` rows)
    pixel_key: torch.Tensor             # [n_pad] int32 class, or [n_pad, W] int32 class-set words
    prototype_key: torch.Tensor         # [m_pad] / [m_pad, W]
    pixel_ranges: torch.Tensor          # [n_pad, 5] int32 slots: own (-1: not kept), partner range [lo, hi)
                                        # (the pixel's group), positive range [lo, hi) (single-label mode)
    row_ptr: torch.Tensor               # [tiles_n + 1] int32
    row_split: torch.Tensor             # [tiles_n] int32: first masked entry of each row
    row_entries: torch.Tensor           # [visits] int32: prototype tile x 2 + positive
    col_ptr: torch.Tensor               # [tiles_m + 1] int32
    col_split: torch.Tensor             # [tiles_m] int32
    col_entries: torch.Tensor           # [visits] int32: pixel tile x 2 + positive
    positive_count: torch.Tensor        # [n] int64: positives other than the own segment
    negative_count: torch.Tensor        # [n] int64
    dense_tiles: int                    # tile pairs a dense sweep of the uncompacted N x M visits
    uniform_tiles: int
    masked_tiles: int

    @property
    def n_pad(self) -> int:
        return self.pixel_key.shape[0]

    @property
    def m_pad(self) -> int:
        return self.prototype_key.shape[0]

    @property
    def num_pixels(self) -> int:
        return self.pixel_rows.shape[0]

    @property
    def num_prototypes(self) -> int:
        return self.prototype_rows.shape[0]

    @property
    def num_words(self) -> int:
        return self.pixel_key.shape[1] if self.pixel_key.dim() == 2 else 1

    @property
    def set_mode(self) -> bool:
        return self.pixel_key.dim() == 2

    @property
    def visited_fraction(self) -> float:
        return (self.uniform_tiles + self.masked_tiles) / max(1, self.dense_tiles)

    def describe(self) -> dict:
        return dict(block_n=self.block_n, block_m=self.block_m, pixels=self.num_pixels,
                    prototypes=self.num_prototypes, dense_tiles=self.dense_tiles, uniform_tiles=self.uniform_tiles,
                    masked_tiles=self.masked_tiles, visited_fraction=self.visited_fraction)


def _words32(pixel_sets: torch.Tensor, prototype_sets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 class-set words [*, W] -> int32 halves [*, W32], keeping only the halves that are non-zero
    somewhere (VOC's 21 classes: one int32 word)."""
    def halves(words):
        low = (words & 0xFFFFFFFF).to(torch.int64)
        high = (words >> 32) & 0xFFFFFFFF
        return torch.stack([low, high], dim=2).reshape(words.shape[0], -1)
    pixel_halves, prototype_halves = halves(pixel_sets), halves(prototype_sets)
    used = (pixel_halves != 0).any(0) | (prototype_halves != 0).any(0)
    used[0] = True
    # int32 two's complement of the unsigned half
    def to_int32(half):
        return torch.where(half >= 2**31, half - 2**32, half).to(torch.int32)
    return to_int32(pixel_halves[:, used]).contiguous(), to_int32(prototype_halves[:, used]).contiguous()


def build_plan(segment: torch.Tensor, pixel_labels: torch.Tensor, prototype_labels: torch.Tensor,
               pixel_groups: Optional[torch.Tensor], prototype_groups: Optional[torch.Tensor],
               block_n: int, block_m: int) -> ContrastPlan:
    """segment [N] int64; labels [N]/[M] int64 (single-label, -1 unlabelled) or [N, W]/[M, W] int64 sets;
    groups [N]/[M] int64 or None; tile sizes of the kernels that will run the plan."""
    device = segment.device
    set_mode = pixel_labels.dim() == 2
    num_pixels, num_prototypes = pixel_labels.shape[0], prototype_labels.shape[0]
    pixels = participating_pixels(pixel_labels).nonzero()[:, 0]
    prototypes = (torch.arange(num_prototypes, device=device) if set_mode
                  else (prototype_labels >= 0).nonzero()[:, 0])
    n, m = pixels.shape[0], prototypes.shape[0]

    # Types in one id space for pixels and prototypes: (group, label) or (group, class set).
    zeros = torch.zeros(n + m, dtype=torch.int64, device=device)
    groups = zeros if pixel_groups is None else torch.cat([pixel_groups[pixels], prototype_groups[prototypes]])
    labels = torch.cat([pixel_labels[pixels], prototype_labels[prototypes]])
    label_key = row_ids(labels) if set_mode else labels
    types = row_ids(torch.stack([groups, label_key], 1))               # sorted by (group, label)
    prototype_type = types[n:]
    prototype_order = torch.argsort(prototype_type, stable=True)
    prototype_rows = prototypes[prototype_order]
    position = torch.full((num_prototypes,), -1, dtype=torch.int64, device=device)
    position[prototype_rows] = torch.arange(m, device=device)
    own = position[segment[pixels]]                                    # -1: own segment not kept
    pixel_order = torch.argsort(row_ids(torch.stack([types[:n], own], 1)), stable=True)
    pixel_rows = pixels[pixel_order]
    pixel_type, prototype_type = types[:n][pixel_order], prototype_type[prototype_order]
    own = own[pixel_order]
    pixel_group, prototype_group = groups[:n][pixel_order], groups[n:][prototype_order]

    if set_mode:
        pixel_key, prototype_key = _words32(pixel_labels[pixel_rows], prototype_labels[prototype_rows])
    else:
        pixel_key = pixel_labels[pixel_rows].to(torch.int32)
        prototype_key = prototype_labels[prototype_rows].to(torch.int32)
    positive_count, negative_count = _member_counts(pixel_type, prototype_type, pixel_group, prototype_group,
                                                    own, pixel_key, prototype_key, set_mode)
    ranges = _pixel_ranges(pixel_type, prototype_type, pixel_group, prototype_group, own, set_mode)

    # Rows of the kernels' padded order: each group starts at a tile boundary.
    pixel_slots, pixel_slot_group, n_pad = _group_slots(pixel_group, block_n)
    prototype_slots, prototype_slot_group, m_pad = _group_slots(prototype_group, block_m)
    to_slot = torch.cat([prototype_slots, prototype_slots.new_zeros(1)])     # compact position -> slot
    last = torch.cat([prototype_slots + 1, prototype_slots.new_zeros(1)])
    own_slot = torch.where(own >= 0, to_slot[own], -1)
    def slot_range(lo, hi):                                                   # compact [lo, hi) -> slots
        empty = hi <= lo
        return torch.where(empty, 0, to_slot[lo.clamp(max=m)]), torch.where(empty, 0, last[(hi - 1).clamp(min=0)])
    member = slot_range(ranges[:, 1], ranges[:, 2])
    positive = slot_range(ranges[:, 3], ranges[:, 4])
    slot_ranges = torch.stack([own_slot, *member, *positive], 1).to(torch.int32)

    kinds = _tile_kinds(_scatter(pixel_type, pixel_slots, n_pad, -1), _scatter(prototype_type, prototype_slots, m_pad, -1),
                        pixel_slot_group, prototype_slot_group,
                        _scatter(own_slot, pixel_slots, n_pad, -1), _scatter(pixel_key, pixel_slots, n_pad, 0),
                        _scatter(prototype_key, prototype_slots, m_pad, 0), set_mode, block_n, block_m)
    row_ptr, row_split, row_entries = _visit_lists(kinds)
    col_ptr, col_split, col_entries = _visit_lists(kinds.t())
    dense = ((num_pixels + block_n - 1) // block_n) * ((num_prototypes + block_m - 1) // block_m)
    return ContrastPlan(
        block_n, block_m, pixel_rows, pixel_slots, prototype_rows, prototype_slots,
        _scatter(pixel_key, pixel_slots, n_pad, 0), _scatter(prototype_key, prototype_slots, m_pad, 0),
        _scatter(slot_ranges, pixel_slots, n_pad, 0),
        row_ptr, row_split, row_entries, col_ptr, col_split, col_entries, positive_count, negative_count, dense,
        int(((kinds == POSITIVE) | (kinds == NEGATIVE)).sum()), int((kinds == MASKED).sum()))


def _scatter(values: torch.Tensor, slots: torch.Tensor, length: int, fill) -> torch.Tensor:
    """values [k, ...] placed at rows ``slots`` of a [length, ...] array filled with ``fill``."""
    out = values.new_full((length,) + tuple(values.shape[1:]), fill)
    out[slots] = values
    return out.contiguous()


def _group_slots(sorted_groups: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """sorted_groups [k] non-decreasing -> (slot of each row [k], group of every slot [length], length):
    each group starts at a multiple of ``block``; the rest of its last tile is empty slots."""
    if sorted_groups.numel() == 0:
        return sorted_groups.new_zeros(0), sorted_groups.new_zeros(0), 0
    values, counts = torch.unique_consecutive(sorted_groups, return_counts=True)
    padded = (counts + block - 1) // block * block
    starts = torch.cumsum(padded, 0) - padded
    index = torch.repeat_interleave(torch.arange(values.shape[0], device=sorted_groups.device), counts)
    rank = torch.arange(sorted_groups.shape[0], device=sorted_groups.device) - (torch.cumsum(counts, 0) - counts)[index]
    return starts[index] + rank, torch.repeat_interleave(values, padded), int(padded.sum())


def _pixel_ranges(pixel_type, prototype_type, pixel_group, prototype_group, own, set_mode: bool) -> torch.Tensor:
    """[n, 5] int32 rows (own, partner lo, partner hi, positive lo, positive hi) in sorted segment
    positions: segments are sorted by (group, label), so a group and a type are each one range."""
    member_lo = torch.searchsorted(prototype_group, pixel_group, right=False)
    member_hi = torch.searchsorted(prototype_group, pixel_group, right=True)
    if set_mode:
        positive_lo = positive_hi = torch.zeros_like(member_lo)
    else:
        positive_lo = torch.searchsorted(prototype_type, pixel_type, right=False)
        positive_hi = torch.searchsorted(prototype_type, pixel_type, right=True)
    return torch.stack([own, member_lo, member_hi, positive_lo, positive_hi], 1).to(torch.int32)


def _tile_kinds(slot_type, prototype_slot_type, slot_group, prototype_slot_group, own_slot, pixel_key,
                prototype_key, set_mode: bool, block_n: int, block_m: int) -> torch.Tensor:
    """[tiles_n, tiles_m] int8 of SKIP / NEGATIVE / POSITIVE / MASKED over the padded orders (types -1 at
    empty slots; groups of every slot, empty ones included)."""
    tiles_n, tiles_m = slot_type.shape[0] // block_n, prototype_slot_type.shape[0] // block_m
    if tiles_n == 0 or tiles_m == 0:
        return torch.zeros(tiles_n, tiles_m, dtype=torch.int8, device=slot_type.device)
    pixel_tiles, prototype_tiles = slot_type.view(tiles_n, block_n), prototype_slot_type.view(tiles_m, block_m)
    # one type, no empty slot (type -1): uniform candidates
    uniform = ((pixel_tiles.amin(1) == pixel_tiles.amax(1)) & (pixel_tiles.amin(1) >= 0))[:, None] & \
              ((prototype_tiles.amin(1) == prototype_tiles.amax(1)) & (prototype_tiles.amin(1) >= 0))[None, :]
    big = torch.iinfo(torch.int64).max
    own_tiles = own_slot.view(tiles_n, block_n)
    own_lo = torch.where(own_tiles >= 0, own_tiles, big).amin(1)
    own_hi = own_tiles.amax(1)                                   # -1 (not kept) never raises the maximum
    starts = torch.arange(tiles_m, device=slot_type.device) * block_m
    own_hit = (own_lo[:, None] < (starts + block_m)[None, :]) & (own_hi[:, None] >= starts[None, :])
    first_pixel = torch.arange(tiles_n, device=slot_type.device) * block_n
    if set_mode:   # uniform tiles: the relation of the tiles' first rows is the relation of every pair
        same = ((pixel_key[first_pixel][:, None, :] & prototype_key[starts][None, :, :]) != 0).any(-1)
    else:
        same = pixel_key[first_pixel][:, None] == prototype_key[starts][None, :]
    kinds = torch.where(same, POSITIVE, NEGATIVE)
    kinds = torch.where(uniform & ~own_hit, kinds, MASKED)
    # a tile holds one group (groups start at tile boundaries): other groups' tiles are skipped
    same_group = slot_group[first_pixel][:, None] == prototype_slot_group[starts][None, :]
    return torch.where(same_group, kinds, SKIP).to(torch.int8)


def _visit_lists(kinds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of the visits of each row of ``kinds``: uniform tiles first, then masked; int32."""
    rows = kinds.shape[0]
    uniform = (kinds == POSITIVE) | (kinds == NEGATIVE)
    masked = kinds == MASKED
    uniform_pairs, masked_pairs = uniform.nonzero(), masked.nonzero()            # row-major: sorted by row
    uniform_values = uniform_pairs[:, 1] * 2 + (kinds[uniform_pairs[:, 0], uniform_pairs[:, 1]] == POSITIVE).long()
    pairs_row = torch.cat([uniform_pairs[:, 0], masked_pairs[:, 0]])
    values = torch.cat([uniform_values, masked_pairs[:, 1] * 2])
    order = torch.argsort(pairs_row, stable=True)                                # uniform before masked per row
    uniform_count = uniform.sum(1)
    counts = uniform_count + masked.sum(1)
    ptr = torch.zeros(rows + 1, dtype=torch.int64, device=kinds.device)
    ptr[1:] = torch.cumsum(counts, 0)
    return ptr.to(torch.int32), (ptr[:-1] + uniform_count).to(torch.int32), values[order].to(torch.int32).contiguous()


def _member_counts(pixel_type, prototype_type, pixel_group, prototype_group, own, pixel_key, prototype_key,
                   set_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives and negatives of each sorted pixel other than its own segment, [n] int64 each, in
    O(n + m + types^2 / set mode) from histograms of the segments' types."""
    n = pixel_type.shape[0]
    device = pixel_type.device
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty
    types = int(max(int(pixel_type.max()), int(prototype_type.max()) if prototype_type.numel() else 0)) + 1
    per_type = torch.bincount(prototype_type, minlength=types)                       # segments per type
    group_ids = torch.unique(torch.cat([pixel_group, prototype_group]), return_inverse=True)[1]
    pixel_gid, proto_gid = group_ids[:n], group_ids[n:]
    per_group = torch.bincount(proto_gid, minlength=int(group_ids.max()) + 1 if group_ids.numel() else 1)
    kept_own = own >= 0
    own_clamped = own.clamp(min=0)
    own_same_group = kept_own & (proto_gid[own_clamped] == pixel_gid) if prototype_type.numel() else kept_own
    if not set_mode:
        positive = per_type[pixel_type]
        own_positive = own_same_group & (prototype_type[own_clamped] == pixel_type) if prototype_type.numel() \
            else kept_own
    else:
        # types of one group whose class sets intersect: a [types, types] relation, typically tiny
        type_first = torch.full((types,), -1, dtype=torch.int64, device=device)
        keys = torch.cat([pixel_key, prototype_key])
        all_types = torch.cat([pixel_type, prototype_type])
        type_first[all_types] = torch.arange(all_types.shape[0], device=device)
        type_words = keys[type_first.clamp(min=0)]
        type_group = torch.cat([pixel_gid, proto_gid])[type_first.clamp(min=0)]
        intersect = ((type_words[:, None, :] & type_words[None, :, :]) != 0).any(-1)
        intersect &= type_group[:, None] == type_group[None, :]
        positive = (intersect.long() @ per_type)[pixel_type]
        own_positive = own_same_group & intersect[pixel_type, prototype_type[own_clamped]] \
            if prototype_type.numel() else kept_own
    negative = per_group[pixel_gid] - positive
    own_negative = own_same_group & ~own_positive
    return positive - own_positive.long(), negative - own_negative.long()
