"""Sparse (top-k and threshold) softmax attention (Deng, Song, Xiong, Yang, arXiv 2404.02690).

Top-k: per query keep the k largest logits, renormalise the softmax over them, drop the rest [paper]. The paper
recommends a dynamic k = alpha * n^C (C in (0, 1)) over a fixed window. Threshold variant [derived]: keep j if
p_j >= eps under the full softmax; at most 1/eps entries pass. Exact identity used by tests [derived, standard]:
Attn - Attn_S = tau (mu_tail - mu_head), tau the dropped mass.

The selection is done exactly on the materialised n_q x n_k logits (quadratic, as the spec notes; approximate
selection such as LSH is out of scope). Masked (causal / padding) entries are never selected.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.attention.lse import visible_mask


def topk_schedule(n: int, top_k: int | None = None, alpha: float = 1.0, exponent: float | None = None) -> int:
    """k for n keys: a fixed ``top_k``, or ``ceil(alpha * n ** exponent)``; clipped to [1, n]."""
    if top_k is not None and exponent is not None:
        raise ValueError("give either top_k (fixed window) or exponent (k = alpha * n^C), not both")
    if top_k is None and exponent is None:
        raise ValueError("sparse attention needs top_k (fixed k) or exponent C with k = alpha * n^C")
    if exponent is not None:
        if not 0 < exponent <= 1 or alpha <= 0:
            raise ValueError(f"need 0 < exponent <= 1 and alpha > 0, got exponent={exponent}, alpha={alpha}")
        k = math.ceil(alpha * n ** exponent)
    else:
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = int(top_k)
    return max(1, min(n, k))


def _scores(q: Tensor, k: Tensor, causal: bool, attn_mask: Tensor | None, scale: float | None) -> Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # [b,h,nq,nk]
    keep = visible_mask(attn_mask, causal, q.shape[2], k.shape[2], q.device)
    return s if keep is None else s.masked_fill(~keep, float("-inf"))


def sparse_topk_attention(q: Tensor, k: Tensor, v: Tensor, top_k: int, causal: bool = False,
                          attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Top-k softmax attention: q [b,h,nq,d], k, v [b,h,nk,d] -> [b,h,nq,d]; exact when top_k >= n_k."""
    top_k = int(top_k)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    s = _scores(q, k, causal, attn_mask, scale)
    if top_k < s.shape[-1]:
        idx = s.topk(top_k, dim=-1).indices
        sel = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
        s = s.masked_fill(~sel, float("-inf"))  # masked entries picked by topk stay -inf
    return torch.matmul(torch.softmax(s, -1), v)


def sparse_threshold_attention(q: Tensor, k: Tensor, v: Tensor, eps: float, causal: bool = False,
                               attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Keep entries with softmax weight >= eps (and always each row's max), renormalise."""
    if not 0 <= eps < 1:
        raise ValueError(f"threshold eps must be in [0, 1), got {eps}")
    s = _scores(q, k, causal, attn_mask, scale)
    p = torch.softmax(s, -1)
    keep = (p >= eps) | (p == p.amax(-1, keepdim=True))
    return torch.matmul(torch.softmax(s.masked_fill(~keep, float("-inf")), -1), v)


def tail_mass(q: Tensor, k: Tensor, top_k: int, causal: bool = False, scale: float | None = None) -> Tensor:
    """tau: softmax mass outside the top-k set, per query [b,h,nq]."""
    p = torch.softmax(_scores(q, k, causal, None, scale), -1)
    return 1.0 - p.topk(min(int(top_k), p.shape[-1]), dim=-1).values.sum(-1)


__all__ = ["sparse_topk_attention", "sparse_threshold_attention", "topk_schedule", "tail_mass"]
