"""NTK-Attention (Yang, Song et al., "Toward Infinite-Long Prefix in Transformer", arXiv 2406.14036).

A prefix of m tokens P is kernelised, exp(<q,k>/sqrt(d)) ~ phi(q)^T phi(k), so its sums collapse into per-head
trainable Z = sum_j phi(k_j) v_j^T (d x d) and k = sum_j phi(k_j) (d):

    NTKAttn_i = (sum_j e^{s_ij} v_j + phi(q_i)^T Z) / (sum_j e^{s_ij} + phi(q_i)^T |k|),  phi(x) = ELU(x / d^{1/4}) + 1

Follows the paper / authors' code (v1): r = d, elementwise phi, |k| keeps the prefix mass non-negative, the prefix
term is added to every query row and is not causally masked.
This project's choices [derived]: the efficient form

    NTKAttn_i = (O_i + e^{-lse_i} phi(q_i)^T Z) / (1 + e^{-lse_i} phi(q_i)^T |k|)

on top of a fused attention with a differentiable lse (``lse.py``), so the n x n matrix is never built; padding
masks honoured; k initialised small and non-zero (under |.| a zero init never moves); a registered dropout module
on phi(q) (the authors build a fresh, always-on Dropout per call); no fp16 cast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention.lse import attention_lse, visible_mask


def ntk_phi(x: Tensor) -> Tensor:
    """phi(x) = ELU(x / d^{1/4}) + 1 (positive features), x [..., d]."""
    return F.elu(x / x.shape[-1] ** 0.25) + 1.0


def _check(q: Tensor, k: Tensor, v: Tensor, z: Tensor, zk: Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, n, d], got q {tuple(q.shape)}")
    h, d = q.shape[1], q.shape[-1]
    if z.shape != (h, d, d) or zk.shape != (h, d):
        raise ValueError(f"NTK prefix expects z [{h}, {d}, {d}] and zk [{h}, {d}] for q {tuple(q.shape)}; "
                         f"got z {tuple(z.shape)}, zk {tuple(zk.shape)}")


def ntk_merge(out: Tensor, lse: Tensor, nd: Tensor) -> Tensor:
    """(O + e^{-lse} num) / (1 + e^{-lse} den); out [b,h,n,d], lse [b,h,n], nd = (num | den) [b,h,n,d+1]."""
    # scaled by e^{min(lse,0)} so neither weight overflows: (w_o O + w_p num) / (w_o + w_p den)
    w_o = torch.exp(torch.clamp(lse, max=0.0)).unsqueeze(-1)  # [b,h,n,1]
    w_p = torch.exp(-torch.clamp(lse, min=0.0)).unsqueeze(-1)
    acc = torch.addcmul(w_o * F.pad(out, (0, 1), value=1.0), w_p, nd.to(w_o.dtype))  # [b,h,n,d+1]
    return (acc[..., :-1] / acc[..., -1:]).to(out.dtype)


def _prefix_terms(phi_q: Tensor, z: Tensor, zk: Tensor) -> Tensor:
    """(phi(q)^T Z | phi(q)^T |k|) [b,h,n,d+1] in one batched matmul."""
    w = torch.cat([z, zk.abs().unsqueeze(-1)], -1).to(phi_q.dtype)  # [h,d,d+1]
    return torch.matmul(phi_q, w.unsqueeze(0))


def ntk_attention(q: Tensor, k: Tensor, v: Tensor, z: Tensor, zk: Tensor, causal: bool = False,
                  attn_mask: Tensor | None = None, scale: float | None = None, backend: str = "auto") -> Tensor:
    """NTK-Attention, efficient form; never builds the n x n score matrix (an explicit attn_mask or a rectangular
    causal mask is materialised as a mask).

    q [b,h,nq,d], k, v [b,h,nk,d], z [h,d,d], zk [h,d] -> [b,h,nq,d]. ``causal`` aligns bottom-right
    (n_q <= n_k); ``attn_mask`` is a boolean "may attend" or additive mask broadcastable to [b,h,nq,nk].
    With z = 0 and zk = 0 it equals softmax attention.
    """
    _check(q, k, v, z, zk)
    out, lse = attention_lse(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale, backend=backend)
    return ntk_merge(out, lse, _prefix_terms(ntk_phi(q), z, zk))


def ntk_attention_reference(q: Tensor, k: Tensor, v: Tensor, z: Tensor, zk: Tensor, causal: bool = False,
                            attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Quadratic oracle, the authors' formula with a -inf mask before the row max (spec pitfall fixed)."""
    _check(q, k, v, z, zk)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # [b,h,nq,nk]
    keep = visible_mask(attn_mask, causal, q.shape[2], k.shape[2], q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)  # [b,h,nq,1]
    a = torch.exp(s - m)
    phi_q = ntk_phi(q)
    num = a @ v + torch.einsum("bhnd,hde->bhne", phi_q, z) / torch.exp(m)
    den = a.sum(-1, keepdim=True) + torch.einsum("bhnd,hd->bhn", phi_q, zk.abs()).unsqueeze(-1) / torch.exp(m)
    return num / den


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, causal: bool = False,
                     attn_mask: Tensor | None = None, scale: float | None = None, backend: str = "auto") -> Tensor:
    """Explicit prefix attention: queries from the input, keys/values [P; X]; the prefix is visible to every query.

    q [b,h,n,d], k, v [b,h,n,d], pk, pv [h,m,d] (or [b,h,m,d]) -> [b,h,n,d]. Uses :func:`attention_lse` (same
    fused kernel as SDPA on CPU, and double-differentiable); the bottom-right causal alignment over n_k = m + n
    keys is exactly "prefix visible to all, causal on the input".
    """
    b, h, n, _ = q.shape
    if pk.dim() == 3:
        pk, pv = pk.unsqueeze(0).expand(b, -1, -1, -1), pv.unsqueeze(0).expand(b, -1, -1, -1)
    m = pk.shape[2]
    kk, vv = torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2)
    if attn_mask is not None:
        keep = visible_mask(attn_mask, False, n, k.shape[2], q.device)
        attn_mask = torch.cat([torch.ones(*keep.shape[:-1], m, dtype=torch.bool, device=q.device), keep], -1)
    return attention_lse(q, kk, vv, causal=causal, attn_mask=attn_mask, scale=scale, backend=backend)[0]


