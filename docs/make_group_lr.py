"""Regenerate docs/group_lr.png: a real `fine_tune(2)` of tf_efficientnet_lite0 (offline ImageNet weights) on the
bundled product sample at 48 px, one thread. Run from the repository root: `python docs/make_group_lr.py`."""
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import torch  # noqa: E402
from fastai.vision.all import ImageDataLoaders, Resize, accuracy, set_seed  # noqa: E402

from fastai_groups import group_learner, product_sample  # noqa: E402

torch.set_num_threads(1)
set_seed(42, reproducible=True)
dls = ImageDataLoaders.from_folder(product_sample(), train="train", valid="valid", item_tfms=Resize(48), bs=64,
                                   num_workers=0)
learn = group_learner(dls, "tf_efficientnet_lite0", metrics=accuracy)
learn.fine_tune(2, 2e-3)
out = Path(__file__).resolve().parent / "group_lr.png"
learn.group_logger.plot().savefig(out, dpi=100, bbox_inches="tight")
print(f"wrote {out}")
