"""fastai_groups.arch: instantiate / resolve_arch / get_module on every kind of arch and idxs, meta-device
instantiation, clear errors."""
import functools

import pytest
import torch
import torchvision.models as tvm
from fastai.vision.models.xresnet import xresnet18
from torch import nn
from torchvision.models import MNASNet

from fastai_groups import arch_summary, get_module, instantiate
from fastai_groups._utils import unwrap_model
from models import AlexNet, summary_text


def test_get_module_types():
    assert type(get_module(xresnet18, [4, 0])).__name__ == "ResBlock"
    assert type(get_module(MNASNet(1.0), [0, 8, 0])).__name__ == "_InvertedResidual"


def test_classes_and_factories_go_to_meta():
    for arch in (tvm.AlexNet, AlexNet, tvm.resnet50, functools.partial(tvm.resnet50, num_classes=3),
                 lambda: tvm.resnet50(), "resnet50", "xresnet50", "timm:resnet50"):
        m = instantiate(arch)
        assert all(p.is_meta for p in m.parameters()), arch
    # an instance is used as is (real tensors)
    real = tvm.resnet18()
    assert instantiate(real) is real


def test_factory_that_takes_pretrained_is_not_downloading():
    calls = []

    def factory(pretrained=True):
        calls.append(pretrained)
        return nn.Sequential(nn.Linear(2, 2))
    arch_summary(factory)
    assert calls == [False]


def test_meta_fallback_for_constructors_that_compute():
    "RegNet copies tensor data in __init__: still summarised, never fails, and still without real parameters."
    m = instantiate(tvm.regnet_y_400mf)
    assert type(m).__name__ == "RegNet"
    assert summary_text(tvm.regnet_y_400mf).startswith("[0 ] (stem)")


def test_giant_model_allocates_nothing():
    pytest.importorskip("timm")
    m = instantiate("timm:vit_giant_patch14_224")    # its build time is in bench/summary.py
    assert sum(p.numel() for p in m.parameters()) > 1e9
    assert all(p.is_meta for p in m.parameters())
    assert "(blocks)       Sequential       : 40  layers" in summary_text(m)


@pytest.mark.parametrize("idxs", [[4, 0], "layer1.0", ["layer1", 0], ["layer1", "0"]])
def test_get_module_paths(idxs):
    assert type(get_module(tvm.resnet18, idxs)).__name__ == "BasicBlock"


def test_wrappers_are_seen_through():
    m = tvm.resnet18()
    assert unwrap_model(nn.DataParallel(m)) is m
    assert summary_text(nn.DataParallel(m)) == summary_text(m)
    compiled = torch.compile(m)
    assert get_module(compiled, "layer1.0") is m.layer1[0]


# --------------------------------------------------------------------------------------------------- errors
def test_index_out_of_range_names_range_and_path():
    with pytest.raises(IndexError, match=r"index 9 out of range for Sequential at \['layer1'\]: valid indices are 0..1"):
        get_module(tvm.resnet18, ["layer1", 9])


def test_index_into_leaf():
    with pytest.raises(IndexError, match=r"Conv2d at \[0\] is a leaf"):
        get_module(tvm.resnet18, [0, 0])


def test_unknown_name_lists_children():
    with pytest.raises(AttributeError, match=r"has no child named 'layer9'; its children are: conv1, bn1"):
        arch_summary(tvm.resnet18, "layer9")


def test_class_needing_arguments():
    class Net(nn.Module):
        def __init__(self, n_classes):
            super().__init__()
            self.fc = nn.Linear(2, n_classes)
    with pytest.raises(TypeError, match=r"Net needs arguments \(n_classes\): pass an instance"):
        arch_summary(Net)


def test_factory_needing_arguments():
    def make(width):
        return nn.Linear(width, 2)
    with pytest.raises(TypeError, match=r"make needs arguments \(width\)"):
        arch_summary(make)


@pytest.mark.parametrize("bad", [3.5, object(), [nn.Linear(1, 1)], int])
def test_not_a_module(bad):
    with pytest.raises(TypeError):
        arch_summary(bad)


def test_factory_returning_non_module():
    with pytest.raises(TypeError, match="not an nn.Module"):
        arch_summary(lambda: 42)


def test_unknown_arch_name():
    with pytest.raises(ValueError, match="unknown architecture 'resnet9000'"):
        arch_summary("resnet9000")


def test_bad_idxs_type():
    with pytest.raises(TypeError, match="idxs must be"):
        arch_summary(tvm.resnet18, 1.5)
