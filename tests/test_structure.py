"""find_structure (issue 21): modules shared by several places, the cache and when it is dropped, cost per block."""
from __future__ import annotations


import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.resnet import BasicBlock

from fastai_groups import GRANULARITIES, auto_splitter, check_groups, find_structure
from fastai_groups.structure import forget_structure

from bench.splitter import cifar_resnet    # the bench times the same models
from test_zoo import check_zoo_model


# ------------------------------------------------------------------------------------------ shared modules
class PosEnc(nn.Module):
    "A conv position encoding (timm's coat ConvPosEnc): x + dwconv(x)."

    def __init__(s, c):
        super().__init__()
        s.proj = nn.Conv2d(c, c, 3, 1, 1, groups=c)

    def forward(s, x):
        return x + s.proj(x)


class SharingBlock(nn.Module):
    "A residual block that calls a position encoding it shares with the other blocks of its stage."

    def __init__(s, c, pe):
        super().__init__()
        s.pe = pe
        s.conv1, s.bn1, s.conv2, s.bn2 = nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1), \
            nn.BatchNorm2d(c)

    def forward(s, x):
        x = s.pe(x)
        return (x + s.bn2(s.conv2(s.bn1(s.conv1(x)).relu()))).relu()


class SharedNet(nn.Module):
    "The encodings are registered on the root, before the stem and the blocks that use them (as in coat)."

    def __init__(s):
        super().__init__()
        s.pe1, s.pe2 = PosEnc(16), PosEnc(32)
        s.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        s.blocks1 = nn.ModuleList([SharingBlock(16, s.pe1) for _ in range(2)])
        s.down = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32))
        s.blocks2 = nn.ModuleList([SharingBlock(32, s.pe2) for _ in range(3)])
        s.fc = nn.Linear(32, 10)

    def forward(s, x):
        x = s.stem(x)
        for b in s.blocks1:
            x = b(x)
        x = s.down(x)
        for b in s.blocks2:
            x = b(x)
        return s.fc(x.mean((2, 3)))


def _groups_of(groups, module: nn.Module) -> set:
    where = {id(p): i for i, ps in enumerate(groups) for p in ps}
    return {where[id(p)] for p in module.parameters()}


def test_shared_module_goes_where_first_used():
    "A module registered on the root and called by every block of a stage goes with that stage, never the stem."
    model = SharedNet()
    groups = auto_splitter(model)
    check_groups(model, groups)
    assert groups.names == ["stem", "stage1", "stage2", "head"], groups.names
    assert _groups_of(groups, model.stem) == {0}
    assert _groups_of(groups, model.pe1) == _groups_of(groups, model.blocks1) == {1}
    assert _groups_of(groups, model.pe2) == _groups_of(groups, model.blocks2) == {2}
    st = find_structure(model)
    assert "pe1" not in [u.name for u in st.units], "the shared module should not be a unit of its own"
    for g in GRANULARITIES:      # the blocks sharing pe1 (and pe2) are never separated, at any granularity
        gs = auto_splitter(model, granularity=g)
        assert len(_groups_of(gs, model.blocks1)) == 1 and len(_groups_of(gs, model.blocks2)) == 1, (g, gs.names)
    check_zoo_model("repro:SharedNet", SharedNet().to("meta"), torch.empty(2, 3, 32, 32, device="meta"))


def test_tied_weight_goes_where_first_used_and_ties_no_groups():
    "A weight shared by the first layer and the classifier (tied, not a shared block) stays first, in one group."
    tied = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    tied[4].weight = tied[0].weight
    groups = auto_splitter(tied)
    check_groups(tied, groups)
    assert len(groups) >= 2, groups.names
    assert _groups_of(groups, tied[0]) == {0}
    assert {i for i, ps in enumerate(groups) for p in ps if p is tied[4].bias} == {len(groups) - 1}


# ------------------------------------------------------------------------------------------ the cache
def test_cache_dropped_when_a_layer_is_replaced():
    model = tvm.resnet18()
    st = find_structure(model)
    assert find_structure(model) is st                        # warm: the same structure
    model.fc = nn.Linear(512, 7)                              # the head replaced
    g = auto_splitter(model)
    check_groups(model, g)
    assert [id(p) for p in g[-1]] == [id(p) for p in model.fc.parameters()]
    st = find_structure(model)
    model.layer3[1] = BasicBlock(256, 256)                    # a block deep inside replaced
    g = auto_splitter(model)
    check_groups(model, g)
    assert find_structure(model) is not st
    assert _groups_of(g, model.layer3[1]) == {3}
    st = find_structure(model)
    model.layer4[0].conv1.weight = nn.Parameter(torch.zeros_like(model.layer4[0].conv1.weight))  # one parameter
    check_groups(model, auto_splitter(model))
    assert find_structure(model) is not st


def test_cache_dropped_when_the_model_changes_otherwise():
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    seq[-1] = nn.Linear(8 * 16 * 16, 4)
    check_groups(seq, auto_splitter(seq))
    del seq[-1]                                               # a child removed (no registration hook)
    check_groups(seq, auto_splitter(seq))
    with torch.device("meta"):
        model = tvm.resnet18()
    auto_splitter(model)
    model.to_empty(device="cpu")                              # every parameter rebuilt behind nn.Module's back
    g = auto_splitter(model)
    check_groups(model, g)
    assert all(p.device.type == "cpu" for ps in g for p in ps)
    st = find_structure(model)
    forget_structure(model)
    assert find_structure(model) is not st


def test_a_600_block_resnet_splits_into_its_stages():
    "A CIFAR ResNet of 1,202 layers (600 blocks): stem, 3 stages, head (its split time per block is in bench/)."
    groups = auto_splitter(cifar_resnet(200))
    assert groups.names == ["stem", "stage1", "stage2", "stage3", "head"]
