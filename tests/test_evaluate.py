"""Evaluation: mIoU arithmetic, the prototype bank, k-NN scores and sliding windows."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spml_fast.config import PRESETS, apply_overrides
from spml_fast.data import SegmentationDataset, read_list
from spml_fast.bank import PrototypeBank, labelled_segment_prototypes
from spml_fast.evaluate import confusion_matrix, miou
from spml_fast.inference import PredictorConfig, predict_scores
from spml_fast.synth import CLASSES, SynthConfig, write_dataset
from spml_fast.train import SpmlModel


def test_confusion_and_miou_by_hand():
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    prediction = np.array([[0, 1, 1, 1], [2, 0, 2, 1]])
    confusion = confusion_matrix(prediction, truth, 3)
    assert confusion.sum() == 7                                     # 255 ignored
    mean, per_class = miou(confusion)
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 3, FP 1 -> 3/4; class 2: TP 1, FN 1 -> 1/2
    assert per_class == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert mean == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    _, absent = miou(confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 2), int), 3))
    assert absent[1] is None and absent[2] is None                  # classes never seen are not averaged


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("evaldata"))
    write_dataset(root, SynthConfig(train_images=3, val_images=1, size=40), progress=False)
    config = apply_overrides(PRESETS["synthetic-scribble"], {"data_root": root, "model.width": 8,
                                                             "model.embedding_dim": 8, "kmeans_grid": 2})
    torch.manual_seed(0)
    return root, config, SpmlModel(config, len(CLASSES)).eval()


def test_bank_labels_are_majorities_of_labelled_pixels(tiny):
    root, config, model = tiny
    dataset = SegmentationDataset(read_list(root, "train_full.txt"), len(CLASSES), root, train=False)
    prototypes, labels = labelled_segment_prototypes(model, dataset, 2, 5, len(CLASSES), progress=False)
    assert prototypes.shape[0] == labels.shape[0] > 3
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(prototypes.shape[0]))
    present = set()
    for i in range(len(dataset)):
        present |= set(dataset[i]["label"].unique().tolist())
    assert set(labels.tolist()) <= present
    empty = SegmentationDataset(read_list(root, "train_tag.txt"), len(CLASSES), root, train=False)
    with pytest.raises(ValueError, match="no labelled pixels"):
        labelled_segment_prototypes(model, empty, 2, 5, len(CLASSES), progress=False)


def class_scores_of(model, image, head, settings):
    """image [3, H, W] -> scores [K, H, W] by the library's predictor."""
    return predict_scores(model, image[None], head, settings)[0]


def test_scores_and_sliding_window(tiny):
    root, config, model = tiny
    bank = PrototypeBank(F.normalize(torch.randn(30, 8), dim=1), torch.randint(0, len(CLASSES), (30,)), CLASSES)
    image = torch.randn(3, 40, 56)
    direct = class_scores_of(model, image, bank, PredictorConfig(k=5))
    assert direct.shape == (len(CLASSES), 40, 56)
    torch.testing.assert_close(direct.sum(0), torch.ones(40, 56))        # vote shares sum to 1
    whole = class_scores_of(model, image, bank, PredictorConfig(k=5, window=64))  # window larger than the image
    torch.testing.assert_close(whole, direct)
    windowed = class_scores_of(model, image, bank, PredictorConfig(k=5, window=24))
    assert windowed.shape == direct.shape and (windowed.sum(0) >= 1 - 1e-5).all()   # every pixel covered


def test_pce_model_scores_are_softmax(tiny):
    root, config, _ = tiny
    pce = SpmlModel(apply_overrides(config, {"objective.relations": 0.0, "objective.partial_ce": 1.0}),
                    len(CLASSES)).eval()
    scores = class_scores_of(pce, torch.randn(3, 32, 32), pce.classifier, PredictorConfig(method="classifier"))
    torch.testing.assert_close(scores.sum(0), torch.ones(32, 32))
