"""fastai_groups: parameter groups, discriminative learning rates and freeze logging for fine-tuning any CNN.

Names are imported lazily (PEP 562): `import fastai_groups` is cheap (no torch, no fastai), and
`from fastai_groups import group_learner` imports the module that defines it on first use.

>>> from fastai_groups import auto_splitter  # imports fastai_groups.splitters (and torch) now
"""
import importlib as _importlib
import warnings as _warnings

__version__ = "0.1.0"

_MODULES = {
    "summary": ["Row", "arch_summary", "get_module", "instantiate", "resolve_arch", "summary_rows", "unwrap_model"],
    "splitters": ["GRANULARITIES", "ParamGroups", "Structure", "auto_splitter", "check_groups", "checked",
                  "find_structure", "group_names"],
    "data": ["FASHION_CLASSES", "check_image_folder", "data_home", "fashion_mnist", "product_sample", "read_idx"],
    "weights": ["build_model", "lite0_state_dict", "load_state_dict", "model_stats"],
    "distributed": ["DDPRewrap", "cpu_distrib_ctx", "patch_cpu_broadcast"],
    "callbacks": ["GradualUnfreeze", "GroupLogger", "GroupLRFinder", "freeze_state", "group_lr_find", "slice_ratios"],
    "head": ["AdaptiveConcatPool2d", "create_head"],
    "learner": ["ForwardBody", "TimmBody", "cnn_model", "create_body", "feature_shape", "group_learner"],
    "frozen": ["FastFrozenBody", "FeatureCache", "body_of", "check_cacheable"],
}
_WHERE = {name: mod for mod, names in _MODULES.items() for name in names}
__all__ = [name for names in _MODULES.values() for name in names]


def __getattr__(name: str):
    "Import the module defining `name` on first access (PEP 562)."
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'fastai_groups' has no attribute {name!r}")
    with _warnings.catch_warnings():  # fastai 2.8 runs torch.jit.script at import time; recent torch warns about it
        _warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
        value = getattr(_importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
