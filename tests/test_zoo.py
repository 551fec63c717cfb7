"""auto_splitter / find_structure / create_body on models nobody tuned it for (issue 13), all built on the meta device.

Sources: every HuggingFace `transformers` image-classification model that builds from its default config offline,
the encoders of `segmentation-models-pytorch` (seeded sample), `open_clip` visual towers (seeded sample), a seeded
sample of timm models that are *not* the smallest of their family (a fixed seed by default;
`FASTAI_GROUPS_ZOO_SEED=daily` or an integer draws another sample, printed to replay it), plus hand-written repros of the issue.

On each model (`check_zoo_model`), against a reference meta forward run by the test itself:

1. every parameter is in exactly one group (`check_groups`);
2. the parameter the forward uses first (as an argument of a torch function) is in the first group, the one it
   uses last in the last group (a root `logit_scale` used at the end counts: it must not be frozen with the stem);
3. groups follow the forward: along the order in which parameters are first used, the group index never
   decreases (on timm models, a parameter counts as used when the largest member of its timm `group_matcher`
   group is: the splitter keeps timm's groups whole, and timm puts e.g. XCiT's `cls_token`, read late, in the stem);
4. no block is cut. A *block* here is a module, other than the root and the plain containers (`Sequential`,
   `ModuleList`, `ModuleDict`), whose own forward merges several paths: while it is the innermost module running,
   an add / sub / mul / cat / stack takes two or more distinct *activations* (tensors computed from the input, not
   parameters or buffers). A residual block, a dense layer, an SE gate, a concat cell all qualify; a stage that only
   chains blocks does not. Whole models are exempt (they may be opened): a module holding both the first and the
   last used parameters, or the first one and two or more blocks (a backbone). A block's parameters
   must all lie in one group, at granularities "stage" and "fastai"; at "block" the innermost blocks (holding no
   other block) must be whole.
"""
from __future__ import annotations

import datetime
import json
import os
import random
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

from fastai_groups import auto_splitter, check_groups, create_body, find_structure

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: The sample of the suite (and CI) is fixed, so that an unrelated change never fails on a new sample; set
#: FASTAI_GROUPS_ZOO_SEED=daily (today's date) or any integer to draw another sample (printed, to replay it).
#: Seeds passed at issue 21: 20261202, 20261203, 20261204, 1, 7, 42.
_SEED = os.environ.get("FASTAI_GROUPS_ZOO_SEED", "20261202")
SEED = int(datetime.date.today().strftime("%Y%m%d") if _SEED == "daily" else _SEED)
print(f"\nzoo seed: FASTAI_GROUPS_ZOO_SEED={SEED}")
N_TIMM, N_SMP, N_CLIP = 100, 12, 8
TIMES: dict[str, float] = {}  # model id -> cold split time (s), printed at the end of the session

_MERGES = {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "__rsub__", "sub_", "__isub__",
           "mul", "__mul__", "__rmul__", "mul_", "__imul__", "cat", "concat", "concatenate", "stack", "hstack",
           "vstack", "addcmul", "lerp"}


# ------------------------------------------------------------------------------------------ reference forward
class _Reference(TorchFunctionMode):
    """During one meta forward: the order in which parameters are first used by a torch function, and the modules
    whose own frame merges paths (two or more distinct activations into an add / sub / mul / cat / stack)."""

    def __init__(self):
        super().__init__()
        self.act = WeakTensorKeyDictionary()
        self.stack: list[nn.Module] = []
        self.merging: set[int] = set()
        self.used: dict[int, int] = {}  # id(parameter) -> rank of first use

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = []
        for a in list(args) + list(kwargs.values()):
            flat += list(a) if isinstance(a, (list, tuple)) else [a]
        for t in flat:
            if isinstance(t, nn.Parameter) and id(t) not in self.used:
                self.used[id(t)] = len(self.used)
        acts = {id(t) for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)
                and t in self.act}
        if acts:
            outs = out if isinstance(out, (list, tuple)) else [out]
            for t in outs:
                if isinstance(t, torch.Tensor):
                    self.act[t] = True
            if len(acts) >= 2 and getattr(func, "__name__", "") in _MERGES and self.stack:
                self.merging.add(id(self.stack[-1]))
        return out


