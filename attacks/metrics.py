"""Reconstruction scores: PSNR, SSIM, recovered fraction, token accuracy, ROUGE-1/2/L, labels.

Batch reconstructions come back in an arbitrary order (the gradient of a sum is
permutation invariant), so the batch scores first match reconstructions to originals
by the best assignment (``scipy.optimize.linear_sum_assignment``).

Images: PSNR and SSIM per example from ``torchmetrics`` (its standard SSIM: Gaussian
window 11, sigma 1.5, K1 0.01, K2 0.03). PSNR above :data:`EXACT_PSNR` (80 dB) means
"exact": its value is float noise (breaching's notebooks call 80-180 dB "meaninglessly
good"), so per-example PSNR is capped there before averaging, and what separates attacks
is ``recovered_fraction``: the share of the batch's examples whose matched reconstruction
reaches ``recovered_psnr`` (30 dB by default, config ``attack.recovered_psnr``).

Labels: ``label_accuracy`` is the multiset overlap; ``label_baseline`` is what the best
data-free guess from the label prior scores on the same batch (:func:`prior_guess`), so
label leakage is read against a guess that needs no update at all.

Text scores are hand-written: ``evaluate``/``rouge_score`` are not dependencies and
breaching's ``datasets.load_metric`` path is gone in datasets >= 3.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.stats import binom

EXACT_PSNR = 80.0  # dB: at or above this a reconstruction is exact up to float noise
RECOVERED_PSNR = 30.0  # dB: default per-example threshold of recovered_fraction


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """10 log10(range^2 / MSE) over all elements (inf when equal)."""
    mse = float(F.mse_loss(x.double(), y.double()))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(data_range**2 / mse))


def per_example_psnr(rec: torch.Tensor, orig: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR of each pair [B] (torchmetrics), inf where a pair is identical."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    rec, orig = rec.double(), orig.double()
    out = peak_signal_noise_ratio(rec, orig, data_range=data_range, reduction="none", dim=tuple(range(1, rec.dim())))
    same = ((rec - orig) ** 2).flatten(1).sum(-1) == 0
    return torch.where(same, torch.full_like(out, float("inf")), out)


def per_example_ssim(rec: torch.Tensor, orig: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """torchmetrics' standard SSIM of each pair of images [B, C, H, W] -> [B]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if rec.shape != orig.shape or rec.dim() != 4:
        raise ValueError(f"ssim needs two image batches of equal shape [B, C, H, W], got {tuple(rec.shape)} "
                         f"and {tuple(orig.shape)}")
    return structural_similarity_index_measure(rec.double(), orig.double(), data_range=data_range, reduction="none")


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM (torchmetrics' definition) of images [B, C, H, W] or [C, H, W]."""
    if x.dim() == 3:
        x, y = x[None], y[None]
    return float(per_example_ssim(x, y, data_range).mean())


def _assignment(rec: torch.Tensor, orig: torch.Tensor) -> tuple[list[int], list[int]]:
    """(rows into orig, cols into rec) of the matching with the largest total capped PSNR.

    Summing capped PSNR (log MSE), not MSE, keeps an exact pair together: with MSE two
    mediocre pairs can outbid one exact pair plus one bad pair."""
    mse = ((orig[:, None].double() - rec[None].double()) ** 2).flatten(2).mean(-1)  # [B_orig, B_rec]
    cost = torch.log10(mse.clamp_min(10 ** (-EXACT_PSNR / 10)))  # = -PSNR / 10 for data range 1, capped
    rows, cols = linear_sum_assignment(cost.numpy())
    return [int(r) for r in rows], [int(c) for c in cols]


def match_images(rec: torch.Tensor, orig: torch.Tensor) -> list[int]:
    """perm such that rec[perm[i]] is matched to orig[i] (largest total capped PSNR); with unequal counts
    only min(B_rec, B_orig) originals (those best matched) are paired, in their order."""
    rows, cols = _assignment(rec, orig)
    return [c for _, c in sorted(zip(rows, cols))]


def image_scores(rec: torch.Tensor, orig: torch.Tensor, data_range: float = 1.0,
                 recovered_psnr: float = RECOVERED_PSNR) -> dict[str, float]:
    """Per-example PSNR (capped at 80 dB) and SSIM after matching, and the recovered fraction.

    ``psnr`` is the mean and ``psnr_median`` the median of the capped per-example PSNR;
    ``recovered_fraction`` counts originals whose match reaches ``recovered_psnr`` over all
    originals (an unmatched original counts as not recovered); ``exact_fraction`` uses 80 dB.
    """
    if rec.shape[1:] != orig.shape[1:]:
        raise ValueError(f"reconstruction {tuple(rec.shape)} and original {tuple(orig.shape)} image shapes differ")
    rows, cols = _assignment(rec, orig)
    r, o = rec[cols], orig[rows]
    ps = per_example_psnr(r, o, data_range).clamp(max=EXACT_PSNR)
    ss = per_example_ssim(r, o, data_range)
    n = orig.shape[0]
    return {
        "psnr": float(ps.mean()), "psnr_median": float(ps.median()), "psnr_max": float(ps.max()),
        "ssim": float(ss.mean()),
        "recovered_fraction": float((ps >= recovered_psnr).sum()) / n,
        "exact_fraction": float((ps >= EXACT_PSNR).sum()) / n,
    }


def format_psnr(value: float) -> str:
    """A PSNR for people: '>= 80 dB (exact)' at or above the cap, else 'x.x dB'."""
    if not np.isfinite(value) or value >= EXACT_PSNR:
        return f">= {EXACT_PSNR:.0f} dB (exact)" if value == value else "nan"
    return f"{value:.1f} dB"


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
        "exact_sentences": float(np.mean([token_accuracy(r, o) == 1.0 for r, o in pairs])),
        "rouge1": float(np.mean([rouge_n(r, o, 1) for r, o in pairs])),
        "rouge2": float(np.mean([rouge_n(r, o, 2) for r, o in pairs])),
        "rougeL": float(np.mean([rouge_l(r, o) for r, o in pairs])),
    }


def label_accuracy(rec: torch.Tensor, orig: torch.Tensor) -> float:
    """Multiset overlap of recovered and true labels / batch size (order-free, like iDLG)."""
    a, b = Counter(rec.reshape(-1).tolist()), Counter(orig.reshape(-1).tolist())
    return sum((a & b).values()) / max(sum(b.values()), 1)


def prior_guess(prior: Sequence[float], n: int) -> torch.Tensor:
    """The n-label multiset that maximises the expected :func:`label_accuracy` when the batch's
    labels are n independent draws from ``prior`` (no data needed).

    The expected overlap is sum_c E[min(k_c, N_c)] with N_c ~ Binomial(n, p_c); adding the
    (k+1)-th copy of class c gains P(N_c >= k+1), which falls with k, so taking the largest
    gain n times (greedy) is optimal.
    """
    p = np.asarray(prior, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or not np.all(p >= 0) or p.sum() <= 0:
        raise ValueError(f"label prior must be a non-empty vector of non-negative weights, got {prior!r}")
    p = p / p.sum()
    counts = np.zeros(p.size, dtype=np.int64)
    for _ in range(n):
        gain = binom.sf(counts, n, p)  # P(N_c >= counts_c + 1)
        counts[int(np.argmax(gain))] += 1
    return torch.repeat_interleave(torch.arange(p.size), torch.from_numpy(counts))


def label_baseline(orig: torch.Tensor, prior: Sequence[float]) -> float:
    """What the data-free :func:`prior_guess` scores on this batch (compare with label_accuracy)."""
    return label_accuracy(prior_guess(prior, int(orig.numel())), orig)
