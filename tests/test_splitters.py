"""auto_splitter and check_groups: invariants on every torchvision classifier and every timm family, bare and
wrapped; fastai's own splits reproduced; odd models; every kind of bad splitter output."""

import pytest
import torch
import torchvision.models as tvm
from fastai.vision.all import Learner, create_head, create_vision_model
from fastai.vision.learner import _densenet_split, _resnet_split
from fastai.vision.models import xresnet
from torch import nn

from fastai_groups import GRANULARITIES, auto_splitter, check_groups, checked, find_structure, instantiate
from fastai_groups.splitters import ParamGroups, group_names

from models import timm_smallest
from test_summary import AlexNet

TV_MODELS = sorted(tvm.list_models(module=tvm))
TIMM_SMALLEST = timm_smallest()


# --------------------------------------------------------------------------------------------------- helpers
def first_and_last(model: nn.Module):
    "The stem's first parameter and the classifier's parameters, found independently of the splitter."
    params = [p for n, m in model.named_modules() if n for p in m.parameters(recurse=False)]
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    clf = [c for c in (clf if isinstance(clf, tuple) else [clf]) if isinstance(c, nn.Module)]  # distilled: 2 heads
    last = [p for c in clf for p in c.parameters()] if clf else params[-1:]
    return params[0], last


def assert_invariants(model: nn.Module, groups, first=None, last=None, min_groups=3):
    check_groups(model, groups)  # every parameter once, no empty group, only parameters
    assert len(group_names(groups)) == len(groups)
    if min_groups:
        assert len(groups) >= min_groups, group_names(groups)
    where = {id(p): g for g, ps in enumerate(groups) for p in ps}
    f, l = first_and_last(model)
    first = f if first is None else first
    last = l if last is None else last
    assert where[id(first)] == 0, f"stem not in the first group: {group_names(groups)}"
    for p in last:
        assert where[id(p)] == len(groups) - 1, f"classifier not in the last group: {group_names(groups)}"


def wrapped(model: nn.Module, nf: int = 8) -> nn.Sequential:
    "A body+head model as fastai and fastai_groups build it; the body is the model minus nothing (structure only)."
    return nn.Sequential(model, create_head(nf, 5))


class Body(nn.Module):
    "A model held by a wrapper module, as fastai's TimmBody and our TimmBody/ForwardBody hold it."

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def wrapped_big_head(model: nn.Module) -> nn.Sequential:
    "Sequential(Body(model), head) with a head holding more parameters than the model (small bodies, wide heads)."
    n = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        head = create_head(8, 5, lin_ftrs=[n // 16 + 1])
    return nn.Sequential(Body(model), head)


def assert_wrapped_big_head(model: nn.Module, min_groups: int = 3):
    big = wrapped_big_head(model)
    head = list(big[1].parameters())
    assert sum(p.numel() for p in head) > sum(p.numel() for p in model.parameters())
    for g in GRANULARITIES:
        assert_invariants(big, auto_splitter(big, granularity=g), first=first_and_last(model)[0], last=head,
                          min_groups=min_groups)


# --------------------------------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("name", TV_MODELS)
def test_torchvision_bare(name):
    model = instantiate(name)
    for g in GRANULARITIES:
        assert_invariants(model, auto_splitter(model, granularity=g))
    assert len(auto_splitter(model, granularity="fastai")) == 3


@pytest.mark.parametrize("name", TV_MODELS)
def test_torchvision_wrapped(name):
    "As fastai's create_vision_model-style Sequential(body, head): the whole new head is the last group."
    body = instantiate(name)
    model = wrapped(body)
    head_params = list(model[1].parameters())
    for g in GRANULARITIES:
        groups = auto_splitter(model, granularity=g)
        assert_invariants(model, groups, first=first_and_last(body)[0], last=head_params)
    assert_wrapped_big_head(body)


FASTAI_SPLITS = {n: _resnet_split for n in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                           "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2",
                                           "wide_resnet101_2"]}
FASTAI_SPLITS.update({n: _densenet_split for n in ["densenet121", "densenet161", "densenet169", "densenet201"]})


@pytest.mark.parametrize("name", sorted(FASTAI_SPLITS))
def test_fastai_granularity_equals_fastai_split(name):
    with torch.device("meta"):
        model = create_vision_model(getattr(tvm, name), 10, pretrained=False)
    ref = FASTAI_SPLITS[name](model)
    ours = auto_splitter(model, granularity="fastai")
    assert [{id(p) for p in g} for g in ours] == [{id(p) for p in g} for g in ref]


def test_vision_learner_accepts_auto_splitter(tmp_path):
    from fastai.vision.all import DataLoaders, vision_learner
    from torch.utils.data import TensorDataset
    ds = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,)))
    dls = DataLoaders.from_dsets(ds, ds, bs=4)
    dls.c = 2
    learn = vision_learner(dls, tvm.resnet18, pretrained=False, splitter=auto_splitter, n_out=2, normalize=False,
                           loss_func=nn.CrossEntropyLoss())
    learn.create_opt()
    assert len(learn.opt.param_lists) >= 3
    n_opt = sum(p.numel() for g in learn.opt.param_lists for p in g)
    assert n_opt == sum(p.numel() for p in learn.model.parameters())


