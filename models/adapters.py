"""Fine-tuning methods (config key ``model.adapter``): which parameters train.

* ``full``: every parameter.
* ``ntk``: NTK-Attention fine-tuning (2406.14036): the base model frozen; per-layer Z, k and the head train.
  Installs the ``ntk`` attention kernel if the model does not use it yet.
* ``lora``: LoRA through ``peft`` (default r=8, alpha=16, dropout 0 as in the seed's ChatGLM runs).
* ``prefix``: P-Tuning v2 (deep prefix tuning, no reparameterisation, m = num_virtual_tokens, default 10 as in the
  seed). Default backend ``native``: per-layer trainable prefix keys/values through our ``prefix`` attention kernel,
  because peft 0.21's prefix tuning needs past_key_values, which transformers 5.24's BERT and ViT do not accept
  ("Model does not support past key values"); ``backend="peft"`` uses peft's PrefixTuningConfig (GPT-2 only).

The task head trains in every arm (the seed froze it in some arms only, spec 1(e)).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from models.attention import install_attention
from models.attention.kernels import NTKAttention, PrefixAttention, attention_modules
from models.tasks import TaskSpec

ADAPTERS = ("full", "ntk", "lora", "prefix")
HEAD_NAMES = ("classifier", "score", "lm_head")
_LORA_TARGETS = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",))


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (tied weights counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def head_names(model: nn.Module, task: TaskSpec) -> list[str]:
    """Names of the task head's top-level modules present in ``model``."""
    children = {name for name, _ in model.named_children()}
    wanted = ("lm_head",) if task.kind == "lm" else ("classifier", "score")
    found = [n for n in wanted if n in children]
    if not found:
        raise ValueError(f"{type(model).__name__} has no task head among {wanted}; "
                         "build it with a *ForImageClassification / *ForSequenceClassification / *LMHeadModel class")
    return found


def _kernel(model: nn.Module) -> Any:
    mods = attention_modules(model)
    return getattr(mods[0][1], "fedprobe_attention", None) if mods else None


def _freeze_all_but(model: nn.Module, keep: tuple[str, ...], heads: list[str]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = any(f".{k}." in f".{name}" for k in keep)
    for h in heads:  # via the module: a tied lm_head is listed under the embedding's name
        for p in getattr(model, h).parameters():
            p.requires_grad = True


def _lora(model: nn.Module, task: TaskSpec, heads: list[str], r: int = 8, alpha: int = 16, dropout: float = 0.0,
          target_modules: list[str] | None = None) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    if target_modules is None:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        target_modules = next((list(t) for t in _LORA_TARGETS if set(t) <= names), None)
        if target_modules is None:
            raise ValueError("no known attention projections for LoRA; pass adapter_params.target_modules")
    task_type = {"text": TaskType.SEQ_CLS, "lm": TaskType.CAUSAL_LM}.get(task.kind)
    cfg = LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=target_modules, modules_to_save=heads)
    return get_peft_model(model, cfg)


def _prefix(model: nn.Module, task: TaskSpec, heads: list[str], num_virtual_tokens: int = 10,
            backend: str = "native", init_std: float = 1.0) -> nn.Module:
    if backend == "peft":
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        task_type = {"text": TaskType.SEQ_CLS, "lm": TaskType.CAUSAL_LM}.get(task.kind)
        cfg = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens,
                                 prefix_projection=False, modules_to_save=heads)
        return get_peft_model(model, cfg)
    if backend != "native":
        raise ValueError(f"adapter_params.backend must be 'native' or 'peft', got {backend!r}")
    kernel = _kernel(model)
    if kernel is not None and not isinstance(kernel, PrefixAttention) and kernel.name != "standard":
        raise ValueError(f"adapter 'prefix' needs model.attention = 'standard' (got {kernel.name!r})")
    install_attention(model, "prefix", num_virtual_tokens=num_virtual_tokens, init_std=init_std)
    _freeze_all_but(model, ("prefix_kv",), heads)
    return model


def apply_adapter(model: nn.Module, name: str, task: TaskSpec, **params: Any) -> nn.Module:
    """Set which parameters of ``model`` train for fine-tuning method ``name``; returns the model to use."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; choose one of: {', '.join(ADAPTERS)}")
    heads = head_names(model, task)
    if name == "full":
        if params:
            raise ValueError(f"adapter 'full' takes no adapter_params, got {sorted(params)}")
        for p in model.parameters():
            p.requires_grad = True
        return model
    if name == "ntk":
        if not isinstance(_kernel(model), NTKAttention):
            if _kernel(model) is not None and _kernel(model).name != "standard":
                raise ValueError(f"adapter 'ntk' replaces attention {_kernel(model).name!r}; use model.attention = 'standard' or 'ntk'")
            install_attention(model, "ntk", **params)
        elif params:
            raise ValueError("adapter 'ntk': the ntk kernel is already installed; put its options in model.attention_params")
        _freeze_all_but(model, ("ntk_prefix",), heads)
        return model
    if name == "lora":
        return _lora(model, task, heads, **params)
    return _prefix(model, task, heads, **params)


__all__ = ["apply_adapter", "trainable_parameters", "head_names", "ADAPTERS"]
