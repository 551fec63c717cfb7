"Bundled product sample, Fashion-MNIST from the Debian package, idx reader, image-folder checks."
import gzip
import importlib.util
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastai_groups import data
from fastai_groups.data import (FASHION_CLASSES, SAMPLE_FILE, check_image_folder, fashion_mnist, product_sample,
                                read_idx)

DEBIAN = Path(data.DEBIAN_SOURCE)
needs_debian = pytest.mark.skipif(not (DEBIAN / "t10k-labels-idx1-ubyte.gz").exists(),
                                  reason="apt-get install dataset-fashion-mnist")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return product_sample(tmp_path_factory.mktemp("sample") / "fashion")


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


# ---------------------------------------------------------------------------------------------------------------
# bundled data
# ---------------------------------------------------------------------------------------------------------------
def test_package_data_is_small_and_licensed():
    folder = SAMPLE_FILE.parent
    assert sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) < 1_000_000
    text = (folder / "LICENSE-fashion-mnist.txt").read_text()
    for needle in ("MIT", "Zalando SE", "Han Xiao", "Kashif Rasul", "Roland Vollgraf",
                   "https://github.com/zalandoresearch/fashion-mnist", "Permission is hereby granted"):
        assert needle in text


def test_bundled_arrays():
    with np.load(SAMPLE_FILE, allow_pickle=False) as z:
        images, labels, is_valid = z["images"], z["labels"], z["is_valid"]
        assert tuple(z["classes"]) == FASHION_CLASSES
    assert images.shape == (600, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels[~is_valid]).tolist() == [48] * 10
    assert np.bincount(labels[is_valid]).tolist() == [12] * 10


@needs_debian
def test_bundled_sample_is_reproducible():
    spec = importlib.util.spec_from_file_location("make_sample", REPO / "tools" / "make_sample.py")
    make_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sample)
    rebuilt = make_sample.sample_arrays()
    with np.load(SAMPLE_FILE, allow_pickle=False) as z:
        for k in z.files:
            np.testing.assert_array_equal(z[k], rebuilt[k], err_msg=k)
    # the stored index really points at the official image
    valid_images = read_idx(DEBIAN / "t10k-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(rebuilt["images"][rebuilt["is_valid"]],
                                  valid_images[rebuilt["source_index"][rebuilt["is_valid"]]])


# ---------------------------------------------------------------------------------------------------------------
# product_sample
# ---------------------------------------------------------------------------------------------------------------
def test_product_sample_layout(sample):
    for split, n in (("train", 48), ("valid", 12)):
        assert sorted(d.name for d in (sample / split).iterdir()) == sorted(FASHION_CLASSES)
        for cls in FASHION_CLASSES:
            assert len(pngs(sample / split / cls)) == n, (split, cls)
    with Image.open(pngs(sample / "train" / "Trouser")[0]) as im:
        assert im.size == (28, 28) and im.mode == "L"


def test_product_sample_pixels_round_trip(sample):
    with np.load(SAMPLE_FILE) as z:
        i = int(np.flatnonzero(z["is_valid"])[0])
        img, label, idx = z["images"][i], z["labels"][i], z["source_index"][i]
    path = sample / "valid" / FASHION_CLASSES[label] / f"{idx:05d}.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), img)


def test_product_sample_is_idempotent(tmp_path, monkeypatch):
    dest = product_sample(tmp_path / "s")
    victim = pngs(dest / "valid" / "Bag")[0]
    files = sorted(dest.rglob("*.png"))
    inodes = lambda: [f.stat().st_ino for f in files if f != victim]   # noqa: E731  (a rewrite makes a new file)
    before = inodes()
    assert product_sample(tmp_path / "s") == dest
    assert inodes() == before                              # complete: nothing rewritten
    victim.unlink()
    before = inodes()
    product_sample(tmp_path / "s")
    assert victim.exists() and victim.stat().st_size > 0   # a missing file: the sample is written again
    assert len(list(dest.rglob("*.png"))) == 600 and not list(dest.rglob("*.tmp"))
    assert all(a != b for a, b in zip(inodes(), before))
    before = inodes()
    product_sample(tmp_path / "s", force=True)
    assert all(a != b for a, b in zip(inodes(), before))   # force: every file rewritten although complete