def reference(model: nn.Module, x) -> dict:
    """One meta forward of `model` on `x`: its parameters in order of first use (`used`: [(name, parameter)]) and its
    blocks (see the module docstring) as {name: (parameter ids, innermost)}."""
    mode, handles = _Reference(), []

    def pre(m, args):
        mode.stack.append(m)

    def post(m, args, out):
        mode.stack.pop()

    for m in model.modules():
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post, always_call=True)]
    xs = x if isinstance(x, tuple) else (x,)
    try:
        model.eval()
        with torch.no_grad(), warnings.catch_warnings(), mode:
            warnings.simplefilter("ignore")
            for t in xs:
                mode.act[t] = True
            model(*xs)
    finally:
        for h in handles:
            h.remove()
    names = {id(p): n for n, p in model.named_parameters()}
    used = sorted((r, names[i]) for i, r in mode.used.items() if i in names)
    params = dict(model.named_parameters())
    first, last = params[used[0][1]], params[used[-1][1]]
    blocks = {}
    for n, m in model.named_modules():
        if not n or type(m) in (nn.Sequential, nn.ModuleList, nn.ModuleDict) or id(m) not in mode.merging:
            continue
        ps = {id(p) for p in m.parameters()}
        inner = [k for k, b in model.named_modules() if k.startswith(n + ".") and id(b) in mode.merging]
        if id(first) in ps and (id(last) in ps or len(inner) >= 2):
            continue  # a whole model / backbone: may be opened
        if ps:
            blocks[n] = (ps, not inner)
    return {"used": [(n, params[n]) for _, n in used], "blocks": blocks}


def _timm_order(model: nn.Module, used: list, coarse: bool) -> list:
    """`used` (parameters in order of first use), where timm declares its own grouping (`group_matcher`), ordered
    by when each parameter's timm group is used: the first use by which half of the group's elements have been used
    (the splitter keeps timm's groups whole, where most of each lies), the group of the input layer at once (the
    stem stays first). timm puts XCiT's `cls_token` (read after the blocks) and VOLO's `pos_embed` (added after
    `network.1`) with the stem, and EfficientViM's per-stage norms (read by the head only) and a RoPE's `freqs` (read by every block) with
    the head."""
    if not (callable(getattr(model, "group_matcher", None)) and hasattr(model, "default_cfg")):
        return used
    from timm.models._manipulate import group_with_matcher
    try:
        lid = group_with_matcher(model.named_parameters(), model.group_matcher(coarse=coarse), reverse=True)
    except Exception:
        return used
    total: dict = {}
    for n, p in used:
        total[lid.get(n)] = total.get(lid.get(n), 0) + p.numel()
    anchor, seen = {lid.get(used[0][0]): 0}, {}  # timm group -> rank of the first use by which half its elements
    # are used; the group of the input layer (timm's stem) at once: the splitter keeps it first
    for rank, (n, p) in enumerate(used):
        g = lid.get(n)
        seen[g] = seen.get(g, 0) + p.numel()
        if g not in anchor and 2 * seen[g] >= total[g]:
            anchor[g] = rank
    return [u for _, u in sorted(enumerate(used), key=lambda iu: (anchor[lid.get(iu[1][0])], iu[0]))]


