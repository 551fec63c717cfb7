"""Tests of the fine-tuning recipe (fastai_groups/recipe.py): a small CNN (random weights, 3 stages with BatchNorm) at
32 px on the colour folder, and resnet18's body for the statistics themselves."""
import math
import warnings

import pytest
import torch
from fastai.learner import Learner
from fastai.vision.all import ImageDataLoaders, Resize, accuracy, aug_transforms, set_seed
from torch import nn
from torchvision.models import resnet18

from fastai_groups import GroupLogger, group_learner
from fastai_groups.recipe import FORWARD_COST, UNFREEZE_FROM, fine_tune_groups, recipe_plan, reestimate_norm_stats


def make_dls(root, aug: bool):
    return ImageDataLoaders.from_folder(root, train="train", valid="valid", bs=8, num_workers=0,
                                        item_tfms=Resize(32, method="squish"),
                                        batch_tfms=aug_transforms(max_warp=0.) if aug else None)


def tiny_cnn(n_out: int = 3) -> nn.Sequential:
    "Conv-BN-ReLU stem and two downsampling stages (16, 32, 64 channels), pooled, linear classifier."
    def block(ni, nf, stride):
        return nn.Sequential(nn.Conv2d(ni, nf, 3, stride, 1, bias=False), nn.BatchNorm2d(nf), nn.ReLU())
    return nn.Sequential(block(3, 16, 1), block(16, 32, 2), block(32, 64, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, n_out))


def make_learn(root, aug=False, train_bn=False, cbs=()):
    set_seed(0, reproducible=True)
    learn = group_learner(make_dls(root, aug), tiny_cnn(), pretrained=False, train_bn=train_bn, metrics=accuracy,
                          cbs=[GroupLogger(show_table=False), *cbs])
    assert len(learn.opt.param_lists if learn.opt else learn.splitter(learn.model)) == 4   # stem, 2 stages, head
    return learn


class BodyPasses:
    "Counts the body's training forwards on images (3 channels), with and without autograd."

    def __init__(self, learn):
        self.learn, self.grad, self.no_grad = learn, 0, 0
        self.handle = learn.model[0].register_forward_hook(self.hook)

    def hook(self, module, args, out):
        x = args[0]
        if getattr(self.learn, "training", False) and x.ndim == 4 and x.shape[1] == 3:
            if out.requires_grad:                    # the hook runs outside FastFrozenBody's no_grad
                self.grad += 1
            else:
                self.no_grad += 1


class FitEnds:
    "Keeps the model's state (weights and buffers) at the end of every fit it sees: `.states`, one per fit."

    def __new__(cls):
        from fastai.callback.core import Callback

        class _FitEnds(Callback):
            order = 100

            def __init__(self):
                self.states = []

            def after_fit(self):
                self.states.append({k: v.clone() for k, v in self.learn.model.state_dict().items()})
        return _FitEnds()


def fits_states(learn) -> dict:
    "{fit: set of states of the body groups} and {fit: states of the head group} from the GroupLogger history."
    h = learn.group_logger.history
    last = h["group"].max()
    body = h[h["group"] < last].groupby("fit")["state"].agg(lambda s: set(s)).to_dict()
    head = h[h["group"] == last].groupby("fit")["state"].agg(lambda s: set(s)).to_dict()
    return body, head


@pytest.mark.parametrize("aug", [False, True])
@pytest.mark.parametrize("train_bn", [False, True])
def test_runs_and_logs_every_phase(image_folder, aug, train_bn, capsys):
    learn = make_learn(image_folder, aug, train_bn)
    before = [p.detach().clone() for p in learn.model[0].parameters()]
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = learn.fine_tune_groups(2, unfrozen_epochs=1, reestimate=True)
    assert plan == learn.recipe_plan and plan["cached"] == (not aug)
    body, head = fits_states(learn)
    assert sorted(body) == [0, 1, 2]          # fit 0: re-estimation (everything frozen, no step), 1: head, 2: unfrozen
    assert body[0] == {"frozen"} and head[0] == {"frozen"}
    # the head phase runs on the fully frozen body whatever the learner's train_bn
    assert body[1] == {"frozen"} and head[1] == {"trainable"}
    assert body[2] == {"trainable"}
    assert learn.group_logger.history.groupby("fit")["epoch"].max().tolist()[-2:] == \
        [plan["head_epochs"] - 1, plan["unfrozen_epochs"] - 1]
    changed = any(not torch.equal(a, b) for a, b in zip(before, learn.model[0].parameters()))
    rolled = [str(w.message) for w in caught if "rolled back" in str(w.message)]
    if plan["rolled_back"]:                   # the unfrozen phase did not improve validation: head-phase weights back
        assert plan["rolled_back"] == ["unfrozen"] and len(rolled) == 1
        assert not any(p.requires_grad for p in learn.model[0][1:].parameters() if p.ndim > 1)
    else:
        assert changed and all(p.requires_grad for p in learn.model.parameters()) and not rolled
    assert math.isfinite(plan["result"]["valid_loss"])
    assert ("FeatureCache: body fully frozen" in capsys.readouterr().out) == plan["cached"]


