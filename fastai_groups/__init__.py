"""fastai_groups: parameter groups, discriminative learning rates and freeze logging for fine-tuning any CNN.

The flow, one module per step::

    arch (model | class | factory | "timm:name" | torchvision name)
      -> instantiate on the meta device (no memory, no download)              arch.py, _meta.py
      -> summary rows, for people                                              summary.py
      -> structure: units from the module tree (blocks kept whole), ordered
         and sized by one meta trace of the forward; stem / stages / head     structure.py
      -> parameter groups with names (ParamGroups), body -> head              splitters.py
      -> fastai Learner (GroupLearner): the group names are recorded once,
         when the optimizer is made; freeze_to / slice / fine_tune use them    learner.py, checkpoint.py
      -> callbacks read opt.hypers and requires_grad per group every batch    callbacks.py, lr_find.py
    A model for fine-tuning is nn.Sequential(body, head): body.py cuts any architecture, head.py builds the
    concat-pool head and joins them; frozen.py (FastFrozenBody) and cache.py (FeatureCache) make the frozen phase
    cheap; weights.py, data.py, distributed.py and cli.py are the edges.

Importing the package imports nothing heavy: each name is loaded from its module on first use (`_EXPORTS`).

Patches of torch and fastai, all of them (why, and when each can go):

- `_meta.params_to_meta`: `nn.Module.register_parameter` / `register_buffer` are replaced for the duration of a
  meta build of constructors that compute with tensors in `__init__` (torchvision's RegNet), so the maths runs
  on real tensors and the storage lands on meta. Goes when `torch.device("meta")` can run such constructors.
- `distributed.patch_cpu_broadcast`: fastai's `DistributedDL._broadcast` moves the shuffled indices to CUDA, so
  fastai cannot train distributed on CPUs; replaced by a device-aware version while `cpu_distrib_ctx` runs (put
  back on exit). Goes when fastai broadcasts on the process group's device.
- `GroupLearner.create_opt`: the optimizer instance's `set_hyper` is wrapped to refuse a `slice` over one group
  and lists of the wrong length (fastai uses `hi` silently, or fails with a bare `AssertionError`); fastai's
  `Optimizer` has no hook for it. Goes when fastai validates hypers.
- `cache.FeatureCache`: for a batch served from the cache the body's `forward` is replaced for exactly that one
  call (the input is already the body's output). No fastai hook lets a callback skip one module of the model.
- `body.ForwardBody` (models whose forward pools the last feature map in code, `x.mean((2, 3))`): a
  `TorchFunctionMode` stops the forward at that pooling. Not a patch of torch, but it intercepts every torch call
  of that forward; pass `cut=` to `create_body` to avoid it.
- `_meta.meta_trace` (the structure's one meta forward): global module forward hooks
  (`register_module_forward_pre_hook` / `register_module_forward_hook`) and a `TorchFunctionMode` that records
  calls and parameter uses and answers shape-preserving ops (norms, activations, same-shape elementwise maths,
  attention, LSTMs) with an empty tensor of the right shape, for the duration of that forward only (meta runs
  those ops through Python decompositions, ~1 ms a call). The forward runs on a copy of the model whose tensors
  are meta stand-ins (`_meta.meta_copy`), and the hooks record only that copy's modules: another thread can keep
  running the model (or any other) meanwhile. Goes when meta kernels are cheap and hooks can be scoped to one
  model tree.
- `structure.find_structure`'s cache: torch's global registration hooks (`register_module_module_registration_hook`
  and the parameter / buffer ones) are installed on the first split and stay; they only drop the cached structure of
  a model whose module gets a new submodule, parameter or buffer (not a patch: torch calls them on every
  registration). Goes if torch gives modules a structure version to compare.
- fastai 2.8 runs `torch.jit.script` at import time, which recent torch deprecates: that one `FutureWarning` is
  filtered (by message). Goes with fastai's next release.
"""
import importlib as _importlib
import warnings as _warnings
from typing import TYPE_CHECKING as _TYPE_CHECKING
from importlib.metadata import PackageNotFoundError as _NotInstalled, version as _version

