"""fastai_groups: parameter groups, discriminative learning rates and freeze logging for fine-tuning any CNN."""
from .summary import Row, arch_summary, get_module, instantiate, resolve_arch, summary_rows, unwrap_model

__version__ = "0.1.0"
__all__ = ["Row", "arch_summary", "get_module", "instantiate", "resolve_arch", "summary_rows", "unwrap_model"]
from .splitters import GRANULARITIES, ParamGroups, Structure, auto_splitter, check_groups, checked, find_structure, group_names

__all__ += ["GRANULARITIES", "ParamGroups", "Structure", "auto_splitter", "check_groups", "checked", "find_structure",
            "group_names"]