def test_defaults_do_not_depend_on_train_bn(image_folder, capsys):
    "A learner built with defaults (train_bn=True) runs the same plan, to the same weights, as one with train_bn=False."
    runs = {}
    for train_bn in (True, False):
        learn = make_learn(image_folder, aug=True, train_bn=train_bn)
        with learn.no_bar(), learn.no_logging():
            plan = learn.fine_tune_groups(2)
        body, head = fits_states(learn)
        assert list(body) == [0] and body[0] == {"frozen"} and head[0] == {"trainable"}
        assert learn.group_logger.history["epoch"].max() == plan["head_epochs"] - 1
        runs[train_bn] = plan, [p.detach().clone() for p in learn.model.parameters()], learn
    (p1, w1, learn1), (p0, w0, _) = runs[True], runs[False]
    assert p1 == p0 and (p1["reestimate"], p1["head_epochs"], p1["unfrozen_epochs"]) == (False, 6, 0)
    assert all(torch.equal(a, b) for a, b in zip(w1, w0))
    # 12 training images per class, below UNFREEZE_FROM: one line says so
    assert f"fine_tune_groups(2): 12 training images per class < {UNFREEZE_FROM:,}" in capsys.readouterr().out
    # after the recipe, train_bn=True keeps fastai's meaning: the frozen body's BatchNorms are trainable again
    bns = [m for m in learn1.model[0].modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in learn1.model[0].modules() if isinstance(m, nn.Conv2d)]
    assert all(p.requires_grad for m in bns for p in m.parameters())
    assert not any(p.requires_grad for m in convs for p in m.parameters())


def test_unfrozen_phase_keeps_norm_statistics_on_the_fast_path(image_folder):
    stats = {}
    for keep in (True, False):
        learn = make_learn(image_folder, aug=True)
        learn.freeze()
        bns = [m for m in learn.model[0].modules() if isinstance(m, nn.BatchNorm2d)]
        start = {k: v.clone() for k, v in learn.model[0].state_dict().items() if "running_mean" in k}
        conv = learn.model[0][0][0].weight.detach().clone()
        ends = FitEnds()
        with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
            warnings.simplefilter("ignore")                  # a roll-back, if any, does not matter here
            plan = learn.fine_tune_groups(1, unfrozen_epochs=1, keep_norm_stats=keep, cbs=ends)
        unfrozen_end = ends.states[-1]                       # the model at the end of the unfrozen phase
        assert plan["keep_norm_stats"] is keep and not torch.equal(conv, unfrozen_end["0.0.0.weight"])
        stats[keep] = all(torch.equal(v, unfrozen_end["0." + k]) for k, v in start.items())
    assert stats == {True: True, False: False}


@pytest.mark.parametrize("train_bn", [False, True])
def test_budget_in_passes_is_within_fastai_fine_tune(image_folder, train_bn):
    "Structurally: ours makes at most fastai's number of training passes, forward-only passes counted at FORWARD_COST."
    theirs = make_learn(image_folder, aug=True, train_bn=True)
    count = BodyPasses(theirs)
    with theirs.no_bar(), theirs.no_logging():
        theirs.fine_tune(1)
    n = len(theirs.dls.train)
    assert (count.grad, count.no_grad) == (2 * n, 0)        # fastai: 1 frozen + 1 unfrozen pass with autograd

    for kwargs in ({}, {"unfrozen_epochs": 1, "reestimate": not train_bn}):
        ours = make_learn(image_folder, aug=True, train_bn=train_bn)
        count = BodyPasses(ours)
        with ours.no_bar(), ours.no_logging():
            plan = ours.fine_tune_groups(1, **kwargs)
        grad, fwd = count.grad / n, count.no_grad / n
        assert (grad, fwd) == (plan["unfrozen_epochs"], plan["head_epochs"] + plan["reestimate"])   # any train_bn
        assert grad + FORWARD_COST * fwd <= 2 and plan["passes"] <= plan["budget"] == 2


