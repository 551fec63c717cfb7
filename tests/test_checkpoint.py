"""fastai_groups.checkpoint and reliability: wrapped models (torch.compile, nn.DataParallel), save / load / export and resuming a fit,
mixed precision with the fast frozen body and GroupLogger. Tiny residual CNNs on 32 px PNGs, real fastai Learners."""
import math
import warnings
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback
from fastai.callback.tracker import SaveModelCallback
from fastai.learner import Learner, load_learner, load_model, save_model
from fastai.vision.data import ImageDataLoaders
from torch import nn

from fastai_groups import FastFrozenBody, FeatureCache, GradualUnfreeze, GroupLogger, arch_summary, auto_splitter, \
    check_groups, get_module, group_learner
from fastai_groups.summary import summary_rows

NAMES = ["stem", "stage1", "stage2", "stage3", "head"]     # TinyNet's groups (auto_splitter, group_learner)
LR = slice(1e-4, 1e-2)


# ------------------------------------------------------------------------------------------------------- fixtures
class Res(nn.Module):
    "conv-(bn)-relu-conv-(bn) plus the input (a strided 1x1 conv when the shape changes), relu."

    def __init__(self, ci, co, stride, bn=True):
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.conv1, self.bn1 = nn.Conv2d(ci, co, 3, stride, 1, bias=False), norm(co)
        self.conv2, self.bn2 = nn.Conv2d(co, co, 3, 1, 1, bias=False), norm(co)
        self.down = nn.Conv2d(ci, co, 1, stride, bias=False) if stride != 1 or ci != co else nn.Identity()

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.down(x))


