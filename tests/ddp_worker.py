"""One rank of the distributed test (tests/test_distributed.py); launch with

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py DATA_DIR OUT_DIR

Trains a torchvision resnet18 (random init, 3 classes, 32 px) with `splitter=auto_splitter` and a `GroupLogger`
inside `cpu_distrib_ctx`, in three scenarios, each with a fresh Learner:

- `fit2`: `create_opt(); freeze()`, one frozen fit of 1 epoch, `unfreeze()`, one fit of 1 epoch
  (fastai re-wraps the model in DDP at each fit). Saves the GroupLogger plot on rank 0 only.
- `gradual`: one fit of 2 epochs with `GradualUnfreeze(start=5)` (unfreezes inside the fit) and `DDPRewrap()`.
- `gradual_norewrap`: the same without `DDPRewrap`: the ranks are expected to drift apart (Lightning #20340),
  which shows that the weight comparison of the test can see the failure.

Each rank writes OUT_DIR/rank{r}.json: group names, parameter names per group, a hash of every parameter before
training (per-rank seed: they differ until DDP copies rank 0's weights), after each fit, losses, GroupLogger
history summary, and the files found in its own `learn.path` (OUT_DIR/<scenario>/rank{r}).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402
from fastai.data.block import CategoryBlock, DataBlock  # noqa: E402
from fastai.data.transforms import GrandparentSplitter, get_image_files, parent_label  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.losses import CrossEntropyLossFlat  # noqa: E402
from fastai.optimizer import Adam  # noqa: E402
from fastai.torch_core import rank_distrib  # noqa: E402
from fastai.vision.data import ImageBlock  # noqa: E402
from torchvision.models import resnet18  # noqa: E402

from fastai_groups import GradualUnfreeze, GroupLogger, auto_splitter, group_names  # noqa: E402
from fastai_groups.distributed import DDPRewrap, cpu_distrib_ctx  # noqa: E402


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def param_hashes(model: torch.nn.Module) -> dict[str, str]:
    return {n: digest(p) for n, p in model.named_parameters()}


class Probe(Callback):
    "Per-rank record of the training batches: this rank's own loss and a hash of each of its input images."
    run_valid = False

    def before_fit(self):
        self.losses, self.batches = [], []

    def after_batch(self):
        self.losses.append(float(self.learn.loss))
        self.batches.append([digest(x) for x in self.learn.xb[0]])


def make_learner(data: Path, path: Path, cbs: list) -> Learner:
    dblock = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files,
                       splitter=GrandparentSplitter(train_name="train", valid_name="valid"), get_y=parent_label)
    dls = dblock.dataloaders(data, bs=4, num_workers=0, device="cpu")
    torch.manual_seed(1000 + rank_distrib())       # different init per rank: DDP must copy rank 0's weights
    model = resnet18(num_classes=dls.c)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=Adam, splitter=auto_splitter,
                    cbs=[Probe(), *cbs], path=path)
    learn.create_opt()
    return learn


def groups_info(learn: Learner) -> dict:
    names = {id(p): n for n, p in learn.model.named_parameters()}
    groups = auto_splitter(learn.model)
    return {"group_names": group_names(groups), "group_params": [[names[id(p)] for p in g] for g in groups]}


def history_info(learn: Learner) -> dict:
    h = learn.group_logger.history
    return {"rows": len(h), "iters": int(h["iter"].nunique()) if len(h) else 0,
            "lr": [round(float(x), 12) for x in h["lr"]], "state": h["state"].tolist(),
            "names": sorted(set(h["name"]))}


def files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def run_fit2(data: Path, out: Path, rank: int) -> dict:
    path = out / "fit2" / f"rank{rank}"
    learn = make_learner(data, path, [GroupLogger("groups.csv", show_table=False)])
    res = {"init": param_hashes(learn.model), **groups_info(learn)}
    learn.freeze()
    res["trainable_fit0"] = [n for n, p in learn.model.named_parameters() if p.requires_grad]
    with cpu_distrib_ctx(learn):
        learn.fit(1, 1e-3)
        res["after_fit0"] = param_hashes(learn.model)
        res["losses_fit0"], res["batches_fit0"] = learn.probe.losses, learn.probe.batches
        learn.unfreeze()
        learn.fit(1, slice(1e-5, 1e-3))
    res["final"] = param_hashes(learn.model)
    res["losses"], res["batches"] = learn.probe.losses, learn.probe.batches
    res["history"] = history_info(learn)
    if rank_distrib() == 0:                       # the rank guard a training script needs for its own files
        learn.group_logger.plot().savefig(path / "groups.png", dpi=60)
    res["files"] = files(path)
    return res


def run_gradual(data: Path, out: Path, rank: int, rewrap: bool) -> dict:
    name = "gradual" if rewrap else "gradual_norewrap"
    path = out / name / f"rank{rank}"
    rw = DDPRewrap()
    cbs = [GroupLogger("groups.csv", show_table=False)] + ([rw] if rewrap else [])
    learn = make_learner(data, path, cbs)
    res = {"init": param_hashes(learn.model), **groups_info(learn)}
    learn.freeze()
    with cpu_distrib_ctx(learn):
        learn.fit(2, slice(1e-4, 1e-3), cbs=GradualUnfreeze(start=5))
    res["final"] = param_hashes(learn.model)
    res["losses"], res["batches"] = learn.probe.losses, learn.probe.batches
    res["history"] = history_info(learn)
    res["n_rewraps"] = rw.n_rewraps
    res["files"] = files(path)
    return res


def main(argv: list[str]) -> None:
    data, out = Path(argv[0]), Path(argv[1])
    scenarios = argv[2].split(",") if len(argv) > 2 else ["fit2", "gradual", "gradual_norewrap"]
    rank = int(os.environ["RANK"])
    t0 = time.time()
    res: dict = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"])}
    for s in scenarios:
        if s == "fit2":
            res[s] = run_fit2(data, out, rank)
        elif s in ("gradual", "gradual_norewrap"):
            res[s] = run_gradual(data, out, rank, rewrap=s == "gradual")
        else:
            raise SystemExit(f"unknown scenario {s!r}")
        res[s]["seconds"] = round(time.time() - t0, 2)
    res["backend"] = str(dist.get_backend()) if dist.is_initialized() else None
    res["master_addr"] = os.environ.get("MASTER_ADDR")
    res["all_finite"] = all(math.isfinite(x) for s in scenarios for x in res[s]["losses"])
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
