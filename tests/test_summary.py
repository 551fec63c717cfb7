"""arch_summary / summary_rows: the seed's outputs byte for byte, every kind of arch, the params and groups
columns."""
import contextlib
import functools
import io
import re
from pathlib import Path

import pytest
import torchvision.models as tvm
from fastai.vision.models.xresnet import xresnet18
from torch import nn
from torchvision.models import MNASNet, resnet50, wide_resnet50_2

from fastai_groups import arch_summary, auto_splitter, get_module, summary_rows
from fastai_groups.summary import count_layers
from models import AlexNet, summary_text


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


@pytest.mark.parametrize("arch", [tvm.AlexNet, AlexNet, tvm.alexnet, functools.partial(tvm.alexnet, num_classes=3),
                                  lambda: tvm.alexnet(), "alexnet", "torchvision:alexnet", tvm.alexnet()])
def test_every_kind_of_arch(arch):
    out = summary_text(arch)
    assert out.splitlines()[0].startswith("[0 ] (feat")
    assert "Sequential" in out


@pytest.mark.parametrize("idxs", [[4], 4, "layer1", ["layer1"], (4,)])
def test_idxs_forms(idxs):
    assert summary_text(wide_resnet50_2, idxs).splitlines()[0] == "[0 ] Bottleneck       : 9   layers"


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
    lines = summary_text(m, params=True).splitlines()
    assert lines[4].split()[-1] == "no" and lines[5].split()[-1] == "partial" and lines[9].split()[-1] == "yes"
    assert lines[2].split()[-1] == "-"  # relu has no parameters
    assert "11,689,512" not in lines[0] and "9,408" in lines[0]
    # the default output is unchanged by the option's existence
    assert summary_text(m).splitlines()[0] == "[0 ] (conv1)    Conv2d           : 1   layers"


def test_groups_column():
    lines = summary_text(tvm.resnet18(), groups=auto_splitter).splitlines()
    assert lines[0].endswith("stem") and lines[4].endswith("stage1") and lines[9].endswith("head")
    assert lines[2].endswith("-")


def test_count_layers_rules():
    assert count_layers(nn.Linear(1, 1)) == 1
    assert count_layers(nn.Sequential()) == 0
    assert count_layers(nn.ModuleList([nn.ReLU(), nn.Sequential(nn.ReLU(), nn.ReLU())])) == 2
    # anything else: leaf modules, empty containers excluded
    assert count_layers(get_module(xresnet18, [4, 0])) == 6
