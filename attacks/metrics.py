"""Reconstruction scores: PSNR, SSIM, token accuracy, ROUGE-1/2/L, label accuracy.

Batch reconstructions come back in an arbitrary order (the gradient of a sum is
permutation invariant), so the batch scores first match reconstructions to originals
by the best assignment (``scipy.optimize.linear_sum_assignment``).

Hand-written on purpose: the venv has neither scikit-image nor torchmetrics, and
``evaluate``/``rouge_score`` are not installed (breaching's ``datasets.load_metric``
path is gone in datasets >= 3). SSIM follows Wang et al. 2004 with a Gaussian window
(sigma 1.5, K1 0.01, K2 0.03, valid convolution, as skimage's ``gaussian_weights=True``);
the window shrinks to the image size for 8x8 digits.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """10 log10(range^2 / MSE) over all elements (inf when equal)."""
    mse = float(F.mse_loss(x.double(), y.double()))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(data_range**2 / mse))


def _gauss_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()  # [C, 1, k, k]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of images [B, C, H, W] (or [C, H, W]), per channel, Gaussian window."""
    x, y = x.double(), y.double()
    if x.dim() == 3:
        x, y = x[None], y[None]
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two images of equal shape [B, C, H, W], got {tuple(x.shape)} and {tuple(y.shape)}")
    k = min(win_size, x.shape[-1], x.shape[-2])
    k -= 1 - k % 2  # odd
    w = _gauss_window(k, sigma, x.shape[1])
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    conv = lambda t: F.conv2d(t, w, groups=x.shape[1])  # noqa: E731
    mx, my = conv(x), conv(y)
    vx, vy, cxy = conv(x * x) - mx**2, conv(y * y) - my**2, conv(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def match_images(rec: torch.Tensor, orig: torch.Tensor) -> list[int]:
    """perm such that rec[perm[i]] is matched to orig[i] (min total MSE); with unequal counts
    only min(B_rec, B_orig) originals (those best matched) are paired, in their order."""
    cost = ((orig[:, None].double() - rec[None].double()) ** 2).flatten(2).mean(-1)  # [B_orig, B_rec]
    rows, cols = linear_sum_assignment(cost.numpy())
    return [int(c) for _, c in sorted(zip(rows, cols))]


def image_scores(rec: torch.Tensor, orig: torch.Tensor, data_range: float = 1.0) -> dict[str, float]:
    """PSNR/SSIM per matched pair, averaged (images de-normalised to [0, data_range])."""
    if rec.shape[1:] != orig.shape[1:]:
        raise ValueError(f"reconstruction {tuple(rec.shape)} and original {tuple(orig.shape)} image shapes differ")
    cost = ((orig[:, None].double() - rec[None].double()) ** 2).flatten(2).mean(-1)
    rows, cols = linear_sum_assignment(cost.numpy())
    rec, orig = rec[list(cols)], orig[list(rows)]
    ps = [psnr(rec[i], orig[i], data_range) for i in range(len(orig))]
    ss = [ssim(rec[i : i + 1], orig[i : i + 1], data_range) for i in range(len(orig))]
    return {"psnr": float(np.mean(ps)), "psnr_max": float(np.max(ps)), "ssim": float(np.mean(ss))}


def token_accuracy(rec: Sequence[int], orig: Sequence[int]) -> float:
    """Fraction of positions where the recovered token equals the original."""
    if not orig:
        return 0.0
    return sum(int(a == b) for a, b in zip(rec, orig)) / len(orig)


def _ngrams(t: Sequence[int], n: int) -> Counter:
    return Counter(tuple(t[i : i + n]) for i in range(len(t) - n + 1))


def _f1(overlap: float, n_rec: int, n_ref: int) -> float:
    if overlap == 0 or n_rec == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_rec, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge_n(rec: Sequence, ref: Sequence, n: int) -> float:
    """ROUGE-N F1 with clipped n-gram counts."""
    a, b = _ngrams(rec, n), _ngrams(ref, n)
    return _f1(sum((a & b).values()), sum(a.values()), sum(b.values()))


def _lcs(a: Sequence, b: Sequence) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(rec: Sequence, ref: Sequence) -> float:
    """ROUGE-L F1 from the longest common subsequence."""
    return _f1(_lcs(rec, ref), len(rec), len(ref))


def _strip(ids: torch.Tensor, mask: torch.Tensor | None) -> list[int]:
    return [int(t) for t, m in zip(ids.tolist(), (mask.tolist() if mask is not None else [1] * len(ids))) if m]


def text_scores(rec: torch.Tensor, orig: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Token accuracy and ROUGE-1/2/L over a batch of token ids [B, L] (mask: 1 = scored)."""
    if rec.shape[1:] != orig.shape[1:]:
        raise ValueError(f"recovered tokens {tuple(rec.shape)} and original {tuple(orig.shape)} shapes differ")
    masks = [None if mask is None else mask[i] for i in range(len(orig))]
    refs = [_strip(orig[i], masks[i]) for i in range(len(orig))]
    # sentences may come back permuted: match by best token accuracy (Hungarian, maximise);
    # a recovered sentence is read under the mask of the original it is compared to
    acc = np.array([[token_accuracy(_strip(rec[j], masks[i]), refs[i]) for j in range(len(rec))] for i in range(len(orig))])
    rows, cols = linear_sum_assignment(-acc)
    pairs = [(_strip(rec[c], masks[r]), refs[r]) for r, c in zip(rows, cols)]
    n_tok = sum(len(o) for _, o in pairs)
    return {
        "token_accuracy": sum(token_accuracy(r, o) * len(o) for r, o in pairs) / max(n_tok, 1),
        "rouge1": float(np.mean([rouge_n(r, o, 1) for r, o in pairs])),
        "rouge2": float(np.mean([rouge_n(r, o, 2) for r, o in pairs])),
        "rougeL": float(np.mean([rouge_l(r, o) for r, o in pairs])),
    }


def label_accuracy(rec: torch.Tensor, orig: torch.Tensor) -> float:
    """Multiset overlap of recovered and true labels / batch size (order-free, like iDLG)."""
    a, b = Counter(rec.reshape(-1).tolist()), Counter(orig.reshape(-1).tolist())
    return sum((a & b).values()) / max(sum(b.values()), 1)
