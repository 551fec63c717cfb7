"""Tests for fastai_groups.body: create_body on every torchvision classifier, timm families, fastai's xresnets and
user modules; cut, n_in, feature shapes on meta."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import googlenet, resnet18, vit_b_16

from fastai_groups.body import AUX_ATTRS, ForwardBody, TimmBody, create_body, feature_shape
from fastai_groups.head import cnn_model
from fastai_groups.arch import instantiate
from fastai_groups.structure import find_structure
from models import n_params, timm_smallest


TORCHVISION = torchvision.models.list_models(module=torchvision.models)


def ids(ps) -> set:
    return {id(p) for p in (ps.parameters() if isinstance(ps, nn.Module) else ps)}


def leaves_reached(out: torch.Tensor) -> set:
    "ids of the leaf tensors the autograd graph of `out` reaches (works on meta tensors: no backward run)."
    stack, seen, found = [out.grad_fn], {}, set()    # nodes kept alive: their ids are never reused while walking
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen[id(fn)] = fn
        if getattr(fn, "variable", None) is not None:
            found.add(id(fn.variable))
        stack += [f for f, _ in fn.next_functions]
    return found


def head_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    "What the model's own classifier receives (input of the first head module find_structure reports)."
    st = find_structure(model)
    first = next(u for u in st.head if u.executed)
    got = []
    h = first.module.register_forward_pre_hook(lambda m, a: got.append(a[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return got[0]


# ---------------------------------------------------------------------------------------------------------------
# Every torchvision classifier (meta device: structure, parameters and a forward pass of the whole model)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TORCHVISION)
def test_every_torchvision_model(name):
    model = instantiate(name)  # meta device: no memory, no init cost
    st = find_structure(model)
    head_params = [p for u in st.head for p in u.params]
    aux = [p for a in AUX_ATTRS if getattr(model, a, None) is not None for p in getattr(model, a).parameters()]
    total = n_params(model)
    m = cnn_model(model, 5)
    body, head = m
    # no classifier (or auxiliary classifier) parameter in the body, nothing else missing
    assert not ids(body) & ids(head_params)
    assert not ids(body) & ids(aux)
    assert ids(body) <= ids(model)
    removed = {id(p): p for p in head_params + aux}.values()  # find_structure may count aux in the head
    assert n_params(body) == total - n_params(removed)
    assert n_params(body) + n_params(head) == n_params(m)
    # the model given is untouched
    for u in st.head:
        assert model.get_submodule(u.name) is u.module
    # a forward pass: (B, n_out), every body parameter reaches the output
    m.to("meta").eval()
    x = torch.empty(2, 3, 224, 224, device="meta")
    feats = body(x)
    assert feats.ndim == 4
    if not name.startswith("vit"):  # a real feature map, not a pooled vector
        assert feats.shape[2] * feats.shape[3] > 1, feats.shape
    out = m(x)
    assert out.shape == (2, 5)
    assert ids(body) <= leaves_reached(out)


def test_fastai_failures_are_handled():
    "fastai crashes on these, and cuts shufflenet_v2 to its first conv; the bodies here are the full extractors."
    for name, kind, nf in [("mobilenet_v2", nn.Sequential, 1280), ("mnasnet0_5", nn.Sequential, 1280),
                           ("vit_b_16", ForwardBody, 768), ("googlenet", nn.Sequential, 1024),
                           ("inception_v3", nn.Sequential, 2048), ("shufflenet_v2_x0_5", nn.Sequential, 1024),
                           ("densenet121", ForwardBody, 1024), ("maxvit_t", ForwardBody, 512)]:
        body = create_body(instantiate(name), pretrained=False)
        assert type(body) is kind, name
        assert feature_shape(body)[1] == nf, name
    assert create_body(instantiate("densenet121"), pretrained=False).collapse  # F.relu then pooling in forward


REAL = [("resnet18", 64), ("alexnet", 64), ("vgg11_bn", 32), ("squeezenet1_1", 64), ("densenet121", 64),
        ("googlenet", 64), ("inception_v3", 80), ("mobilenet_v2", 64), ("mobilenet_v3_small", 64),
        ("mnasnet0_5", 64), ("shufflenet_v2_x0_5", 64), ("efficientnet_b0", 64), ("regnet_y_400mf", 64),
        ("convnext_tiny", 32), ("swin_t", 64), ("swin_v2_t", 64), ("maxvit_t", 224), ("vit_b_16", 224)]


@pytest.mark.parametrize("name,size", REAL)
def test_torchvision_real_forward(name, size):
    "One model per family on real tensors: the body gives exactly the features the model's classifier pools."
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    batch = 1 if size >= 224 else 2
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        logits = model(x)
    ref = head_input(model, x)
    body = create_body(model, pretrained=False)
    with torch.no_grad():
        feats = body(x)
    assert feats.ndim == 4 and feats.shape[0] == batch
    if ref.ndim == 4:
        torch.testing.assert_close(feats, ref)
    elif getattr(body, "collapse", False) or feats.shape[2] * feats.shape[3] > 1:
        # the model pooled (or flattened) the map in its forward: the body returns the map before that
        pooled = feats.mean((2, 3)) if feats.shape[1] == ref.shape[1] else feats.flatten(1)
        torch.testing.assert_close(pooled, ref)
    else:
        torch.testing.assert_close(feats[:, :, 0, 0], ref)  # vit: the class token
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits)  # the model still works as before
    m = cnn_model(model, 3)
    if batch == 2:  # training mode, backward: every body parameter gets a gradient
        m.train()
        out = m(x)
        assert out.shape == (2, 3)
        out.sum().backward()
        assert all(p.grad is not None for p in m[0].parameters())
    else:
        with torch.no_grad():
            assert m.eval()(x).shape == (1, 3)


class Net(nn.Module):
    "A user model pooling in its forward, after functional glue."

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block(F.relu(self.stem(x)))
        x = F.max_pool2d(torch.sigmoid(x), 2)  # functional glue after the last module, a local pooling
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_user_model_with_functional_pooling():
    net = Net().eval()
    body = create_body(net, pretrained=False)
    assert isinstance(body, ForwardBody) and body.collapse
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        feats = body.eval()(x)
        assert feats.shape == (2, 16, 4, 4)  # the map the global pooling would get
        torch.testing.assert_close(feats, F.max_pool2d(torch.sigmoid(net.block(F.relu(net.stem(x)))), 2))
    assert ids(body) == ids(net) - ids(net.fc)
    m = cnn_model(net, 4)
    again = pickle.loads(pickle.dumps(m))  # learn.export() pickles the model
    m.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), m(x))
        torch.testing.assert_close(copy.deepcopy(m)(x), m(x))


class ScaleNet(nn.Module):
    "Rescales 0..255 inputs: `.item()` before any layer, so no meta forward runs at all."

    def __init__(self):
        super().__init__()
        self.net = resnet18()

    def forward(self, x):
        return self.net(x / 255 if x.max().item() > 1 else x)


class TwoInputs(nn.Module):
    "Takes an image and a vector."

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        self.fc = nn.Linear(8, 2)

    def forward(self, x, extra):
        return self.fc(self.features(x).mean((2, 3)) + extra)


class PooledFeatures(nn.Module):
    "A feature extractor returning (B, C): find_structure takes its only child for the classifier."

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))

    def forward(self, x):
        return self.features(x).mean((2, 3))


def test_models_that_do_not_run_on_meta_are_refused():
    "Never a body silently stripped of its parameters: a clear error asking for cut=."
    for model in (ScaleNet(), TwoInputs()):
        with pytest.raises(ValueError, match=r"could not run \w+ on the meta device.*pass cut="):
            create_body(model, pretrained=False)
        with pytest.raises(ValueError, match="pass cut="):
            cnn_model(model, 3)
    with pytest.raises(ValueError, match=r"holds all its parameters.*cut=lambda m: m"):
        create_body(PooledFeatures(), pretrained=False)
    model = ScaleNet()
    body = create_body(model, pretrained=False, cut=lambda m: nn.Sequential(*list(m.net.children())[:-2]))
    assert ids(body) == ids(model) - ids(model.net.fc)
    body = create_body(PooledFeatures(), pretrained=False, cut=lambda m: m)
    assert feature_shape(body) == (2, 8)


def test_feature_extractor_without_classifier_kept_whole():
    model = nn.Sequential(*list(resnet18().children())[:-2])  # no classifier: nothing to cut, nothing unused
    body = create_body(model, pretrained=False)
    assert body is model and ids(body) == ids(model)
    m = cnn_model(model, 3)
    assert m[1][2].num_features == 1024
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_fastai_xresnet():
    body = create_body("fastai:xresnet18", pretrained=False)
    assert type(body) is nn.Sequential and feature_shape(body)[1] == 512
    assert not any(isinstance(m, nn.Linear) for m in body.modules())


# ---------------------------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------------------------
TIMM = [("resnet10t", 64, "NCHW"), ("convnext_atto", 64, "NCHW"), ("swin_tiny_patch4_window7_224", 224, "NHWC"),
        ("vit_tiny_patch16_224", 224, "tokens"), ("efficientnet_b0", 64, "NCHW"), ("mobilenetv3_small_050", 64, "NCHW")]


@pytest.mark.parametrize("name,size,fmt", TIMM)
def test_timm_families(name, size, fmt):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    full = timm.create_model(name).eval()
    body = create_body(full, pretrained=False)  # an instance: used as is, never modified
    assert isinstance(body, TimmBody) and body.fmt == fmt
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        feats, raw = body.eval()(x), full.forward_features(x)
        ref = {"NCHW": lambda: raw, "NHWC": lambda: raw.permute(0, 3, 1, 2),
               "tokens": lambda: full.forward_head(raw, pre_logits=True)[:, :, None, None]}[fmt]()
        torch.testing.assert_close(feats, ref)
        assert full(x).shape == (1, 1000)  # the classifier is still there in the model given
    assert not ids(body) & ids(full.get_classifier())
    m = cnn_model(f"timm:{name}", 4, pretrained=False)
    m.train()
    out = m(torch.randn(2, 3, size, size))
    assert out.shape == (2, 4)
    out.sum().backward()
    assert all(p.grad is not None for p in m[0].parameters())  # unused modules (conv_head, head norm) dropped


@pytest.mark.parametrize("name", [n for n in ("crossvit_tiny_240", "efficientvim_m1")   # those the installed timm has
                                  if n in set(timm_smallest().values())])
def test_timm_features_not_a_tensor(name):
    "forward_features gives a list (crossvit: per-branch tokens, efficientvim: per-stage maps): forward_head pools it."
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    full = timm.create_model(name).eval()
    body = create_body(full, pretrained=False)
    assert isinstance(body, TimmBody) and body.fmt == "pooled"
    x = torch.randn(2, 3, *full.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        ref = full.forward_head(full.forward_features(x), pre_logits=True)[:, :, None, None]
        torch.testing.assert_close(body.eval()(x), ref)
    assert not ids(body) & ids(full.get_classifier())
    m = cnn_model(f"timm:{name}", 5, pretrained=False).eval()
    assert m[1][2].num_features == 2 * feature_shape(m[0])[1]
    with torch.no_grad():
        assert m(x).shape == (2, 5)


class ListFeatures(nn.Module):
    "timm-like, but forward_features returns a list and there is no forward_head to pool it."

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward_features(self, x):
        return [self.conv(x)]

    def forward(self, x):
        return self.fc(self.forward_features(x)[0].mean((2, 3)))


def test_timm_features_not_poolable():
    with pytest.raises(ValueError, match=r"returns a list of 1 \(shape \(2, 4, 222, 222\)\).*no forward_head.*cut="):
        create_body(ListFeatures(), pretrained=False)
    ListFeatures.forward_head = lambda self, x, pre_logits=False: x  # gives the list back: still not (B, C)
    try:
        with pytest.raises(ValueError, match=r"forward_head\(x, pre_logits=True\) gives a list.*not \(B, C\).*cut="):
            create_body(ListFeatures(), pretrained=False)
    finally:
        del ListFeatures.forward_head
    body = create_body(ListFeatures(), pretrained=False, cut=lambda m: m.conv)
    assert feature_shape(body)[1] == 4


def test_timm_shared_modules_coat():
    "coat's crpe modules are shared by several blocks: built, the model given left intact, shared stays shared."
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    full = timm.create_model("coat_tiny").eval()
    shared = full.crpe1
    assert full.serial_blocks1[0].factoratt_crpe.crpe is shared
    m = cnn_model(full, 5)
    assert not any(t.is_meta for t in list(full.parameters()) + list(full.buffers()))  # meta runs restored all
    assert not any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
    body = m[0]
    assert body.model.crpe1 is shared and body.model.serial_blocks1[0].factoratt_crpe.crpe is shared
    assert feature_shape(body) == (2, 152, 1, 1) and m[1][2].num_features == 304
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = full.forward_head(full.forward_features(x), pre_logits=True)[:, :, None, None]
        torch.testing.assert_close(body.eval()(x), ref)
        assert m.eval()(x).shape == (2, 5)


TIMM_SMALLEST = timm_smallest()


TIMM_SLOW = {"sequencer"}  # its LSTMs unroll step by step on the meta device (~10 s): left out of the sweep


@pytest.mark.parametrize("family", sorted(set(TIMM_SMALLEST) - TIMM_SLOW))
def test_every_timm_family(family):
    "The smallest model of every timm family, on the meta device: a 4-D body output, the head sized for it."
    pytest.importorskip("timm")
    model = instantiate("timm:" + TIMM_SMALLEST[family])
    body, head = cnn_model(model, 5)
    shape = feature_shape(body)
    assert len(shape) == 4 and shape[0] == 2
    bn = next(mod for mod in head if isinstance(mod, nn.BatchNorm1d))
    assert bn.num_features == 2 * shape[1]  # concat pooling of nf channels
    clf = model.get_classifier()
    clf = [c for c in (clf if isinstance(clf, tuple) else [clf]) if isinstance(c, nn.Module)]  # distilled: 2 heads
    assert ids(body) <= ids(model) and not ids(body) & {id(p) for c in clf for p in c.parameters()}


# ---------------------------------------------------------------------------------------------------------------
# cut, n_in, nf on meta
# ---------------------------------------------------------------------------------------------------------------
def test_cut_int_and_callable():
    model = resnet18()
    body = create_body(model, pretrained=False, cut=-3)
    assert type(body) is nn.Sequential and len(body) == 7 and body[6] is model.layer3
    m = cnn_model(model, 3, cut=-3)
    assert m[1][2].num_features == 512  # layer3: 256 channels, concat pooled
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    body = create_body(model, pretrained=False, cut=lambda mod: nn.Sequential(mod.conv1, mod.bn1))
    assert feature_shape(body)[1] == 64
    for bad in (True, "2", 1.5):
        with pytest.raises(TypeError):
            create_body(model, pretrained=False, cut=bad)
    with pytest.raises(ValueError):
        create_body(model, pretrained=False, cut=0)


def test_body_output_must_match_pool():
    flat = lambda mod: nn.Sequential(*list(mod.children())[:-1], nn.Flatten())  # noqa: E731 - (B, 512)
    with pytest.raises(ValueError, match="pool=False"):
        cnn_model(resnet18, 3, cut=flat)
    m = cnn_model(resnet18, 3, cut=flat, pool=False)
    assert m[1][0].num_features == 512 and m(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="pool=True"):
        cnn_model(resnet18, 3, pool=False)
    with pytest.raises(TypeError, match="unknown argument"):
        cnn_model(resnet18, 3, lin_ftr=[3])


def test_n_in_random_init():
    model = resnet18()
    m = cnn_model(model, 3, n_in=1)
    assert m[0][0].in_channels == 1 and model.conv1.in_channels == 3  # the model given keeps its conv
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    m = cnn_model("timm:resnet10t", 3, n_in=1)
    first = next(c for c in m.modules() if isinstance(c, nn.Conv2d))
    assert first.in_channels == 1 and m(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    g = googlenet(weights=None, init_weights=False, transform_input=True)
    body = create_body(g, pretrained=False, n_in=1)  # transform_input re-normalises RGB: switched off
    assert feature_shape(body, n_in=1)[1] == 1024
    with pytest.raises(ValueError, match="n_in"):
        create_body(resnet18, pretrained=False, n_in=0)


@pytest.mark.parametrize("n_in", [1, 2, 4])
def test_n_in_pretrained(r18_file, n_in):
    w = torch.load(r18_file)["conv1.weight"]
    body = create_body(resnet18, weights=r18_file, n_in=n_in)
    new = body[0].weight
    assert new.shape == (64, n_in, 7, 7)
    if n_in == 1:
        torch.testing.assert_close(new, w.sum(1, keepdim=True))
    elif n_in == 2:
        torch.testing.assert_close(new, w[:, :2] * 1.5)
    else:
        torch.testing.assert_close(new[:, :3], w)
        assert torch.all(new[:, 3:] == 0)
    torch.testing.assert_close(body[1].weight, torch.load(r18_file)["bn1.weight"])
    assert body(torch.randn(2, n_in, 32, 32)).shape == (2, 512, 1, 1)


def test_nf_on_meta_in_training_mode():
    model = resnet18()
    devices = []
    hook = model.conv1.register_forward_pre_hook(lambda m, a: devices.append(a[0].device.type))
    try:
        m = cnn_model(model, 3)
        assert devices and set(devices) == {"meta"}  # never a forward on real tensors
        assert all(mod.training for mod in m.modules())  # never left in eval mode
        devices.clear()
        assert feature_shape(m[0]) == (2, 512, 7, 7)
        assert set(devices) == {"meta"} and m[0].training
        m[0].eval()
        feature_shape(m[0])
        assert not any(mod.training for mod in m[0].modules())
    finally:
        hook.remove()


def test_create_body_leaves_model_alone():
    model = vit_b_16()
    head = model.heads.head
    body = create_body(model, pretrained=False)
    assert isinstance(body, ForwardBody)
    assert model.heads.head is head and isinstance(head, nn.Linear)
    assert not ids(body) & ids(head)
    assert model.class_token is body.model.class_token  # shared parameters
