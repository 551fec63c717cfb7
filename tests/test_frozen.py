"""Tests of the fast frozen body (fastai_groups/frozen.py): small resnet18 / a tiny conv body at 32 px, 64 images."""

import numpy as np
import pytest
import torch
from fastai.callback.training import BnFreeze
from fastai.learner import Learner

from fastai_groups.callbacks import GradualUnfreeze
from fastai_groups.cache import FeatureCache
from fastai_groups.frozen import FastFrozenBody
from models import NotSequential, make_learn, fit, Probe, FreezeSchedule, UnfreezeAt




# --------------------------------------------------------------------------------------------------- fast path
def test_switches_with_freeze_state(dls, capsys):
    learn = make_learn(dls, [FastFrozenBody(), Probe()])
    fit(learn, 4, cbs=FreezeSchedule([-1, 0, -2, -1]))   # frozen body, all trainable, partial, frozen body
    by_epoch = {}
    for ep, _, rg, train_norms, mode in learn.probe.rows:
        by_epoch.setdefault(ep, set()).add((rg, train_norms, mode))
    assert by_epoch == {0: {(False, False, "no_grad")}, 1: {(True, True, "")}, 2: {(True, True, "")},
                        3: {(False, False, "no_grad")}}
    # validation untouched: eval mode and no grad, whatever the state
    assert {(rg, tn) for _, _, rg, tn, _ in learn.probe.valid_rows} == {(False, False)}
    out = capsys.readouterr().out
    assert out.count("FastFrozenBody: body fully frozen") == 2 and out.count("FastFrozenBody: body trainable") == 1
    assert learn.fast_frozen and "fast frozen" in learn.fast_frozen_info
    assert "forward" not in vars(learn.model[0])          # nothing left on the body after the fit


def test_gradual_unfreeze_and_mid_epoch_unfreeze(dls):
    learn = make_learn(dls, [FastFrozenBody(verbose=False), Probe()])
    fit(learn, 2, cbs=GradualUnfreeze(every=1))
    assert [(r[0], r[2], r[3]) for r in learn.probe.rows if r[1] == 0] == [(0, False, False), (1, True, True)]
    learn.freeze()
    fit(learn, 1, cbs=UnfreezeAt(1))                       # unfreeze after batch 1: autograd and BN train from batch 2
    assert [(r[2], r[3], r[4]) for r in learn.probe.rows] == [(False, False, "no_grad")] * 2 + [(True, True, "")] * 2
    assert not learn.fast_frozen


def test_train_bn_true_is_fastai(dls):
    learn = make_learn(dls, [FastFrozenBody(), Probe()], train_bn=True)
    fit(learn, 1)
    assert {r[2:] for r in learn.probe.rows} == {(True, True, "")}
    assert learn.fast_frozen is False


def test_fast_path_equals_plain_bnfreeze(dls):
    plain = make_learn(dls, [BnFreeze()])
    fast = make_learn(dls, [FastFrozenBody(verbose=False)])
    fit(plain, 2)
    fit(fast, 2)
    np.testing.assert_allclose([float(v) for v in fast.recorder.losses], [float(v) for v in plain.recorder.losses],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(fast.recorder.values, dtype=float),
                               np.array(plain.recorder.values, dtype=float), rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(plain.model.state_dict().items(), fast.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), k


def test_needs_sequential_body_head(dls):
    learn = Learner(dls, NotSequential(), cbs=FastFrozenBody())
    with pytest.raises(TypeError, match=r"nn.Sequential\(body, head\).*get_body"):
        fit(learn, 1)
    learn = Learner(dls, NotSequential(), cbs=[FastFrozenBody(get_body=lambda m: m.features, verbose=False),
                                               FeatureCache(get_body=lambda m: m.features, verbose=False)])
    learn.model.features.requires_grad_(False)
    fit(learn, 1)
    assert learn.fast_frozen_mode == "cached"
    assert learn.fast_frozen_info == "cached features (64 train + 16 valid items, 1.3 MiB), body not run"
    learn.remove_cb(FeatureCache)
    fit(learn, 1)
    assert learn.fast_frozen_info == "fast frozen (no autograd, 3 norm layers in inference mode)"
