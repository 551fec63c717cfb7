"""The classifier head put on a body: concat pooling, then `BatchNorm1d -> Dropout -> Linear` blocks.

`create_head(2048, 44)` is the head printed by `cnn_learner(data, models.resnet50)` in seed 003 (fastai v1):

    AdaptiveConcatPool2d, Flatten, BatchNorm1d(4096), Dropout(0.25), Linear(4096, 512), ReLU(inplace=True),
    BatchNorm1d(512), Dropout(0.5), Linear(512, 44)

with biases on the Linear layers (2,097,664 and 22,572 parameters). `create_head(..., fastai_compat=True)` is
fastai 2.8's `fastai.vision.learner.create_head` layer for layer and parameter for parameter: Linear layers that
follow a BatchNorm have no bias, and BatchNorm biases start at 1e-3 (fastai's `BatchNorm`).

`cnn_model(arch, n_out)` joins any body and this head: `nn.Sequential(create_body(arch), create_head(nf, n_out))`,
`nf` found on the meta device.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Optional, Sequence, Union

import fastai.layers as fl
from fastcore.meta import delegates
import torch
from torch import nn

from .body import Cut, build_body, feature_shape

__all__ = ["AdaptiveConcatPool2d", "create_head", "cnn_model", "join_head"]

Size = Union[None, int, Sequence[Optional[int]]]


def _check_size(size: Size) -> Union[int, tuple]:
    "The output size for adaptive pooling: a positive int, or a pair of positive ints / None (keep that dimension)."
    if size is None:
        return 1
    if isinstance(size, bool):
        raise TypeError("size must be None, a positive int or a pair of them, not a bool")
    if isinstance(size, numbers.Integral):
        if size < 1:
            raise ValueError(f"size must be a positive int, got {size}")
        return int(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and \
            all(s is None or (isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1) for s in size):
        return tuple(None if s is None else int(s) for s in size)
    raise ValueError(f"size must be None, a positive int or a pair of positive ints (or None), got {size!r}")


class AdaptiveConcatPool2d(fl.AdaptiveConcatPool2d):
    """Adaptive max pooling and adaptive average pooling, concatenated on the channels (max first), so a
    `(B, C, H, W)` map becomes `(B, 2*C, size, size)`. The submodules are registered `ap` then `mp`, as in fastai
    (seed 003 prints them in that order), and it *is* a `fastai.layers.AdaptiveConcatPool2d`.

    `size`: the output size, `None` meaning 1.

    >>> import torch
    >>> AdaptiveConcatPool2d()(torch.randn(2, 8, 5, 5)).shape
    torch.Size([2, 16, 1, 1])
    """

    def __init__(self, size: Size = None):
        super().__init__(_check_size(size))


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _dropouts(ps, n_lin: int) -> list[float]:
    "fastai's spread: a single p gives p/2 to every Linear but the last, which gets p; a list gives one p per Linear."
    if isinstance(ps, numbers.Real) and not isinstance(ps, bool):
        out = [ps / 2] * (n_lin - 1) + [ps]
    elif hasattr(ps, "__iter__") and not isinstance(ps, (str, bytes)):
        ps = list(ps)
        if len(ps) == 1:
            out = [ps[0] / 2] * (n_lin - 1) + [ps[0]]
        elif len(ps) == n_lin:
            out = list(ps)
        else:
            raise ValueError(f"ps has {len(ps)} values but the head has {n_lin} Linear layers: give one dropout "
                             f"probability per Linear layer, or a single float")
    else:
        raise TypeError(f"ps must be a float or a list of floats, got {type(ps).__name__}")
    for p in out:
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
            raise ValueError(f"dropout probabilities must be floats in [0, 1), got {p!r} (from ps={ps!r})")
    return [float(p) for p in out]


def _batchnorm(nf: int, fastai_compat: bool) -> nn.BatchNorm1d:
    return fl.BatchNorm(nf, ndim=1) if fastai_compat else nn.BatchNorm1d(nf)


def create_head(nf: int, n_out: int, lin_ftrs: Optional[Sequence[int]] = None, ps: Union[float, Sequence[float]] = 0.5,
                pool: bool = True, concat_pool: bool = True, first_bn: bool = True, bn_final: bool = False,
                lin_first: bool = False, y_range: Optional[tuple] = None, fastai_compat: bool = False) -> nn.Sequential:
    """A classifier head taking the body's `nf` features to `n_out` outputs, as a flat `nn.Sequential`.

    Arguments mean what they mean in fastai's `create_head`:

    - `nf`: number of features (channels) the body outputs; concat pooling doubles it.
    - `n_out`: number of outputs (classes).
    - `lin_ftrs`: sizes of the hidden Linear layers (default `[512]`).
    - `ps`: dropout probabilities, one per Linear layer; a single float `p` gives `p/2` to every Linear layer
      but the last, which gets `p`.
    - `pool`: start with pooling and `Flatten` (the body gives a `(B, C, H, W)` map); `False` for a body that
      already gives `(B, nf)`.
    - `concat_pool`: `AdaptiveConcatPool2d` (max and average) rather than `nn.AdaptiveAvgPool2d(1)`.
    - `first_bn`: a BatchNorm before the first Linear layer (later Linear layers always get one).
    - `bn_final`: a final `BatchNorm1d(n_out, momentum=0.01)`.
    - `lin_first`: `Linear -> activation -> BatchNorm -> Dropout` blocks instead of `BatchNorm -> Dropout ->
      Linear -> activation` (fastai's layout: a Dropout first, and a plain last Linear).
    - `y_range`: `(low, high)`: a final `SigmoidRange(low, high)`.
    - `fastai_compat`: build fastai 2.8's head exactly (bias-free Linear layers next to a BatchNorm, BatchNorm
      biases initialised to 1e-3). By default (seed 003, fastai v1) every Linear layer has a bias (except, with
      `lin_first`, one directly followed by a BatchNorm, where a bias would be cancelled) and BatchNorms start
      at PyTorch's defaults.

    >>> [type(m).__name__ for m in create_head(2048, 44)]  # doctest: +NORMALIZE_WHITESPACE
    ['AdaptiveConcatPool2d', 'Flatten', 'BatchNorm1d', 'Dropout', 'Linear', 'ReLU', 'BatchNorm1d', 'Dropout',
     'Linear']
    >>> sum(p.numel() for p in create_head(2048, 44).parameters())
    2129452
    """
    nf, n_out = _positive_int("nf", nf), _positive_int("n_out", n_out)
    if lin_ftrs is None:
        lin_ftrs = [512]
    if isinstance(lin_ftrs, (str, bytes)) or not hasattr(lin_ftrs, "__iter__"):
        raise TypeError(f"lin_ftrs must be None or a list of ints, got {type(lin_ftrs).__name__}")
    hidden = [_positive_int("each of lin_ftrs", f) for f in lin_ftrs]
    if y_range is not None:
        if not isinstance(y_range, (list, tuple)) or len(y_range) != 2 or \
                not all(isinstance(v, numbers.Real) for v in y_range) or not y_range[0] < y_range[1]:
            raise ValueError(f"y_range must be a pair (low, high) with low < high, got {y_range!r}")
    if pool and concat_pool:
        nf *= 2
    sizes = [nf] + hidden + [n_out]
    n_lin = len(sizes) - 1
    drops = _dropouts(ps, n_lin)
    bns = [bool(first_bn)] + [True] * (n_lin - 1)

    layers: list[nn.Module] = []
    if pool:
        layers += [AdaptiveConcatPool2d() if concat_pool else nn.AdaptiveAvgPool2d(1), fl.Flatten()]
    if lin_first:
        # fastai: a Dropout first, then (Linear, act, BN, Dropout) per hidden layer, then a plain Linear
        layers.append(nn.Dropout(drops[0]))
        for k in range(n_lin - 1):
            ni, no, bn, p = sizes[k], sizes[k + 1], bns[k], drops[k + 1]
            layers += [nn.Linear(ni, no, bias=not bn), nn.ReLU(inplace=True)]
            if bn:
                layers.append(_batchnorm(no, fastai_compat))
            if p != 0:
                layers.append(nn.Dropout(p))
        layers.append(nn.Linear(sizes[-2], n_out))
    else:
        for k in range(n_lin):
            ni, no, bn, p = sizes[k], sizes[k + 1], bns[k], drops[k]
            if bn:
                layers.append(_batchnorm(ni, fastai_compat))
            if p != 0:
                layers.append(nn.Dropout(p))
            layers.append(nn.Linear(ni, no, bias=not (bn and fastai_compat)))
            if k < n_lin - 1:
                layers.append(nn.ReLU(inplace=True))
    if bn_final:
        layers.append(nn.BatchNorm1d(n_out, momentum=0.01))
    if y_range is not None:
        layers.append(fl.SigmoidRange(*y_range))
    return nn.Sequential(*layers)


def _head_args() -> set[str]:
    return set(inspect.signature(create_head).parameters) - {"nf", "n_out"}


def join_head(body: nn.Module, n_out: int, n_in: int, init: Optional[Callable], head_kwargs: dict,
          shape: Optional[torch.Size] = None) -> nn.Sequential:
    "nn.Sequential(body, head), nf read from the body's output on the meta device, only the head initialised."
    unknown = set(head_kwargs) - _head_args()
    if unknown:
        raise TypeError(f"unknown argument(s) {', '.join(sorted(unknown))}; the head takes "
                        f"{', '.join(sorted(_head_args()))}")
    pool = head_kwargs.get("pool", True)
    shape = feature_shape(body, n_in) if shape is None else shape
    if pool and len(shape) != 4:
        raise ValueError(f"the body returns shape {tuple(shape)} (for a batch of 2), not a (B, C, H, W) feature map: "
                         "pass pool=False for a body that returns (batch, features)")
    if not pool and len(shape) != 2:
        raise ValueError(f"with pool=False the head takes (batch, features), but the body returns shape "
                         f"{tuple(shape)}: use pool=True for a feature map")
    head = create_head(int(shape[1]), n_out, **head_kwargs)
    if init is not None:
        from fastai.torch_core import apply_init
        apply_init(head, init)
    return nn.Sequential(body, head)


@delegates(create_head, but=["nf", "n_out"])   # help(cnn_model) lists the head's options
def cnn_model(arch: Any, n_out: int, pretrained: bool = False, weights: Any = None, cut: Cut = None, n_in: int = 3,
              init: Optional[Callable] = nn.init.kaiming_normal_, **kwargs) -> nn.Sequential:
    """`nn.Sequential(create_body(arch, ...), create_head(nf, n_out, **kwargs))`, fastai's
    `create_vision_model` for any architecture. `nf` is read from the body's output on the meta device (no
    memory, the body's training mode untouched); only the head is initialised, with `init` (fastai's
    `apply_init`: Linear weights, zero biases; BatchNorms kept). `kwargs`: `create_head`'s arguments.

    >>> from torchvision.models import resnet50
    >>> sum(p.numel() for p in cnn_model(resnet50, 44).parameters())  # seed 003
    25637484
    """
    body, _, shape = build_body(arch, pretrained=pretrained, cut=cut, weights=weights, n_in=n_in)
    return join_head(body, n_out, n_in, init, kwargs, shape)
