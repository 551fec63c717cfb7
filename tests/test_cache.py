"""Tests of the feature cache (fastai_groups/cache.py): small resnet18 / a tiny conv body at 32 px, 64 images."""

import shutil

import numpy as np
import pytest
import torch
from fastai.callback.training import BnFreeze
from fastai.data.transforms import Normalize
from fastai.vision.augment import Brightness, Flip, RandomErasing, Resize
from fastai.vision.core import TensorImage, imagenet_stats
from fastai.vision.data import ImageDataLoaders
from fasttransform.transform import Transform
from PIL import Image

from fastai_groups.cache import FeatureCache, random_transforms
from fastai_groups.frozen import FastFrozenBody
from models import N_TRAIN, N_VALID, BS, make_dls, make_learn, fit, Probe, CountItems, UnfreezeAt


# --------------------------------------------------------------------------------------------------- cache
def test_cache_equals_plain_and_hits_once(dls, capsys):
    "resnet18 (fastai's model): one epoch from the cache gives the plain run's losses, metrics and head weights."
    plain = make_learn(dls, [BnFreeze()], resnet=True)
    cached = make_learn(dls, [FeatureCache(), CountItems()], resnet=True)
    fit(plain, 1)
    fit(cached, 1)
    out = capsys.readouterr().out
    assert "FeatureCache: body fully frozen -> features computed once (64 train + 16 valid items" in out
    assert cached.count_items.n == N_TRAIN + N_VALID                 # body run once per item
    assert cached.fast_frozen_mode == "cached" and cached.feature_cache.nbytes > 0
    np.testing.assert_allclose([float(v) for v in cached.recorder.losses], [float(v) for v in plain.recorder.losses],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(cached.recorder.values, dtype=float),
                               np.array(plain.recorder.values, dtype=float), rtol=1e-4, atol=1e-5)
    for (k, a), b in zip(plain.model[1].state_dict().items(), cached.model[1].state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), k
    fit(cached, 1)                                                   # a second frozen fit reuses the cache
    assert cached.count_items.n == N_TRAIN + N_VALID
    cached.get_preds()                                               # outside a fit: images, as usual
    assert cached.count_items.n == N_TRAIN + 2 * N_VALID


def test_cache_dropped_on_unfreeze_and_rebuilt_on_new_weights(dls, capsys):
    learn = make_learn(dls, [FeatureCache(), CountItems(), Probe()])
    fit(learn, 1)
    store = learn.feature_cache.store
    assert store is not None
    with torch.no_grad():
        learn.model[0][0].weight.mul_(1.0)                            # in place: the cached features are stale
    fit(learn, 1)
    assert learn.feature_cache.store is not store and learn.count_items.n == 2 * (N_TRAIN + N_VALID)
    learn.unfreeze()
    fit(learn, 1)
    assert learn.feature_cache.store is None and learn.fast_frozen_mode == ""
    assert {r[2:4] for r in learn.probe.rows} == {(True, True)}
    assert learn.count_items.n == 3 * (N_TRAIN + N_VALID)
    assert "feature cache dropped" in capsys.readouterr().out


def test_cache_mid_epoch_unfreeze_loads_images(dls):
    learn = make_learn(dls, [FeatureCache(verbose=False), CountItems(), Probe()])
    fit(learn, 1, cbs=UnfreezeAt(1))
    assert [(r[2], r[4]) for r in learn.probe.rows] == [(False, "cached")] * 2 + [(True, "")] * 2
    # build (64 + 16), then the 2 last training batches and the validation from images
    assert learn.count_items.n == N_TRAIN + N_VALID + 2 * BS + N_VALID


def test_cache_memory_limit_falls_back(dls, capsys):
    learn = make_learn(dls, [FeatureCache(max_bytes=10_000), Probe()])
    fit(learn, 1)
    out = capsys.readouterr().out
    assert "FeatureCache: the features need" in out and "> max_bytes" in out and "training without the cache" in out
    assert learn.feature_cache.store is None
    assert {r[2:] for r in learn.probe.rows} == {(False, False, "no_grad")}


def test_cache_refuses_random_augmentation(image_dir):
    dls = make_dls(image_dir, batch_tfms=Flip(p=0.5))
    assert random_transforms(dls.train) == ["Flip (after_batch): a fastai RandTransform, random on the training set"]
    learn = make_learn(dls, [FeatureCache()])
    with pytest.raises(ValueError, match=r"may be random: Flip \(after_batch\).*Resize\(size, method='squish'\)"):
        fit(learn, 1)
    assert "forward" not in vars(learn.model[0])


