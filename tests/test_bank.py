"""The prototype bank file (safetensors + JSON), the class-balanced cap, and adding a class."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from spml_fast.bank import PrototypeBank, add_class, load_bank, save_bank, subsample_balanced

NAMES = ["background", "cat", "dog"]


def make_bank(counts=(50, 10, 3), dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return PrototypeBank(F.normalize(torch.randn(labels.numel(), dim, generator=generator), dim=1), labels,
                         list(NAMES), {"preset": "test"})


def test_save_load_round_trip_with_metadata(tmp_path):
    bank = make_bank()
    path = str(tmp_path / "bank.safetensors")
    save_bank(bank, path)
    loaded = load_bank(path)
    assert torch.equal(loaded.prototypes, bank.prototypes) and torch.equal(loaded.labels, bank.labels)
    assert loaded.class_names == NAMES and loaded.metadata["preset"] == "test"
    sidecar = json.load(open(tmp_path / "bank.json"))
    assert sidecar["dim"] == 8 and sidecar["counts"] == [50, 10, 3] and len(sidecar["mean"]) == 3
    assert sidecar["stride"] == 4 and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_bank(str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors: not a prototype bank"):
        load_bank(str(bad))
    with pytest.raises(ValueError, match="labels must lie in"):
        PrototypeBank(torch.zeros(2, 4), torch.tensor([0, 5]), NAMES)


def test_cap_is_class_balanced():
    bank = make_bank(counts=(50, 10, 3))
    capped = subsample_balanced(bank, 21)
    assert capped.counts() == [9, 9, 3]                 # the small class keeps all; the rest share equally
    assert capped.metadata["subsampled_from"] == 63
    kept = {tuple(row.tolist()) for row in capped.prototypes}
    assert kept <= {tuple(row.tolist()) for row in bank.prototypes}
    assert subsample_balanced(bank, 100) is bank
    assert subsample_balanced(bank, 2).labels.numel() == 2
    with pytest.raises(ValueError, match="max-size"):
        subsample_balanced(bank, 0)


def test_add_class_appends_without_touching_the_rest():
    bank = make_bank()
    new = F.normalize(torch.randn(6, 8), dim=1)
    votes = torch.tensor([1, 1, 0, 1, 0, 0])
    extended = add_class(bank, "horse", new, votes)
    assert extended.class_names == NAMES + ["horse"]
    assert extended.counts() == [50, 10, 3, 3]
    assert torch.equal(extended.prototypes[:63], bank.prototypes)
    with pytest.raises(ValueError, match="already has"):
        add_class(bank, "cat", new, votes)
    with pytest.raises(ValueError, match="no segment"):
        add_class(bank, "horse", new, torch.zeros(6, dtype=torch.int64))


def test_cli_bank_cap_add_class_and_train_classifier(deploy_run, tmp_path):
    """`spml-fast bank --max-size`, `bank --add` from binary masks, `train-classifier`."""
    import subprocess
    import sys
    import numpy as np
    from PIL import Image
    data, run, _ = deploy_run
    cli = [sys.executable, "-m", "spml_fast"]
    capped = str(tmp_path / "capped.safetensors")
    done = subprocess.run(cli + ["bank", "--checkpoint", run, "--out", capped, "--max-size", "40"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert load_bank(capped).labels.numel() == 40
    # masks of one class (stripes = 1) as the "new" class: 1 = new, 0 = other
    os.makedirs(tmp_path / "masks")
    lines = []
    for line in open(os.path.join(data, "val.txt")).read().split("\n"):
        if not line.strip():
            continue
        image, label = line.split()[:2]
        mask = (np.asarray(Image.open(os.path.join(data, label))) == 1).astype(np.uint8)
        name = os.path.basename(label)
        Image.fromarray(mask).save(tmp_path / "masks" / name)
        lines.append(f"{os.path.join(data, image)} {tmp_path / 'masks' / name}")
    (tmp_path / "novel.txt").write_text("\n".join(lines) + "\n")
    added = str(tmp_path / "added.safetensors")
    done = subprocess.run(cli + ["bank", "--checkpoint", run, "--bank", capped, "--add", "novel", "--data", "/",
                                 "--list", str(tmp_path / "novel.txt"), "--out", added], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    extended = load_bank(added)
    assert extended.class_names[-1] == "novel" and extended.counts()[-1] > 0
    assert torch.equal(extended.prototypes[:40], load_bank(capped).prototypes)
    head = str(tmp_path / "head.safetensors")
    done = subprocess.run(cli + ["train-classifier", "--checkpoint", run, "--out", head, "--epochs", "50"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "training accuracy" in done.stdout and os.path.exists(head)
