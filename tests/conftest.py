"Shared test setup: few threads (2-core CI), quiet warnings from third-party deprecations."
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)
os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    "3 classes of noisy solid-colour 32 px PNGs: 12 train + 4 valid images per class (`train/`, `valid/`)."
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("valid", 4)):
        for cls, rgb in {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                a = np.clip(np.array(rgb) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    "(frozen/cache tests) Two classes of 32x32 RGB PNGs (class a: darker top half), 64 train and 16 valid."
    from models import N_TRAIN, N_VALID
    root = tmp_path_factory.mktemp("frozen_imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN // 2), ("valid", N_VALID // 2)):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                if c == "a":
                    a[:16] //= 3
                Image.fromarray(a).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def dls(image_dir):
    from models import make_dls
    return make_dls(image_dir)





@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    "A local resnet18 checkpoint (random weights, 10 classes): pretrained weights without a download."
    from torchvision.models import resnet18
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "r18.pth"
    torch.save(resnet18(num_classes=10).state_dict(), path)
    return path