def check_zoo_model(key: str, model: nn.Module, x) -> None:
    "Split `model` cold at every granularity and check the invariants of the module docstring against `x`'s forward."
    ref = reference(model, x)
    t = time.perf_counter()
    groups = auto_splitter(model)
    TIMES[key] = time.perf_counter() - t
    print(f"{key}: cold split {TIMES[key] * 1e3:.0f} ms, {len(groups)} groups")
    for g in ("stage", "fastai", "block"):
        gs = groups if g == "stage" else auto_splitter(model, granularity=g)
        check_groups(model, gs)
        where = {id(p): i for i, ps in enumerate(gs) for p in ps}
        used = [(n, where[id(p)]) for n, p in ref["used"]]
        assert used[0][1] == 0, f"{key} {g}: first used parameter {used[0][0]} in group {used[0][1]}"
        assert used[-1][1] == len(gs) - 1, \
            f"{key} {g}: last used parameter {used[-1][0]} in group {used[-1][1]} of {len(gs)}"
        used = [(n, where[id(p)]) for n, p in _timm_order(model, ref["used"], coarse=g != "block")]
        back, top, top_name = [], 0, ""
        for n, i in used:
            if i < top:
                back.append(f"{n} (group {i}, used after {top_name} in group {top})")
            elif i > top:
                top, top_name = i, n
        assert not back, f"{key} {g}: {len(back)} parameters used after a later group's: {back[:3]}"
        cut = [n for n, (ps, innermost) in ref["blocks"].items()
               if (g != "block" or innermost) and len({where[i] for i in ps if i in where}) > 1]
        assert not cut, f"{key} {g}: blocks cut: {cut[:5]}"


# ------------------------------------------------------------------------------------------ HuggingFace
class HFClassifier(nn.Module):
    "A transformers image classifier as a plain model: pixel_values in, logits out."

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def _hf_types() -> list[str]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as M
    except ImportError:
        return []
    return sorted(M)


