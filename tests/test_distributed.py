"""Two CPU processes on gloo: every rank contrasts against the prototypes of both ranks."""
import os
import socket

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from spml_fast import pixel_segment_loss
from spml_fast.relations import MemoryBank, RelationConfig, relation_losses
from spml_fast.segments import make_segments


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_batch(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    embeddings = F.normalize(torch.randn(1, 8, 6, 6, generator=gen), dim=1).requires_grad_()
    label = torch.randint(0, 3, (1, 24, 24), generator=gen)
    label[:, :, 12:] = 255
    overseg = (torch.arange(24)[None, :, None] // 6 * 4 + torch.arange(24)[None, None, :] // 6).clone()
    return embeddings, label, overseg, torch.ones(1, 24, 24, dtype=torch.bool), torch.tensor([[0b110]])


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        batches = [_rank_batch(r) for r in range(2)]
        segments = [make_segments(*b, num_classes=3, grid=2, iterations=2) for b in batches]
        mine, leaf = segments[rank], batches[rank][0]
        config = RelationConfig(weight_image=0.0, weight_cooccurrence=0.0, memory_bank=0)
        losses, _ = relation_losses(mine, MemoryBank(0), config, 3, torch.tensor([rank]))
        # expected: the C loss against rank 0's segments followed by rank 1's
        offset = 0 if rank == 0 else segments[0].prototypes.shape[0]
        everyone = torch.cat([s.prototypes.detach() for s in segments])
        labels = torch.cat([s.segment_label for s in segments])
        expected = pixel_segment_loss(mine.embeddings.detach(), everyone, mine.segment + offset, mine.pixel_label,
                                      labels, RelationConfig().kappa_semantic)
        losses["C"].backward()
        other_leaf = batches[1 - rank][0]
        results[rank] = (float(losses["C"]), float(expected), int(everyone.shape[0]),
                         float(leaf.grad.abs().sum()), other_leaf.grad is None)
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_contrasts_against_both_ranks():
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(_free_port(), results), nprocs=2, join=True, start_method="spawn")
    assert set(results.keys()) == {0, 1}
    sizes = {results[r][2] for r in range(2)}
    assert len(sizes) == 1
    for rank in range(2):
        got, expected, _, grad, other_untouched = results[rank]
        assert abs(got - expected) < 1e-5, (rank, got, expected)
        assert grad > 0                  # gradients reach this rank's pixels ...
        assert other_untouched           # ... and the other rank's copy gets none