# --------------------------------------------------------------------------------------------------- timm
def timm_coarse_boundaries_respected(model, groups, coarse=True):
    "Every boundary between two of our groups is a boundary of timm's own grouping (no timm group cut in two)."
    from timm.models._manipulate import group_with_matcher
    try:
        matcher = model.group_matcher(coarse=coarse)
    except (AssertionError, NotImplementedError):  # e.g. RDNet: "coarse grouping is not implemented"
        return {}
    lid = group_with_matcher(model.named_parameters(), matcher, reverse=True)
    params = dict(model.named_parameters())
    ours = {id(p): g for g, ps in enumerate(groups) for p in ps}
    members = {}
    for n, g in lid.items():
        members.setdefault(g, set()).add(ours[id(params[n])])
    return {g: s for g, s in members.items() if len(s) > 1}


def test_timm_family_list_is_complete():
    timm = pytest.importorskip("timm")
    assert set(TIMM_SMALLEST) == set(timm.list_modules())     # every family of the installed timm is in the json


@pytest.mark.parametrize("family", sorted(TIMM_SMALLEST))
def test_timm_family(family):
    pytest.importorskip("timm")
    name = TIMM_SMALLEST[family]
    model = instantiate("timm:" + name)
    clf = model.get_classifier()
    has_head = any(True for c in (clf if isinstance(clf, tuple) else [clf]) for _ in c.parameters())
    for g in GRANULARITIES:
        groups = auto_splitter(model, granularity=g)
        assert_invariants(model, groups, min_groups=3 if has_head else 2)
        if callable(getattr(model, "group_matcher", None)):
            cut = timm_coarse_boundaries_respected(model, groups, coarse=g != "block")
            assert not cut, f"{name} {g}: timm groups cut in two: {cut}"
    assert_wrapped_big_head(model)
    model = wrapped(model)
    assert_invariants(model, auto_splitter(model), first=first_and_last(model[0])[0],
                      last=list(model[1].parameters()))


# --------------------------------------------------------------------------------------------------- odd models
@pytest.mark.parametrize("fn", [xresnet.xresnet18, xresnet.xresnet34, xresnet.xresnet50, xresnet.xresnet101,
                                xresnet.xresnet152])
def test_xresnets(fn):
    model = instantiate(fn)
    groups = auto_splitter(model)
    assert_invariants(model, groups)
    assert groups.names == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    assert {id(p) for p in groups[0]} == {id(p) for c in list(model.children())[:3] for p in c.parameters()}