def build_hf(model_type: str):
    "The model on meta from its default config and an input, or None when it does not build / run offline."
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as M
    cls = M[model_type]
    cls = cls[0] if isinstance(cls, (tuple, list)) else cls
    try:
        cfg = AutoConfig.for_model(model_type)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = HFClassifier(getattr(transformers, cls)(cfg)).eval()
        vc = getattr(cfg, "vision_config", cfg)
        size = getattr(vc, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        x = torch.empty(2, getattr(vc, "num_channels", 3), size, size, device="meta")
        with torch.no_grad():
            model(x)
    except Exception as e:  # needs an optional library (natten), text inputs, or has no logits: not a zoo model
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    return model, x


#: Image-classification types of transformers that cannot be a zoo model here, and why (checked below: one that
#: starts to build offline fails that test and belongs in the zoo).
HF_UNBUILDABLE = {
    "dinat": "needs the natten package",
    "imagegpt": "takes token ids, not pixels",
    "shieldgemma2": "takes token ids with its images",
    "perceiver": "calls .item() in its forward: cannot run on meta",
    "pp_lcnet": "its output has no .logits",
    "siglip2": "needs a pixel mask and spatial shapes with its pixels",
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [t for t in _hf_types() if t not in HF_UNBUILDABLE])
def test_hf(model_type):
    pytest.importorskip("transformers")
    model, x = build_hf(model_type)
    assert model is not None, f"hf:{model_type} no longer builds offline from its default config: {x}"
    check_zoo_model(f"hf:{model_type}", model, x)


@pytest.mark.parametrize("model_type", sorted(set(HF_UNBUILDABLE) & set(_hf_types())))
def test_hf_types_left_out_do_not_build(model_type):
    "The types left out of the zoo really cannot be built and run offline from their default config."
    model, why = build_hf(model_type)
    assert model is None, f"hf:{model_type} builds now: move it from HF_UNBUILDABLE into the zoo"


# ------------------------------------------------------------------------------------------ segmentation-models
def _smp_names() -> list[str]:
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        return []
    names = smp.encoders.get_encoder_names()
    fixed = [n for n in ("resnet34", "xception", "inceptionv4", "dpn68", "mobileone_s0") if n in names]
    rest = sorted(set(names) - set(fixed))
    return fixed + sorted(random.Random(SEED).sample(rest, min(N_SMP, len(rest))))


@pytest.mark.slow
@pytest.mark.parametrize("name", _smp_names())
def test_smp_encoder(name):
    import segmentation_models_pytorch as smp
    try:
        with torch.device("meta"):
            enc = smp.encoders.get_encoder(name, weights=None)
    except RuntimeError:  # mit_b*: .item() in __init__; built for real (small), then moved to meta
        enc = smp.encoders.get_encoder(name, weights=None).to("meta")
    x = torch.empty(2, 3, 256, 256, device="meta")
    check_zoo_model(f"smp:{name}", enc, x)


# ------------------------------------------------------------------------------------------ open_clip
def _clip_names() -> list[str]:
    try:
        import open_clip
    except ImportError:
        return []
    names = open_clip.list_models()
    fixed = [n for n in ("RN50", "ViT-B-32", "convnext_tiny") if n in names]
    rest = sorted(set(names) - set(fixed))
    return fixed + sorted(random.Random(SEED).sample(rest, min(N_CLIP, len(rest))))


@pytest.mark.slow
@pytest.mark.parametrize("name", _clip_names())
def test_open_clip_visual(name):
    import open_clip
    from open_clip.model import _build_vision_tower
    cfg = open_clip.get_model_config(name)
    with torch.device("meta"):  # the tower alone, as create_model(name).visual builds it (no text tower, no weights)
        visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
    size = getattr(visual, "image_size", None) or cfg["vision_cfg"].get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    check_zoo_model(f"clip:{name}", visual, torch.empty(2, 3, size, size, device="meta"))


# ------------------------------------------------------------------------------------------ timm
def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    smallest = set(json.loads((Path(__file__).parent / "timm_smallest.json").read_text()).values())
    names = sorted(set(timm.list_models()) - smallest)
    return sorted(random.Random(SEED).sample(names, min(N_TIMM, len(names))))


@pytest.mark.slow
@pytest.mark.parametrize("name", _timm_names())
def test_timm_not_smallest(name):
    import timm
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    check_zoo_model(f"timm:{name}", model, torch.empty((2,) + tuple(size), device="meta"))


# ------------------------------------------------------------------------------------------ the repros
class FcFirst(nn.Module):
    "The classifier declared before the layers (issue 13's repro)."

    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(64, 10)
        s.c1, s.b1, s.c2, s.b2 = nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.Conv2d(32, 64, 3, 2, 1), \
            nn.BatchNorm2d(64)

    def forward(s, x):
        return s.fc(s.b2(s.c2(s.b1(s.c1(x)).relu())).relu().mean((2, 3)))


def _group_of(groups, module: nn.Module) -> set:
    where = {id(p): i for i, ps in enumerate(groups) for p in ps}
    return {where[id(p)] for p in module.parameters()}


def _split_quietly_or_warned(model):
    "auto_splitter's groups; a warning is allowed (then it must name what it placed), never an error."
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        groups = auto_splitter(model)
    return groups, [str(x.message) for x in w if issubclass(x.category, UserWarning)]


def test_fc_declared_first_is_the_head():
    model = FcFirst()
    groups, _ = _split_quietly_or_warned(model)
    check_groups(model, groups)
    assert _group_of(groups, model.fc) == {len(groups) - 1}, groups.names
    assert _group_of(groups, model.c1) == {0}
    for m in (model.b1, model.c2, model.b2):  # the body, in forward order, before the head
        assert max(_group_of(groups, m)) < len(groups) - 1
    check_zoo_model("repro:FcFirst", FcFirst().to("meta"), torch.empty(2, 3, 32, 32, device="meta"))


def test_create_body_keeps_the_layer_before_a_head_declared_first():
    model = FcFirst()
    body = create_body(model, pretrained=False)
    kept = {id(p) for p in body.parameters()}
    for m in (model.c1, model.b1, model.c2, model.b2):
        assert all(id(p) in kept for p in m.parameters()), "a body layer was dropped"
    assert not any(id(p) in kept for p in model.fc.parameters())
    x = torch.randn(2, 3, 32, 32)
    model.eval(), body.eval()
    ref = model.b2(model.c2(model.b1(model.c1(x)).relu()))  # the last feature map, before relu/mean/fc
    out = body(x)
    assert out.shape[:2] == (2, 64) and out.ndim == 4
    assert torch.allclose(out.relu(), ref.relu(), atol=1e-5) or torch.allclose(out, ref, atol=1e-5)


class FcFirstUnused(FcFirst):
    "The repro with a layer its forward never calls."

    def __init__(s):
        super().__init__()
        s.spare = nn.Conv2d(64, 64, 1)


def test_create_body_says_which_layers_it_drops():
    model = FcFirstUnused()
    with pytest.warns(UserWarning, match=r"create_body: spare of FcFirstUnused hold parameters"):
        body = create_body(model, pretrained=False)
    kept = {id(p) for p in body.parameters()}
    assert not any(id(p) in kept for p in model.spare.parameters())
    assert all(id(p) in kept for p in model.b2.parameters())


class HeadFirstDict(nn.Module):
    "A ModuleDict declared head first: head, then stage2, stage1, stem."

    def __init__(s):
        super().__init__()
        s.parts = nn.ModuleDict({"head": nn.Linear(32, 5),
                                 "stage2": nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU()),
                                 "stage1": nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU()),
                                 "stem": nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())})

    def forward(s, x):
        p = s.parts
        return p["head"](p["stage2"](p["stage1"](p["stem"](x))).mean((2, 3)))


