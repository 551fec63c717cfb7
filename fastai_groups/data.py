"""Product photos to fine-tune on, offline: a bundled Fashion-MNIST sample and a folder checker.

`product_sample()` writes the 600-image sample shipped inside the package (10 product classes, 48 train and
12 valid images each) as PNG files in the folder layout fastai reads:

    dest/train/<class>/<n>.png
    dest/valid/<class>/<n>.png

so `ImageDataLoaders.from_folder(dest, train='train', valid='valid')` works on it with no download.
`fashion_mnist()` does the same with the full dataset from the Debian package `dataset-fashion-mnist`,
`read_idx()` reads its idx files and `check_image_folder()` validates a user's own folder before training.

Fashion-MNIST is Copyright (c) 2017 Zalando SE (Han Xiao, Kashif Rasul, Roland Vollgraf), MIT license; see
`fastai_groups/data/LICENSE-fashion-mnist.txt` and https://github.com/zalandoresearch/fashion-mnist.
"""
from __future__ import annotations

import gzip
import mimetypes
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["FASHION_CLASSES", "SAMPLE_FILE", "data_home", "product_sample", "fashion_mnist", "read_idx",
           "check_image_folder"]

PathLike = Union[str, os.PathLike]

#: Fashion-MNIST's class names, label order, safe to use as folder names.
FASHION_CLASSES: tuple[str, ...] = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                    "Sneaker", "Bag", "Ankle_boot")

#: The bundled sample: `images` (N, 28, 28) uint8, `labels` (N,) uint8, `is_valid` (N,) bool,
#: `source_index` (N,) int32 (index in the official train split, or in t10k for valid images), `classes`.
SAMPLE_FILE: Path = Path(__file__).parent / "data" / "fashion_sample.npz"

DEBIAN_SOURCE = "/usr/share/datasets/fashion-mnist"
_SPLITS = ("train", "valid")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
# the same definition as fastai's `image_extensions`, without importing fastai
_IMAGE_EXTENSIONS = {ext for ext, mime in mimetypes.types_map.items() if mime.startswith("image/")}


# ----------------------------------------------------------------------------------------------------------------
# Reading the data
# ----------------------------------------------------------------------------------------------------------------
def data_home() -> Path:
    """The folder where datasets are written by default: `$FASTAI_GROUPS_HOME`, else
    `$XDG_CACHE_HOME/fastai_groups`, else `~/.cache/fastai_groups`. Not created here.

    >>> (data_home() / "fashion_sample").name
    'fashion_sample'
    """
    home = os.environ.get("FASTAI_GROUPS_HOME")
    if home:
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "fastai_groups"


