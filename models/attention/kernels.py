"""Attention kernels as drop-ins for transformers models (ViT, BERT, GPT-2 and any model using its interface).

transformers (5.x) attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation)``
with ``(module, query, key, value, attention_mask, scaling=, dropout=, **kwargs)``, q/k/v [b, h, n, d], and
expect ``(out [b, n, h, d], weights | None)``. We register one dispatcher, ``"fedprobe"``, that calls the kernel
object stored on each attention module (``module.fedprobe_attention``), so two models can use different kernels
or parameters. Masks come from transformers' ``sdpa_mask`` (boolean "may attend" [b, 1, nq, nk] or None).
Kernels with per-layer parameters (NTK-Attention) add a submodule to each attention module in ``prepare``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from fl.registry import Registry
from models.attention.lse import visible_mask
from models.attention.ntk import NTKPrefix, prefix_attention
from models.attention.sketch import sketch_attention
from models.attention.sparse import sparse_threshold_attention, sparse_topk_attention, topk_schedule

log = logging.getLogger(__name__)
HF_KEY = "fedprobe"


class AttentionKernel:
    """Base kernel: ``attend(module, q, k, v, causal, mask, scale) -> [b,h,nq,d]``."""

    name = "base"

    def prepare(self, module: nn.Module, num_heads: int, head_dim: int) -> None:
        """Module surgery before first use (default: none)."""

    def attend(self, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None,
               scale: float | None) -> Tensor:
        raise NotImplementedError

    def __call__(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 scaling: float | None = None, dropout: float = 0.0, is_causal: bool | None = None,
                 **kwargs: Any) -> tuple[Tensor, None]:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
        if dropout > 0 and module.training and not getattr(self, "_warned", False):
            log.warning("attention kernel %r does not apply attention-probability dropout (p=%s ignored)",
                        self.name, dropout)
            self._warned = True
        out = self.attend(module, query, key, value, causal, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items() if not k.startswith('_'))})"


ATTENTION: Registry[type[AttentionKernel]] = Registry("attention kernel", entry_point_group="fedprobe.attention",
                                                        base="models.attention.kernels:AttentionKernel")


@ATTENTION.register("standard")
class StandardAttention(AttentionKernel):
    """Exact softmax attention: ``impl="eager"`` (plain torch, any-order derivatives) or transformers' ``"sdpa"``."""

    name = "standard"

    def __init__(self, impl: str = "eager") -> None:
        if impl not in ("eager", "sdpa"):
            raise ValueError(f"attention_params.impl must be 'eager' or 'sdpa', got {impl!r}")
        self.impl = impl

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kw):
        if self.impl == "sdpa":  # fused on CPU: fast, but no double backward (gradient-inversion attacks need it)
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kw)
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        s = torch.matmul(query, key.transpose(-2, -1)) * scale  # [b,h,nq,nk]
        keep = visible_mask(attention_mask, causal, query.shape[2], key.shape[2], query.device)
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        p = torch.nn.functional.dropout(torch.softmax(s, -1), p=dropout, training=module.training)
        return torch.matmul(p, value).transpose(1, 2).contiguous(), None


@ATTENTION.register("ntk")
class NTKAttention(AttentionKernel):
    """NTK-Attention: softmax attention plus a kernelised infinite prefix (per-layer Z, k; see ntk.py)."""

    name = "ntk"

    def __init__(self, init_std: float = 1e-4, dropout: float = 0.0, backend: str = "auto") -> None:
        if init_std <= 0:
            raise ValueError(f"attention_params.init_std must be > 0 (k under |.| must start non-zero), got {init_std}")
        self.init_std, self.dropout, self.backend = float(init_std), float(dropout), backend

    def prepare(self, module, num_heads, head_dim):
        if not isinstance(getattr(module, "ntk_prefix", None), NTKPrefix):
            ref = next(module.parameters(), None)
            prefix = NTKPrefix(num_heads, head_dim, self.init_std, self.dropout)
            module.ntk_prefix = prefix.to(ref.device) if ref is not None else prefix

    def attend(self, module, q, k, v, causal, mask, scale):
        prefix = getattr(module, "ntk_prefix", None)
        if prefix is None:
            raise ValueError(f"{type(module).__name__} has no ntk_prefix; call models.attention.install_attention(model, 'ntk')")
        return prefix.attend(q, k, v, causal=causal, attn_mask=mask, scale=scale, backend=self.backend)


@ATTENTION.register("sparse_topk")
class SparseTopKAttention(AttentionKernel):
    """Top-k softmax attention, k fixed (top_k) or alpha * n^C (exponent); or threshold eps."""

    name = "sparse_topk"

    def __init__(self, top_k: int | None = None, alpha: float = 1.0, exponent: float | None = None,
                 threshold: float | None = None) -> None:
        if threshold is None:
            topk_schedule(8, top_k, alpha, exponent)  # validates the combination now, not at first forward
        elif top_k is not None or exponent is not None:
            raise ValueError("attention_params: give threshold or top_k/exponent, not both")
        self.top_k, self.alpha, self.exponent, self.threshold = top_k, alpha, exponent, threshold

    def attend(self, module, q, k, v, causal, mask, scale):
        if self.threshold is not None:
            return sparse_threshold_attention(q, k, v, self.threshold, causal=causal, attn_mask=mask, scale=scale)
        kk = topk_schedule(k.shape[2], self.top_k, self.alpha, self.exponent)
        return sparse_topk_attention(q, k, v, kk, causal=causal, attn_mask=mask, scale=scale)