def test_moduledict_declared_head_first():
    model = HeadFirstDict()
    groups, _ = _split_quietly_or_warned(model)
    check_groups(model, groups)
    assert _group_of(groups, model.parts["head"]) == {len(groups) - 1}
    assert _group_of(groups, model.parts["stem"][0]) == {0}
    check_zoo_model("repro:HeadFirstDict", HeadFirstDict().to("meta"), torch.empty(2, 3, 32, 32, device="meta"))


class AudioRes(nn.Module):
    def __init__(s, c):
        super().__init__()
        s.c1, s.n1, s.c2, s.n2 = nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c), nn.Conv1d(c, c, 3, padding=1), \
            nn.BatchNorm1d(c)

    def forward(s, x):
        return (x + s.n2(s.c2(s.n1(s.c1(x)).relu()))).relu()


class AudioNet(nn.Module):
    "A Conv1d audio classifier on (B, 1, 16000) waveforms: strided stem, residual stages, linear head."

    def __init__(s):
        super().__init__()
        s.stem = nn.Sequential(nn.Conv1d(1, 16, 80, stride=16), nn.BatchNorm1d(16), nn.ReLU())
        s.layer1 = nn.Sequential(AudioRes(16), AudioRes(16))
        s.down = nn.Sequential(nn.Conv1d(16, 32, 3, stride=4), nn.BatchNorm1d(32), nn.ReLU())
        s.layer2 = nn.Sequential(AudioRes(32), AudioRes(32))
        s.classifier = nn.Linear(32, 10)

    def forward(s, x):
        return s.classifier(s.layer2(s.down(s.layer1(s.stem(x)))).mean(-1))


def test_conv1d_audio_model():
    model = AudioNet()
    groups, _ = _split_quietly_or_warned(model)
    check_groups(model, groups)
    assert _group_of(groups, model.classifier) == {len(groups) - 1}
    body = {id(p) for m in (model.stem, model.layer1, model.down, model.layer2) for p in m.parameters()}
    assert not body & {id(p) for p in groups[-1]}, "body parameters in the head group"
    assert len(groups) >= 3
    check_zoo_model("repro:AudioNet", AudioNet().to("meta"), torch.empty(2, 1, 16000, device="meta"))


