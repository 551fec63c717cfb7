"""On a GPU: images/s and peak memory of frozen and unfrozen epochs, mixed precision + channels-last, ours vs fastai.

resnet50 (random weights: no downloads) at 224 px, batch 64, 10 classes, random images held on the GPU (so the
data pipeline is not measured); `learn.to_channelslast()` (fastai: channels-last model and inputs plus fp16
`MixedPrecision`) on both. Frozen: fastai `vision_learner` default freeze (`train_bn=True`) vs ours
`group_learner(train_bn=False)` with the fast frozen body; unfrozen: both after `unfreeze()`. One warm-up epoch,
then the median of `reps` epochs (images/s = training images / epoch time; the epoch's validation is one batch;
`torch.cuda.synchronize()` at both ends); peak memory is `torch.cuda.max_memory_allocated()` over the timed
epochs. Without CUDA the section says so and returns.
"""
from __future__ import annotations

import time

from .common import Context, Figure, Section, fmt_time, md_table, median, quiet
from .learners import fastai_learner, our_learner

DEFAULT = dict(n_items=1024, bs=64, size=224, reps=3, arch="resnet50")
QUICK = dict(n_items=128, bs=32, size=64, reps=1, arch="resnet18")


def gpu_dls(n_items: int, bs: int, size: int, device: str = "cuda"):
    "DataLoaders over random images already on `device` (10 classes)."
    import torch
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n_items + bs, 3, size, size, device=device, generator=g)
    y = torch.randint(0, 10, (n_items + bs,), device=device, generator=g)
    train, valid = list(zip(x[:n_items], y[:n_items])), list(zip(x[n_items:], y[n_items:]))
    return DataLoaders(DataLoader(train, bs=bs, shuffle=True, drop_last=True, device=device),
                       DataLoader(valid, bs=bs, device=device), device=device)


def _sync(cuda: bool) -> None:
    if cuda:
        import torch
        torch.cuda.synchronize()


def measure(learn, reps: int, n_images: int, cuda: bool = True) -> dict:
    "Warm-up epoch, then `reps` epochs: images/s (median) and peak memory (MiB; nan off CUDA)."
    import torch

    def epoch():
        with learn.no_bar(), learn.no_logging(), quiet():
            learn.fit(1, 1e-3)

    epoch()
    _sync(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        _sync(cuda)
        t = time.perf_counter()
        epoch()
        _sync(cuda)
        times.append(time.perf_counter() - t)
    return {"ips": n_images / median(times), "epoch": median(times),
            "peak": torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")}


def compare(cfg: dict, device: str = "cuda", amp_channels_last: bool = True) -> dict:
    "{(who, phase): measure(...)} for who in fastai/ours and phase in frozen/unfrozen."
    import torch
    import torchvision
    from fastai.losses import CrossEntropyLossFlat
    arch = getattr(torchvision.models, cfg["arch"])
    cuda = device == "cuda"
    n_images = (cfg["n_items"] // cfg["bs"]) * cfg["bs"]
    res = {}
    for who in ("fastai", "ours"):
        dls = gpu_dls(cfg["n_items"], cfg["bs"], cfg["size"], device)
        if who == "fastai":
            learn = fastai_learner(dls, arch, 1e-3, n_out=10, loss_func=CrossEntropyLossFlat())
        else:
            learn = our_learner(dls, cfg["arch"], 1e-3, pretrained=False, train_bn=False, n_out=10,
                                loss_func=CrossEntropyLossFlat())
        if amp_channels_last:
            learn.to_channelslast()
        learn.freeze()
        res[(who, "frozen")] = measure(learn, cfg["reps"], n_images, cuda)
        learn.unfreeze()
        res[(who, "unfrozen")] = measure(learn, cfg["reps"], n_images, cuda)
        del learn, dls
        if cuda:
            torch.cuda.empty_cache()
    return res


def run(ctx: Context) -> Section:
    import torch
    sec = Section("gpu", "GPU: images/s and peak memory, mixed precision + channels-last")
    if not torch.cuda.is_available():
        sec.add("no GPU on this machine (`torch.cuda.is_available()` is False): section not run.")
        sec.notes.append("gpu: no GPU on this machine")
        return sec
    cfg = QUICK if ctx.quick else DEFAULT
    n_images = (cfg["n_items"] // cfg["bs"]) * cfg["bs"]
    res = compare(cfg)
    sec.add(f"{torch.cuda.get_device_name(0)}; `{cfg['arch']}`, {cfg['size']} px, batch {cfg['bs']}, "
            f"{n_images} images per epoch, fp16 AMP + channels-last; epoch = training + validation of one batch.", "")
    rows = []
    for phase in ("frozen", "unfrozen"):
        for who in ("fastai", "ours"):
            r = res[(who, phase)]
            rows.append([phase, who, f"{r['ips']:,.0f}", fmt_time(r["epoch"]), f"{r['peak']:,.0f} MiB"])
    sec.add(*md_table(["phase", "Learner", "images/s", "epoch", "peak memory"], rows))
    for phase in ("frozen", "unfrozen"):
        o, f = res[("ours", phase)], res[("fastai", phase)]
        sec.figures.append(Figure(f"GPU {phase} images/s, `{cfg['arch']}` AMP + channels-last", f"{o['ips']:,.0f}/s",
                                  f"{f['ips']:,.0f}/s", f"{o['ips'] / f['ips']:.2f}x throughput, "
                                                        f"{o['peak'] / f['peak']:.2f}x peak memory"))
    return sec