def read_idx(path: PathLike) -> np.ndarray:
    """The array stored in an idx file (the MNIST format), gzipped (`.gz`) or not.

    >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").shape  # doctest: +SKIP
    (10000,)
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4].hex()!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset, count = 4 + 4 * ndim, int(np.prod(shape, dtype=np.int64))
    if len(raw) != offset + count * dtype.itemsize:
        raise ValueError(f"{path}: header says shape {shape} but the file holds {len(raw) - offset} data bytes")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _load_sample() -> dict[str, np.ndarray]:
    if not SAMPLE_FILE.exists():
        raise FileNotFoundError(f"the bundled sample {SAMPLE_FILE} is missing: reinstall fastai-groups")
    with np.load(SAMPLE_FILE, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------------------------------------------
# Writing image folders
# ----------------------------------------------------------------------------------------------------------------
def _file_name(index: int) -> str:
    return f"{int(index):05d}.png"


def _plan(images: np.ndarray, labels: np.ndarray, is_valid: np.ndarray, source_index: np.ndarray,
          dest: Path) -> list[tuple[Path, np.ndarray]]:
    "Where each image goes: `dest/<split>/<class>/<index in the official split>.png`."
    return [(dest / _SPLITS[int(v)] / FASHION_CLASSES[int(y)] / _file_name(i), img)
            for img, y, v, i in zip(images, labels, is_valid, source_index)]


def _complete(plan: Sequence[tuple[Path, np.ndarray]]) -> bool:
    "Every planned file is there and non-empty (checked by count, per class folder)."
    expected: dict[Path, set[str]] = {}
    for p, _ in plan:
        expected.setdefault(p.parent, set()).add(p.name)
    for folder, names in expected.items():
        if not folder.is_dir():
            return False
        found = {e.name for e in os.scandir(folder) if e.name in names and e.is_file() and e.stat().st_size > 0}
        if len(found) != len(names):
            return False
    return True


def _write_pngs(plan: Sequence[tuple[Path, np.ndarray]]) -> None:
    from PIL import Image
    for folder in {p.parent for p, _ in plan}:
        folder.mkdir(parents=True, exist_ok=True)
    for path, img in plan:
        tmp = path.with_name(path.name + ".tmp")
        Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(tmp, format="PNG")  # 2-D uint8: mode "L"
        os.replace(tmp, path)  # an interrupted run never leaves a truncated .png behind


def _materialise(plan: list[tuple[Path, np.ndarray]], dest: Path, force: bool) -> Path:
    if force or not _complete(plan):
        _write_pngs(plan)
    return dest


def product_sample(dest: PathLike | None = None, force: bool = False) -> Path:
    """Write the bundled product-photo sample (Fashion-MNIST, 10 classes x 60 grayscale 28x28 images:
    48 train from the official train split, 12 valid from its test split) as PNG files, and return `dest`.

    Layout: `dest/train/<class>/<n>.png` and `dest/valid/<class>/<n>.png`, class names in `FASHION_CLASSES`,
    `n` the image's index in the official split. `dest` defaults to `data_home()/"fashion_sample"`. Nothing
    is rewritten when every file is already there, unless `force`.

    >>> from fastai.vision.all import ImageDataLoaders, Resize  # doctest: +SKIP
    >>> dls = ImageDataLoaders.from_folder(product_sample(), train="train", valid="valid",
    ...                                    item_tfms=Resize(64), bs=16)  # doctest: +SKIP
    >>> len(dls.vocab)  # doctest: +SKIP
    10
    """
    dest = Path(dest).expanduser() if dest is not None else data_home() / "fashion_sample"
    s = _load_sample()
    return _materialise(_plan(s["images"], s["labels"], s["is_valid"], s["source_index"], dest), dest, force)


def _fashion_files(source: Path) -> dict[str, Path]:
    files = {f"{split}_{kind}": source / f"{prefix}-{kind}-{idx}-ubyte.gz"
             for split, prefix in (("train", "train"), ("valid", "t10k"))
             for kind, idx in (("images", "idx3"), ("labels", "idx1"))}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found ({missing[0]} is missing): install it with "
                                "`sudo apt-get install dataset-fashion-mnist`, or pass source= the folder holding "
                                "train-images-idx3-ubyte.gz and friends")
    return files


def fashion_mnist(dest: PathLike | None = None, n_per_class: int | None = None,
                  source: PathLike = DEBIAN_SOURCE) -> Path:
    """Write Fashion-MNIST from the idx files in `source` (the Debian package `dataset-fashion-mnist`) as PNG
    files in the same layout as `product_sample`: train images from the train split, valid from t10k.

    `n_per_class` keeps the first `n` images of each class of each split (all when None: 60,000 + 10,000
    files). `dest` defaults to `data_home()/"fashion_mnist"` (`"fashion_mnist_<n>"` with a limit). Nothing is
    rewritten when every file is already there.

    >>> path = fashion_mnist(n_per_class=100)  # doctest: +SKIP
    >>> len(list((path / "train" / "Trouser").glob("*.png")))  # doctest: +SKIP
    100
    """
    if n_per_class is not None and (isinstance(n_per_class, bool) or int(n_per_class) < 1):
        raise ValueError(f"n_per_class must be a positive int or None, not {n_per_class!r}")
    files = _fashion_files(Path(source))
    if dest is None:
        dest = data_home() / ("fashion_mnist" if n_per_class is None else f"fashion_mnist_{int(n_per_class)}")
    dest = Path(dest).expanduser()
    plan: list[tuple[Path, np.ndarray]] = []
    for valid, split in enumerate(_SPLITS):
        images, labels = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
        if len(images) != len(labels):
            raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels in {source}")
        keep = np.arange(len(labels))
        if n_per_class is not None:
            keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:int(n_per_class)]
                                           for c in range(len(FASHION_CLASSES))]))
        plan += _plan(images[keep], labels[keep], np.full(len(keep), valid), keep, dest)
    return _materialise(plan, dest, force=False)


# ----------------------------------------------------------------------------------------------------------------
# Checking a user's folder
# ----------------------------------------------------------------------------------------------------------------
def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS and not p.name.startswith(".")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))


_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")   # PIL modes of 16- / 32-bit greyscale images


def _mode(p: Path) -> Optional[str]:
    "PIL's mode of image `p` (e.g. 'RGB', 'I;16'); None when PIL cannot read it."
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(p) as im:
                im.load()
                return im.mode
    except Exception:
        return None


def _one_line(items: Sequence[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_image_folder(path: PathLike, warn: bool = True) -> tuple[list[str], list[Path]]:
    """Check that `path` is a folder fastai can fine-tune on, and return `(class names, unreadable files)`.

    Two layouts work: `path/train/<class>/*.png` (+ optional `path/valid/<class>/...`), read with
    `ImageDataLoaders.from_folder(path, train="train", valid="valid")`, and `path/<class>/*.jpg`, read with
    `from_folder(path, valid_pct=0.2)`. Images sit directly in their class folder; folders whose name
    starts with `.` or `_` are skipped. Raises `ValueError` (one line) for a missing path, fewer than two class
    folders with images, class folders without readable images (named), or valid classes absent from train.
    Files PIL cannot open are returned, and reported with a warning when `warn`; so are (with a warning only)
    16- / 32-bit greyscale images, which fastai's RGB conversion clips to a handful of grey levels.

    >>> classes, bad = check_image_folder(product_sample())  # doctest: +SKIP
    >>> classes[:3], bad  # doctest: +SKIP
    (['Ankle_boot', 'Bag', 'Coat'], [])
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"{root}: no such folder; pass the folder that holds the class sub-folders")
    if not root.is_dir():
        raise ValueError(f"{root} is a file, not a folder of class sub-folders")
    split_layout = (root / "train").is_dir()
    splits = [root / s for s in _SPLITS if (root / s).is_dir()] if split_layout else [root]
    per_split: dict[Path, list[str]] = {}
    bad: list[Path] = []
    empty: list[str] = []
    wide: list[Path] = []
    for split in splits:
        per_split[split] = []
        for cls in _subdirs(split):
            images = sorted(p for p in cls.iterdir() if _is_image(p))
            modes = {p: _mode(p) for p in images}
            unreadable = [p for p in images if modes[p] is None]
            bad += unreadable
            wide += [p for p in images if modes[p] in _WIDE_MODES]
            if len(images) == len(unreadable):
                empty.append(str(cls.relative_to(root)))
            else:
                per_split[split].append(cls.name)
    if empty:
        raise ValueError(f"{root}: class folder(s) without readable images: {_one_line(empty)}; add images or "
                         "remove the folder(s)")
    train = per_split[splits[0]]
    if len(train) < 2:
        where = root / "train" if split_layout else root
        found = f"only {train[0]!r}" if train else "none"
        raise ValueError(f"{where} needs at least 2 class sub-folders holding images (found {found}); "
                         "put the images of each class in their own sub-folder")
    if split_layout and len(splits) > 1:
        unknown = sorted(set(per_split[splits[1]]) - set(train))
        if unknown:
            raise ValueError(f"{root / 'valid'}: class folder(s) missing from train/: {_one_line(unknown)}; add "
                             "training images of these classes, or remove them from valid/")
    if bad and warn:
        warnings.warn(f"{len(bad)} unreadable image file(s) in {root}: {_one_line([str(p) for p in bad])}; "
                      "remove or re-save them (fastai stops on them mid-epoch; the CLI skips them)", stacklevel=2)
    if wide and warn:
        names = _one_line([str(p) for p in wide], 3)
        warnings.warn(f"{len(wide)} image(s) in {root} are 16- or 32-bit greyscale ({names}): fastai's conversion "
                      "to RGB clips them to a handful of grey levels; convert them to 8-bit first (e.g. Image.fromarray((np.asarray(im) >> 8).astype(np.uint8)) for 16-bit PNGs)",
                      stacklevel=2)
    return sorted(train), bad
