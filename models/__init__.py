"""Models: transformer families built from config (``build_model``) and task definitions.

>>> from models.config import ModelConfig
>>> model = build_model(ModelConfig(family="vit", size="tiny"), task, seed=0)

The names below load on first use (PEP 562), so ``models.config`` -- the ``[model]`` section the CLI reads before
anything heavy -- does not import torch.
"""

from typing import Any

__all__ = ["MODELS", "ModelError", "ModelFamily", "apply_overrides", "build_model", "check_model", "count_parameters",
           "task_for"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from models import build  # build imports the families (vit, bert, gpt2)

        return getattr(build, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
