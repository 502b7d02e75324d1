"""Models: transformer families built from config (``build_model``) and task definitions.

>>> from fl.config import ModelConfig
>>> model = build_model(ModelConfig(family="vit", size="tiny"), task, seed=0)
"""

from models import families as _families  # noqa: F401  (registers vit, bert, gpt2)
from models.build import MODELS, ModelError, ModelFamily, apply_overrides, build_model, check_model, count_parameters

__all__ = ["MODELS", "ModelError", "ModelFamily", "apply_overrides", "build_model", "check_model", "count_parameters"]
