"""Typical calls of the public API, checked by mypy (tests/test_packaging.py::test_public_api_type_checks): the
package's type hints must accept what its README and docstrings show. Never imported or run."""
from functools import partial

from fastai.learner import Learner
from torch import nn

import fastai_groups as fg


def tour(dls, model: nn.Module) -> None:
    fg.arch_summary("resnet50")
    fg.arch_summary(model, [4, 0], verbose=True)
    sub: nn.Module = fg.get_module(model, "layer1")
    groups = fg.auto_splitter(model, granularity="block", n_groups=8)
    names: list[str] = groups.names
    fg.check_groups(model, groups)
    learn = Learner(dls, model, splitter=partial(fg.auto_splitter, granularity="fastai"))
    head: nn.Module = fg.create_head(512, 10, lin_ftrs=[256], ps=0.5)
    body: nn.Module = fg.create_body("resnet18", pretrained=False, cut=-2)
    net: nn.Module = fg.cnn_model("resnet18", 10)
    gl: fg.GroupLearner = fg.group_learner(dls, "tf_efficientnet_lite0", cbs=[fg.GroupLogger("groups.csv")])
    plan: dict = gl.fine_tune_groups(3, base_lr=2e-3, lr_mult=10.0, pct_start=0.3)
    why: str = fg.recipe_plan(3, per_class=500.0)["why"]
    n: int = fg.reestimate_norm_stats(gl, max_batches=10)
    learn.fit_one_cycle(2, slice(1e-5, 1e-3), cbs=[fg.GradualUnfreeze(every=2)])
    print(sub, names, head, body, net, plan, why, n)
