"""One-pass streaming polynomial-feature attention (Addanki, Li, Song, Yang, arXiv 2311.14652).

Polynomial method [paper + Alman-Song]: U1 = phi(Q), U2 = phi(K) with phi(q)^T phi(k) ~ exp(scale <q, k>), then
T~ = D~^{-1} U1 (U2^T V), D~ = diag(U1 U2^T 1). Streaming [paper]: one pass, state independent of n.

This project's reconstruction [derived; the paper's three sketch matrices were not read]:
* phi is the degree-g Taylor map phi_g(x) = [(sqrt(scale) x)^{(x)j} / sqrt(j!)]_{j=0..g}, t = sum_j d^j features,
  so phi(q)^T phi(k) = sum_{j<=g} (scale <q,k>)^j / j!. An even g keeps this positive for every score, hence a
  positive normaliser (odd g can give 0/0 and is rejected).
* State after n tokens: M = sum_j phi(k_j) v_j^T [t, d_v] and s = sum_j phi(k_j) [t]; memory O(t d_v), flat in n.
  The causal output row is T_j = phi(q_j)^T M / phi(q_j)^T s. The CountSketch sparse-recovery layer of the paper
  (storing whole output columns in sublinear space) is not implemented; outputs are returned as computed.
* ``scale`` defaults to 1/sqrt(d) (transformers' convention); the paper's analysis uses 1/d.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def taylor_features(x: Tensor, degree: int, scale: float | None = None) -> Tensor:
    """phi_g(x): [..., d] -> [..., t], t = sum_{j=0..g} d^j, with phi(q).phi(k) = sum_j (scale q.k)^j / j!."""
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    d = x.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    x = x * math.sqrt(scale)
    feats = [x.new_ones(*x.shape[:-1], 1)]
    cur = feats[0]
    for j in range(1, degree + 1):
        cur = (cur.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)  # [..., d^j]
        feats.append(cur / math.sqrt(math.factorial(j)))
    return torch.cat(feats, -1)


def feature_dim(d: int, degree: int) -> int:
    return sum(d ** j for j in range(degree + 1))


def _check_degree(degree: int) -> None:
    if degree < 0 or degree % 2:
        raise ValueError(f"sketch degree must be even and >= 0 (odd Taylor degree can make the normaliser 0), got {degree}")


class StreamingSketchAttention:
    """Causal one-pass attention with a fixed-size polynomial-feature state.

    >>> s = StreamingSketchAttention(degree=2)
    >>> s.update(k_t, v_t)   # k_t [..., d], v_t [..., d_v]
    >>> y = s.query(q_t)     # [..., d_v], attends to every token seen so far
    """

    def __init__(self, degree: int = 2, scale: float | None = None) -> None:
        _check_degree(degree)
        self.degree, self.scale = degree, scale
        self.M: Tensor | None = None  # [..., t, d_v]
        self.s: Tensor | None = None  # [..., t]
        self.n = 0

    def update(self, k_t: Tensor, v_t: Tensor) -> None:
        f = taylor_features(k_t, self.degree, self.scale)  # [..., t]
        if self.M is None:
            self.M = f.new_zeros(*f.shape, v_t.shape[-1])
            self.s = f.new_zeros(f.shape)
        self.M = self.M + f.unsqueeze(-1) * v_t.unsqueeze(-2)
        self.s = self.s + f
        self.n += 1

    def query(self, q_t: Tensor) -> Tensor:
        if self.M is None:
            raise ValueError("query() before any update(): the stream is empty")
        f = taylor_features(q_t, self.degree, self.scale)
        num = torch.einsum("...t,...te->...e", f, self.M)
        return num / torch.einsum("...t,...t->...", f, self.s).unsqueeze(-1)

    def memory_bytes(self) -> int:
        """Bytes held by the state (M and s); independent of the number of tokens seen."""
        return 0 if self.M is None else self.M.numel() * self.M.element_size() + self.s.numel() * self.s.element_size()


def sketch_attention(q: Tensor, k: Tensor, v: Tensor, degree: int = 2, causal: bool = False,
                     key_mask: Tensor | None = None, scale: float | None = None, chunk: int = 64) -> Tensor:
    """Full-sequence polynomial-feature attention: q [b,h,nq,d], k, v [b,h,nk,d] -> [b,h,nq,d].

    ``key_mask`` [b, nk] (True = real token) drops padded keys. Causal mode scans chunks of ``chunk`` tokens with
    the streaming state (bottom-right aligned), so extra memory is O(chunk * t + t * d_v), flat in n.
    """
    _check_degree(degree)
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    kf_scale = 1.0 if key_mask is None else key_mask[:, None, :, None].to(q.dtype)  # [b,1,nk,1]
    if not causal:
        M, s = 0.0, 0.0
        for j0 in range(0, nk, chunk):
            fk = taylor_features(k[:, :, j0:j0 + chunk], degree, scale)
            if key_mask is not None:
                fk = fk * kf_scale[:, :, j0:j0 + chunk]
            M = M + fk.transpose(-2, -1) @ v[:, :, j0:j0 + chunk]  # [b,h,t,dv]
            s = s + fk.sum(-2)  # [b,h,t]
        out = []
        for i0 in range(0, nq, chunk):
            fq = taylor_features(q[:, :, i0:i0 + chunk], degree, scale)
            out.append((fq @ M) / (fq @ s.unsqueeze(-1)))
        return torch.cat(out, 2)
    if nq > nk:
        raise ValueError(f"causal sketch attention needs n_q <= n_k, got {nq} > {nk}")
    off = nk - nq  # query i sees keys j <= i + off
    t = feature_dim(q.shape[-1], degree)
    M = q.new_zeros(b, h, t, v.shape[-1])
    s = q.new_zeros(b, h, t)
    outs = []
    # keys before the first query's window are pure state
    for j0 in range(0, off, chunk):
        j1 = min(off, j0 + chunk)
        fk = taylor_features(k[:, :, j0:j1], degree, scale)
        if key_mask is not None:
            fk = fk * kf_scale[:, :, j0:j1]
        M, s = M + fk.transpose(-2, -1) @ v[:, :, j0:j1], s + fk.sum(-2)
    for i0 in range(0, nq, chunk):
        i1 = min(nq, i0 + chunk)
        fq = taylor_features(q[:, :, i0:i1], degree, scale)  # [b,h,c,t]
        fk = taylor_features(k[:, :, off + i0:off + i1], degree, scale)
        if key_mask is not None:
            fk = fk * kf_scale[:, :, off + i0:off + i1]
        a = (fq @ fk.transpose(-2, -1)).tril()  # [b,h,c,c] intra-chunk causal kernel
        vc = v[:, :, off + i0:off + i1]
        num = a @ vc + fq @ M
        den = a.sum(-1) + (fq @ s.unsqueeze(-1)).squeeze(-1)  # [b,h,c]
        outs.append(num / den.unsqueeze(-1))
        M, s = M + fk.transpose(-2, -1) @ vc, s + fk.sum(-2)
    return torch.cat(outs, 2)


def sketch_state_bytes(d: int, d_v: int, degree: int, bytes_per: int = 4) -> int:
    """Bytes of one head's streaming state (M, s)."""
    t = feature_dim(d, degree)
    return (t * d_v + t) * bytes_per


__all__ = ["taylor_features", "feature_dim", "StreamingSketchAttention", "sketch_attention", "sketch_state_bytes"]