def test_cache_leads_fast_frozen_body(dls):
    learn = make_learn(dls, [FastFrozenBody(), FeatureCache(verbose=False), CountItems()])
    fit(learn, 2)                                                    # body run once per item over 2 epochs
    assert learn.fast_frozen_mode == "cached" and learn.count_items.n == N_TRAIN + N_VALID
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureCache(max_bytes=0)


# ------------------------------------------------------------------------------------- what the cache refuses
class Perturb(Transform):
    "Adds 1 to 10% of the batches: random, and not a fastai RandTransform."
    order = 99

    def encodes(self, x: TensorImage):
        return x + float(torch.rand(()) < 0.1)


class Scale(Transform):
    "Deterministic, but not fastai's: refused until declared."
    order = 99

    def encodes(self, x: TensorImage):
        return x * 0.5


class DeclaredScale(Scale):
    deterministic = True


def _keep(b):
    return b


@pytest.mark.parametrize("tfm,name", [(RandomErasing(p=0.2), "RandomErasing"), (Flip(p=0.05), "Flip"),
                                      (Brightness(p=0.05), "Brightness"), (Perturb(), "Perturb"),
                                      (Scale(), "Scale"), (_keep, "_keep")])
def test_cache_refuses_rare_or_unknown_transforms(image_dir, tfm, name):
    "Decided from the pipeline, not from samples: rare augmentation and unknown transforms are refused by name."
    learn = make_learn(make_dls(image_dir, batch_tfms=tfm), [FeatureCache(), CountItems()])
    with pytest.raises(ValueError, match=rf"may be random: {name} \(after_batch\).*declared: `deterministic = True`"):
        fit(learn, 1)
    assert learn.count_items.n == 0                                  # refused before any batch


def _folder(image_dir, tmp_path, wide: bool):
    "image_dir's train/valid, plus (when `wide`) one 48x32 training image, late in the dataset."
    root = tmp_path / "imgs"
    shutil.copytree(image_dir, root)
    if wide:
        Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(root / "train" / "b" / "zz_wide.png")
    return root


def _resize_dls(root, method):
    return ImageDataLoaders.from_folder(root, train="train", valid="valid", item_tfms=Resize(32, method=method),
                                        bs=BS, num_workers=0)


@pytest.mark.parametrize("method", ["crop", "pad"])
def test_cache_refuses_resize_placing_at_random(image_dir, tmp_path, method):
    "Resize crops / pads at random on train when an image is not at the target's aspect: read from every file."
    dls = _resize_dls(_folder(image_dir, tmp_path, wide=True), method)
    assert [p.name for p in dls.train.items].index("zz_wide.png") >= 8
    learn = make_learn(dls, [FeatureCache()])
    with pytest.raises(ValueError, match=rf"Resize \(after_item\): method='{method}' {method}s at random the images "
                                         r"not at the target's aspect ratio, e.g. .*zz_wide.png \(48x32\)"):
        fit(learn, 1)


@pytest.mark.parametrize("method,wide", [("squish", True), ("crop", False), ("pad", False)])
def test_cache_accepts_deterministic_resize(image_dir, tmp_path, method, wide):
    learn = make_learn(_resize_dls(_folder(image_dir, tmp_path, wide), method), [FeatureCache(verbose=False)])
    fit(learn, 1)
    assert learn.fast_frozen_mode == "cached"


@pytest.mark.parametrize("how", ["class attribute", "argument"])
def test_cache_accepts_declared_transforms(image_dir, how):
    tfm, declared = (DeclaredScale(), ()) if how == "class attribute" else (Scale(), [Scale])
    dls = make_dls(image_dir, batch_tfms=[tfm, Flip(p=0.0), Normalize.from_stats(*imagenet_stats)])
    assert random_transforms(dls.train, declared) == []
    learn = make_learn(dls, [FeatureCache(verbose=False, deterministic=declared), CountItems()])
    fit(learn, 1)
    assert learn.fast_frozen_mode == "cached" and learn.count_items.n == N_TRAIN + N_VALID


def test_cache_notices_data_changed_in_place(image_dir):
    "A validation file list edited in place rebuilds the cache; a random transform added in place is refused."
    learn = make_learn(make_dls(image_dir), [FeatureCache(verbose=False), CountItems()])
    fit(learn, 1)
    fit(learn, 1)
    assert learn.count_items.n == N_TRAIN + N_VALID                  # reused
    items = learn.dls.valid.dataset.items
    items[0] = items[-1]                                             # same list, same length, another file
    fit(learn, 1)
    assert learn.count_items.n == 2 * (N_TRAIN + N_VALID)            # rebuilt
    learn.dls.train.after_batch.add(Flip(p=0.05))
    with pytest.raises(ValueError, match=r"may be random: Flip \(after_batch\)"):
        fit(learn, 1)