class TinyNet(nn.Module):
    "A resnet in miniature (conv1, bn1, relu, layer1..3, avgpool, fc): groups stem, stage1..3, head."

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.layer1, self.layer2, self.layer3 = (nn.Sequential(Res(8, 8, 1)), nn.Sequential(Res(8, 16, 2)),
                                                 nn.Sequential(Res(16, 16, 2)))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CompileNet(nn.Module):
    """The smallest model with a stem, stages and a head (no norm layers: few kernels for inductor to build; each
    block has a 1x1 conv on its skip, so that it has 3 parameterised layers and counts as a block)."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv1, self.relu = nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.ReLU()
        self.layer1, self.layer2 = nn.Sequential(Res(8, 12, 1, bn=False)), nn.Sequential(Res(12, 16, 2, bn=False))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.layer2(self.layer1(self.relu(self.conv1(x))))), 1))


def make_dls(root, device="cpu"):
    return ImageDataLoaders.from_folder(root, train="train", valid="valid", bs=6, num_workers=0, device=device)


def make_learn(root, path, cbs=(), seed=0, **kwargs):
    "`group_learner` on TinyNet, random init (so unfrozen), `train_bn=False`: the fast frozen body engages."
    torch.manual_seed(seed)
    dls = make_dls(root, kwargs.pop("device", "cpu"))
    kwargs = {"train_bn": False, "lin_ftrs": [16], **kwargs}
    learn = group_learner(dls, TinyNet, pretrained=False, path=path, cbs=[GroupLogger(show_table=False), *cbs],
                          **kwargs)
    learn.remove_cb(ProgressCallback)
    return learn


def fit(learn, method="fit_one_cycle", *args, **kwargs):
    with learn.no_logging():
        getattr(learn, method)(*args, **kwargs)


class Probe(Callback):
    "Per training batch: (epoch, iter), the lr of every group at the step, `learn.fast_frozen_mode` after the forward."
    order = 100

    def before_fit(self):
        self.rows = []

    def after_pred(self):
        if self.training:
            self._mode = getattr(self.learn, "fast_frozen_mode", None)

    def before_step(self):
        self.rows.append((self.epoch, self.iter, tuple(float(h["lr"]) for h in self.opt.hypers), self._mode))


def flags(learn) -> dict:
    return {n: p.requires_grad for n, p in learn.model.named_parameters()}


def same_hypers(a, b) -> bool:
    return len(a) == len(b) and all(dict(x) == dict(y) for x, y in zip(a, b))


def rows_from(df, **eq) -> pd.DataFrame:
    "Rows matching `col >= value` for each keyword, without the `fit` column, index reset."
    for k, v in eq.items():
        df = df[df[k] >= v]
    return df.drop(columns="fit").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------------- wrappers
WRAPPERS = {"compile": torch.compile, "dataparallel": nn.DataParallel,
            "dataparallel(compile)": lambda m: nn.DataParallel(torch.compile(m))}


@pytest.mark.parametrize("wrap", list(WRAPPERS))
def test_wrappers_see_through(wrap, capsys):
    "Summary, get_module, auto_splitter, check_groups on a wrapped model: the bare model's modules and parameters."
    model = TinyNet()
    wrapped = WRAPPERS[wrap](model)
    assert wrapped is not model and isinstance(wrapped, nn.Module)
    for split in (auto_splitter, *[partial(auto_splitter, granularity=g) for g in ("fastai", "block")]):
        bare, seen = split(model), split(wrapped)
        assert seen.names == bare.names
        assert [[id(p) for p in g] for g in seen] == [[id(p) for p in g] for g in bare]   # the same objects
    assert auto_splitter(wrapped).names == NAMES
    check_groups(wrapped, auto_splitter(wrapped))
    with pytest.raises(ValueError, match=r"missing \(never trained\): fc.weight, fc.bias"):
        check_groups(wrapped, auto_splitter(wrapped)[:-1])
    assert get_module(wrapped, "layer2.0") is model.layer2[0]
    assert get_module(wrapped, [4, 0, 0]) is model.layer2[0].conv1
    assert [(r.name, r.params) for r in summary_rows(wrapped)] == [(r.name, r.params) for r in summary_rows(model)]
    arch_summary(model, params=True, groups=auto_splitter)
    expected = capsys.readouterr().out
    arch_summary(wrapped, params=True, groups=auto_splitter)
    assert capsys.readouterr().out == expected and "layer3" in expected and "head" in expected


@pytest.mark.slow
def test_compiled_model_trains_with_group_logger(image_folder):
    """fastai `Learner(dls, torch.compile(model), splitter=auto_splitter, cbs=GroupLogger())` trains one epoch on CPU
    with torch's default backend, inductor: it works on CPU (gcc builds its C++ kernels), so no "eager"/"aot_eager"
    stand-in. Cold, inductor's ~13 kernels take ~1 s of gcc each on 2 cores; later runs hit its on-disk cache."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CompileNet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learn = Learner(make_dls(image_folder), torch.compile(model), splitter=auto_splitter,
                    cbs=[GroupLogger(show_table=False), Probe()])
    learn.remove_cb(ProgressCallback)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fit(learn, "fit", 1, LR)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames        # it really ran compiled
    assert all(math.isfinite(float(v)) for v in learn.recorder.losses)
    bare = auto_splitter(model)
    assert [[id(p) for p in g] for g in learn.opt.param_lists] == [[id(p) for p in g] for g in bare]
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())  # the compiled graph trained them
    df = learn.group_logger.history
    n = len(learn.dls.train)
    assert df["name"].iloc[:4].tolist() == ["stem", "stage1", "stage2", "head"] == bare.names
    assert len(df) == 4 * n and (df["state"] == "trainable").all()
    lr = df.pivot(index="iter", columns="group", values="lr").to_numpy()
    assert np.array_equal(lr, np.array([r[2] for r in learn.probe.rows]))
    assert np.allclose(lr[0], np.geomspace(1e-4, 1e-2, 4))