class LogitScaleNet(nn.Module):
    "A root parameter used at the very end (CLIP's logit_scale): it must not be frozen with the stem."

    def __init__(s):
        super().__init__()
        s.logit_scale = nn.Parameter(torch.ones([]))
        s.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        s.layer1 = nn.Sequential(*[tvm_basic(16) for _ in range(2)])
        s.fc = nn.Linear(16, 4)

    def forward(s, x):
        return s.fc(s.layer1(s.stem(x)).mean((2, 3))) * s.logit_scale.exp()


def tvm_basic(c):
    from torchvision.models.resnet import BasicBlock
    return BasicBlock(c, c)


def test_root_parameter_used_last_goes_with_the_head():
    model = LogitScaleNet()
    groups, _ = _split_quietly_or_warned(model)
    check_groups(model, groups)
    g = _group_of(groups, model.fc)
    assert g == {len(groups) - 1}
    where = {id(p): i for i, ps in enumerate(groups) for p in ps}
    assert where[id(model.logit_scale)] == len(groups) - 1, groups.names
    assert _group_of(groups, model.stem) == {0}


class SeparableConv(nn.Module):
    def __init__(s, cin, cout):
        super().__init__()
        s.dw = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        s.pw = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(s, x):
        return s.pw(s.dw(x))


class XceptionBlock(nn.Module):
    "Xception's block: `rep`, a Sequential of separable convs, plus a `skip` conv, summed."

    def __init__(s, cin, cout, stride):
        super().__init__()
        s.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        s.rep = nn.Sequential(nn.ReLU(), SeparableConv(cin, cout), nn.BatchNorm2d(cout), nn.ReLU(),
                              SeparableConv(cout, cout), nn.BatchNorm2d(cout), nn.ReLU(),
                              SeparableConv(cout, cout), nn.BatchNorm2d(cout), nn.MaxPool2d(3, stride, 1))

    def forward(s, x):
        return s.rep(x) + s.skip(x)


class MiniXception(nn.Module):
    def __init__(s):
        super().__init__()
        s.conv1, s.bn1 = nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        s.block1, s.block2, s.block3 = XceptionBlock(16, 32, 2), XceptionBlock(32, 64, 2), XceptionBlock(64, 64, 1)
        s.fc = nn.Linear(64, 10)

    def forward(s, x):
        x = s.block3(s.block2(s.block1(s.bn1(s.conv1(x)).relu())))
        return s.fc(x.mean((2, 3)))


def _assert_whole(groups, modules: dict):
    for n, m in modules.items():
        assert len(_group_of(groups, m)) == 1, f"{n} cut in two: groups {_group_of(groups, m)} ({groups.names})"


def test_xception_blocks_never_cut():
    model = MiniXception()
    for g in ("stage", "fastai", "block"):
        groups = auto_splitter(model, granularity=g)
        check_groups(model, groups)
        _assert_whole(groups, {"block1": model.block1, "block2": model.block2, "block3": model.block3})
        assert _group_of(groups, model.fc) == {len(groups) - 1}
    check_zoo_model("repro:MiniXception", MiniXception().to("meta"), torch.empty(2, 3, 64, 64, device="meta"))


class Branch(nn.Module):
    def __init__(s, c, k, stride=1):
        super().__init__()
        s.act, s.sep, s.bn = nn.ReLU(), SeparableConv(c, c), nn.BatchNorm2d(c)
        s.pool = nn.AvgPool2d(3, stride, 1) if stride > 1 else nn.Identity()

    def forward(s, x):
        return s.pool(s.bn(s.sep(s.act(x))))


