"""Build a ``transformers`` model from a :class:`models.config.ModelConfig` and a :class:`TaskSpec`.

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

import inspect
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fl.registry import Registry, RegistryError
from models import families  # noqa: F401  (registers vit, bert, gpt2)
from models.config import ModelConfig
from models.family import MODELS, ModelError, ModelFamily, _family
from models.pretrained import resolve_pretrained
from models.tasks import TaskSpec

# model.family = "package.module:factory" naming a plain nn.Module class or factory (not a ModelFamily): the model is
# called as model(x) and returns logits; the factory gets model.params as keyword arguments, and the task as
# ``task`` when it has such a parameter
PLAIN_MODELS: Registry = Registry("model factory")

DEFAULT_ATTN = "eager"
_LOG = logging.getLogger("fedprobe.models")


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
    path = Path(resolve_pretrained(path_str))  # a registered name ("minilm") or a folder
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
        with _quiet_transformers():  # its per-load report and progress bar, in every client process and round
            model, info = fam.model_class(task).from_pretrained(
                str(path), config=config, local_files_only=True, attn_implementation=attn,
                ignore_mismatched_sizes=True, output_loading_info=True,
            )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.pretrained: cannot load weights from {path}: {str(exc).splitlines()[0]}") from None
    # the task's new head (classifier / score) is expected to be missing; anything else is worth one line
    body = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(HEAD_PREFIXES))
    if body:
        shown = ", ".join(body[:4]) + (f" and {len(body) - 4} more" if len(body) > 4 else "")
        _LOG.warning("model.pretrained %s lacks %d weights, randomly initialised: %s", path, len(body), shown)
    return model


HEAD_PREFIXES = ("classifier.", "score.")  # the heads fit_pretrained resizes to the task


class _quiet_transformers:
    """transformers' logging at ERROR and its progress bars off, restored on exit."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: Any) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        if self._bars:
            hf_logging.enable_progress_bar()


def _resolve(cfg: ModelConfig, task: TaskSpec) -> tuple[ModelFamily, dict[str, Any], str]:
    """(family, config overrides, attention implementation) after the checks every model path needs."""
    fam = _family(cfg.family)
    fam.check_task(task)
    if cfg.size not in fam.sizes:
        raise ModelError(f"model.size {cfg.size!r} unknown for {fam.name!r}; choose one of: {', '.join(fam.sizes)}")
    params = dict(cfg.params)
    return fam, params, params.pop("attn_implementation", DEFAULT_ATTN)


def plain_factory(cfg: ModelConfig) -> Any:
    """The factory a ``package.module:factory`` family names when it is a plain ``nn.Module`` one, else None."""
    if ":" not in cfg.family:
        return None
    try:
        obj = PLAIN_MODELS.get(cfg.family)
    except RegistryError as exc:
        raise ModelError(str(exc).replace("model factory plugin", "model.family")) from None
    if inspect.isclass(obj) and issubclass(obj, ModelFamily):
        return None
    return obj


def task_for(cfg: ModelConfig, task: TaskSpec) -> TaskSpec:
    """``task`` as this model is called: a plain ``nn.Module`` family is called as model(x) (``call="positional"``)."""
    return replace(task, call="positional") if plain_factory(cfg) is not None else task


def _plain_kwargs(factory: Any, cfg: ModelConfig, task: TaskSpec) -> dict[str, Any]:
    for key, default in (("attention", "standard"), ("adapter", "full"), ("pretrained", "")):
        if getattr(cfg, key) != default:
            raise ModelError(f"model.{key} applies to transformers families; {cfg.family!r} is a plain nn.Module "
                             f"factory: remove model.{key} (load your own weights inside the factory)")
    kwargs = dict(cfg.params)
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return kwargs
    if "task" in sig.parameters:
        kwargs["task"] = task
    try:
        sig.bind(**kwargs)
    except TypeError as exc:
        raise ModelError(f"model.params do not fit {cfg.family} {sig}: {exc}") from None
    return kwargs


def _build_plain(factory: Any, cfg: ModelConfig, task: TaskSpec, seed: int) -> nn.Module:
    kwargs = _plain_kwargs(factory, cfg, task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.family {cfg.family!r} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def build_model(cfg: ModelConfig, task: TaskSpec, seed: int = 0) -> nn.Module:
    """The model ``cfg`` describes, for ``task``; same seed -> same initial weights."""
    factory = plain_factory(cfg)
    if factory is not None:
        return _build_plain(factory, cfg, task, seed)
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
    factory = plain_factory(cfg)
    if factory is not None:
        _plain_kwargs(factory, cfg, task)  # the factory's signature against model.params, nothing called
        return
    fam, params, attn = _resolve(cfg, task)
    if attn not in ("eager", "sdpa", "flash_attention_2", "flex_attention"):
        raise ModelError(f"model.params.attn_implementation {attn!r} unknown; use 'eager' (default) or 'sdpa'")
    if not cfg.pretrained and not params and attn in ("eager", "sdpa"):
        # a built-in size with no overrides: its transformers config holds nothing the user chose (the test suite
        # builds every family and size), so transformers need not even be imported
        config = None
    elif cfg.pretrained:
        path = Path(resolve_pretrained(cfg.pretrained))
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
