"""Tests of the fine-tuning recipe (fastai_groups/recipe.py): a small CNN (random weights, 3 stages with BatchNorm) at
32 px on the colour folder, and resnet18's body for the statistics themselves."""
import math

import pytest
import torch
from fastai.learner import Learner
from fastai.vision.all import ImageDataLoaders, Resize, accuracy, aug_transforms, set_seed
from torch import nn
from torchvision.models import resnet18

from fastai_groups import GroupLogger, group_learner
from fastai_groups.recipe import FORWARD_COST, fine_tune_groups, recipe_plan, reestimate_norm_stats


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
    with learn.no_bar(), learn.no_logging():
        plan = learn.fine_tune_groups(2, unfrozen_epochs=1, reestimate=True)
    assert plan == learn.recipe_plan and plan["cached"] == (not aug and not train_bn)
    body, head = fits_states(learn)
    assert sorted(body) == [0, 1, 2]          # fit 0: re-estimation (everything frozen, no step), 1: head, 2: unfrozen
    assert body[0] == {"frozen"} and head[0] == {"frozen"}
    # the head phase: with train_bn=True the frozen body's BatchNorms train (fastai's meaning)
    assert body[1] == ({"partial"} if train_bn else {"frozen"}) and head[1] == {"trainable"}
    assert body[2] == {"trainable"}
    assert learn.group_logger.history.groupby("fit")["epoch"].max().tolist()[-2:] == \
        [plan["head_epochs"] - 1, plan["unfrozen_epochs"] - 1]
    after = list(learn.model[0].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))          # the unfrozen phase trained the body
    assert all(p.requires_grad for p in learn.model.parameters())
    assert math.isfinite(learn.recorder.values[-1][1])
    assert ("FeatureCache: body fully frozen" in capsys.readouterr().out) == plan["cached"]


@pytest.mark.parametrize("train_bn", [False, True])
def test_defaults_train_the_head_long_and_never_unfreeze(image_folder, train_bn):
    learn = make_learn(image_folder, aug=True, train_bn=train_bn)
    with learn.no_bar(), learn.no_logging():
        plan = learn.fine_tune_groups(2)
    assert (plan["reestimate"], plan["unfrozen_epochs"]) == (False, 0)
    assert plan["head_epochs"] == (3 if train_bn else 6)       # 2 * (epochs + 1) on the fast path
    body, head = fits_states(learn)
    assert list(body) == [0] and body[0] == ({"partial"} if train_bn else {"frozen"}) and head[0] == {"trainable"}
    assert learn.group_logger.history["epoch"].max() == plan["head_epochs"] - 1


def test_unfrozen_phase_keeps_norm_statistics_on_the_fast_path(image_folder):
    stats = {}
    for keep in (True, False):
        learn = make_learn(image_folder, aug=True)
        learn.freeze()
        bns = [m for m in learn.model[0].modules() if isinstance(m, nn.BatchNorm2d)]
        start = [m.running_mean.clone() for m in bns]
        conv = learn.model[0][0][0].weight.detach().clone()
        with learn.no_bar(), learn.no_logging():
            plan = learn.fine_tune_groups(1, unfrozen_epochs=1, keep_norm_stats=keep)
        assert plan["keep_norm_stats"] is keep and not torch.equal(conv, learn.model[0][0][0].weight)
        stats[keep] = all(torch.equal(a, m.running_mean) for a, m in zip(start, bns))
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
        if train_bn:    # frozen epochs back-propagate through the body (its BatchNorms train)
            assert (grad, fwd) == (plan["head_epochs"] + plan["unfrozen_epochs"], plan["reestimate"])
        else:
            assert (grad, fwd) == (plan["unfrozen_epochs"], plan["head_epochs"] + plan["reestimate"])
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
    with pytest.raises(ValueError, match="cache=True needs a learner with train_bn=False"):
        learn.fine_tune_groups(2, cache=True)
    with pytest.raises(ValueError, match="max_batches must be None or an int >= 1"):
        reestimate_norm_stats(learn, max_batches=0)
    with pytest.raises(ValueError, match=r"pass the data .*\(dl=...\)"):
        reestimate_norm_stats(learn.model[0])


def test_plan_and_fastai_fine_tune_keeps_its_meaning():
    assert recipe_plan(3, fast=True) == {"reestimate": False, "head_epochs": 8, "unfrozen_epochs": 0, "passes": 4.0,
                                         "budget": 4}
    assert recipe_plan(3, fast=True, unfrozen_epochs=1, reestimate=True)["head_epochs"] == 5
    assert recipe_plan(3, fast=False)["head_epochs"] + recipe_plan(3, fast=False)["unfrozen_epochs"] == 4
    for e in range(1, 8):
        for fast in (True, False):
            p = recipe_plan(e, fast)
            assert p["passes"] <= p["budget"] == e + 1 and p["head_epochs"] >= 1
    from fastai_groups.learner import GroupLearner
    assert GroupLearner.fine_tune is Learner.fine_tune