def test_epochs_one_never_unfreezes(image_folder):
    learn = make_learn(image_folder)
    with learn.no_bar(), learn.no_logging():
        plan = fine_tune_groups(learn, 1)
    assert plan["unfrozen_epochs"] == 0 and plan["head_epochs"] == 4
    assert not any(p.requires_grad for p in learn.model[0].parameters())     # the body stays frozen


def test_reestimate_changes_statistics_not_weights():
    "On a module: population statistics of the data seen (first BN: the mean of conv1's output), weights untouched."
    torch.manual_seed(0)
    body = nn.Sequential(*list(resnet18().children())[:-2])
    batches = [(torch.randn(4, 3, 32, 32) * 2 + 1, torch.zeros(4)) for _ in range(3)]
    weights = {k: v.clone() for k, v in body.state_dict().items() if "running" not in k and "num_batches" not in k}
    bn = body[1]
    bn.running_mean.fill_(5.0)
    moms = [m.momentum for m in body.modules() if isinstance(m, nn.BatchNorm2d)]
    body.train()
    body[4].eval()                                   # a mixed mode the call must give back
    n = reestimate_norm_stats(body, batches)
    assert n == 20
    with torch.no_grad():
        conv = torch.cat([body[0](x) for x, _ in batches])
    assert torch.allclose(bn.running_mean, conv.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(bn.running_var, conv.var((0, 2, 3)), rtol=0.05)
    assert all(torch.equal(body.state_dict()[k], v) for k, v in weights.items())
    assert [m.momentum for m in body.modules() if isinstance(m, nn.BatchNorm2d)] == moms
    assert body.training and not body[4].training and body[5].training
    assert reestimate_norm_stats(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), [torch.randn(2, 3)]) == 0


def test_reestimate_on_a_learner_is_a_logged_fit(image_folder):
    learn = make_learn(image_folder, aug=True)
    learn.freeze()
    body = learn.model[0]
    stats = {k: v.clone() for k, v in body.state_dict().items() if "running_mean" in k}
    weights = [p.detach().clone() for p in learn.model.parameters()]
    flags = [p.requires_grad for p in learn.model.parameters()]
    with learn.no_bar(), learn.no_logging():
        assert reestimate_norm_stats(learn) == 3
    assert all(not torch.equal(body.state_dict()[k], v) for k, v in stats.items())
    assert all(torch.equal(a, b) for a, b in zip(weights, learn.model.parameters()))
    assert [p.requires_grad for p in learn.model.parameters()] == flags and learn.opt.frozen_idx == 3
    h = learn.group_logger.history
    assert set(h["fit"]) == {0} and set(h["state"]) == {"frozen"} and h["iter"].nunique() == len(learn.dls.train)


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), r"epochs must be an int >= 1, got 0"),
    (dict(epochs=2.5), r"epochs must be an int >= 1, got 2.5"),
    (dict(epochs=True), r"epochs must be an int >= 1, got True"),
    (dict(epochs=3, base_lr=0), r"base_lr must be a finite number > 0, got 0 \(e.g. base_lr=2e-3\)"),
    (dict(epochs=3, base_lr=-1e-3), r"base_lr must be a finite number > 0"),
    (dict(epochs=3, base_lr=float("nan")), r"base_lr must be a finite number > 0, got nan"),
    (dict(epochs=3, base_lr=float("inf")), r"base_lr must be a finite number > 0, got inf"),
    (dict(epochs=3, base_lr="1e-3"), r"base_lr must be a finite number > 0, got '1e-3'"),
    (dict(epochs=3, head_epochs=0), r"head_epochs must be an int >= 1, got 0"),
    (dict(epochs=3, unfrozen_epochs=-1), r"unfrozen_epochs must be an int >= 0, got -1"),
    (dict(epochs=3, lr_mult=float("nan")), r"lr_mult must be a finite number > 0"),
    (dict(epochs=3, lr_max=1e-3), r"lr_max= is set by the recipe; use base_lr"),
    (dict(epochs=3, n_epoch=2), r"n_epoch= is set by the recipe; use epochs"),
])
def test_bad_input_is_one_clear_line(image_folder, kwargs, match):
    learn = make_learn(image_folder)
    weights = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match=match) as e:
        learn.fine_tune_groups(**kwargs)
    assert "\n" not in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(weights, learn.model.parameters()))   # nothing ran