def test_product_sample_default_dest(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTAI_GROUPS_HOME", str(tmp_path / "home"))
    assert product_sample() == tmp_path / "home" / "fashion_sample"
    assert len(list((tmp_path / "home" / "fashion_sample").rglob("*.png"))) == 600


def test_product_sample_loads_with_fastai(sample):
    from fastai.vision.all import ImageDataLoaders, Resize
    dls = ImageDataLoaders.from_folder(sample, train="train", valid="valid", item_tfms=Resize(32), bs=8,
                                       num_workers=0)
    assert list(dls.vocab) == sorted(FASHION_CLASSES)
    assert (len(dls.train_ds), len(dls.valid_ds)) == (480, 120)
    x, y = dls.one_batch()
    assert tuple(x.shape) == (8, 3, 32, 32) and tuple(y.shape) == (8,)


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST from the Debian package, read_idx
# ---------------------------------------------------------------------------------------------------------------
@needs_debian
def test_fashion_mnist_limited(tmp_path):
    dest = fashion_mnist(tmp_path / "fm", n_per_class=5)
    for split in ("train", "valid"):
        assert sorted(d.name for d in (dest / split).iterdir()) == sorted(FASHION_CLASSES)
        assert all(len(pngs(dest / split / c)) == 5 for c in FASHION_CLASSES)
    # first 5 of each class, named by their index in the official split
    labels = read_idx(DEBIAN / "train-labels-idx1-ubyte.gz")
    first = np.flatnonzero(labels == 1)[:5]
    assert [p.stem for p in pngs(dest / "train" / "Trouser")] == [f"{i:05d}" for i in first]
    assert check_image_folder(dest) == (sorted(FASHION_CLASSES), [])


def test_fashion_mnist_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(tmp_path / "out", n_per_class=5, source=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="n_per_class"):
        fashion_mnist(tmp_path / "out", n_per_class=0)


@needs_debian
def test_read_idx_debian():
    labels = read_idx(DEBIAN / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    images = read_idx(DEBIAN / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8


def test_read_idx_formats(tmp_path):
    arr = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    raw = bytes([0, 0, 0x0C, 2]) + np.array(arr.shape, dtype=">u4").tobytes() + arr.astype(">i4").tobytes()
    (tmp_path / "a-idx2").write_bytes(raw)
    with gzip.open(tmp_path / "a-idx2.gz", "wb") as f:
        f.write(raw)
    for name in ("a-idx2", "a-idx2.gz"):
        out = read_idx(tmp_path / name)
        np.testing.assert_array_equal(out, arr)
        assert out.dtype == np.int32
    (tmp_path / "bad").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")


# ---------------------------------------------------------------------------------------------------------------
# check_image_folder
# ---------------------------------------------------------------------------------------------------------------
def flat_folder(sample: Path, dest: Path, classes=("Bag", "Coat", "Dress")) -> Path:
    for c in classes:
        shutil.copytree(sample / "train" / c, dest / c)
    return dest


def test_check_image_folder_layouts(sample, tmp_path):
    assert check_image_folder(sample) == (sorted(FASHION_CLASSES), [])
    flat = flat_folder(sample, tmp_path / "flat")
    (flat / ".ipynb_checkpoints").mkdir()
    (flat / "notes.txt").write_text("not a class")
    assert check_image_folder(str(flat)) == (["Bag", "Coat", "Dress"], [])


def test_check_image_folder_errors(sample, tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        check_image_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a folder"):
        check_image_folder(tmp_path / "file.png")
    one = flat_folder(sample, tmp_path / "one", classes=("Bag",))
    with pytest.raises(ValueError, match="at least 2 class") as e:
        check_image_folder(one)
    assert "\n" not in str(e.value) and "'Bag'" in str(e.value)
    with pytest.raises(ValueError, match="at least 2 class"):
        check_image_folder(tmp_path / "one" / "Bag")  # images but no class folders
    empty = flat_folder(sample, tmp_path / "empty")
    (empty / "Sandal").mkdir()
    (empty / "Shirt").mkdir()
    (empty / "Shirt" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="without readable images: Sandal, Shirt; add images"):
        check_image_folder(empty)


def test_check_image_folder_split_layout_errors(sample, tmp_path):
    root = tmp_path / "split"
    shutil.copytree(sample, root)
    (root / "valid" / "Sock").mkdir()
    with pytest.raises(ValueError, match="valid/Sock"):
        check_image_folder(root)
    shutil.copytree(sample / "valid" / "Bag", root / "valid" / "Sock", dirs_exist_ok=True)
    with pytest.raises(ValueError, match="missing from train/: Sock"):
        check_image_folder(root)


def test_check_image_folder_reports_corrupt(sample, tmp_path):
    flat = flat_folder(sample, tmp_path / "flat")
    bad = flat / "Coat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    truncated = flat / "Dress" / "cut.png"
    truncated.write_bytes(pngs(flat / "Bag")[0].read_bytes()[:60])
    with pytest.warns(UserWarning, match="2 unreadable image file"):
        classes, unreadable = check_image_folder(flat)
    assert classes == ["Bag", "Coat", "Dress"]
    assert sorted(unreadable) == sorted([bad, truncated])
    _, quiet = check_image_folder(flat, warn=False)
    assert len(quiet) == 2
    for p in pngs(flat / "Bag"):  # a class with only unreadable files is an empty class
        p.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="without readable images: Bag"):
        check_image_folder(flat, warn=False)


def test_check_image_folder_warns_on_16_bit_greyscale(tmp_path):
    "16-bit PNGs reach the model as a handful of grey levels (fastai's RGB conversion): a warning with the count."
    from fastai.vision.core import PILImage
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            wide = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)        # 16-bit greyscale
            Image.fromarray(wide).save(tmp_path / cls / f"{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b" / "rgb.png")
    assert len(np.unique(np.asarray(PILImage.create(tmp_path / "a" / "0.png")))) < 20    # 4096 levels in the file
    with pytest.warns(UserWarning, match=r"^4 image\(s\) in .* are 16- or 32-bit greyscale .*convert them to 8-bit"):
        assert check_image_folder(tmp_path) == (["a", "b"], [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_image_folder(tmp_path, warn=False)