def test_seed_alexnet():
    model = AlexNet()
    groups = auto_splitter(model)
    assert_invariants(model, groups)
    assert {id(p) for p in groups[-1]} == {id(p) for p in model.clf.parameters()}


def test_plain_sequential():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 4))
    groups = auto_splitter(model)
    assert_invariants(model, groups)
    assert [len(g) for g in groups] == [2, 2, 2, 2]


class RootParams(nn.Module):
    "Parameters registered directly on the root, used at both ends of the forward."

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.body = tvm.resnet18(num_classes=4)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.body(x + self.offset) / self.temperature


def test_parameters_on_root():
    model = RootParams()
    groups = auto_splitter(model)
    check_groups(model, groups)
    assert len(groups) >= 3
    assert any(p is model.offset for p in groups[0])


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[tvm.resnet.BasicBlock(8, 8) for _ in range(2)])
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)
        self.out.weight = self.fc.weight  # tied

    def forward(self, x):
        return self.out(self.fc(self.blocks(self.stem(x)).mean((2, 3))))


def test_tied_weights_once():
    model = Tied()
    groups = auto_splitter(model)
    check_groups(model, groups)  # raises on duplicates
    ids = [id(p) for g in groups for p in g]
    assert ids.count(id(model.fc.weight)) == 1


def test_real_and_meta_models_give_the_same_partition():
    real, meta = tvm.resnet34(), instantiate(tvm.resnet34)
    names_real = [[n for n, p in real.named_parameters() if any(p is q for q in g)] for g in auto_splitter(real)]
    names_meta = [[n for n, p in meta.named_parameters() if any(p is q for q in g)] for g in auto_splitter(meta)]
    assert names_real == names_meta
    # the real model is untouched: training mode kept, still on cpu
    assert real.training and all(p.device.type == "cpu" for p in real.parameters())


def test_n_groups():
    model = instantiate(tvm.resnet50)
    assert [len(auto_splitter(model, n_groups=k)) for k in (1, 2, 3, 4, 5, 6)] == [1, 2, 3, 4, 5, 6]
    assert auto_splitter(model, n_groups=2).names == ["stem-stage4", "head"]
    assert len(auto_splitter(model, granularity="block", n_groups=10)) == 10
    with pytest.raises(ValueError, match="n_groups=7 is more than ResNet can give at granularity 'stage': at most 6"):
        auto_splitter(model, n_groups=7)
    with pytest.raises(ValueError, match="n_groups must be a positive int"):
        auto_splitter(model, n_groups=0)


def test_bad_granularity():
    with pytest.raises(ValueError, match="granularity must be one of"):
        auto_splitter(tvm.resnet18(), granularity="layer")


def test_no_parameters():
    with pytest.raises(ValueError, match="has no parameters"):
        auto_splitter(nn.Sequential(nn.ReLU(), nn.Flatten()))


def test_learner_trains_with_auto_splitter():
    from fastai.vision.all import DataLoaders
    from torch.utils.data import TensorDataset
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,)))
    dls = DataLoaders.from_dsets(ds, ds, bs=8)
    model = tvm.resnet18(num_classes=3)
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), splitter=auto_splitter)
    learn.fit(1, lr=slice(1e-4, 1e-2))
    lrs = [h["lr"] for h in learn.opt.hypers]
    assert len(lrs) == 6 and lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-2)


# --------------------------------------------------------------------------------------------------- check_groups
@pytest.fixture
def net():
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))


def test_check_groups_accepts_good(net):
    check_groups(net, [list(net[0].parameters()), list(net[2].parameters())])


def test_check_groups_missing(net):
    with pytest.raises(ValueError, match=r"missing \(never trained\): 2.weight, 2.bias"):
        check_groups(net, [list(net[0].parameters())])


def test_check_groups_duplicated(net):
    with pytest.raises(ValueError, match=r"duplicated \(stepped twice\): 0.weight"):
        check_groups(net, [list(net.parameters()), [net[0].weight]])