@ATTENTION.register("sketch")
class SketchAttention(AttentionKernel):
    """Polynomial-feature (Taylor, even degree) linear attention with a state flat in n (see sketch.py)."""

    name = "sketch"

    def __init__(self, degree: int = 2, chunk: int = 64) -> None:
        if degree < 0 or degree % 2:
            raise ValueError(f"attention_params.degree must be even and >= 0, got {degree}")
        self.degree, self.chunk = int(degree), int(chunk)

    def attend(self, module, q, k, v, causal, mask, scale):
        key_mask = None
        if mask is not None:  # transformers' 4D mask -> key padding (a key no query may see is padding)
            keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
            key_mask = keep.any(-2).any(-2) if keep.dim() == 4 else keep
            key_mask = key_mask.expand(q.shape[0], k.shape[2])
        return sketch_attention(q, k, v, self.degree, causal=causal, key_mask=key_mask, scale=scale, chunk=self.chunk)


class PrefixKV(nn.Module):
    """Per-layer trainable prefix keys/values (P-Tuning v2 without reparameterisation), pk, pv [h, m, d].

    ``forward(ones [b]) -> [b, h, 2m, d]`` = ones_i * (pk | pv): one input, one output that depends on it (so the
    backward hook fires), no buffers, so Opacus' functorch fallback yields per-sample gradients d loss_i / d P.
    """

    def __init__(self, num_heads: int, head_dim: int, num_virtual_tokens: int, init_std: float = 1.0) -> None:
        super().__init__()
        if num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        self.pk = nn.Parameter(torch.randn(num_heads, num_virtual_tokens, head_dim) * init_std)
        self.pv = nn.Parameter(torch.randn(num_heads, num_virtual_tokens, head_dim) * init_std)

    def forward(self, ones: Tensor) -> Tensor:
        kv = torch.cat([self.pk, self.pv], 1).to(ones.dtype)  # [h,2m,d]
        return ones.view(-1, 1, 1, 1) * kv


@ATTENTION.register("prefix")
class PrefixAttention(AttentionKernel):
    """Exact softmax attention over [P; X] with m trainable prefix tokens per layer (P-Tuning v2 / prefix tuning)."""

    name = "prefix"

    def __init__(self, num_virtual_tokens: int = 10, init_std: float = 1.0) -> None:
        if int(num_virtual_tokens) < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        self.num_virtual_tokens, self.init_std = int(num_virtual_tokens), float(init_std)

    def prepare(self, module, num_heads, head_dim):
        if not isinstance(getattr(module, "prefix_kv", None), PrefixKV):
            ref = next(module.parameters(), None)
            p = PrefixKV(num_heads, head_dim, self.num_virtual_tokens, self.init_std)
            module.prefix_kv = p.to(ref.device) if ref is not None else p

    def attend(self, module, q, k, v, causal, mask, scale):
        kv = module.prefix_kv(q.new_ones(q.shape[0]))  # [b,h,2m,d]
        m = kv.shape[2] // 2
        return prefix_attention(q, k, v, kv[:, :, :m], kv[:, :, m:], causal=causal, attn_mask=mask, scale=scale)


def _dispatch(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
              **kwargs: Any) -> tuple[Tensor, None]:
    kernel = getattr(module, "fedprobe_attention", None)
    if kernel is None:
        raise ValueError(f"{type(module).__name__} uses attn_implementation 'fedprobe' but has no kernel; "
                         "call models.attention.install_attention(model, name)")
    return kernel(module, query, key, value, attention_mask, **kwargs)


def register_with_transformers() -> None:
    """Register the ``fedprobe`` dispatcher and its mask builder (sdpa-style boolean masks); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(HF_KEY, _dispatch)
    ALL_MASK_ATTENTION_FUNCTIONS.register(HF_KEY, sdpa_mask)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Self-attention modules that dispatch through transformers' attention interface."""
    found = []
    for name, m in model.named_modules():
        if "CrossAttention" in type(m).__name__ or getattr(m, "is_cross_attention", False):
            continue
        if hasattr(m, "config") and hasattr(m, "scaling") and hasattr(m, "is_causal"):
            found.append((name, m))
    return found


def _heads(m: nn.Module) -> tuple[int, int]:
    h = getattr(m, "num_attention_heads", None) or getattr(m, "num_heads", None) or m.config.num_attention_heads
    d = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None) or m.config.hidden_size // h
    return int(h), int(d)


def install_attention(model: nn.Module, name: str, **params: Any) -> nn.Module:
    """Use kernel ``name`` (an ATTENTION entry) in every self-attention layer of ``model``, in place."""
    kernel = ATTENTION.create(name, **params)
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no transformers attention modules to install {name!r} into; "
                         "use a ViT / BERT / GPT-2 model from transformers")
    register_with_transformers()
    for _, m in mods:
        kernel.prepare(m, *_heads(m))
        m.fedprobe_attention = kernel
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(HF_KEY)
    for _, m in mods:  # modules hold the (shared) config; check the switch reached them
        if m.config._attn_implementation != HF_KEY:
            m.config._attn_implementation_internal = HF_KEY
    return model


__all__ = ["ATTENTION", "AttentionKernel", "install_attention", "attention_modules", "register_with_transformers"]