def test_dataparallel_model_trains_with_group_logger(image_folder):
    """`nn.DataParallel` (on CPU it runs the module itself; with GPUs it needs the model on the first GPU): groups,
    names, freeze state and hypers are the bare model's."""
    torch.manual_seed(0)
    model = TinyNet()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    learn = Learner(make_dls(image_folder, device), nn.DataParallel(model), splitter=auto_splitter, train_bn=False,
                    cbs=[GroupLogger(show_table=False), Probe()])
    learn.remove_cb(ProgressCallback)
    learn.freeze_to(-2)
    fit(learn, "fit", 1, LR)
    df = learn.group_logger.history
    assert df["name"].iloc[:5].tolist() == NAMES
    assert df.drop_duplicates("group")["state"].tolist() == ["frozen"] * 3 + ["trainable"] * 2
    assert not any(p.requires_grad for p in model.layer2.parameters()) and model.layer3[0].conv1.weight.requires_grad
    lr = df.pivot(index="iter", columns="group", values="lr").to_numpy()
    assert np.array_equal(lr, np.array([r[2] for r in learn.probe.rows]))


# ---------------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("saved_frozen", [True, False])
def test_save_load_into_fresh_learner(image_folder, tmp_path, saved_frozen):
    """`save(with_opt=True)` then `load` into a fresh learner whose freeze state is the opposite: groups, per-group
    hypers, optimizer state, requires_grad of every parameter, frozen_idx and the GroupLogger history come back."""
    a = make_learn(image_folder, tmp_path)
    a.freeze() if saved_frozen else a.freeze_to(2)               # body frozen, or stem + stage1 frozen
    fit(a, "fit_one_cycle", 1, LR)
    a.save("ckpt")
    b = make_learn(image_folder, tmp_path, seed=1)              # other weights, unfrozen
    if not saved_frozen:
        b.freeze()
    assert flags(b) != flags(a)
    b.load("ckpt")
    assert flags(b) == flags(a) and b.opt.frozen_idx == a.opt.frozen_idx == (4 if saved_frozen else 2)
    assert same_hypers(b.opt.hypers, a.opt.hypers) and [h["lr"] for h in b.opt.hypers] != [LR.stop] * 5
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    sa, sb = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
    assert len(sa) == len(sb) and all(sa[i].keys() == sb[i].keys() and
                                      all(torch.equal(sa[i][k], sb[i][k]) if torch.is_tensor(sa[i][k])
                                          else sa[i][k] == sb[i][k] for k in sa[i]) for i in range(len(sa)))
    pd.testing.assert_frame_equal(b.group_logger.history, a.group_logger.history)
    # the next epoch: the fast frozen body follows the restored freeze state, the log goes on from iteration 6
    b.add_cb(Probe())
    fit(b, "fit", 1, LR)
    assert {r[3] for r in b.probe.rows} == ({"no_grad"} if saved_frozen else {""})
    assert b.fast_frozen is saved_frozen
    new = b.group_logger.history.query("fit == 1")
    assert new["iter"].min() == len(b.dls.train)
    assert new.drop_duplicates("group")["state"].tolist() == a.group_logger.history.drop_duplicates("group")[
        "state"].tolist() == (["frozen"] * 4 + ["trainable"] if saved_frozen else ["frozen"] * 2 + ["trainable"] * 3)