def test_check_groups_non_parameters(net):
    with pytest.raises(ValueError) as e:
        check_groups(net, [[net[0].parameters()], [net[0]], [(net[2].weight, net[2].bias)], [torch.zeros(1)]])
    msg = str(e.value)
    for kind in ("generator", "Linear", "tuple", "Tensor"):
        assert f"is a {kind}, not an nn.Parameter" in msg
    assert "missing (never trained): 0.weight, 0.bias, 2.weight, 2.bias" in msg


def test_check_groups_generator_group_and_empty_group(net):
    with pytest.raises(ValueError) as e:
        check_groups(net, [net.parameters(), []])
    assert "group 0 is a generator, not a list of parameters" in str(e.value)
    assert "group 1 is empty" in str(e.value)


def test_check_groups_foreign_parameter(net):
    with pytest.raises(ValueError, match="not a parameter of this model"):
        check_groups(net, [list(net.parameters()) + [nn.Parameter(torch.zeros(1))]])


def test_checked_validates_when_optimizer_is_created(net):
    from fastai.vision.all import DataLoaders
    from torch.utils.data import TensorDataset
    ds = TensorDataset(torch.randn(8, 2), torch.randint(0, 2, (8,)))
    dls = DataLoaders.from_dsets(ds, ds, bs=4)
    learn = Learner(dls, net, loss_func=nn.CrossEntropyLoss(), splitter=checked(lambda m: [list(m[0].parameters())]))
    with pytest.raises(ValueError, match="missing"):
        learn.create_opt()
    good = Learner(dls, net, loss_func=nn.CrossEntropyLoss(), splitter=checked(auto_splitter))
    good.create_opt()
    assert len(good.opt.param_lists) == 2


def test_param_groups_names():
    g = ParamGroups([[nn.Parameter(torch.zeros(1))]], names=["head"])
    assert g.names == ["head"] and group_names([[1], [2]]) == ["group0", "group1"]
    with pytest.raises(ValueError):
        ParamGroups([[1]], names=["a", "b"])


def test_short_reprs():
    "issue 16.3: Structure, Unit and ParamGroups print names, counts and sizes, never the tensors."
    model = instantiate("resnet50")
    st = find_structure(model)
    text = str(st)
    assert text == repr(st) and len(text) < 200
    assert text == ("Structure(stem=[conv1, bn1, relu, maxpool], stages=4 (3, 4, 6, 3 units), head=[avgpool, fc], "
                    "traced=complete)")
    n = sum(p.numel() for p in model.layer1[0].parameters())
    k = len(list(model.layer1[0].parameters()))
    assert repr(st.stages[0][0]) == f"Unit('layer1.0', Bottleneck, block, {k} tensors, {n:,} elements, res=3136)"
    assert len(repr(st.units)) < 3000
    groups = auto_splitter(model)
    text = repr(groups)
    stem = sum(p.numel() for u in st.stem for p in u.params)
    assert text.startswith(f"ParamGroups(6 groups: stem (3 tensors, {stem:,}), stage1 (") and len(text) < 300
    assert text.endswith(f"head (2 tensors, {model.fc.weight.numel() + model.fc.bias.numel():,}))")
    blocks = repr(auto_splitter(model, granularity="block"))
    assert blocks.startswith("ParamGroups(18 groups: ") and "... 7 more, head (" in blocks and len(blocks) < 600


class NeedsRealData(nn.Module):
    "A forward that reads a tensor's value (`.item()`): it cannot run on the meta device."

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, 2), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        scale = 1.0 + float(x.mean().item() > 0)
        return self.fc(self.b(self.a(x * scale)).mean((2, 3)))


def test_untraceable_model_warns_and_still_partitions():
    model = NeedsRealData()
    with pytest.warns(UserWarning, match="auto_splitter could not run NeedsRealData on the meta device"):
        groups = auto_splitter(model)
    check_groups(model, groups)
    assert groups.names[-1] == "head" and {id(p) for p in groups[-1]} == {id(p) for p in model.fc.parameters()}


