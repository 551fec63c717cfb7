"Tests for fastai_groups.head: seed 003's head and model (cnn_model), fastai 2.8 parity, argument checks."
import pytest
import torch
from torch import nn

import fastai.layers as fl
from fastai.vision.learner import create_head as fastai_create_head

from torchvision.models import resnet18, resnet50

from fastai_groups.head import AdaptiveConcatPool2d, cnn_model, create_head
from fastai_groups.splitters import auto_splitter

SEED_TYPES = ["AdaptiveConcatPool2d", "Flatten", "BatchNorm1d", "Dropout", "Linear", "ReLU", "BatchNorm1d", "Dropout",
              "Linear"]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------------------------
# AdaptiveConcatPool2d
# ---------------------------------------------------------------------------------------------------------------
def test_concat_pool_order_and_values():
    pool = AdaptiveConcatPool2d()
    assert [n for n, _ in pool.named_children()] == ["ap", "mp"]  # registration order, as the seed prints
    assert isinstance(pool, fl.AdaptiveConcatPool2d)
    x = torch.randn(2, 3, 5, 4)
    out = pool(x)
    assert out.shape == (2, 6, 1, 1)
    torch.testing.assert_close(out[:, :3, 0, 0], x.amax((2, 3)))  # max first
    torch.testing.assert_close(out[:, 3:, 0, 0], x.mean((2, 3)))  # then average
    torch.testing.assert_close(out, fl.AdaptiveConcatPool2d()(x))


def test_concat_pool_size():
    assert AdaptiveConcatPool2d(2)(torch.randn(1, 4, 6, 6)).shape == (1, 8, 2, 2)
    assert AdaptiveConcatPool2d((1, 3))(torch.randn(1, 4, 6, 6)).shape == (1, 8, 1, 3)
    for bad in (0, -1, (0, 1), "1", 1.5, True):
        with pytest.raises((ValueError, TypeError)):
            AdaptiveConcatPool2d(bad)


# ---------------------------------------------------------------------------------------------------------------
# Seed 003: cnn_learner(data, models.resnet50) on 44 classes
# ---------------------------------------------------------------------------------------------------------------
def test_seed_003_layout():
    head = create_head(2048, 44)
    assert isinstance(head, nn.Sequential) and type(head) is nn.Sequential
    assert [type(m).__name__ for m in head] == SEED_TYPES
    assert head[2].num_features == 4096 and head[6].num_features == 512
    assert [head[3].p, head[7].p] == [0.25, 0.5]
    assert (head[4].in_features, head[4].out_features) == (4096, 512)
    assert (head[8].in_features, head[8].out_features) == (512, 44)
    assert head[5].inplace
    # the seed's parameter counts: BatchNorm1d 8,192 and 1,024; Linear 2,097,664 and 22,572 (with biases)
    assert [n_params(head[i]) for i in (2, 4, 6, 8)] == [8192, 2097664, 1024, 22572]
    assert n_params(head) == 8192 + 2097664 + 1024 + 22572
    assert head(torch.randn(3, 2048, 10, 10)).shape == (3, 44)


def test_seed_003_repr():
    text = repr(create_head(2048, 44))
    assert "(ap): AdaptiveAvgPool2d(output_size=1)\n    (mp): AdaptiveMaxPool2d(output_size=1)" in text
    assert "Linear(in_features=4096, out_features=512, bias=True)" in text
    assert "Linear(in_features=512, out_features=44, bias=True)" in text


def test_default_batchnorm_init_is_pytorch():
    head = create_head(16, 3)
    assert torch.all(head[2].bias == 0) and torch.all(head[2].weight == 1)


# ---------------------------------------------------------------------------------------------------------------
# fastai 2.8 parity
# ---------------------------------------------------------------------------------------------------------------
PARITY = [dict(), dict(lin_ftrs=[256, 128]), dict(lin_ftrs=[]), dict(ps=0.2), dict(ps=[0.1, 0.3]), dict(ps=0.0),
          dict(first_bn=False), dict(bn_final=True), dict(y_range=(-1, 3)), dict(pool=False),
          dict(concat_pool=False), dict(lin_first=True), dict(lin_first=True, lin_ftrs=[256, 128], ps=[.1, .2, .3]),
          dict(lin_first=True, first_bn=False, bn_final=True, y_range=(0, 5))]


@pytest.mark.parametrize("kw", PARITY, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_fastai_compat_parity(kw):
    ours, theirs = create_head(64, 7, fastai_compat=True, **kw), fastai_create_head(64, 7, **kw)
    assert [type(m).__name__ for m in ours] == [type(m).__name__ for m in theirs]
    assert all(isinstance(a, type(b)) for a, b in zip(ours, theirs))
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    for a, b in zip(ours, theirs):  # same hyper-parameters
        for attr in ("p", "inplace", "eps", "momentum", "in_features", "out_features", "low", "high", "full"):
            assert getattr(a, attr, None) == getattr(b, attr, None), (type(a).__name__, attr)
    # fastai's init: BatchNorm bias 1e-3
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        if a.dtype.is_floating_point and a.ndim == 1 and torch.all(b == 1e-3):
            assert torch.all(a == 1e-3)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 64, 3, 3) if kw.get("pool", True) else torch.randn(4, 64)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    ours.train(), theirs.train()
    torch.manual_seed(0)
    a = ours(x)
    torch.manual_seed(0)
    torch.testing.assert_close(a, theirs(x))


