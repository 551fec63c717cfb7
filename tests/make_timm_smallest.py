"""Regenerate tests/timm_smallest.json: the smallest architecture (by parameter count) of every timm module.

Run after a timm upgrade: `python tests/make_timm_smallest.py` (builds every model on the meta device, ~3 min).
"""
import json
import warnings
from pathlib import Path

import timm

from fastai_groups.arch import instantiate

if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    out = {}
    for mod in timm.list_modules():
        sizes = {}
        for name in timm.list_models(module=mod):
            try:
                sizes[name] = sum(p.numel() for p in instantiate("timm:" + name).parameters())
            except Exception as e:  # report and go on: a family with no buildable model shows up in the test
                print(f"{mod}/{name}: {type(e).__name__}: {e}")
        if sizes:
            out[mod] = min(sizes, key=sizes.get)
    path = Path(__file__).with_name("timm_smallest.json")
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{len(out)} families written to {path}")
