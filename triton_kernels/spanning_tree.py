"""Minimum spanning trees of the images' pixel grids on the device, rooted at
pixel 0 and ordered top-down, in five launches whatever the image size or the
tree's depth, with no host synchronisation (``edge_distance_kernel`` before
them turns features into the grid's edge distances).

1. ``boruvka_kernel`` (one program per image): Borůvka rounds until no
   component hooks. A round: every component's lightest outgoing edge by
   ``atomic_min`` on a 64-bit key (distance bits << 32 | edge index: ties
   broken by edge index, so the forest is unique and a round makes no cycle
   but the pair of components that pick the same edge, which the lower
   root keeps), hooking, pointer jumping until the labels are flat. At most
   log2(pixels) + 1 rounds. Stores: the tree's edges as flags [E].
2. ``euler_kernel`` (programs over arcs): the Euler tour of the tree as a
   successor list over the 4 arc slots of each pixel (right, down, left,
   up), each arc's successor the next tree arc, counter-clockwise, out of
   its head; the tour is cut where it returns to the root's first arc.
3. ``rank_kernel`` (one program per image): list ranking by pointer jumping,
   double-buffered, until every arc points at the end: each arc's distance
   to the end of the tour, i.e. its position in it.
4. ``parent_kernel`` (programs over pixels): a pixel's parent is the
   neighbour whose arc into it comes first in the tour; that arc's position
   is the pixel's preorder key; with the features, the edge's affinity.
5. ``order_kernel`` (one program per image): the pixels sorted by that key by
   compaction (a running prefix sum over the key slots): a depth-first
   preorder, a parent before its children.

Programs that loop over phases separate them with ``tl.debug_barrier`` (one
program, one thread block: its global writes are visible to all its
threads after the barrier). Workspace: int32 [B, 18n + E + 2n], int64 [B, n].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
NO_EDGE = 0x7FFFFFFFFFFFFFFF


@triton.jit
def edge_ends(edge, width, horizontal_edges):
    """Endpoints (u, v) of grid edges: horizontal edges row-major first, then vertical ones."""
    per_row = tl.maximum(width - 1, 1)
    is_horizontal = edge < horizontal_edges
    left = (edge // per_row) * width + edge % per_row
    top = edge - horizontal_edges
    first = tl.where(is_horizontal, left, top)
    second = tl.where(is_horizontal, left + 1, top + width)
    return first, second


@triton.jit
def arc(node, direction, width, height, horizontal_edges, in_tree, mask):
    """Does pixel ``node`` have a tree edge in ``direction`` (0 right, 1 down, 2 left, 3 up), and to
    which neighbour."""
    row = node // width
    col = node % width
    per_row = tl.maximum(width - 1, 1)
    if direction == 0:
        ok = col < width - 1
        edge = row * per_row + col
        neighbour = node + 1
    elif direction == 1:
        ok = row < height - 1
        edge = horizontal_edges + node
        neighbour = node + width
    elif direction == 2:
        ok = col > 0
        edge = row * per_row + col - 1
        neighbour = node - 1
    else:
        ok = row > 0
        edge = horizontal_edges + node - width
        neighbour = node - width
    ok = ok & mask
    flag = tl.load(in_tree + tl.where(ok, edge, 0), mask=ok, other=0)
    return ok & (flag != 0), neighbour


@triton.jit
def boruvka_kernel(distances, label, hook, best, in_tree, nodes, edges, width,
                   BLOCK: tl.constexpr, NO_EDGE: tl.constexpr):
    image = tl.program_id(0).to(tl.int64)
    distances += image * edges
    in_tree += image * edges
    label += image * nodes
    hook += image * nodes
    best += image * nodes
    horizontal_edges = (nodes // width) * (width - 1)
    lane = tl.arange(0, BLOCK)
    for start in range(0, nodes, BLOCK):
        tl.store(label + start + lane, start + lane, mask=start + lane < nodes)
    for start in range(0, edges, BLOCK):
        tl.store(in_tree + start + lane, 0, mask=start + lane < edges)
    tl.debug_barrier()
    hooked = tl.full((), 1, tl.int32)
    while hooked > 0:
        hooked = tl.full((), 0, tl.int32)
        for start in range(0, nodes, BLOCK):                  # every component: no edge yet
            tl.store(best + start + lane, tl.full([BLOCK], NO_EDGE, tl.int64), mask=start + lane < nodes)
        tl.debug_barrier()
        for start in range(0, edges, BLOCK):                  # each component's lightest outgoing edge
            edge = start + lane
            mask = edge < edges
            first, second = edge_ends(edge, width, horizontal_edges)
            a = tl.load(label + first, mask=mask, other=0)
            b = tl.load(label + second, mask=mask, other=0)
            bits = tl.load(distances + edge, mask=mask, other=0.0).to(tl.int32, bitcast=True)
            key = (bits.to(tl.int64) << 32) | edge.to(tl.int64)
            crossing = mask & (a != b)
            tl.atomic_min(best + a, key, mask=crossing)
            tl.atomic_min(best + b, key, mask=crossing)
        tl.debug_barrier()
        for start in range(0, nodes, BLOCK):                  # roots hook onto the other side
            node = start + lane
            mask = node < nodes
            key = tl.load(best + node, mask=mask, other=NO_EDGE)
            has = mask & (tl.load(label + node, mask=mask, other=-1) == node) & (key != NO_EDGE)
            edge = (key & 0xFFFFFFFF).to(tl.int32)
            first, second = edge_ends(tl.where(has, edge, 0), width, horizontal_edges)
            a = tl.load(label + first, mask=has, other=0)
            b = tl.load(label + second, mask=has, other=0)
            other = tl.where(a == node, b, a)
            mutual = tl.load(best + other, mask=has, other=NO_EDGE) == key
            hooks = has & ~(mutual & (node < other))          # of a pair on one edge, the lower root stays
            tl.store(hook + node, tl.where(hooks, other, node), mask=mask)
            tl.store(in_tree + edge, 1, mask=has)
            hooked += tl.sum(hooks.to(tl.int32), axis=0)
        tl.debug_barrier()
        changed = tl.full((), 1, tl.int32)
        while changed > 0:                                    # pointer jumping: every hook to its root
            changed = tl.full((), 0, tl.int32)
            for start in range(0, nodes, BLOCK):
                node = start + lane
                mask = node < nodes
                up = tl.load(hook + node, mask=mask, other=0)
                upper = tl.load(hook + up, mask=mask, other=0)
                tl.store(hook + node, upper, mask=mask)
                changed += tl.sum((mask & (upper != up)).to(tl.int32), axis=0)
            tl.debug_barrier()
        for start in range(0, nodes, BLOCK):                  # relabel: a label is a root, now flat
            node = start + lane
            mask = node < nodes
            root = tl.load(label + node, mask=mask, other=0)
            tl.store(label + node, tl.load(hook + root, mask=mask, other=0), mask=mask)
        tl.debug_barrier()


@triton.jit
def euler_kernel(in_tree, successor, rank, nodes, edges, width, BLOCK: tl.constexpr):
    image = tl.program_id(0).to(tl.int64)
    in_tree += image * edges
    successor += image * 4 * nodes
    rank += image * 4 * nodes
    height = nodes // width
    horizontal_edges = height * (width - 1)
    slot = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = slot < 4 * nodes
    tail = slot // 4
    direction = slot % 4
    zero = tl.zeros([BLOCK], tl.int32)
    # the arc itself: exists, and its head
    exists = mask & (zero != 0)
    head = tail
    for d in tl.static_range(4):
        ok, neighbour = arc(tail, d, width, height, horizontal_edges, in_tree, mask & (direction == d))
        exists = exists | ok
        head = tl.where(direction == d, neighbour, head)
    # successor: the first tree arc out of the head after the reverse arc, counter-clockwise
    back = (direction + 2) % 4
    nxt = slot
    for k in tl.static_range(4, 0, -1):
        turn = (back + k) % 4
        found = exists & (zero != 0)
        for d in tl.static_range(4):
            ok, _ = arc(head, d, width, height, horizontal_edges, in_tree, exists & (turn == d))
            found = found | ok
        nxt = tl.where(found, head * 4 + turn, nxt)
    # the tour starts with the root's first arc (right if it exists, else down); the arc that returns
    # to it ends the tour: it points at itself
    root_right, _ = arc(zero, 0, width, height, horizontal_edges, in_tree, zero == 0)
    start = tl.where(root_right, 0, 1)
    nxt = tl.where(exists & (nxt == start), slot, nxt)
    nxt = tl.where(exists, nxt, slot)
    tl.store(successor + slot, nxt, mask=mask)
    tl.store(rank + slot, (exists & (nxt != slot)).to(tl.int32), mask=mask)


@triton.jit
def rank_kernel(successor, rank, nodes, half, BLOCK: tl.constexpr):
    """successor / rank: [2, B, 4n], the halves read and written in turn (``half`` = B * 4n)."""
    image = tl.program_id(0).to(tl.int64)
    offset = image * 4 * nodes
    lane = tl.arange(0, BLOCK)
    changed = tl.full((), 1, tl.int32)
    read = tl.full((), 0, tl.int64)
    while changed > 0:
        changed = tl.full((), 0, tl.int32)
        write = half - read
        for start in range(0, 4 * nodes, BLOCK):
            slot = start + lane
            mask = slot < 4 * nodes
            nxt = tl.load(successor + read + offset + slot, mask=mask, other=0)
            distance = tl.load(rank + read + offset + slot, mask=mask, other=0) + \
                tl.load(rank + read + offset + nxt, mask=mask, other=0)
            further = tl.load(successor + read + offset + nxt, mask=mask, other=0)
            tl.store(successor + write + offset + slot, further, mask=mask)
            tl.store(rank + write + offset + slot, distance, mask=mask)
            changed += tl.sum((mask & (further != nxt)).to(tl.int32), axis=0)
        read = write
        tl.debug_barrier()
    if read != 0:                                             # the last round wrote the second half
        for start in range(0, 4 * nodes, BLOCK):
            slot = start + lane
            mask = slot < 4 * nodes
            tl.store(rank + offset + slot, tl.load(rank + half + offset + slot, mask=mask, other=0), mask=mask)


@triton.jit
def parent_kernel(in_tree, rank, parent, keyed, features, affinity, nodes, edges, width, channels, sigma,
                  HAS_FEATURES: tl.constexpr, BLOCK: tl.constexpr):
    image = tl.program_id(0).to(tl.int64)
    in_tree += image * edges
    rank += image * 4 * nodes
    parent += image * nodes
    keyed += image * 2 * nodes
    height = nodes // width
    horizontal_edges = height * (width - 1)
    node = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = node < nodes
    up = node
    key = tl.zeros([BLOCK], tl.int32)
    for d in tl.static_range(4):
        ok, neighbour = arc(node, d, width, height, horizontal_edges, in_tree, mask)
        # a larger distance to the end of the tour = earlier in it
        into = tl.load(rank + neighbour * 4 + (d + 2) % 4, mask=ok, other=0)
        out_of = tl.load(rank + node * 4 + d, mask=ok, other=0)
        is_parent = ok & (into > out_of)
        up = tl.where(is_parent, neighbour, up)
        key = tl.where(is_parent, 2 * nodes - 1 - into, key)      # 1 + the arc's position in the tour
    tl.store(parent + node, up.to(tl.int64), mask=mask)
    tl.store(keyed + key, node, mask=mask)                        # the root (key 0) first
    if HAS_FEATURES:                  # each pixel's edge affinity to its parent, exp(-|f - f_up| / sigma)
        features += image * channels * nodes
        gap = tl.zeros([BLOCK], tl.float32)
        for channel in range(channels):
            here = tl.load(features + channel * nodes + node, mask=mask, other=0.0).to(tl.float32)
            there = tl.load(features + channel * nodes + up, mask=mask, other=0.0).to(tl.float32)
            gap += (here - there) * (here - there)
        value = tl.where(up == node, 0.0, tl.exp(-tl.sqrt(gap) / sigma))
        tl.store(affinity + image * nodes + node, value, mask=mask)


@triton.jit
def edge_distance_kernel(features, valid, distances, nodes, edges, width, channels, cut,
                         BLOCK: tl.constexpr):
    """distances [B, E] float32: |f_u - f_v| over the channels of features [B, C, n], ``cut`` where an
    edge touches a pixel that is not valid ([B, n] bool)."""
    image = tl.program_id(0).to(tl.int64)
    features += image * channels * nodes
    valid += image * nodes
    edge = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = edge < edges
    first, second = edge_ends(edge, width, (nodes // width) * (width - 1))
    total = tl.zeros([BLOCK], tl.float32)
    for channel in range(channels):
        a = tl.load(features + channel * nodes + first, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(features + channel * nodes + second, mask=mask, other=0.0).to(tl.float32)
        total += (a - b) * (a - b)
    inside = (tl.load(valid + first, mask=mask, other=0) != 0) & (tl.load(valid + second, mask=mask, other=0) != 0)
    tl.store(distances + image * edges + edge, tl.where(inside, tl.sqrt(total), cut), mask=mask)


@triton.jit
def order_kernel(keyed, order, nodes, BLOCK: tl.constexpr):
    image = tl.program_id(0).to(tl.int64)
    keyed += image * 2 * nodes
    order += image * nodes
    lane = tl.arange(0, BLOCK)
    done = tl.full((), 0, tl.int32)
    for start in range(0, 2 * nodes, BLOCK):
        slot = start + lane
        node = tl.load(keyed + slot, mask=slot < 2 * nodes, other=-1)
        kept = node >= 0
        place = done + tl.cumsum(kept.to(tl.int32), axis=0) - 1
        tl.store(order + place, node.to(tl.int64), mask=kept)
        done += tl.sum(kept.to(tl.int32), axis=0)


def launch_edge_distances(features: torch.Tensor, valid: torch.Tensor, cut: float) -> torch.Tensor:
    """features [B, C, h, w] contiguous, valid [B, h, w] bool contiguous -> distances [B, E] float32."""
    batch, channels, height, width = features.shape
    nodes, edges = height * width, height * (width - 1) + (height - 1) * width
    distances = torch.empty(batch, edges, dtype=torch.float32, device=features.device)
    edge_distance_kernel[(batch, triton.cdiv(edges, BLOCK))](features, valid, distances, nodes, edges, width,
                                                             channels, cut, BLOCK=BLOCK, num_warps=4)
    return distances


def launch_spanning_forest(distances: torch.Tensor, height: int, width: int, features=None, sigma: float = 1.0):
    """distances [B, E] float32 contiguous, >= 0 -> (parent, order) [B, n] int64: each image's minimum
    spanning tree rooted at pixel 0 and a depth-first preorder of it; with features [B, C, h, w]
    contiguous also affinity [B, n] float32 of each pixel's edge to its parent (else None)."""
    batch = distances.shape[0]
    nodes, edges = height * width, distances.shape[1]
    device = distances.device
    label = torch.empty(batch, nodes, dtype=torch.int32, device=device)
    hook = torch.empty(batch, nodes, dtype=torch.int32, device=device)
    successor = torch.empty(2, batch, 4 * nodes, dtype=torch.int32, device=device)   # two halves, in turn
    rank = torch.empty(2, batch, 4 * nodes, dtype=torch.int32, device=device)
    in_tree = torch.empty(batch, edges, dtype=torch.int32, device=device)
    best = torch.empty(batch, nodes, dtype=torch.int64, device=device)
    keyed = torch.full((batch, 2 * nodes), -1, dtype=torch.int32, device=device)
    parent = torch.empty(batch, nodes, dtype=torch.int64, device=device)
    order = torch.empty(batch, nodes, dtype=torch.int64, device=device)
    affinity = torch.empty(batch, nodes, dtype=torch.float32, device=device) if features is not None else None
    boruvka_kernel[(batch,)](distances, label, hook, best, in_tree, nodes, edges, width,
                             BLOCK=BLOCK, NO_EDGE=NO_EDGE, num_warps=4)
    euler_kernel[(batch, triton.cdiv(4 * nodes, BLOCK))](in_tree, successor, rank, nodes, edges, width,
                                                         BLOCK=BLOCK, num_warps=4)
    rank_kernel[(batch,)](successor, rank, nodes, batch * 4 * nodes, BLOCK=BLOCK, num_warps=4)
    parent_kernel[(batch, triton.cdiv(nodes, BLOCK))](
        in_tree, rank, parent, keyed, features if features is not None else distances,
        affinity if affinity is not None else distances, nodes, edges, width,
        features.shape[1] if features is not None else 0, float(sigma),
        HAS_FEATURES=features is not None, BLOCK=BLOCK, num_warps=4)
    order_kernel[(batch,)](keyed, order, nodes, BLOCK=BLOCK, num_warps=4)
    return parent, order, affinity