@pytest.mark.parametrize("schedule", ["frozen", "gradual"])
def test_resumed_fit_equals_uninterrupted(image_folder, tmp_path, schedule):
    """An uninterrupted 3-epoch fit saving after every epoch, and the same fit resumed from the epoch-0 checkpoint in
    a fresh (unfrozen) learner with `start_epoch=1`: same per-group hypers and freeze state at every step, same fast
    frozen body mode, and the resumed log continues the checkpoint's (Lightning's BackboneFinetuning re-freezes on
    resume; nothing here does). `gradual`: GradualUnfreeze changes the freeze state at each epoch."""
    extra = (lambda: [GradualUnfreeze()]) if schedule == "gradual" else (lambda: [])
    a = make_learn(image_folder, tmp_path, cbs=[Probe()])
    a.freeze()
    fit(a, "fit_one_cycle", 3, LR, cbs=[SaveModelCallback(every_epoch=True, with_opt=True), *extra()])
    b = make_learn(image_folder, tmp_path, cbs=[Probe()], seed=1)
    b.load("model_0")
    fit(b, "fit_one_cycle", 3, LR, start_epoch=1, cbs=extra())
    ha, hb = a.group_logger.history, b.group_logger.history
    pd.testing.assert_frame_equal(rows_from(hb, epoch=1), rows_from(ha, epoch=1))       # hypers, state, iter, epoch
    pd.testing.assert_frame_equal(hb.query("fit == 0").reset_index(drop=True), ha.query("epoch == 0"))
    assert hb.query("epoch >= 1")["fit"].unique().tolist() == [1]                       # a new fit call, logged so
    assert [r for r in a.probe.rows if r[0] >= 1] == b.probe.rows
    modes = {r[0]: r[3] for r in a.probe.rows}
    assert modes == ({0: "no_grad", 1: "no_grad", 2: "no_grad"} if schedule == "frozen" else
                     {0: "no_grad", 1: "", 2: ""})
    states = hb.query("epoch == 2").drop_duplicates("group")["state"].tolist()
    assert states == (["frozen"] * 4 + ["trainable"] if schedule == "frozen" else ["frozen"] * 2 + ["trainable"] * 3)


def test_other_grouping_is_rejected(image_folder, tmp_path):
    "Another number of groups, or other group sizes: a ValueError naming both groupings, and nothing loaded."
    a = make_learn(image_folder, tmp_path)
    fit(a, "fit", 1, LR)
    a.save("ckpt")

    def shifted(m):                                  # 5 groups too, but stage3's first conv moves to stage2
        g = auto_splitter(m)
        return [g[0], g[1], g[2] + g[3][:1], g[3][1:], g[4]]

    for splitter, here in ((partial(auto_splitter, granularity="fastai"), r"3 groups: stem-stage1 \("),
                           (shifted, r"5 groups: group0 \(3 tensors, 232 params\), group1 \(6 tensors")):
        b = make_learn(image_folder, tmp_path, seed=1, splitter=splitter)
        b.create_opt()
        weights = {k: v.clone() for k, v in b.model.state_dict().items()}
        hypers = [dict(h) for h in b.opt.hypers]
        with pytest.raises(ValueError, match=r"the checkpoint has 5 groups: stem \(3 tensors, 232 params\), stage1 "
                                             r"\(6 tensors, 1,184 params\), .*; this learner has " + here):
            b.load("ckpt")
        assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in weights.items()) and \
            same_hypers(b.opt.hypers, hypers)
        b.load("ckpt", with_opt=False)               # the weights alone load
        assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    # a plain fastai file knows its number of groups only
    save_model(tmp_path / "plain.pth", a.model, a.opt)
    b = make_learn(image_folder, tmp_path, splitter=partial(auto_splitter, granularity="fastai"))
    with pytest.raises(ValueError, match=r"checkpoint has 5 groups \(a plain fastai file: no names or sizes\); "
                                         r"this learner has 3 groups: stem-stage1"):
        b.load(tmp_path / "plain")


@pytest.mark.parametrize("with_opt", [False, True])
def test_weights_of_another_model_are_refused_before_anything_is_written(image_folder, tmp_path, with_opt):
    "A checkpoint of 10 classes into a 3-class learner: one line naming the tensors, and not one tensor overwritten."
    torch.manual_seed(3)
    src = group_learner(make_dls(image_folder), TinyNet, pretrained=False, path=tmp_path, lin_ftrs=[16])
    src.model[1][-1] = nn.Linear(16, 10)             # the same body, a head of 10 classes
    src.create_opt()
    src.save("ten")
    b = make_learn(image_folder, tmp_path, seed=1)
    b.create_opt()
    weights = {k: v.clone() for k, v in b.model.state_dict().items()}
    match = (r"ten.pth has another grouping than this learner: .*head \(8 tensors, 794 params\); this learner has .*"
             r"head \(8 tensors, 675 params\)" if with_opt else   # the optimizer state is checked first
             r"checkpoint .*ten.pth does not fit this learner's model \(another number of classes\?\): 2 tensors of "
             r"another shape \(1\.\d+\.weight: file \(10, 16\), learner \(3, 16\); .*nothing was loaded")
    with pytest.raises(ValueError, match=match) as e:
        b.load("ten", with_opt=with_opt)
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in weights.items())


