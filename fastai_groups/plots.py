"""Figures of a training run: `plot_group_lr` (what `GroupLogger.plot` draws, also from a saved CSV) and
`plot_compare` (the CLI's `compare.png`).

- `plot_group_lr(history, epochs)`: per-group learning rate against iterations (line style = freeze state: solid
  trains, dashed partial, dotted frozen; a marker per group, labels at the line ends, so groups on the same curve
  stay apart), each fit labelled by what it is (frozen / unfrozen / gradual unfreezing), the validation metric per
  epoch on a right-hand axis, and a freeze map below.
- `plot_compare(curves, freeze_epochs)`: validation accuracy per epoch of each schedule, integer epoch ticks, the
  frozen epochs shaded.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

__all__ = ["plot_group_lr", "plot_compare", "phase_names"]

_STYLE = {"trainable": "-", "partial": "--", "frozen": ":"}
_MARKERS = "osD^vP*Xph<>8d"


def phase_names(history: pd.DataFrame) -> dict[int, str]:
    """What each fit of a `GroupLogger` history was, from the freeze states within it: `"unfrozen (...)"` (every
    group trains throughout), `"frozen (k of n groups train)"` (the same groups stay frozen or partial throughout)
    or `"gradual unfreezing (a→b of n groups train)"` (the number of trainable groups changes).

    >>> phase_names(learn.group_logger.history)  # doctest: +SKIP
    {0: 'frozen (1 of 3 groups trains)', 1: 'unfrozen (all 3 groups train)'}
    """
    out = {}
    for fit, d in history.groupby("fit", sort=True):
        n = int(d["group"].max()) + 1
        per_iter = (d["state"] == "trainable").groupby(d["iter"]).sum()
        a, b = int(per_iter.iloc[0]), int(per_iter.iloc[-1])
        if per_iter.nunique() > 1:
            out[int(fit)] = f"gradual unfreezing ({a}\u2192{b} of {n} groups train)"
        elif a == n:
            out[int(fit)] = f"unfrozen (all {n} groups train)"
        else:
            out[int(fit)] = f"frozen ({a} of {n} groups train{'s' if a == 1 else ''})"
    return out


def _metric(epochs: Optional[pd.DataFrame]) -> Optional[str]:
    "The validation metric to show: the first metric after the losses, else `valid_loss`."
    if epochs is None or epochs.empty:
        return None
    cols = [c for c in epochs.columns if c not in ("iter", "epoch", "fit", "train_loss")]
    mets = [c for c in cols if c != "valid_loss" and epochs[c].notna().any()]
    return mets[0] if mets else ("valid_loss" if "valid_loss" in cols and epochs["valid_loss"].notna().any() else None)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    "Half-open index ranges `[a, b)` where `mask` is True."
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def _spread(ys: list[float], gap: float) -> list[float]:
    "Positions near `ys` (sorted order kept) at least `gap` apart: for labels at line ends."
    order = np.argsort(ys)
    out = np.array(ys, dtype=float)
    for a, b in zip(order[:-1], order[1:]):
        out[b] = max(out[b], out[a] + gap)
    shift = (out[order].mean() - np.mean(ys)) if len(ys) else 0.0   # re-centre the block of labels
    return list(out - shift)


def _end_labels(ax, x: float, ys: list, names: list, colors: list, fontsize, inside: bool = False) -> None:
    """Label the line ends at `x` (right of it, or left and below when `inside`, for a fit followed by another):
    groups at the same lr share one label, labels spread apart vertically."""
    same: dict = {}
    for g, y in enumerate(ys):
        if np.isfinite(y) and y > 0:
            same.setdefault(float(f"{y:.6g}"), []).append(g)
    if not same:
        return
    ylo, yhi = (math.log10(v) for v in ax.get_ylim())
    keys = list(same)
    gap = (yhi - ylo) / 18
    pos = [p - 1.3 * gap if inside else p for p in _spread([math.log10(k) for k in keys], gap=gap)]
    for k, p in zip(keys, pos):
        gs = same[k]
        if len(gs) > 2 and gs == list(range(gs[0], gs[-1] + 1)):
            text = f"{names[gs[0]]} \u2026 {names[gs[-1]]} ({len(gs)} groups, same lr)"
        else:
            text = " = ".join(names[g] for g in gs) + ("  (same lr)" if len(gs) > 1 else "")
        ax.annotate(text, (x, k),
                    xytext=(x, 10 ** p), textcoords="data", color=colors[gs[0]] if len(gs) == 1 else "0.2",
                    fontsize=fontsize, va="center", ha="right" if inside else "left", annotation_clip=False, zorder=20,
                    bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none", alpha=0.7),
                    gid="end:" + ",".join(map(str, gs)))


def plot_group_lr(history: pd.DataFrame, epochs: Optional[pd.DataFrame] = None, figsize: Optional[tuple] = None):
    """The figure `GroupLogger.plot` returns: the lr of each group (log scale) per iteration, the validation
    metric at each epoch end (a panel of its own, when `epochs` has one), and a freeze map (one band per group:
    white trains, hatched partial, grey frozen). Each fit is labelled by its phase (`phase_names`).

    `history`: `learn.group_logger.history` or `pd.read_csv("groups.csv")`; `epochs`: `learn.group_logger.epochs`.

    >>> plot_group_lr(pd.read_csv("groups.csv")).savefig("group_lr.png", dpi=120)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import MaxNLocator

    df = history
    if df.empty:
        raise ValueError("GroupLogger has recorded nothing yet: train first")
    n = int(df["group"].max()) + 1
    names = df.drop_duplicates("group", keep="last").sort_values("group")["name"].tolist()
    iters = np.sort(df["iter"].unique())
    lr = df.pivot(index="iter", columns="group", values="lr").reindex(iters)
    state = df.pivot(index="iter", columns="group", values="state").reindex(iters)
    fit_of = df.drop_duplicates("iter").set_index("iter")["fit"].reindex(iters).to_numpy()
    starts = np.flatnonzero(np.r_[True, fit_of[1:] != fit_of[:-1]])      # index of each fit's first iteration
    ends = np.r_[starts[1:], len(iters)] - 1
    phases = phase_names(df)
    metric = _metric(epochs)

    small = "small" if n <= 16 else "x-small"
    ratios = [3] + ([1] if metric else []) + [0.6 + n / 8]
    fig, axes = plt.subplots(len(ratios), 1, sharex=True, figsize=figsize or (11, 4.5 + sum(ratios[1:]) + 0.1 * n),
                             gridspec_kw=dict(height_ratios=ratios))
    ax, axm = axes[0], axes[-1]
    cmap = plt.get_cmap("tab10" if n <= 10 else "viridis")
    colors = [cmap(i) if n <= 10 else cmap(i / (n - 1)) for i in range(n)]
    cut = np.zeros(len(iters) + 1, dtype=bool)
    cut[starts] = True                                        # no line across a fit boundary
    step = max(1, len(iters) // 12)
    for g in range(n):
        y = lr[g].to_numpy(dtype=float)
        st = state[g].to_numpy()
        for s, ls in _STYLE.items():
            for a, b in _runs(st == s):
                b = b + 1 if b < len(y) and not cut[b] else b   # join the next style's first point
                ax.plot(iters[a:b], y[a:b], color=colors[g], ls=ls, lw=1.8 if s == "trainable" else 1.5,
                        label="_nolegend_", gid=f"lr:{g}:{s}")
        idx = np.arange((g * step) // n, len(iters), step)    # staggered markers: groups on one curve stay apart
        ax.plot(iters[idx], y[idx], ls="none", marker=_MARKERS[g % len(_MARKERS)],
                ms=4 + 3 * (n - 1 - g) / max(1, n - 1) if n <= 8 else 4,   # larger below: concentric when equal
                color=colors[g], zorder=3 + g, label=f"{g}: {names[g]}", gid=f"marker:{g}")
    ax.set_yscale("log")
    vals = lr.to_numpy(dtype=float)
    lo, hi = np.nanmin(vals), np.nanmax(vals)
    span = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
    ax.set_ylim(lo / 10 ** (0.08 * span + 0.05), hi * 10 ** (0.3 * span + 0.2))
    for e in ends:                                            # labels at the line ends of every fit
        last = e == ends[-1]
        _end_labels(ax, iters[e] + (0.15 if last else -0.1), list(vals[e]), names, colors, "x-small", not last)
    ax.set_ylabel("learning rate (log scale)")
    ax.set_title("Learning rate of each parameter group", fontsize="medium")
    style = [Line2D([], [], color="0.3", ls=ls, label=lbl) for ls, lbl in
             (("-", "line: trains"), ("--", "line: partial (BatchNorm only)"), (":", "line: frozen"))]
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + style, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=small,
              ncol=max(1, math.ceil((n + 3) / 20)), title="group", frameon=False)
    if metric:
        axv, e = axes[1], epochs[epochs[metric].notna()]
        x = e["iter"].to_numpy() + 0.5
        label = metric if metric.startswith("valid") else f"valid {metric}"
        axv.plot(x, e[metric], color="k", marker="o", ms=5, lw=1.2, gid="metric", label=label)
        for xi, v in zip(x, e[metric]):
            axv.annotate(f"{v:.3g}", (xi, v), xytext=(0, 6), textcoords="offset points", ha="center",
                         fontsize="x-small")
        vmin, vmax = float(e[metric].min()), float(e[metric].max())
        pad = (vmax - vmin) * 0.3 or 0.05
        axv.set_ylim(vmin - pad, vmax + 2 * pad)
        axv.set_ylabel(label)
        axv.set_title(f"{label.replace('_', ' ')} at each epoch end", fontsize="medium")
        axv.grid(alpha=0.3)
    for st, sty in (("partial", dict(facecolor="#e0e0e0", hatch="///", edgecolor="#8c8c8c")),
                    ("frozen", dict(facecolor="#9e9e9e", edgecolor="none"))):
        for g in range(n):
            for a, b in _runs((state[g] == st).to_numpy()):
                axm.add_patch(Rectangle((iters[a] - 0.5, g - 0.5), iters[b - 1] - iters[a] + 1, 1, lw=0, **sty))
    axm.set_xlim(iters[0] - 0.5, iters[-1] + 0.5 + 0.12 * (iters[-1] - iters[0] + 1))
    axm.set_ylim(n - 0.5, -0.5)
    axm.set_yticks(range(n))
    axm.set_yticklabels(names, fontsize=small)
    axm.xaxis.set_major_locator(MaxNLocator(integer=True))
    axm.set_xlabel("training iteration (batch)")
    axm.set_title("freeze state of each group", fontsize="medium")
    axm.legend(handles=[Patch(facecolor="white", edgecolor="k", label="trains"),
                        Patch(facecolor="#e0e0e0", edgecolor="#8c8c8c", hatch="///", label="partial (BatchNorm only)"),
                        Patch(facecolor="#9e9e9e", edgecolor="k", label="frozen")],
               loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    if epochs is not None and not epochs.empty:
        for x in epochs["iter"].to_numpy() + 0.5:             # epoch ends: thin grey lines
            for a in axes:
                a.axvline(x, color="0.8", lw=0.6, zorder=0)
    for i, (s, e) in enumerate(zip(starts, ends)):
        x0 = iters[s] - 0.5
        if i:
            for a in axes:
                a.axvline(x0, color="k", ls="--", lw=0.9)
        fit = int(fit_of[s])
        kind, _, detail = phases[fit].partition(" (")   # two lines, centred over the fit: short fits stay apart
        ax.annotate(f"fit {fit}: {kind}\n({detail}", ((iters[s] + iters[e]) / 2, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(0, -4), textcoords="offset points", ha="center", va="top", fontsize="small",
                    color="0.15", fontweight="bold", gid=f"phase:{fit}")
    fig.tight_layout()
    return fig


def plot_compare(curves: dict, freeze_epochs: int = 0, title: str = "", frozen_in: tuple = ("fine_tune", "two_groups")):
    """Validation accuracy per epoch of each schedule (`{name: [acc_epoch1, ...]}`), integer epoch ticks, the
    first `freeze_epochs` epochs shaded as frozen when a schedule of `frozen_in` (those that freeze the body
    there, as `fine_tune` does) is plotted.

    >>> plot_compare({"fine_tune": [0.5, 0.6, 0.7]}, freeze_epochs=1).savefig("compare.png")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(6, 4))
    which = [s for s in curves if s in frozen_in]
    if freeze_epochs and which:
        ax.axvspan(0.5, freeze_epochs + 0.5, color="0.88", zorder=0, gid="frozen")
        ax.annotate(f"{', '.join(which)}:\nbody frozen ({freeze_epochs} epoch{'s' if freeze_epochs > 1 else ''})",
                    (0.5, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -4), textcoords="offset points",
                    va="top", fontsize="x-small", color="0.3")
    for s, acc in curves.items():
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=s)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch"), ax.set_ylabel("validation accuracy"), ax.legend(), ax.grid(alpha=0.3)
    ax.set_title(title)
    return fig