def test_cache_refusals_are_one_line(image_folder):
    learn = make_learn(image_folder, aug=True)
    with pytest.raises(ValueError, match="transforms that may be random") as e:
        learn.fine_tune_groups(2, cache=True)
    assert "\n" not in str(e.value)
    learn = make_learn(image_folder, train_bn=True)
    with pytest.raises(ValueError, match="max_batches must be None or an int >= 1"):
        reestimate_norm_stats(learn, max_batches=0)
    with pytest.raises(ValueError, match=r"pass the data .*\(dl=...\)"):
        reestimate_norm_stats(learn.model[0])


def test_plan_decides_from_images_per_class_within_the_budget():
    small, large = recipe_plan(3, per_class=UNFREEZE_FROM - 1), recipe_plan(3, per_class=UNFREEZE_FROM)
    assert {k: small[k] for k in ("reestimate", "head_epochs", "unfrozen_epochs", "passes", "budget")} == \
        {"reestimate": False, "head_epochs": 8, "unfrozen_epochs": 0, "passes": 4.0, "budget": 4}
    assert (large["head_epochs"], large["unfrozen_epochs"], large["passes"]) == (4, 2, 4.0)
    assert "never unfrozen" in small["why"] and "kept only if validation improves" in large["why"]
    assert recipe_plan(3)["unfrozen_epochs"] == 0 and "unknown" in recipe_plan(3)["why"]
    assert recipe_plan(3, unfrozen_epochs=1, reestimate=True)["head_epochs"] == 5
    for e in range(1, 8):
        for n in (None, 10, UNFREEZE_FROM, 10 * UNFREEZE_FROM):
            p = recipe_plan(e, per_class=n)
            assert p["passes"] <= p["budget"] == e + 1 and p["head_epochs"] >= 1
    from fastai_groups.learner import GroupLearner
    assert GroupLearner.fine_tune is Learner.fine_tune


# ----------------------------------------------------------------------------------------------------------------
# Roll-back: a phase that makes the model worse is never returned without a word
# ----------------------------------------------------------------------------------------------------------------
def test_an_unfrozen_phase_that_hurts_is_rolled_back(image_folder):
    "lr_mult=1e-5 puts the first groups at 1e5 x the head's rate: the unfrozen phase diverges and is undone."
    learn = make_learn(image_folder)
    ends = FitEnds()
    with learn.no_bar(), learn.no_logging(), pytest.warns(UserWarning, match=r"the unfrozen phase made the model "
                                                                          r"worse \(.*\); rolled back") as w:
        plan = learn.fine_tune_groups(1, unfrozen_epochs=1, lr_mult=1e-5, cbs=ends)
    assert len([x for x in w if "rolled back" in str(x.message)]) == 1
    assert plan["rolled_back"] == ["unfrozen"] and learn.recipe_plan is plan
    assert not math.isfinite(learn.recorder.values[-1][1]) or learn.recorder.values[-1][2] <= plan["result"]["accuracy"]
    state = learn.model.state_dict()
    assert len(ends.states) == 2
    assert all(torch.equal(state[k], v) for k, v in ends.states[0].items())    # exactly the head phase's weights
    with learn.no_bar():
        loss, acc = learn.validate()
    assert (loss, acc) == pytest.approx((plan["result"]["valid_loss"], plan["result"]["accuracy"]), rel=1e-5)
    assert not any(p.requires_grad for p in learn.model[0].parameters())         # the body is frozen again


def test_a_diverging_head_phase_is_rolled_back(image_folder):
    learn = make_learn(image_folder)
    start = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with learn.no_bar(), learn.no_logging(), pytest.warns(UserWarning, match=r"head phase made the model worse .*"
                                                                          r"Lower base_lr \(it was 1e\+12\)"):
        plan = learn.fine_tune_groups(2, base_lr=1e12)
    assert plan["rolled_back"] == ["head"] and plan["unfrozen_epochs"] == 0
    assert all(torch.equal(learn.model.state_dict()[k], v) for k, v in start.items())
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Inputs and schedules checked before training (issue 24): one clear error, nothing changed
# ----------------------------------------------------------------------------------------------------------------
def _unchanged(learn):
    snap = {k: v.clone() for k, v in learn.model.state_dict().items()}
    flags = [p.requires_grad for p in learn.model.parameters()]
    return lambda: all(torch.equal(learn.model.state_dict()[k], v) for k, v in snap.items()) and \
        flags == [p.requires_grad for p in learn.model.parameters()]


