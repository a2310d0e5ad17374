"""CAM pseudo-labels from image tags (tag supervision, docs/data.md, label maps)."""
import json
import os

import numpy as np
import torch
from PIL import Image

from spml_fast.cam import CamConfig, CamNet, cam_labels, tag_targets, write_cam_labels
from spml_fast.data import read_list, tags_to_words
from spml_fast.synth import CLASSES, SynthConfig, write_dataset


def test_tag_targets_read_the_bit_sets():
    words = torch.stack([torch.from_numpy(tags_to_words([1, 4], 6)), torch.from_numpy(tags_to_words([], 6))])
    torch.testing.assert_close(tag_targets(words, 6), torch.tensor([[1., 0, 0, 1, 0], [0, 0, 0, 0, 0]]))


def test_cam_labels_use_only_tagged_classes_and_the_threshold():
    torch.manual_seed(0)
    model = CamNet(6, width=8).eval()
    image = torch.randn(3, 40, 48)
    labels = cam_labels(model, image, torch.from_numpy(tags_to_words([2, 5], 6)), 6, threshold=0.2)
    assert labels.shape == (40, 48) and set(np.unique(labels)) <= {0, 2, 5}
    everything_background = cam_labels(model, image, torch.from_numpy(tags_to_words([2], 6)), 6, threshold=1.01)
    assert (everything_background == 0).all()          # no normalised CAM exceeds 1


def test_write_cam_labels_writes_a_list_file(tmp_path):
    root = str(tmp_path)
    write_dataset(root, SynthConfig(train_images=4, val_images=1, size=40), progress=False)
    info = write_cam_labels(root, "train_tag.txt", "train_cam.txt", len(CLASSES),
                            CamConfig(iterations=3, batch=2, width=8, crop=40), progress=False)
    assert info["images"] == 4
    tags = json.load(open(os.path.join(root, "tags.json")))
    for entry in read_list(root, "train_cam.txt"):
        label = np.asarray(Image.open(entry.label))
        assert label.shape == np.asarray(Image.open(entry.image)).shape[:2]
        assert set(np.unique(label).tolist()) <= {0, *tags[entry.key]}
