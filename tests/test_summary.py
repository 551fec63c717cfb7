"""arch_summary / get_module / summary_rows: the seed's outputs byte for byte, every kind of arch and idxs,
meta-device instantiation, clear errors."""
import contextlib
import functools
import io
import re
import time
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from fastai.vision.models.xresnet import xresnet18
from torch import nn
from torchvision.models import MNASNet, resnet50, wide_resnet50_2

from fastai_groups import arch_summary, auto_splitter, get_module, instantiate, summary_rows
from fastai_groups.summary import count_layers, resolve_arch, unwrap_model

SEED = Path(__file__).parent / "seed" / "001_arch_summary.txt"


def _seed_cases():
    "(command, expected output) for every arch_summary/get_module call printed in seed 001."
    lines = SEED.read_text().splitlines()
    cases = []
    for i, line in enumerate(lines):
        if re.match(r"^(arch_summary|get_module)\(", line):
            out = []
            for nxt in lines[i + 1:]:
                if not nxt.strip() or re.match(r"^(arch_summary|get_module)\(", nxt):
                    break
                out.append(nxt.rstrip())
            cases.append((line.strip(), out))
    return cases


CASES = _seed_cases()


def _run(cmd: str) -> list[str]:
    ns = dict(arch_summary=arch_summary, get_module=get_module, xresnet18=xresnet18, wide_resnet50_2=wide_resnet50_2,
              resnet50=resnet50, mnasnet=MNASNet(1.0))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = eval(cmd, ns)
        if res is not None:
            print(res)
    # torch >= 2.5 prints `bias=True` in BatchNorm reprs; the seed was printed before that
    return [l.rstrip().replace(", bias=True, track_running_stats", ", track_running_stats")
            for l in buf.getvalue().splitlines()]


def test_seed_has_all_cases():
    cmds = [c for c, _ in CASES]
    assert len([c for c in cmds if c.startswith("arch_summary")]) == 7
    assert len([c for c in cmds if c.startswith("get_module")]) == 4


@pytest.mark.parametrize("cmd,expected", CASES, ids=[c for c, _ in CASES])
def test_seed_output(cmd, expected):
    assert _run(cmd) == expected


def test_get_module_types():
    assert type(get_module(xresnet18, [4, 0])).__name__ == "ResBlock"
    assert type(get_module(MNASNet(1.0), [0, 8, 0])).__name__ == "_InvertedResidual"


class AlexNet(nn.Module):
    "The user-written AlexNet of seed 002 (attributes feats, clf)."

    def __init__(self, num_classes=1000):
        super().__init__()
        self.feats = nn.Sequential(
            nn.Conv2d(3, 96, 11, 4, 0), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(96, 256, 5, 1, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 384, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(384, 384, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, 1, 1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.clf = nn.Sequential(nn.Dropout(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True), nn.Dropout(),
                                 nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, num_classes))

    def forward(self, inp):
        return self.clf(torch.flatten(self.feats(inp), 1))


def _text(*args, **kwargs) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        arch_summary(*args, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("arch", [tvm.AlexNet, AlexNet, tvm.alexnet, functools.partial(tvm.alexnet, num_classes=3),
                                  lambda: tvm.alexnet(), "alexnet", "torchvision:alexnet", tvm.alexnet()])
def test_every_kind_of_arch(arch):
    out = _text(arch)
    assert out.splitlines()[0].startswith("[0 ] (feat")
    assert "Sequential" in out


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
    assert _text(tvm.regnet_y_400mf).startswith("[0 ] (stem)")


def test_giant_model_is_fast_and_allocates_nothing():
    pytest.importorskip("timm")
    instantiate("timm:vit_tiny_patch16_224")  # import timm's registry outside the timing
    t = time.perf_counter()
    m = instantiate("timm:vit_giant_patch14_224")
    dt = time.perf_counter() - t
    assert sum(p.numel() for p in m.parameters()) > 1e9
    assert all(p.is_meta for p in m.parameters())
    assert dt < 2.0  # well under a second on a normal machine; generous for a loaded 2-core CI box
    assert "(blocks)       Sequential       : 40  layers" in _text(m)


@pytest.mark.parametrize("idxs", [[4], 4, "layer1", ["layer1"], (4,)])
def test_idxs_forms(idxs):
    assert _text(wide_resnet50_2, idxs).splitlines()[0] == "[0 ] Bottleneck       : 9   layers"


@pytest.mark.parametrize("idxs", [[4, 0], "layer1.0", ["layer1", 0], ["layer1", "0"]])
def test_get_module_paths(idxs):
    assert type(get_module(tvm.resnet18, idxs)).__name__ == "BasicBlock"


def test_rows_are_structured():
    rows = summary_rows(tvm.resnet18())
    assert [r.name for r in rows] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                                     "avgpool", "fc"]
    assert rows[9].params == 512 * 1000 + 1000 and rows[9].state == "yes"
    assert sum(r.params for r in rows) == sum(p.numel() for p in tvm.resnet18().parameters())
    assert rows[4].path == (4,) and rows[4].qualname == "layer1"
    sub = summary_rows(tvm.resnet18(), "layer1")
    assert sub[1].path == (4, 1) and sub[1].qualname == "layer1.1"


def test_params_column_shows_trainable_state():
    m = tvm.resnet18()
    for p in m.layer1.parameters():
        p.requires_grad_(False)
    m.layer2[0].conv1.weight.requires_grad_(False)
    lines = _text(m, params=True).splitlines()
    assert lines[4].split()[-1] == "no" and lines[5].split()[-1] == "partial" and lines[9].split()[-1] == "yes"
    assert lines[2].split()[-1] == "-"  # relu has no parameters
    assert "11,689,512" not in lines[0] and "9,408" in lines[0]
    # the default output is unchanged by the option's existence
    assert _text(m).splitlines()[0] == "[0 ] (conv1)    Conv2d           : 1   layers"


def test_groups_column():
    lines = _text(tvm.resnet18(), groups=auto_splitter).splitlines()
    assert lines[0].endswith("stem") and lines[4].endswith("stage1") and lines[9].endswith("head")
    assert lines[2].endswith("-")


def test_count_layers_rules():
    assert count_layers(nn.Linear(1, 1)) == 1
    assert count_layers(nn.Sequential()) == 0
    assert count_layers(nn.ModuleList([nn.ReLU(), nn.Sequential(nn.ReLU(), nn.ReLU())])) == 2
    # anything else: leaf modules, empty containers excluded
    assert count_layers(get_module(xresnet18, [4, 0])) == 6


def test_wrappers_are_seen_through():
    m = tvm.resnet18()
    assert unwrap_model(nn.DataParallel(m)) is m
    assert _text(nn.DataParallel(m)) == _text(m)
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