def test_one_parameter_group_is_refused(image_folder):
    set_seed(0, reproducible=True)
    learn = Learner(make_dls(image_folder, aug=False), tiny_cnn(), metrics=accuracy, train_bn=False)
    same = _unchanged(learn)
    with pytest.raises(ValueError, match=r"needs the head in a parameter group of its own, but the learner has 1 "
                                         r"group .* build it with splitter=auto_splitter") as e:
        fine_tune_groups(learn, 2)
    assert "\n" not in str(e.value) and same()


@pytest.mark.parametrize("where", ["learner", "fit"])
def test_gradual_unfreeze_is_refused(image_folder, where):
    from fastai_groups import GradualUnfreeze
    learn = make_learn(image_folder, cbs=[GradualUnfreeze()] if where == "learner" else [])
    same = _unchanged(learn)
    with pytest.raises(ValueError, match=r"decides when the body is frozen, but GradualUnfreeze in the callbacks"):
        learn.fine_tune_groups(2, **({"cbs": [GradualUnfreeze()]} if where == "fit" else {}))
    assert same()


def test_no_training_batch_is_refused_and_statistics_kept(image_folder):
    set_seed(0, reproducible=True)
    dls = ImageDataLoaders.from_folder(image_folder, train="train", valid="valid", bs=64, num_workers=0,
                                       item_tfms=Resize(32))
    learn = group_learner(dls, tiny_cnn(), pretrained=True, train_bn=False, metrics=accuracy)
    assert len(dls.train) == 0                          # 36 images, batch 64, fastai drops the last partial batch
    for m in learn.model.modules():                     # statistics that a reset would change
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(0.7), m.running_var.fill_(3.0)
    same = _unchanged(learn)
    with pytest.raises(ValueError, match=r"the training data give no batch \(36 items, batch size 64, drop_last\): "
                                         r"lower bs"):
        learn.fine_tune_groups(2, reestimate=True)
    assert same()                                       # running statistics included (state_dict)
    with pytest.raises(ValueError, match="yielded no batch"):
        reestimate_norm_stats(learn)
    assert same()


def test_one_class_is_refused(tmp_path, image_folder):
    import shutil
    for split in ("train", "valid"):
        shutil.copytree(image_folder / split / "red", tmp_path / split / "red")
    learn = group_learner(make_dls(tmp_path, aug=False), tiny_cnn(1), pretrained=True, train_bn=False)
    with pytest.raises(ValueError, match=r"the data have 1 class \(red\); a classifier needs at least 2"):
        learn.fine_tune_groups(2)


def test_feature_cache_that_does_not_fit_is_not_reported_as_cached(image_folder, capsys):
    from fastai_groups import FeatureCache
    learn = make_learn(image_folder, cbs=[FeatureCache(max_bytes=10)])
    with learn.no_bar(), learn.no_logging():
        plan = learn.fine_tune_groups(1)
    assert "training without the cache" in capsys.readouterr().out
    assert plan["cached"] is False and learn.recipe_plan["cached"] is False


def test_one_cycle_options_reach_every_phase(image_folder):
    "pct_start / div are forwarded (the user's value wins), not a TypeError after the head phase."
    learn = make_learn(image_folder)
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = learn.fine_tune_groups(1, unfrozen_epochs=1, pct_start=0.5, div=10.0)
    h = learn.group_logger.history
    for fit in (0, 1):
        lrs = h[(h["fit"] == fit) & (h["group"] == h["group"].max())]["lr"].to_numpy()
        assert lrs[0] == pytest.approx(lrs.max() / 10, rel=1e-3)        # div=10 in both phases
    assert plan["unfrozen_epochs"] == 1


def test_an_unfrozen_phase_that_helps_is_kept(image_folder, capsys):
    "A random body barely helps its head; six unfrozen epochs lower the validation loss, so they are kept."
    set_seed(0, reproducible=True)
    learn = group_learner(make_dls(image_folder, aug=False), tiny_cnn(), pretrained=True, train_bn=False,
                          cbs=[GroupLogger(show_table=False)])       # no metric: the validation loss decides
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)                     # no roll-back warning
        plan = learn.fine_tune_groups(1, base_lr=1e-2, head_epochs=1, unfrozen_epochs=6, lr_mult=1)
    out = capsys.readouterr().out
    assert plan["rolled_back"] == [] and plan["result"]["valid_loss"] < float(
        learn.group_logger.epochs.query("fit == 0")["valid_loss"].iloc[-1])
    assert "fine_tune_groups: unfrozen phase kept (validation valid_loss " in out
    assert all(p.requires_grad for p in learn.model.parameters())
