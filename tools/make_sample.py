"""Rebuild `fastai_groups/data/fashion_sample.npz`, the bundled product-photo sample, from Fashion-MNIST.

Needs the Debian package `dataset-fashion-mnist` (or `--source` pointing at the four idx .gz files).
Deterministic: the same seed gives the same images, labels and order.

    python tools/make_sample.py                 # writes fastai_groups/data/fashion_sample.npz
    python tools/make_sample.py --out /tmp/s.npz --seed 0
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fastai_groups.data import DEBIAN_SOURCE, FASHION_CLASSES, SAMPLE_FILE, read_idx

N_TRAIN, N_VALID, SEED = 48, 12, 0


def pick(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    "`n` indices per class, drawn without replacement, sorted within a class, classes in label order."
    return np.concatenate([np.sort(rng.choice(np.flatnonzero(labels == c), size=n, replace=False))
                           for c in range(len(FASHION_CLASSES))])


def sample_arrays(source: str | Path = DEBIAN_SOURCE, n_train: int = N_TRAIN, n_valid: int = N_VALID,
                  seed: int = SEED) -> dict[str, np.ndarray]:
    """The sample as arrays: train images from the official train split, valid images from t10k.

    >>> s = sample_arrays(); s["images"].shape  # doctest: +SKIP
    (600, 28, 28)
    """
    source, rng = Path(source), np.random.default_rng(seed)
    parts = []
    for valid, (prefix, n) in enumerate((("train", n_train), ("t10k", n_valid))):
        images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
        idx = pick(labels, n, rng)
        parts.append(dict(images=images[idx], labels=labels[idx], is_valid=np.full(len(idx), bool(valid)),
                          source_index=idx.astype(np.int32)))
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out["classes"] = np.array(FASHION_CLASSES)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=DEBIAN_SOURCE, help="folder with the Fashion-MNIST idx .gz files")
    ap.add_argument("--out", default=str(SAMPLE_FILE), help="the .npz file to write")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    arrays = sample_arrays(args.source, seed=args.seed)
    out = Path(args.out)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, {len(arrays['labels'])} images)")
    return out


if __name__ == "__main__":
    main()
