"""Build a ``transformers`` model from a :class:`fl.config.ModelConfig` and a :class:`TaskSpec`.

A model family (``MODELS`` registry) is a :class:`ModelFamily` subclass: it maps a size
name and a task to a ``transformers`` config and model class. ``build_model`` then

1. makes the model: random init under ``torch.manual_seed(seed)`` (inside a forked RNG,
   so the caller's RNG stream is untouched), or ``from_pretrained(cfg.pretrained,
   local_files_only=True)`` with the classification head resized to the task;
2. applies ``cfg.params`` as config overrides (unknown key -> :class:`ModelError`);
3. installs a non-standard attention kernel (``models.attention.install_attention``);
4. wraps the model in an adapter (``models.adapters.apply_adapter``) unless ``full``.

Standard attention defaults to transformers' ``"eager"`` implementation: on CPU the fused
SDPA kernel has no double backward, which gradient-inversion attacks (gradient of a
gradient-matching loss) need. Set ``model.params.attn_implementation = "sdpa"`` for speed
where no such attack runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fl.config import ModelConfig
from fl.registry import Registry, RegistryError
from models.tasks import TaskKind, TaskSpec

MODELS: Registry = Registry("model family", entry_point_group="fedprobe.models", base="models.build:ModelFamily")

DEFAULT_ATTN = "eager"


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


def apply_overrides(config: Any, params: dict[str, Any], family: str) -> None:
    """Set ``config.<key> = value`` for each override; unknown keys raise :class:`ModelError`."""
    for key, value in params.items():
        if not hasattr(config, key):
            valid = ", ".join(sorted(k for k in config.to_dict() if not k.startswith("_")))
            raise ModelError(
                f"model.params.{key} is not a {type(config).__name__} field (family {family!r}); valid keys: {valid}"
            )
        setattr(config, key, value)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and (heads < 1 or hidden % heads):
        raise ModelError(
            f"model.params: hidden size {hidden} is not a multiple of the {heads} attention heads (family {family!r})"
        )


def _from_pretrained(fam: ModelFamily, path_str: str, task: TaskSpec, params: dict[str, Any], attn: str) -> nn.Module:
    path = Path(path_str).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model.pretrained folder not found: {path} (give a folder written by save_pretrained, or '' for random init)"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"model.pretrained: {path} has no config.json (save the model there with save_pretrained)")
    cfg_cls = fam.config_class()
    config = cfg_cls.from_pretrained(str(path), local_files_only=True)
    if getattr(config, "model_type", None) != getattr(cfg_cls, "model_type", None):
        raise ModelError(
            f"model.pretrained: {path} holds a {config.model_type!r} model, not {cfg_cls.model_type!r}; "
            "set model.family to match"
        )
    fam.fit_pretrained(config, task)
    apply_overrides(config, params, fam.name)
    try:
        return fam.model_class(task).from_pretrained(
            str(path), config=config, local_files_only=True, attn_implementation=attn, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.pretrained: cannot load weights from {path}: {str(exc).splitlines()[0]}") from None


def _resolve(cfg: ModelConfig, task: TaskSpec) -> tuple[ModelFamily, dict[str, Any], str]:
    """(family, config overrides, attention implementation) after the checks every model path needs."""
    fam = _family(cfg.family)
    fam.check_task(task)
    if cfg.size not in fam.sizes:
        raise ModelError(f"model.size {cfg.size!r} unknown for {fam.name!r}; choose one of: {', '.join(fam.sizes)}")
    params = dict(cfg.params)
    return fam, params, params.pop("attn_implementation", DEFAULT_ATTN)


def build_model(cfg: ModelConfig, task: TaskSpec, seed: int = 0) -> nn.Module:
    """The model ``cfg`` describes, for ``task``; same seed -> same initial weights."""
    fam, params, attn = _resolve(cfg, task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.pretrained:
            model = _from_pretrained(fam, cfg.pretrained, task, params, attn)
        else:
            config = fam.config(cfg.size, task)
            apply_overrides(config, params, fam.name)
            try:
                model = fam.model_class(task)._from_config(config, attn_implementation=attn)
            except ValueError as exc:  # e.g. hidden size not divisible by heads, unknown attn_implementation
                raise ModelError(f"cannot build {fam.name!r} ({cfg.size}): {str(exc).splitlines()[0]}") from None
        if cfg.attention != "standard":
            from models.attention import install_attention

            install_attention(model, cfg.attention, **cfg.attention_params)
        if cfg.adapter != "full":
            from models.adapters import apply_adapter

            model = apply_adapter(model, cfg.adapter, task, **cfg.adapter_params)
    return model


def check_model(cfg: ModelConfig, task: TaskSpec) -> None:
    """What :func:`build_model` would refuse, found from the config alone (no weights, no model class
    imported): family and task, size, ``pretrained`` folder, ``params`` overrides, attention kernel
    parameters. ``fedprobe check`` uses it to answer in seconds; ``fedprobe run`` still builds the model."""
    fam, params, attn = _resolve(cfg, task)
    if attn not in ("eager", "sdpa", "flash_attention_2", "flex_attention"):
        raise ModelError(f"model.params.attn_implementation {attn!r} unknown; use 'eager' (default) or 'sdpa'")
    if not cfg.pretrained and not params and attn in ("eager", "sdpa"):
        # a built-in size with no overrides: its transformers config holds nothing the user chose (the test suite
        # builds every family and size), so transformers need not even be imported
        config = None
    elif cfg.pretrained:
        path = Path(cfg.pretrained).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(f"model.pretrained: {path} has no config.json (give a folder written by save_pretrained, "
                             "or '' for random init)")
        config = fam.config_class().from_pretrained(str(path), local_files_only=True)
        fam.fit_pretrained(config, task)
    else:
        config = fam.config(cfg.size, task)
    if config is not None:
        apply_overrides(config, params, fam.name)
    if cfg.attention != "standard":
        from models.attention import ATTENTION

        ATTENTION.create(cfg.attention, **cfg.attention_params)  # kernel constructors validate their parameters


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
