"""Segments of a batch and the four relations."""
import torch
import torch.nn.functional as F

from spml_fast.relations import MemoryBank, RelationConfig, affinity_sets, relation_losses
from spml_fast.segments import make_segments, pool_labels


def batch(seed=0, batch_size=2, size=32, dim=8, classes=4):
    gen = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(batch_size, dim, size // 4, size // 4, generator=gen), dim=1)
    label = torch.full((batch_size, size, size), 255)
    label[:, 4:8, 4:20] = 1
    label[:, 20:24, 4:20] = 2
    label[:, 12:14, 24:30] = 0
    overseg = (torch.arange(size)[None, :, None] // 8 * 4 + torch.arange(size)[None, None, :] // 8).expand(
        batch_size, -1, -1).clone()
    valid = torch.ones(batch_size, size, size, dtype=torch.bool)
    valid[:, :, -4:] = False
    overseg[~valid] = -1
    tags = torch.tensor([[0b110], [0b1000]])[:batch_size]      # disjoint tag sets: relation O has negatives
    return embeddings.requires_grad_(), label, overseg, valid, tags


def test_pool_labels_keeps_thin_strokes():
    label = torch.full((1, 16, 16), 255)
    label[0, 5, :] = 3                              # a 1-pixel stroke, missed by nearest sampling at stride 4
    pooled = pool_labels(label, (4, 4), 5)
    assert (pooled[0, 1] == 3).all() and (pooled[0, [0, 2, 3]] == 255).all()


def test_segments_never_mix_images_labels_or_regions():
    embeddings, label, overseg, valid, tags = batch()
    segments = make_segments(embeddings, label, overseg, valid, tags, num_classes=4, grid=2, iterations=3)
    seg = segments.segment
    for pixel_attr, segment_attr in ((segments.pixel_image, segments.segment_image),
                                     (segments.pixel_label, segments.segment_label),
                                     (segments.pixel_region, segments.segment_region)):
        assert torch.equal(pixel_attr, segment_attr[seg])
    assert segments.embeddings.shape[0] == 2 * 8 * 7            # padding columns left out
    torch.testing.assert_close(segments.prototypes.norm(dim=1), torch.ones(segments.prototypes.shape[0]))
    assert set(segments.pixel_label.unique().tolist()) == {-1, 0, 1, 2}


def test_relations_and_memory_bank():
    embeddings, label, overseg, valid, tags = batch()
    segments = make_segments(embeddings, label, overseg, valid, tags, num_classes=4, grid=2, iterations=3)
    config = RelationConfig(weight_affinity=0.5, memory_bank=2)
    bank = MemoryBank(config.memory_bank)
    losses, local = relation_losses(segments, bank, config, 4, torch.arange(2))
    assert set(losses) == {"I", "C", "O", "A"} and all(torch.isfinite(v) and v >= 0 for v in losses.values())
    assert losses["I"] > 0 and losses["C"] > 0 and losses["O"] > 0
    sum(config.weights()[name] * value for name, value in losses.items()).backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    for step in range(3):
        bank.push(local)
    assert len(bank.segments()) == 2
    # the bank joins C: a bank with other prototypes changes the loss
    losses_with_bank, _ = relation_losses(segments, bank, config, 4, torch.arange(2) + 10)
    assert float(losses_with_bank["C"].detach()) != float(losses["C"].detach())
    restored = MemoryBank(2)
    restored.load_state_dict(bank.state_dict())
    assert all(torch.equal(a.prototypes, b.prototypes) for a, b in zip(restored.segments(), bank.segments()))


def test_affinity_sets():
    prototypes = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [1.0, 0.0]]), dim=1)
    label = torch.tensor([2, -1, -1, 1])
    image = torch.tensor([0, 0, 0, 1])
    sets = affinity_sets(prototypes, label, image, num_classes=4, threshold=0.95, topk=1)
    assert sets[1, 0] == 1 << 2                      # most similar labelled segment of its image: class 2
    assert sets[2, 0] == 0b1111                      # none similar enough: all classes
    assert sets[3, 0] == 1 << 1                      # itself


def test_each_relation_is_the_dense_loss_with_its_labels_groups_and_concentration():
    """Relation I contrasts over-segmentation regions within each image (groups = images), C labelled
    segments of the batch and the memory bank, O image tag sets, A the affinity sets; each with its own
    kappa. Removing I's groups, or swapping a relation's labels or kappa, must change the value."""
    from spml_fast.ops.reference import pixel_segment_loss_dense
    from spml_fast.relations import BankSegments
    embeddings, label, overseg, valid, tags = batch()
    segments = make_segments(embeddings, label, overseg, valid, tags, num_classes=4, grid=2, iterations=3)
    config = RelationConfig(kappa_image=16.0, kappa_semantic=6.0, kappa_cooccurrence=12.0, weight_affinity=0.5,
                            kappa_affinity=9.0, memory_bank=2)
    bank = MemoryBank(2)
    _, local = relation_losses(segments, bank, config, 4, torch.arange(2))
    bank.push(BankSegments(F.normalize(torch.randn_like(local.prototypes), dim=1), local.label, local.tags,
                           local.image + 100))
    losses, _ = relation_losses(segments, bank, config, 4, torch.arange(2) + 2)
    e, p, seg = segments.embeddings, segments.prototypes, segments.segment
    everyone = torch.cat([p, bank.segments()[0].prototypes])
    expected_i = pixel_segment_loss_dense(e, p, seg, segments.pixel_region, segments.segment_region, 16.0,
                                          segments.pixel_image, segments.segment_image)
    labels_all = torch.cat([segments.segment_label, bank.segments()[0].label])
    tags_all = torch.cat([segments.segment_tags, bank.segments()[0].tags])
    expected_c = pixel_segment_loss_dense(e, everyone, seg, segments.pixel_label, labels_all, 6.0)
    expected_o = pixel_segment_loss_dense(e, everyone, seg, segments.pixel_tags, tags_all, 12.0)
    images_all = torch.cat([segments.segment_image + 2, bank.segments()[0].image])
    sets = affinity_sets(everyone, labels_all, images_all, 4, config.affinity_threshold, config.affinity_topk)
    expected_a = pixel_segment_loss_dense(e, everyone, seg, sets[seg], sets, 9.0)
    for name, expected in (("I", expected_i), ("C", expected_c), ("O", expected_o), ("A", expected_a)):
        torch.testing.assert_close(losses[name], expected, rtol=1e-5, atol=1e-6, msg=f"relation {name}")
    # the test can fail: each wiring mistake gives another value
    without_groups = pixel_segment_loss_dense(e, p, seg, segments.pixel_region, segments.segment_region, 16.0)
    wrong_kappa = pixel_segment_loss_dense(e, everyone, seg, segments.pixel_label, labels_all, 12.0)
    without_bank = pixel_segment_loss_dense(e, p, seg, segments.pixel_label, segments.segment_label, 6.0)
    assert abs(float(without_groups) - float(expected_i.detach())) > 1e-3
    assert abs(float(wrong_kappa.detach()) - float(expected_c.detach())) > 1e-3
    assert abs(float(without_bank.detach()) - float(expected_c.detach())) > 1e-4
