"""Softmax attention that also returns the row log-sum-exp, differentiable in both outputs.

    O_i = sum_j softmax(s_i)_j v_j,   lse_i = log sum_j exp(s_ij),   s_ij = scale * <q_i, k_j>

NTK-Attention (``ntk.py``) merges a prefix term into ``O`` through ``lse``, so gradients must flow through
``lse`` as well (spec 1(e): fused kernels treat lse as non-differentiable and silently drop d lse / d(q, k)).
With ``P = softmax(S)`` and upstream grads ``dO``, ``dlse`` the exact backward is

    dP = dO V^T,  dS = P * (dP - (rowsum(dO * O) - dlse)),  dq = scale * dS K,  dk = scale * dS^T Q,  dv = P^T dO.

Two backends, both written by hand because torch exposes no differentiable lse (checked in torch 2.13):

* ``fused`` (CPU): torch's flash-attention CPU kernel ``aten._scaled_dot_product_flash_attention_for_cpu`` for the
  forward; its backward kernel computes ``rowsum(dO * O)`` itself, so we fold ``-dlse`` into that row sum: pass
  ``O - (dlse / |dO|^2) dO`` instead of ``O`` (float32/64, rows with dO != 0), or else append columns (q, k, v get
  zeros, ``O`` gets ``-dlse``, ``dO`` gets ones), which add nothing to the scores or ``dP``; their gradients are
  dropped. Memory O(n * block) as in flash attention.
* ``chunked`` (any device): blockwise online softmax over key blocks in plain torch with recomputation in backward
  (flash-attention style); memory O(n * block).

Double backward (gradient-inversion attacks differentiate a gradient): both backends switch to the plain-torch
blockwise backward when called with ``create_graph=True``, so higher derivatives exist.

Masks: ``causal`` aligns the diagonal bottom-right (query i sees keys j <= i + n_k - n_q), and ``attn_mask`` is a
boolean "may attend" mask or an additive float mask broadcastable to [b, h, n_q, n_k]. Rows with no visible key
are un-masked (attend to all keys, as transformers does for padded query rows) so every row stays finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_FUSED_OP = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_EFF_OP = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)
_EFF_BWD = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention_backward", None)


def _additive_mask(attn_mask: Tensor | None, causal: bool, nq: int, nk: int, dtype: torch.dtype,
                   device: torch.device, square_causal_native: bool) -> tuple[Tensor | None, bool]:
    """(additive float mask or None, causal flag for the kernel). Builds a mask only when one is needed."""
    if attn_mask is None and (not causal or (square_causal_native and nq == nk)):
        return None, causal
    if attn_mask is None:
        keep = None
    elif attn_mask.dtype == torch.bool:
        keep = attn_mask
    else:
        keep = attn_mask > float("-inf")  # additive mask: -inf (or finfo.min) marks blocked entries
        keep = keep & (attn_mask > torch.finfo(attn_mask.dtype).min / 2)
    if causal:
        tri = torch.ones(nq, nk, dtype=torch.bool, device=device).tril(diagonal=nk - nq)  # bottom-right aligned
        keep = tri if keep is None else keep & tri
    keep = keep | ~keep.any(-1, keepdim=True)  # fully masked rows attend to everything (kept finite)
    add = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        add = add + torch.where(keep, attn_mask.to(dtype), torch.zeros((), dtype=dtype, device=device))
    return add, False


def _backward_torch(q, k, v, out, lse, mask, scale, dout, dlse, block):
    """Blockwise backward in plain differentiable torch ops (so create_graph=True gives double backward)."""
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    delta = (dout * out).sum(-1) - dlse  # [b,h,nq]
    dq, dks, dvs = 0, [], []
    for j0 in range(0, k.shape[2], block):
        kb, vb = k[:, :, j0:j0 + block], v[:, :, j0:j0 + block]
        s = torch.matmul(q, kb.transpose(-2, -1)) * scale
        if mask is not None:
            s = s + mask[..., j0:j0 + block]
        p = torch.exp(s - lse.unsqueeze(-1))  # [b,h,nq,blk]
        dvs.append(torch.matmul(p.transpose(-2, -1), dout))
        ds = p * (torch.matmul(dout, vb.transpose(-2, -1)) - delta.unsqueeze(-1))
        dq = dq + torch.matmul(ds, kb) * scale
        dks.append(torch.matmul(ds.transpose(-2, -1), q) * scale)
    return dq, torch.cat(dks, 2), torch.cat(dvs, 2)


class _FusedCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal: bool, scale: float):
        out, lse = _FUSED_OP(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the aten kernel has no double backward
            if ctx.causal:
                mask, _ = _additive_mask(None, True, q.shape[2], k.shape[2], q.dtype, q.device, False)
            return (*_backward_torch(q, k, v, out, lse, mask, ctx.scale, dout, dlse, 256), None, None, None)
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is None:
            dlse = torch.zeros_like(lse)
        dout = dout.to(q.dtype).contiguous()
        # The kernel computes dS = P * (dO V^T - rowsum(dO * O)); we need rowsum(...) - dlse. Fast path (fp32/64):
        # pass O' = O - (dlse / |dO|^2) dO, exact whenever |dO_i| > 0 (relative error ~ eps * |dlse|).
        nrm = (dout * dout).sum(-1, keepdim=True)  # [b,h,nq,1]
        dl = dlse.unsqueeze(-1).to(q.dtype)
        if q.dtype in (torch.float32, torch.float64) and not bool(((nrm < 1e-30) & (dl != 0)).any()):
            out2 = torch.where(dl != 0, out - (dl / nrm.clamp_min(1e-30)) * dout, out)
            return (*_FUSED_BWD(dout, q, k, v, out2, lse, 0.0, ctx.causal, attn_mask=mask, scale=ctx.scale),
                    None, None, None)
        # General path: 8 extra columns (q, k, v zero; dO = (1, 0..); O = (-dlse, 0..)) add -dlse to the row sum.
        # (8 rather than 1: a head size of d + 1 runs ~2x slower in the CPU kernel, d + 8 ~1.4x; measured.)
        e = F.pad(torch.ones_like(dl), (0, 7))  # [b,h,nq,8]
        pad = lambda t: F.pad(t, (0, 8))  # noqa: E731
        gq, gk, gv = _FUSED_BWD(
            torch.cat([dout, e], -1), pad(q), pad(k), pad(v), torch.cat([out, -dl * e], -1), lse, 0.0,
            ctx.causal, attn_mask=mask, scale=ctx.scale,
        )
        d = q.shape[-1]
        return gq[..., :d], gk[..., :d], gv[..., :d], None, None, None


class _EfficientCUDA(torch.autograd.Function):
    """CUDA memory-efficient attention kernel, same -dlse folding; v gets 8 extra columns (alignment).

    Experimental: checked by benchmarks/gpu_attention.py, not in CI (no GPU); no mask, square causal only.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        out, lse, seed, offset = _EFF_OP(q, k, v, None, True, 0.0, causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, seed, offset)
        ctx.causal, ctx.scale = causal, scale
        return out, lse[..., : q.shape[2]]  # kernel pads lse to a multiple of 32 rows

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, seed, offset = ctx.saved_tensors
        n = q.shape[2]
        dout = torch.zeros_like(out) if dout is None else dout
        dlse = q.new_zeros(lse.shape[:-1] + (n,)) if dlse is None else dlse
        extra = F.pad(dlse.new_ones(dlse.shape).unsqueeze(-1), (0, 7))  # [b,h,n,8] = (1, 0, ..)
        gq, gk, gv, _ = _EFF_BWD(
            torch.cat([dout, extra.to(dout.dtype)], -1), q, k, F.pad(v, (0, 8)), None,
            torch.cat([out, (-dlse.unsqueeze(-1) * extra).to(out.dtype)], -1), lse, seed, offset, 0.0,
            [True, True, True, False], ctx.causal, scale=ctx.scale,
        )
        return gq, gk, gv[..., :-8], None, None