class NTKPrefix(nn.Module):
    """Per-layer NTK-Attention parameters: Z [h,d,d] and k [h,d] (d^2 + d per head).

    ``forward(phi_q [b,h,n,d]) -> [b,h,n,d+1]`` returns (phi(q)^T Z | phi(q)^T |k|) as one tensor: a single
    input and a single output, no buffers, so Opacus computes per-sample gradients for it with its functorch
    fallback. Init: Z, k ~ N(0, init_std^2) (the authors' ChatGLM init randn/1e4); k is non-zero so that
    |k| trains from step one. ``dropout`` acts on phi(q) (authors' ViT used 0.2; default 0).
    """

    def __init__(self, num_heads: int, head_dim: int, init_std: float = 1e-4, dropout: float = 0.0) -> None:
        super().__init__()
        if init_std <= 0:
            raise ValueError(f"init_std must be > 0 (a zero k under |.| never trains), got {init_std}")
        self.z = nn.Parameter(torch.randn(num_heads, head_dim, head_dim) * init_std)
        self.zk = nn.Parameter(torch.randn(num_heads, head_dim) * init_std)
        self.dropout = nn.Dropout(dropout)

    def forward(self, phi_q: Tensor) -> Tensor:
        return _prefix_terms(phi_q, self.z, self.zk)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool = False, attn_mask: Tensor | None = None,
               scale: float | None = None, backend: str = "auto") -> Tensor:
        """NTK-Attention with this module's Z, k; same maths as :func:`ntk_attention`."""
        out, lse = attention_lse(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale, backend=backend)
        nd = self(self.dropout(ntk_phi(q)))  # [b,h,n,d+1]; dropout outside forward keeps Opacus' replay exact
        return ntk_merge(out, lse, nd)


__all__ = ["ntk_phi", "ntk_attention", "ntk_attention_reference", "prefix_attention", "ntk_merge", "NTKPrefix"]