class PlainRes(nn.Module):
    "A residual block of two convs and no norm layer (identity skip): still a block, not a conv pair."

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2, self.act = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return self.act(x + self.conv2(self.act(self.conv1(x))))


class MixedNet(nn.Module):
    "Stem, a stage of norm-free residual blocks, a stage of resnet BasicBlocks (with BatchNorm), classifier."

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(PlainRes(8), PlainRes(8))
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16))
        self.layer2 = nn.Sequential(tvm.resnet.BasicBlock(8, 16, 2, down), tvm.resnet.BasicBlock(16, 16))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


def test_norm_free_residual_blocks_are_blocks():
    model = MixedNet()
    groups = auto_splitter(model, granularity="block")
    assert_invariants(model, groups)
    assert groups.names == ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "head"]
    assert {id(p) for p in groups[0]} == {id(p) for p in model.stem.parameters()}
    assert auto_splitter(model).names == ["stem", "stage1", "stage2", "head"]


def test_checked_accepts_generator_splitters(net):
    "A splitter yielding its groups (plain fastai accepts it) is read once: checked, and fastai gets the lists."
    from fastai.vision.all import DataLoaders
    from torch.utils.data import TensorDataset
    ds = TensorDataset(torch.randn(8, 2), torch.randint(0, 2, (8,)))
    dls = DataLoaders.from_dsets(ds, ds, bs=4)
    gen = checked(lambda m: (list(c.parameters()) for c in m.children() if any(True for _ in c.parameters())))
    learn = Learner(dls, net, loss_func=nn.CrossEntropyLoss(), splitter=gen)
    learn.create_opt()
    assert [len(g) for g in learn.opt.param_lists] == [len(list(c.parameters())) for c in net.children()
                                                         if any(True for _ in c.parameters())]
    learn.freeze()
    assert not any(p.requires_grad for p in learn.opt.param_lists[0])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
    with pytest.raises(ValueError, match="missing"):                  # a generator that misses parameters
        checked(lambda m: (list(c.parameters()) for c in list(m.children())[:1]))(net)
    named = checked(lambda m: ParamGroups([list(m[0].parameters()), list(m[2].parameters())], names=["a", "b"]))(net)
    assert isinstance(named, ParamGroups) and named.names == ["a", "b"]


def test_split_beside_threads_running_models():
    """A split while other threads run forwards, of another model and of a part of this very model: the groups are
    those of a quiet split, and every forward of the other threads gives its exact result (the trace runs on a meta
    copy: the model's tensors are never swapped, and only the copy's modules are recorded)."""
    import threading
    torch.manual_seed(0)
    model, other = tvm.resnet18().eval(), tvm.resnet34().eval()
    x, h = torch.randn(2, 3, 64, 64), torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        ref_other, ref_layer1 = other(x), model.layer1(h)
    quiet = auto_splitter(model)
    expected = [(n, [id(p) for p in g]) for n, g in zip(quiet.names, quiet)]
    stop, failures, runs = threading.Event(), [], [0]

    def forwards():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    ok = torch.equal(other(x), ref_other) and torch.equal(model.layer1(h), ref_layer1)
            except Exception as e:          # e.g. "Tensor on device meta" when the trace swapped the tensors
                ok = repr(e)
            if ok is not True:
                failures.append(ok)
            runs[0] += 1

    threads = [threading.Thread(target=forwards) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        i = 0
        while i < 15 or runs[0] < 10:                # at least 15 cold splits while 10 forwards of the others ran
            assert i < 500
            i += 1
            model.fc = nn.Linear(512, 1000)          # a replaced layer: the next split traces again (cold)
            g = auto_splitter(model)
            expected[-1] = ("head", [id(p) for p in model.fc.parameters()])
            assert [(n, [id(p) for p in grp]) for n, grp in zip(g.names, g)] == expected
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