try:
    __version__ = _version("fastai-groups")       # one source: pyproject.toml's version, as installed
except _NotInstalled:                              # imported from a source tree that was never installed
    __version__ = "0+unknown"

_warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)

# every public name, recorded once: name -> module that defines it
_EXPORTS = {
    **dict.fromkeys(["resolve_arch", "instantiate", "get_module"], "arch"),
    "unwrap_model": "_utils",
    **dict.fromkeys(["Row", "arch_summary", "summary_rows"], "summary"),
    **dict.fromkeys(["Structure", "Unit", "find_structure"], "structure"),
    **dict.fromkeys(["GRANULARITIES", "ParamGroups", "auto_splitter", "check_groups", "checked", "group_names",
                     "learner_group_names"], "splitters"),
    **dict.fromkeys(["ForwardBody", "TimmBody", "create_body", "feature_shape"], "body"),
    **dict.fromkeys(["AdaptiveConcatPool2d", "create_head", "cnn_model"], "head"),
    **dict.fromkeys(["GroupLearner", "group_learner"], "learner"),
    **dict.fromkeys(["GradualUnfreeze", "GroupLogger", "freeze_state", "notify_freeze_change"], "callbacks"),
    **dict.fromkeys(["GroupLRFinder", "group_lr_find", "slice_ratios"], "lr_find"),
    **dict.fromkeys(["phase_names", "plot_compare", "plot_group_lr"], "plots"),
    **dict.fromkeys(["FastFrozenBody", "body_of"], "frozen"),
    **dict.fromkeys(["FeatureCache", "check_cacheable"], "cache"),
    **dict.fromkeys(["build_model", "lite0_state_dict", "lite_state_dict", "load_state_dict", "model_stats",
                     "known_stats"], "weights"),
    **dict.fromkeys(["ReestimateNorms", "fine_tune_groups", "recipe_plan", "reestimate_norm_stats"], "recipe"),
    **dict.fromkeys(["FASHION_CLASSES", "check_image_folder", "data_home", "fashion_mnist", "product_sample",
                     "read_idx"], "data"),
    **dict.fromkeys(["DDPRewrap", "cpu_distrib_ctx", "patch_cpu_broadcast"], "distributed"),
}
__all__ = list(_EXPORTS)

if _TYPE_CHECKING:   # the same names, statically, for type checkers (at run time: `__getattr__`)
    from .arch import resolve_arch, instantiate, get_module
    from ._utils import unwrap_model
    from .summary import Row, arch_summary, summary_rows
    from .structure import Structure, Unit, find_structure
    from .splitters import (GRANULARITIES, ParamGroups, auto_splitter, check_groups, checked, group_names,
        learner_group_names)
    from .body import ForwardBody, TimmBody, create_body, feature_shape
    from .head import AdaptiveConcatPool2d, create_head, cnn_model
    from .learner import GroupLearner, group_learner
    from .callbacks import GradualUnfreeze, GroupLogger, freeze_state, notify_freeze_change
    from .lr_find import GroupLRFinder, group_lr_find, slice_ratios
    from .plots import phase_names, plot_compare, plot_group_lr
    from .frozen import FastFrozenBody, body_of
    from .cache import FeatureCache, check_cacheable
    from .weights import build_model, lite0_state_dict, lite_state_dict, load_state_dict, model_stats, known_stats
    from .recipe import ReestimateNorms, fine_tune_groups, recipe_plan, reestimate_norm_stats
    from .data import FASHION_CLASSES, check_image_folder, data_home, fashion_mnist, product_sample, read_idx
    from .distributed import DDPRewrap, cpu_distrib_ctx, patch_cpu_broadcast  # noqa: F401



def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastai_groups' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