def test_default_differs_from_fastai_only_by_biases():
    ours, theirs = create_head(2048, 44), fastai_create_head(2048, 44)
    assert [type(m).__name__ for m in ours] == [type(m).__name__ for m in theirs]
    extra = n_params(ours) - n_params(theirs)
    assert extra == 512 + 44  # the two Linear biases
    assert ours[4].bias is not None and theirs[4].bias is None


def test_lin_first_drops_bias_before_batchnorm():
    head = create_head(32, 4, lin_first=True)
    assert [type(m).__name__ for m in head] == ["AdaptiveConcatPool2d", "Flatten", "Dropout", "Linear", "ReLU",
                                                "BatchNorm1d", "Dropout", "Linear"]
    assert head[3].bias is None and head[7].bias is not None
    assert head(torch.randn(2, 32, 4, 4)).shape == (2, 4)


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------
def test_options():
    h = create_head(10, 3, pool=False)
    assert type(h[0]) is nn.BatchNorm1d and h[0].num_features == 10  # nf not doubled without pooling
    assert h(torch.randn(4, 10)).shape == (4, 3)
    h = create_head(10, 3, concat_pool=False)
    assert isinstance(h[0], nn.AdaptiveAvgPool2d) and h[2].num_features == 10
    h = create_head(10, 3, lin_ftrs=[8, 6], ps=[0.1, 0.2, 0.3])
    assert [m.p for m in h if isinstance(m, nn.Dropout)] == [0.1, 0.2, 0.3]
    assert [m.out_features for m in h if isinstance(m, nn.Linear)] == [8, 6, 3]
    h = create_head(10, 3, lin_ftrs=[8, 6], ps=0.4)
    assert [m.p for m in h if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.4]
    h = create_head(10, 3, ps=0)
    assert not any(isinstance(m, nn.Dropout) for m in h)
    h = create_head(10, 3, first_bn=False)
    assert type(h[2]) is nn.Dropout
    h = create_head(10, 3, bn_final=True, y_range=(0, 5))
    assert type(h[-2]) is nn.BatchNorm1d and h[-2].momentum == 0.01 and h[-2].num_features == 3
    assert isinstance(h[-1], fl.SigmoidRange)
    h.eval()
    out = h(torch.randn(64, 10, 2, 2) * 100)
    assert out.min() >= 0 and out.max() <= 5


@pytest.mark.parametrize("args,kw", [
    ((0, 3), {}), ((10, 0), {}), ((10.5, 3), {}), ((10, 3), dict(lin_ftrs=[0])), ((10, 3), dict(lin_ftrs=512)),
    ((10, 3), dict(ps=[0.1, 0.2, 0.3])), ((10, 3), dict(ps=1.0)), ((10, 3), dict(ps=-0.1)), ((10, 3), dict(ps="a")),
    ((10, 3), dict(y_range=(1, 0))), ((10, 3), dict(y_range=(1,))), ((True, 3), {}),
])
def test_bad_arguments(args, kw):
    with pytest.raises((ValueError, TypeError)):
        create_head(*args, **kw)


def test_ps_error_message():
    with pytest.raises(ValueError, match="one dropout probability per Linear layer"):
        create_head(10, 3, ps=[0.1, 0.2, 0.3])


# ---------------------------------------------------------------------------------------------------------------
# Seed 003's model: cnn_model(resnet50, 44), as cnn_learner(data, models.resnet50) with 44 classes
# ---------------------------------------------------------------------------------------------------------------
def tiny_dls(n_classes=3):
    from fastai.data.core import DataLoaders
    items = [(torch.randn(3, 32, 32), i % n_classes) for i in range(8)]
    return DataLoaders.from_dsets(items, items, bs=4)


def test_seed_003_resnet50_numbers():
    from fastai.learner import Learner
    model = cnn_model(resnet50, 44)
    assert n_params(model) == 25_637_484
    body, head = model
    assert type(body) is nn.Sequential and len(body) == 8  # learner.model[0]: conv1 ... layer4, indices 0..7
    assert [type(m).__name__ for m in body] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] + ["Sequential"] * 4
    assert isinstance(head[0], AdaptiveConcatPool2d) and head[2].num_features == 4096
    learn = Learner(tiny_dls(44), model, loss_func=nn.CrossEntropyLoss(), splitter=auto_splitter, train_bn=True)
    learn.freeze()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2_182_572
    assert n_params(model) - trainable == 23_454_912


def test_fastai_compat_model_matches_fastai():
    from fastai.vision.learner import create_vision_model
    ours = cnn_model(resnet18, 7, fastai_compat=True)
    theirs = create_vision_model(resnet18, 7, pretrained=False)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]


def test_only_head_initialised():
    torch.manual_seed(0)
    model = resnet18()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = cnn_model(model, 3, init=nn.init.zeros_)
    for n, p in model.named_parameters():
        if not n.startswith("fc."):
            assert torch.equal(p, before[n]), n
    head = m[1]
    assert all(torch.all(l.weight == 0) and torch.all(l.bias == 0) for l in head if isinstance(l, nn.Linear))
    assert all(torch.all(b.weight == 1) for b in head if isinstance(b, nn.BatchNorm1d))  # norms not re-initialised
    m = cnn_model(resnet18, 3)  # kaiming normal: not all zero, biases zero
    lin = [l for l in m[1] if isinstance(l, nn.Linear)]
    assert all(l.weight.std() > 0 and torch.all(l.bias == 0) for l in lin)
