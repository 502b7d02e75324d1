"""The model-family contract: the ``MODELS`` registry, the :class:`ModelFamily` base class, :class:`ModelError`.

A family maps a size name and a task to a ``transformers`` config and model class; ``models.families`` registers
the built-in ones (vit, bert, gpt2), a plugin registers its own where it is defined, and ``models.build`` builds
from them. Kept apart from ``models.build`` so that the families import the contract, not the builder.
"""

from __future__ import annotations

from typing import Any

from fl.registry import Registry, RegistryError
from models.tasks import TaskKind, TaskSpec

MODELS: Registry = Registry("model family", entry_point_group="fedprobe.models", base="models.family:ModelFamily")


class ModelError(ValueError):
    """A model that cannot be built from the config (one line: what is wrong and the fix)."""


class ModelFamily:
    """Base class of a model family: sizes and the transformers classes per task kind."""

    name: str = ""
    kinds: tuple[TaskKind, ...] = ()
    sizes: dict[str, dict[str, Any]] = {}

    def config(self, size: str, task: TaskSpec) -> Any:
        """A fresh ``transformers`` config for ``size`` fitted to ``task``."""
        raise NotImplementedError

    def model_class(self, task: TaskSpec) -> type:
        """The ``PreTrainedModel`` subclass for ``task.kind``."""
        raise NotImplementedError

    def config_class(self) -> type:
        raise NotImplementedError

    def fit_pretrained(self, config: Any, task: TaskSpec) -> None:
        """Adapt a loaded config to ``task`` (classification head size); raise on a hard mismatch."""
        if task.kind != "lm":
            config.num_labels = task.num_classes

    def check_task(self, task: TaskSpec) -> None:
        if task.kind not in self.kinds:
            able = [n for n in MODELS.names() if task.kind in getattr(_safe_family(n), "kinds", ())]
            raise ModelError(
                f"model family {self.name!r} cannot do a {task.kind!r} task; "
                f"set model.family to one of: {', '.join(able) or '(none)'}"
            )


def _safe_family(name: str) -> ModelFamily | None:
    try:
        return _family(name)
    except (RegistryError, ModelError):
        return None


def _family(name: str) -> ModelFamily:
    obj = MODELS.get(name)
    fam = obj() if isinstance(obj, type) else obj
    if not isinstance(fam, ModelFamily):
        raise ModelError(f"model family {name!r} is a {type(fam).__name__}, expected a models.ModelFamily subclass")
    fam.name = fam.name or name
    return fam
