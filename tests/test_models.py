"""The embedding network and local pretrained weights."""
import pytest
import torch

from spml_fast.models import DilatedResNet, EmbeddingNet, ModelConfig, load_pretrained


@pytest.mark.parametrize("backbone", ["small", "resnet50"])
def test_embedding_shape_and_norm(backbone):
    model = EmbeddingNet(ModelConfig(backbone=backbone, embedding_dim=16)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 16, 16, 16)                              # stride 4
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 16, 16))


def test_resnet_output_stride_8_and_torchvision_names():
    net = DilatedResNet(50).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 8, 8)
    names = set(net.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer4.2.conv3.weight"} <= names


def test_load_pretrained_reports_keys(tmp_path):
    model = EmbeddingNet(ModelConfig(backbone="resnet50", embedding_dim=8))
    source = DilatedResNet(50)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["fc.weight"] = torch.zeros(10, 2048)
    del state["module.layer4.2.conv3.weight"]
    state["module.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "imagenet.pth")
    report = load_pretrained(model, str(tmp_path / "imagenet.pth"))
    assert report["missing"] == ["layer4.2.conv3.weight"] and report["unexpected"] == ["extra.weight"]
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)
    (tmp_path / "garbage.pth").write_bytes(b"nope")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_pretrained(model, str(tmp_path / "garbage.pth"))