def test_plain_fastai_files_and_plain_learners(image_folder, tmp_path):
    """Files saved by fastai load as with fastai; a GroupLearner checkpoint loads in a plain fastai Learner without
    fastai's "Could not load the optimizer state"; weights are saved without the torch.compile wrapper."""
    a = make_learn(image_folder, tmp_path)
    a.freeze()
    fit(a, "fit", 1, LR)
    b = make_learn(image_folder, tmp_path, seed=1)
    save_model(tmp_path / "plain.pth", a.model, a.opt)              # fastai's own {'model', 'opt'}
    b.load(tmp_path / "plain")
    assert same_hypers(b.opt.hypers, a.opt.hypers)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert len(b.group_logger.history) == 0 and all(flags(b).values())   # nothing more in the file: left as it was
    save_model(tmp_path / "weights.pth", a.model, a.opt, with_opt=False)  # a bare state dict
    with pytest.warns(UserWarning, match="doesn't contain an optimizer state"):
        make_learn(image_folder, tmp_path, seed=2).load(tmp_path / "weights")

    a.model = torch.compile(a.model)                                # saved unwrapped: loads into bare models
    file = a.save("ours")
    assert not any(k.startswith("_orig_mod.") for k in torch.load(file, weights_only=False)["model"])
    plain = Learner(make_dls(image_folder), make_learn(image_folder, tmp_path, seed=3).model, splitter=auto_splitter)
    plain.create_opt()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(file, plain.model, plain.opt)
    assert not [w for w in caught if "optimizer" in str(w.message)]   # no "Could not load the optimizer state"
    assert same_hypers(plain.opt.hypers, a.opt.hypers)
    save_model(tmp_path / "compiled.pth", a.model, a.opt)          # fastai keeps torch.compile's `_orig_mod.` prefix
    assert all(k.startswith("_orig_mod.") for k in torch.load(tmp_path / "compiled.pth", weights_only=False)["model"])
    b.load(tmp_path / "compiled")
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_export_load_learner_keeps_state(image_folder, tmp_path):
    """`export` / `load_learner`: groups, per-group hypers, frozen_idx, requires_grad, the GroupLogger history, and
    the fast frozen body on the next epoch."""
    a = make_learn(image_folder, tmp_path)
    a.freeze()
    fit(a, "fit_one_cycle", 1, LR)
    attrs = set(vars(a))
    a.export("export.pkl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = load_learner(tmp_path / "export.pkl")
    assert type(b).__name__ == "GroupLearner" and b.opt is not None
    assert b.splitter(b.model).names == NAMES and [len(g) for g in b.opt.param_lists] == [
        len(g) for g in a.opt.param_lists]
    assert same_hypers(b.opt.hypers, a.opt.hypers) and b.opt.frozen_idx == a.opt.frozen_idx == 4
    assert flags(b) == flags(a)
    pd.testing.assert_frame_equal(b.group_logger.history, a.group_logger.history)
    assert set(vars(a)) == attrs and set(vars(b)) <= attrs     # export leaves nothing behind on either learner
    label, _, probs = b.predict(image_folder / "valid" / "red" / "0.png")   # inference, as exported for
    assert label in ("red", "green", "blue") and math.isclose(float(probs.sum()), 1, rel_tol=1e-5)
    b.dls = make_dls(image_folder)                                  # exported without data
    b.add_cb(Probe())
    fit(b, "fit", 1, LR)
    assert {r[3] for r in b.probe.rows} == {"no_grad"}
    assert b.group_logger.history.query("fit == 1")["iter"].min() == len(b.dls.train)


# -------------------------------------------------------------------------------------------------- mixed precision
class CPUBFloat16(MixedPrecision):
    """fastai's `MixedPrecision` with `torch.autocast('cpu', bfloat16)`: fastai's `to_bf16()` uses
    `autocast('cuda')`, which torch disables (with a warning) on a machine without CUDA, so it would train in fp32."""

    def __init__(self):
        super().__init__(amp_mode="bf16")

    def before_fit(self):
        "fastai's, on the CPU (bf16 needs no loss scaling: a disabled GradScaler, as fastai's bf16 mode has)."
        self.autocast, self.learn.scaler, self.scales = (torch.autocast("cpu", dtype=torch.bfloat16),
                                                         torch.amp.GradScaler("cpu", enabled=False), [])


class Dtypes(Callback):
    "dtype of the body's output and of the last Linear's output, per training batch."
    order = 100

    def before_fit(self):
        self.seen = set()
        self.hooks = [m.register_forward_hook(lambda m, i, o, k=k: self._add(k, o)) for k, m in
                      (("body", self.learn.model[0]), ("head", self.learn.model[1][-1]))]

    def _add(self, k, o):
        if self.training:
            self.seen.add((k, o.dtype))

    def after_fit(self):
        for h in self.hooks:
            h.remove()


def test_bf16_cpu_with_fast_frozen_body_and_logger(image_folder, tmp_path):
    """bf16 autocast on CPU with the fast frozen body (train_bn=False, frozen) and GroupLogger: finite losses, the
    fast path on, and the logged per-group lrs are those fastai's scheduler set (the optimizer's, the fp32 run's)."""
    runs = {}
    for name, cbs in (("bf16", [CPUBFloat16(), Dtypes()]), ("fp32", [Dtypes()])):
        learn = make_learn(image_folder, tmp_path, cbs=[Probe(), *cbs])
        learn.freeze()
        fit(learn, "fit_one_cycle", 1, LR)
        runs[name] = learn
    bf, fp = runs["bf16"], runs["fp32"]
    assert bf.dtypes.seen == {("body", torch.bfloat16), ("head", torch.bfloat16)}      # autocast was on
    assert fp.dtypes.seen == {("body", torch.float32), ("head", torch.float32)}
    assert all(math.isfinite(float(v)) for v in bf.recorder.losses) and len(bf.recorder.losses) == len(bf.dls.train)
    assert {r[3] for r in bf.probe.rows} == {"no_grad"} and bf.fast_frozen_mode == "no_grad"
    lr = bf.group_logger.history.pivot(index="iter", columns="group", values="lr").to_numpy()
    assert np.array_equal(lr, np.array([r[2] for r in bf.probe.rows]))                  # what the steps used
    pd.testing.assert_frame_equal(bf.group_logger.history, fp.group_logger.history)     # hypers and states unchanged
    assert (bf.group_logger.history.drop_duplicates("group")["state"] == ["frozen"] * 4 + ["trainable"]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="to_fp16 needs CUDA")
def test_fp16_cuda_with_fast_frozen_body_and_logger(image_folder, tmp_path):
    "fastai's `to_fp16()` on a GPU with the fast frozen body and GroupLogger (the GradScaler may skip steps)."
    learn = make_learn(image_folder, tmp_path, cbs=[Probe(), Dtypes()], device=torch.device("cuda"))
    learn.to_fp16()
    learn.freeze()
    fit(learn, "fit_one_cycle", 1, LR)
    assert next(learn.model.parameters()).is_cuda
    assert {d for k, d in learn.dtypes.seen if k == "head"} == {torch.float16}          # autocast was on
    assert all(math.isfinite(float(v)) for v in learn.recorder.losses)
    assert {r[3] for r in learn.probe.rows} == {"no_grad"}
    df = learn.group_logger.history
    assert len(df) == 5 * len(learn.dls.train)                     # one row per batch and group, steps skipped or not
    lr = df.pivot(index="iter", columns="group", values="lr").to_numpy()
    stepped = {(r[0], r[1]) for r in learn.probe.rows}
    assert len(stepped) == len(learn.probe.rows) >= 1
    assert np.array_equal(lr[[i for _, i in sorted(stepped)]], np.array([r[2] for r in learn.probe.rows]))
    assert (df.drop_duplicates("group")["state"] == ["frozen"] * 4 + ["trainable"]).all()


def test_compiled_model_on_the_fast_frozen_body(image_folder):
    """A compiled `Sequential(body, head)` with a fully frozen body: the fast path keeps the body's norm layers in
    inference mode but does not swap the body's forward per batch (torch.compile would recompile at every batch
    and give up at its recompile limit); autograd records nothing in the body anyway, nothing there needs grad."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU()))
    model = nn.Sequential(body, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)))
    learn = Learner(make_dls(image_folder), torch.compile(model), splitter=auto_splitter, train_bn=False,
                    cbs=[FastFrozenBody(verbose=False), Probe()])
    learn.remove_cb(ProgressCallback)
    learn.freeze()
    stats = body[1].running_mean.clone()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fit(learn, "fit", 2, LR)
    assert learn.fast_frozen and {r[3] for r in learn.probe.rows} == {"no_grad"}
    assert len(learn.probe.rows) == 2 * len(learn.dls.train) >= 12
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 4  # not one graph per batch
    assert torch.equal(body[1].running_mean, stats)                              # inference-mode BatchNorm
    assert all(math.isfinite(float(v)) for v in learn.recorder.losses)


def test_feature_cache_refuses_compiled_and_dataparallel_models(image_folder):
    "The cache must swap the body's forward per batch, which torch.compile and DataParallel do not allow: say so."
    for wrap in (torch.compile, nn.DataParallel):
        body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU()))
        model = nn.Sequential(body, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)))
        learn = Learner(make_dls(image_folder), wrap(model), splitter=auto_splitter, train_bn=False,
                        cbs=FeatureCache(verbose=False))
        learn.remove_cb(ProgressCallback)
        learn.freeze()
        with pytest.raises(ValueError, match="FeatureCache: learn.model runs under torch.compile or nn.DataParallel"):
            fit(learn, "fit", 1, LR)


def test_resume_is_bit_for_bit(image_folder, tmp_path):
    """2 epochs straight, and 1 epoch + save + a new learner + load + `fit_one_cycle(2, start_epoch=1)`: the same
    weights, bit for bit (shuffling and the head's dropout draw the same numbers: `save` keeps the random states)."""
    from fastai.callback.core import CancelFitException
    from fastai.torch_core import set_seed

    class Interrupt(Callback):
        def after_epoch(self):
            self.learn.save("cut")
            raise CancelFitException

    set_seed(0)
    straight = make_learn(image_folder, tmp_path)
    fit(straight, "fit_one_cycle", 2, LR)
    set_seed(0)
    cut = make_learn(image_folder, tmp_path)
    fit(cut, "fit_one_cycle", 2, LR, cbs=[Interrupt()])
    resumed = make_learn(image_folder, tmp_path, seed=7)      # another init, global random state, loader rng
    torch.rand(5)
    resumed.load("cut")
    fit(resumed, "fit_one_cycle", 2, LR, start_epoch=1)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in resumed.model.modules())
    assert not all(torch.equal(a[k], v) for k, v in cut.model.state_dict().items())    # epoch 1 changed them
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pd.testing.assert_frame_equal(rows_from(resumed.group_logger.history, epoch=1),
                                  rows_from(straight.group_logger.history, epoch=1))