class Cell(nn.Module):
    "A NASNet/PNASNet-style cell: takes the two previous outputs, adapts them, combines 4 branch blocks, concat."

    def __init__(s, c_prev_prev, c_prev, c, reduce):
        super().__init__()
        st = 2 if reduce else 1
        s.conv_prev_1x1 = nn.Sequential(nn.ReLU(), nn.Conv2d(c_prev_prev, c, 1, bias=False), nn.BatchNorm2d(c))
        s.conv_1x1 = nn.Sequential(nn.ReLU(), nn.Conv2d(c_prev, c, 1, bias=False), nn.BatchNorm2d(c))
        s.comb0_left, s.comb0_right = Branch(c, 5, st), Branch(c, 3, st)
        s.comb1_left, s.comb1_right = Branch(c, 3, st), Branch(c, 3, st)
        s.reduce = reduce

    def forward(s, x_prev, x):
        a, b = s.conv_prev_1x1(x_prev), s.conv_1x1(x)
        if a.shape[-1] != b.shape[-1]:
            a = nn.functional.adaptive_avg_pool2d(a, b.shape[-2:])
        y0 = s.comb0_left(a) + s.comb0_right(b)
        y1 = s.comb1_left(b) + s.comb1_right(a)
        return torch.cat([y0, y1], 1)


class MiniNASNet(nn.Module):
    def __init__(s):
        super().__init__()
        s.conv0 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16))
        s.cell_0 = Cell(16, 16, 8, False)   # out 16
        s.cell_1 = Cell(16, 16, 8, False)   # out 16
        s.cell_2 = Cell(16, 16, 16, True)   # out 32, /2
        s.cell_3 = Cell(16, 32, 16, False)  # out 32
        s.cell_4 = Cell(32, 32, 16, False)  # out 32
        s.last_linear = nn.Linear(32, 10)

    def forward(s, x):
        x0 = s.conv0(x)
        x1 = s.cell_0(x0, x0)
        x2 = s.cell_1(x0, x1)
        x3 = s.cell_2(x1, x2)
        x4 = s.cell_3(x2, x3)
        x5 = s.cell_4(x3, x4)
        return s.last_linear(x5.relu().mean((2, 3)))


def test_nasnet_cells_never_cut():
    model = MiniNASNet()
    for g in ("stage", "fastai", "block"):
        groups, _ = _split_quietly_or_warned(model) if g == "stage" else (auto_splitter(model, granularity=g), [])
        check_groups(model, groups)
        _assert_whole(groups, {f"cell_{i}": getattr(model, f"cell_{i}") for i in range(5)})
        assert _group_of(groups, model.last_linear) == {len(groups) - 1}
        assert _group_of(groups, model.conv0) == {0}
    check_zoo_model("repro:MiniNASNet", MiniNASNet().to("meta"), torch.empty(2, 3, 64, 64, device="meta"))


def test_find_structure_head_is_what_produces_the_output():
    for model, clf in ((FcFirst(), "fc"), (AudioNet(), "classifier"), (MiniXception(), "fc")):
        st = find_structure(model)
        assert clf in [u.name for u in st.head], (type(model).__name__, [u.name for u in st.head])


class FcFirstNeedsData(FcFirst):
    "The repro, with a forward that needs real data after the first conv: the meta trace stops there."

    def forward(s, x):
        x = s.b1(s.c1(x)).relu()
        x = x * (1.0 + float(x.mean().item() > 0))
        return s.fc(s.b2(s.c2(x)).relu().mean((2, 3)))


def test_partial_trace_warns_and_places_the_classifier_in_the_head():
    model = FcFirstNeedsData()
    with pytest.warns(UserWarning) as rec:
        groups = auto_splitter(model)
    check_groups(model, groups)
    msgs = [str(w.message) for w in rec]
    assert any("fc" in m and "c2" in m for m in msgs), msgs  # names the modules it had to place
    assert _group_of(groups, model.fc) == {len(groups) - 1}, groups.names
    assert _group_of(groups, model.c1) == {0}


@pytest.fixture(scope="module", autouse=True)
def _print_slowest():
    yield
    if TIMES:
        slow = sorted(TIMES.items(), key=lambda kv: -kv[1])[:10]
        print("\nslowest cold splits: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in slow))
