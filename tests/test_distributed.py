"""fastai DDP (`distrib_ctx`) with `auto_splitter` and `GroupLogger`, in CPU processes (gloo).

The end-to-end tests launch `python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py`
once (module fixture, 35-50 s on 2 cores, loopback only) and check the JSON each rank writes; the others test
`fastai_groups.distributed` in this process.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist

import fastai_groups.distributed as fgd
from fastai_groups.distributed import (DDPRewrap, cpu_collectives, cpu_distrib_ctx, patch_cpu_broadcast,
                                       unpatch_cpu_broadcast)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_worker.py"
CLASSES = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
N_TRAIN, N_VALID = 8, 4                     # per class: 24 training images, 12 per rank, 3 batches of 4 per rank
TIMEOUT = 240
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="fastai.distributed needs accelerate (the `test` extra)")


# ------------------------------------------------------------------------------------------------------------------
# in this process (the import check in a fresh interpreter)
# ------------------------------------------------------------------------------------------------------------------
def test_module_imports_without_accelerate_and_says_what_to_install():
    "fastai.distributed raises NameError without accelerate; ours imports, and asks for accelerate when used."
    code = ("import sys; sys.modules['accelerate'] = None\n"
            "import fastai_groups.distributed as d\n"
            "assert d.cpu_collectives() is False\n"
            "try:\n    d.patch_cpu_broadcast()\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ImportError: fastai's distributed training needs accelerate: pip install accelerate" in res.stdout


@pytest.fixture
def restore_broadcast():
    "Leave `DistributedDL._broadcast` as the test found it."
    from fastai.distributed import DistributedDL
    before = DistributedDL._broadcast
    yield DistributedDL
    DistributedDL._broadcast = before


@needs_accelerate
def test_patch_is_idempotent_and_reversible(restore_broadcast):
    ddl = restore_broadcast
    unpatch_cpu_broadcast()
    fastai_method = ddl._broadcast
    assert patch_cpu_broadcast() is True
    assert patch_cpu_broadcast() is False
    assert ddl._broadcast is fgd._cpu_aware_broadcast and fgd._fastai_broadcast is fastai_method
    assert unpatch_cpu_broadcast() is True
    assert unpatch_cpu_broadcast() is False
    assert ddl._broadcast is fastai_method


@needs_accelerate
def test_without_process_group_fastai_method_runs(restore_broadcast, monkeypatch):
    "No gloo group (or a GPU one): the patch hands over to fastai's own `_broadcast`, unchanged."
    ddl = restore_broadcast
    calls = []
    patch_cpu_broadcast()
    monkeypatch.setattr(fgd, "_fastai_broadcast", lambda self, t, rank: calls.append((t, rank)) or t)
    assert not dist.is_initialized()
    assert cpu_collectives() is False
    assert ddl._broadcast(None, [2, 0, 1], 0) == [2, 0, 1]
    assert calls == [([2, 0, 1], 0)]


@pytest.fixture
def gloo_group(tmp_path):
    "A one-process gloo group (file rendezvous: no network), destroyed afterwards."
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@needs_accelerate
def test_distributed_dl_indices_over_gloo(gloo_group, restore_broadcast):
    from fastai.data.load import DataLoader
    assert cpu_collectives() is True
    patch_cpu_broadcast()
    dl = restore_broadcast(DataLoader(list(range(10)), bs=4, shuffle=True), rank=0, world_size=1)
    idxs = dl.get_idxs()                                  # fastai 2.8's own method moves these to CUDA
    assert sorted(idxs) == list(range(10))
    assert sorted(int(x) for b in dl for x in b) == list(range(10))


def test_cpu_distrib_ctx_rejects_gpu_only_options():
    for kwargs, msg in [({"sync_bn": True}, "SyncBatchNorm"), ({"in_notebook": True}, "torchrun"),
                        ({"cpu": False}, "cpu=True")]:
        with pytest.raises(ValueError, match=msg):
            with cpu_distrib_ctx(None, **kwargs):
                pass


def _tiny_learner(cbs=None):
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    g = torch.Generator().manual_seed(0)
    ds = [(torch.randn(4, generator=g), torch.tensor(i % 2)) for i in range(16)]
    dls = DataLoaders(DataLoader(ds, bs=4, shuffle=True, drop_last=True), DataLoader(ds, bs=4), device="cpu")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=cbs,
                   splitter=lambda m: [list(m[0].parameters()), list(m[2].parameters())])


@needs_accelerate
def test_cpu_distrib_ctx_without_launcher_trains_in_process(monkeypatch, restore_broadcast):
    "Not started by torchrun (no WORLD_SIZE): a plain fit, as fastai's distrib_ctx does; DDPRewrap stays inert."
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    rewrap = DDPRewrap()
    learn = _tiny_learner(cbs=[rewrap])
    learn.create_opt()
    learn.freeze()
    with cpu_distrib_ctx(learn) as ctx:
        assert ctx is learn
        learn.fit(1, 1e-2)
        learn.unfreeze()
        learn.fit(1, 1e-2)
    assert isinstance(learn.model, torch.nn.Sequential)
    assert rewrap.n_rewraps == 0
    assert all(math.isfinite(x) for x in learn.recorder.losses)


# ------------------------------------------------------------------------------------------------------------------
# two CPU processes under torchrun
# ------------------------------------------------------------------------------------------------------------------
def _make_images(root: Path) -> Path:
    "3 classes of 32 px noisy colour squares, every image distinct."
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("valid", N_VALID)):
        for name, rgb in CLASSES.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = np.clip(np.array(rgb) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"    # gloo on the loopback interface, whatever the hostname resolves to
    return env


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict:
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("fastai.distributed needs accelerate (the `test` extra)")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("ddp")
    data, out = _make_images(tmp / "data"), tmp / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
           "--nproc_per_node", "2", str(WORKER), str(data), str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)    # torchrun and its two workers: the session started above
        else:
            proc.kill()
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s:\n{log[-6000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{log[-6000:]}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"out": out, "r0": ranks[0], "r1": ranks[1], "log": log}


def _differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if a[k] != b[k]]


@pytest.mark.slow
def test_two_gloo_ranks_on_loopback(ddp):
    for r, res in enumerate((ddp["r0"], ddp["r1"])):
        assert res["rank"] == r and res["world_size"] == 2
        assert res["backend"] == "gloo"
        assert res["master_addr"] == "127.0.0.1"


def test_both_ranks_build_identical_groups(ddp):
    for s in ("fit2", "gradual", "gradual_norewrap"):
        a, b = ddp["r0"][s], ddp["r1"][s]
        assert a["group_names"] == b["group_names"] == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
        assert a["group_params"] == b["group_params"]
        flat = [n for g in a["group_params"] for n in g]
        assert sorted(flat) == sorted(a["final"]) and len(set(flat)) == len(flat)


def test_weights_identical_across_ranks_after_unfreeze(ddp):
    a, b = ddp["r0"]["fit2"], ddp["r1"]["fit2"]
    assert _differing(a["init"], b["init"]), "per-rank seeds: the ranks start apart, DDP makes them equal"
    assert _differing(a["after_fit0"], b["after_fit0"]) == []
    assert _differing(a["final"], b["final"]) == []             # Lightning #20340: drift after unfreezing
    assert sorted(_differing(a["init"], a["final"])) == sorted(a["final"])   # every parameter trained


def test_frozen_fit_trains_head_and_batchnorm_only(ddp):
    a = ddp["r0"]["fit2"]
    trainable = set(a["trainable_fit0"])
    assert trainable == {n for n in a["init"] if n.startswith("fc.") or ".bn" in n or n.startswith("bn")
                         or "downsample.1" in n}
    assert set(_differing(a["init"], a["after_fit0"])) == trainable


def test_each_rank_trains_its_own_shard(ddp):
    for s in ("fit2", "gradual"):
        a, b = ddp["r0"][s], ddp["r1"][s]
        assert len(a["losses"]) == len(b["losses"]) > 0
        assert all(math.isfinite(x) for x in a["losses"] + b["losses"])
        assert a["losses"] != b["losses"]                         # rank-local losses: different batches
    a, b = ddp["r0"]["fit2"], ddp["r1"]["fit2"]
    # one epoch: rank 0 broadcast its shuffled indices, each rank took its half
    seen0 = [x for batch in a["batches_fit0"] for x in batch]
    seen1 = [x for batch in b["batches_fit0"] for x in batch]
    assert len(seen0) == len(seen1) == len(CLASSES) * N_TRAIN // 2
    assert not set(seen0) & set(seen1)
    assert len(set(seen0) | set(seen1)) == len(CLASSES) * N_TRAIN


def test_group_logger_same_history_on_both_ranks(ddp):
    h0, h1 = ddp["r0"]["fit2"]["history"], ddp["r1"]["fit2"]["history"]
    assert h0 == h1
    n_groups, iters = 6, 6                                        # 2 fits x 3 batches per rank
    assert h0["iters"] == iters and h0["rows"] == iters * n_groups
    states = np.array(h0["state"]).reshape(iters, n_groups)
    assert (states[:3, -1] == "trainable").all() and (states[:3, :-1] == "partial").all()   # frozen, train_bn
    assert (states[3:] == "trainable").all()


def test_only_rank0_writes_logger_files(ddp):
    assert ddp["r0"]["fit2"]["files"] == ["groups.csv", "groups.png"]
    assert ddp["r1"]["fit2"]["files"] == []
    for s in ("gradual", "gradual_norewrap"):
        assert ddp["r0"][s]["files"] == ["groups.csv"] and ddp["r1"][s]["files"] == []
    csv = pd.read_csv(ddp["out"] / "fit2" / "rank0" / "groups.csv")
    assert len(csv) == ddp["r0"]["fit2"]["history"]["rows"]
    assert csv["name"].unique().tolist() == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]


def test_unfreezing_within_a_fit_needs_ddp_rewrap(ddp):
    "GradualUnfreeze inside one fit: with DDPRewrap the ranks stay equal; without, fastai shows Lightning #20340."
    a, b = ddp["r0"]["gradual"], ddp["r1"]["gradual"]
    assert a["n_rewraps"] == b["n_rewraps"] == 2                # epoch 0: 5 groups, epoch 1: all 6
    assert _differing(a["final"], b["final"]) == []
    a, b = ddp["r0"]["gradual_norewrap"], ddp["r1"]["gradual_norewrap"]
    drift = _differing(a["final"], b["final"])
    assert drift, ("without DDPRewrap the ranks no longer drift apart: fastai now re-wraps on freeze changes "
                   "within a fit, DDPRewrap may be dropped")
    wrapped = set(ddp["r0"]["fit2"]["trainable_fit0"])          # same model, same freeze() before the fit
    assert not set(drift) & wrapped                               # only what was unfrozen after the wrap drifts