class _Chunked(torch.autograd.Function):
    """Blockwise online-softmax attention with recomputing backward; mask is additive or None."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float, block: int):
        b, h, nq, d = q.shape
        nk = k.shape[2]
        m = q.new_full((b, h, nq), float("-inf"))
        l = q.new_zeros(b, h, nq)
        acc = q.new_zeros(b, h, nq, v.shape[-1])
        for j0 in range(0, nk, block):
            s = torch.matmul(q, k[:, :, j0:j0 + block].transpose(-2, -1)) * scale  # [b,h,nq,blk]
            if mask is not None:
                s = s + mask[..., j0:j0 + block]
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            p = torch.exp(s - m_safe.unsqueeze(-1))
            corr = torch.exp(m - m_safe)
            l = l * corr + p.sum(-1)
            acc = acc * corr.unsqueeze(-1) + torch.matmul(p, v[:, :, j0:j0 + block])
            m = m_new
        out = acc / l.unsqueeze(-1)
        lse = m + torch.log(l)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale, ctx.block = scale, block
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        return (*_backward_torch(q, k, v, out, lse, mask, ctx.scale, dout, dlse, ctx.block), None, None, None)


def attention_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, attn_mask: Tensor | None = None,
                  scale: float | None = None, backend: str = "auto", block: int = 256) -> tuple[Tensor, Tensor]:
    """Softmax attention and its row log-sum-exp, both differentiable.

    q [b,h,nq,d], k [b,h,nk,d], v [b,h,nk,d] -> (out [b,h,nq,d], lse [b,h,nq]).
    backend: "auto" (fused on CPU, else chunked), "fused", "chunked", "efficient" (CUDA, experimental) or
    "reference" (quadratic oracle).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, n, d]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    nq, nk = q.shape[2], k.shape[2]
    if backend == "auto":
        fused_ok = (_FUSED_OP is not None and q.device.type == "cpu" and v.shape[-1] == q.shape[-1]
                    and q.dtype in (torch.float32, torch.float64, torch.bfloat16))
        backend = "fused" if fused_ok else "chunked"
    if backend == "reference":
        return attention_lse_reference(q, k, v, causal, attn_mask, scale)
    if backend == "fused":
        if _FUSED_OP is None:
            raise ValueError("backend='fused' needs torch's CPU flash-attention op; use backend='chunked'")
        mask, kcausal = _additive_mask(attn_mask, causal, nq, nk, q.dtype, q.device, square_causal_native=True)
        return _FusedCPU.apply(q.contiguous(), k.contiguous(), v.contiguous(), mask, kcausal, scale)
    if backend == "efficient":
        if _EFF_OP is None or q.device.type != "cuda" or attn_mask is not None or (causal and nq != nk):
            raise ValueError("backend='efficient' needs CUDA, no attn_mask and square causal; use backend='chunked'")
        return _EfficientCUDA.apply(q, k, v, causal, scale)
    if backend == "chunked":
        mask, _ = _additive_mask(attn_mask, causal, nq, nk, q.dtype, q.device, square_causal_native=False)
        return _Chunked.apply(q, k, v, mask, scale, int(block))
    raise ValueError(f"unknown attention backend {backend!r}; choose auto, fused, chunked or reference")


def attention_lse_reference(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, attn_mask: Tensor | None = None,
                            scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Quadratic test oracle: materialises the n_q x n_k score matrix."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # [b,h,nq,nk]
    mask, _ = _additive_mask(attn_mask, causal, q.shape[2], k.shape[2], q.dtype, q.device, square_causal_native=False)
    if mask is not None:
        s = s + mask
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.softmax(s, -1), v), lse


def visible_mask(attn_mask: Tensor | None, causal: bool, nq: int, nk: int, device: torch.device) -> Tensor | None:
    """Boolean [.., nq, nk] "may attend" mask with the same conventions as :func:`attention_lse` (or None)."""
    add, _ = _additive_mask(attn_mask, causal, nq, nk, torch.float32, device, square_causal_native=False)
    return None if add is None else torch.isfinite(add)


__all__ = ["attention_lse", "attention_lse_reference", "visible_mask"]
