"""fastai_groups: parameter groups, discriminative learning rates and freeze logging for fine-tuning any CNN."""
import warnings as _warnings

with _warnings.catch_warnings():  # fastai 2.8 runs torch.jit.script at import time; recent torch warns about it
    _warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    import fastai.layers  # noqa: F401

from .summary import Row, arch_summary, get_module, instantiate, resolve_arch, summary_rows, unwrap_model
from .splitters import (GRANULARITIES, ParamGroups, Structure, auto_splitter, check_groups, checked, find_structure,
                        group_names)
from .data import FASHION_CLASSES, check_image_folder, data_home, fashion_mnist, product_sample, read_idx
from .weights import build_model, lite0_state_dict, lite_state_dict, load_state_dict, model_stats
from .distributed import DDPRewrap, cpu_distrib_ctx, patch_cpu_broadcast
from .callbacks import GradualUnfreeze, GroupLogger, GroupLRFinder, freeze_state, group_lr_find, slice_ratios
from .head import AdaptiveConcatPool2d, create_head
from .learner import ForwardBody, TimmBody, cnn_model, create_body, feature_shape, group_learner
from .frozen import FastFrozenBody, FeatureCache, body_of, check_cacheable
from .recipe import ReestimateNorms, fine_tune_groups, recipe_plan, reestimate_norm_stats

__version__ = "0.1.0"
__all__ = ["Row", "arch_summary", "get_module", "instantiate", "resolve_arch", "summary_rows", "unwrap_model",
           "GRANULARITIES", "ParamGroups", "Structure", "auto_splitter", "check_groups", "checked", "find_structure",
           "group_names",
           "FASHION_CLASSES", "check_image_folder", "data_home", "fashion_mnist", "product_sample", "read_idx",
           "build_model", "lite0_state_dict", "lite_state_dict", "load_state_dict", "model_stats",
           "DDPRewrap", "cpu_distrib_ctx", "patch_cpu_broadcast",
           "GradualUnfreeze", "GroupLogger", "GroupLRFinder", "freeze_state", "group_lr_find", "slice_ratios",
           "AdaptiveConcatPool2d", "create_head",
           "ForwardBody", "TimmBody", "cnn_model", "create_body", "feature_shape", "group_learner",
           "FastFrozenBody", "FeatureCache", "body_of", "check_cacheable",
           "ReestimateNorms", "fine_tune_groups", "recipe_plan", "reestimate_norm_stats"]
