"""Triton kernels of spml_fast and their launch helpers (installed as
``spml_fast.triton_kernels``). Nothing here validates input: the public ops in
``spml_fast.ops`` do that before launching.

- ``pixel_segment_fwd``: per-pixel log-sum-exp over positive / negative segments
- ``pixel_segment_bwd``: dE (pixel tiles) and dP (segment tiles) by recomputation
- ``segment_sum``: per-segment sums and counts of embeddings
- ``nearest_prototype``: streaming top-k of cosine similarity
- ``utils``: the shared @triton.jit helpers and tile configurations
"""
