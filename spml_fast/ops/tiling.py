"""Tile configuration of the PyTorch (CPU) paths.

The tiled PyTorch path processes ``pixel_chunk`` pixels at a time against
all M prototypes. Its working set is a handful of [chunk, M] tensors, so
``chunk_bytes`` (the size of one [chunk, M] float32 tile) bounds it: with
the default 4 MiB and about 6 live tiles, under 32 MiB whatever N is.
Small tiles also stay in the CPU's L2/L3 cache, which is why the tiled path
is faster than the dense one and not just leaner.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    chunk_bytes: int = 4 << 20   # bytes of one [chunk, M] float32 tile
    min_chunk: int = 16          # never fewer pixels than this per chunk

    def pixel_chunk(self, num_pixels: int, num_prototypes: int) -> int:
        return max(1, min(num_pixels, max(self.min_chunk, self.chunk_bytes // (4 * num_prototypes))))


DEFAULT = TileConfig()
