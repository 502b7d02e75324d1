"""One-pass streaming polynomial-feature attention (Addanki, Li, Song, Yang, arXiv 2311.14652).

Polynomial method [paper + Alman-Song]: U1 = phi(Q), U2 = phi(K) with phi(q)^T phi(k) ~ exp(scale <q, k>), then
T~ = D~^{-1} U1 (U2^T V), D~ = diag(U1 U2^T 1). Streaming [paper]: one pass, state independent of n.

This project's reconstruction [derived; the paper's three sketch matrices were not read]:
* phi is the degree-g Taylor map phi_g(x) = [(sqrt(scale) x)^{(x)j} / sqrt(j!)]_{j=0..g}, t = sum_j d^j features,
  so phi(q)^T phi(k) = sum_{j<=g} (scale <q,k>)^j / j!. An even g keeps this positive for every score, hence a
  positive normaliser (odd g can give 0/0 and is rejected).
* State after n tokens: M = sum_j phi(k_j) v_j^T [t, d_v] and s = sum_j phi(k_j) [t]; memory O(t d_v), flat in n.
  The causal output row is T_j = phi(q_j)^T M / phi(q_j)^T s.
* Sparse recovery (spec 4(a) step 3, causal variant): ``sketched_causal_attention`` / ``StreamingSketchAttention(
  countsketch=...)`` add each output row T_j to a CountSketch of the output columns (``countsketch.py``) and drop it,
  so a whole n x d_v output is held in O(rows * width * d_v) space; ``CountSketch.topk`` decodes a k-sparse y_i per
  column with ||T_i - y_i|| <= (1 + eps1) ||T_i - H_k(T_i)||. The non-causal variant is not built: its per-row
  normaliser phi(q_j)^T s needs the final s and is not a linear function of the stream (spec 4(a) step 4).
* ``scale`` defaults to 1/sqrt(d) (transformers' convention); the paper's analysis uses 1/d.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from models.attention.countsketch import CountSketch


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

    def __init__(self, degree: int = 2, scale: float | None = None, countsketch: CountSketch | None = None) -> None:
        _check_degree(degree)
        self.degree, self.scale, self.countsketch = degree, scale, countsketch
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

    def step(self, q_t: Tensor, k_t: Tensor, v_t: Tensor) -> Tensor:
        """One causal token: update with (k_t, v_t), return T_t = query(q_t); with a ``countsketch``, T_t is also
        added to it at index t (the token's position), so the caller may drop it."""
        self.update(k_t, v_t)
        out = self.query(q_t)
        if self.countsketch is not None:
            self.countsketch.update(self.n - 1, out)
        return out

    def memory_bytes(self) -> int:
        """Bytes held by the state (M and s, plus the CountSketch if any); independent of the number of tokens."""
        state = 0 if self.M is None else self.M.numel() * self.M.element_size() + self.s.numel() * self.s.element_size()
        return state + (0 if self.countsketch is None else self.countsketch.memory_bytes())


def sketch_attention(q: Tensor, k: Tensor, v: Tensor, degree: int = 2, causal: bool = False,
                     key_mask: Tensor | None = None, scale: float | None = None, chunk: int = 64) -> Tensor:
    """Full-sequence polynomial-feature attention: q [b,h,nq,d], k, v [b,h,nk,d] -> [b,h,nq,d].

    ``key_mask`` [b, nk] (True = real token) drops padded keys. Causal mode scans chunks of ``chunk`` tokens with
    the streaming state (bottom-right aligned), so extra memory is O(chunk * t + t * d_v), flat in n.
    """
    _check_degree(degree)
    if not causal:
        nq, nk = q.shape[2], k.shape[2]
        kf_scale = 1.0 if key_mask is None else key_mask[:, None, :, None].to(q.dtype)  # [b,1,nk,1]
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
    return torch.cat([out for _, out in _causal_chunks(q, k, v, degree, key_mask, scale, chunk)], 2)


def sketched_causal_attention(q: Tensor, k: Tensor, v: Tensor, countsketch: CountSketch, degree: int = 2,
                              key_mask: Tensor | None = None, scale: float | None = None,
                              chunk: int = 64) -> CountSketch:
    """One causal pass, q [b,h,nq,d], k, v [b,h,nk,d]: each output row T_j [b,h,d_v] is added to ``countsketch``
    (shape (b, h, d_v)) at index j and dropped, so memory is the (M, s) state, one chunk and the sketch, flat in n.
    Decode with ``countsketch.topk(nq, k)``: per (b, h, column), the k largest output entries over tokens."""
    _check_degree(degree)
    want = (q.shape[0], q.shape[1], v.shape[-1])
    if countsketch.shape != want:
        raise ValueError(f"countsketch shape {countsketch.shape} does not match the output columns {want}; "
                         f"build it as CountSketch(width, rows, shape={want})")
    for i0, out in _causal_chunks(q, k, v, degree, key_mask, scale, chunk):  # out [b,h,c,dv]
        countsketch.update(torch.arange(i0, i0 + out.shape[2]), out.permute(2, 0, 1, 3))
    return countsketch


def _causal_chunks(q: Tensor, k: Tensor, v: Tensor, degree: int, key_mask: Tensor | None, scale: float | None,
                   chunk: int) -> Iterator[tuple[int, Tensor]]:
    """Causal one-pass scan (bottom-right aligned): yields (i0, output rows i0..i0+c [b,h,c,d_v]) chunk by chunk,
    holding only the (M, s) state and one chunk; a caller that drops each chunk keeps memory flat in n."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    kf_scale = 1.0 if key_mask is None else key_mask[:, None, :, None].to(q.dtype)  # [b,1,nk,1]
    if nq > nk:
        raise ValueError(f"causal sketch attention needs n_q <= n_k, got {nq} > {nk}")
    off = nk - nq  # query i sees keys j <= i + off
    t = feature_dim(q.shape[-1], degree)
    M = q.new_zeros(b, h, t, v.shape[-1])
    s = q.new_zeros(b, h, t)
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
        yield i0, num / den.unsqueeze(-1)
        M, s = M + fk.transpose(-2, -1) @ vc, s + fk.sum(-2)


def sketch_state_bytes(d: int, d_v: int, degree: int, bytes_per: int = 4) -> int:
    """Bytes of one head's streaming state (M, s)."""
    t = feature_dim(d, degree)
    return (t * d_v + t) * bytes_per


__all__ = ["taylor_features", "feature_dim", "StreamingSketchAttention", "sketch_attention", "sketch_state_bytes",
           "sketched_causal_attention"]
