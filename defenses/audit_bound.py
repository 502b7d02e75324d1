"""One-run epsilon lower bounds: Steinke, Nasr and Jagielski (NeurIPS 2023), and its f-DP refinement.

Setting: m canaries, each included independently with probability 1/2; after the run the
auditor guesses "in" or "out" for r of them (abstaining on the rest) and v guesses are
right. If the mechanism is (eps, delta)-DP with respect to each canary, their main theorem in
its (eps, delta) form with abstentions bounds the chance of v or more correct guesses by

    p(eps, delta) = P[Bin(r, q) >= v] + 2 m delta * max_{1<=i<=v} P[v - i <= Bin(r, q) < v] / i,
    q = e^eps / (1 + e^eps)

(the expression of their Appendix D). The lower bound at confidence 1 - beta is the largest eps
whose p-value is still below beta: observing v correct guesses would be less likely than beta
under any smaller eps. Written here from the paper's formula because jax_privacy's version
(``CanaryScoreAuditor.epsilon_one_run``) takes one-sided guesses only, and this one takes the paper's
"in" and "out" guesses; on one-sided guesses the two agree (``tests/defenses/test_audit.py``).

Choosing the number of guesses after seeing the scores is a multiple test: :func:`best_guess_bound`
tries a fixed grid of guess counts and splits beta over it (Bonferroni), so the reported bound keeps
its stated confidence.

:func:`gdp_guess_bound` is the f-DP one-run audit of Mahloujifar, Melis and Chaudhuri ("Auditing
f-Differential Privacy in One Run", ICML 2025), computed by Google DeepMind's ``jax_privacy.auditing``
(``CanaryScoreAuditor.epsilon_one_run_fdp``, its "audit_rh_with_cap" recursion). It tests a stronger
hypothesis than (eps, delta)-DP: that the run is as private as the *Gaussian* mechanism whose privacy
curve passes through (eps, delta). It reports the largest such eps the guesses reject. That is the
hypothesis the accountants' epsilon stands for when DP-SGD releases every step at sample rate 1 (a
composition of Gaussian mechanisms is exactly Gaussian), so there the two numbers are directly
comparable and the f-DP bound is much tighter. For a Poisson-subsampled run the curve is not Gaussian
and the f-DP number is an estimate under that hypothesis, not a bound on the run's (eps, delta).
jax_privacy supports one-sided guesses only ("in" for the k highest scores), so that is what it is given.

:func:`gaussian_fit_estimate` is the one-shot *estimate* in the style of Andrew et al. ("One-shot Empirical
Privacy Estimation for Federated Learning", ICLR 2024): a Gaussian fitted to the included and to the excluded
canaries' statistics, and the epsilon at delta of the Gaussian mechanism that separates them as much
(mu = |mean_in - mean_out| / pooled std). It has no confidence level and may land on either side of the truth;
it is reported beside the bounds, never as one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

GUESS_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # of m, guessed "in" and as many "out"


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v correct of r guesses] under (eps, delta)-DP (Steinke et al. 2023, the expression of App. D)."""
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(binom.sf(v - 1, r, q))
    if v == 0 or delta == 0:
        return min(1.0, tail)
    i = np.arange(1, v + 1)
    window = np.cumsum(binom.pmf(v - i, r, q))  # P[v - i <= Bin < v] for i = 1..v
    return min(1.0, tail + 2 * m * delta * float(np.max(window / i)))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """Largest eps with p_value(eps) < beta (0 when even eps = 0 explains the guesses)."""
    if not 0 < beta < 1:
        raise ValueError(f"beta (1 - confidence) must be in (0, 1), got {beta!r}")
    if r == 0 or p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return lo
    for _ in range(50):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def best_guess_bound(scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float = 0.95,
                     fractions: Sequence[float] = GUESS_FRACTIONS) -> dict[str, float]:
    """Guess "in" for the k highest scores and "out" for the k lowest, for each k of the grid; the best bound.

    Returns ``epsilon_lower``, ``canaries`` (m), ``guesses`` (r) and ``correct`` (v) of the best k, and
    ``confidence``. The grid is fixed in advance and the bound Bonferroni-corrected over it.
    """
    s = np.asarray(scores, dtype=float)
    b = np.asarray(included, dtype=bool)
    m = len(s)
    if m != len(b):
        raise ValueError(f"{m} scores for {len(b)} canaries")
    best = {"epsilon_lower": 0.0, "canaries": float(m), "guesses": 0.0, "correct": 0.0, "confidence": confidence}
    ks = sorted({max(1, int(f * m)) for f in fractions if 2 * max(1, int(f * m)) <= m})
    if m < 2 or not ks:
        return best
    order = np.argsort(-s, kind="stable")
    beta = (1 - confidence) / len(ks)
    for k in ks:
        v = int(b[order[:k]].sum() + (~b[order[m - k:]]).sum())
        eps = epsilon_lower_bound(m, 2 * k, v, delta, beta)
        if eps > best["epsilon_lower"]:
            best.update(epsilon_lower=eps, guesses=float(2 * k), correct=float(v))
    return best


def gdp_guess_bound(scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float = 0.95,
                    fractions: Sequence[float] = GUESS_FRACTIONS) -> dict[str, float]:
    """The f-DP (Gaussian trade-off) one-run bound: "in" for the k highest scores, k over the fixed grid.

    Returns ``epsilon_lower_gdp``, ``gdp_guesses`` and ``gdp_correct`` of the best k. The grid is the same as
    :func:`best_guess_bound`'s (k = fraction * m) and the bound is Bonferroni-corrected over it.
    """
    s = np.asarray(scores, dtype=float)
    b = np.asarray(included, dtype=bool)
    m = len(s)
    if m != len(b):
        raise ValueError(f"{m} scores for {len(b)} canaries")
    best = {"epsilon_lower_gdp": 0.0, "gdp_guesses": 0.0, "gdp_correct": 0.0}
    ks = sorted({max(1, int(f * m)) for f in fractions if max(1, int(f * m)) < m})
    if not ks or b.all() or not b.any():  # the auditor needs both included and excluded canaries
        return best
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the auditing module needs JAX importable, not a device
    from jax_privacy.auditing import CanaryScoreAuditor, Explicit

    auditor = CanaryScoreAuditor(s[b], s[~b])
    ranked = np.sort(s)[::-1]
    beta = (1 - confidence) / len(ks)
    for k in ks:
        threshold = float(ranked[k - 1])  # ties at the threshold are guessed "in" too
        guessed = s >= threshold
        guesses, correct = int(guessed.sum()), int(b[guessed].sum())
        eps = float(auditor.epsilon_one_run_fdp(beta, delta, threshold_strategy=Explicit(threshold)))
        if eps > best["epsilon_lower_gdp"]:
            best.update(epsilon_lower_gdp=eps, gdp_guesses=float(guesses), gdp_correct=float(correct))
    return best


def gaussian_fit_estimate(scores: Sequence[float], included: Sequence[bool], delta: float) -> dict[str, float]:
    """``epsilon_estimate`` (and its ``mu_estimate``) from Gaussians fitted to the in and out statistics."""
    from defenses.accounting import epsilon

    s = np.asarray(scores, dtype=float)
    b = np.asarray(included, dtype=bool)
    if len(s) != len(b):
        raise ValueError(f"{len(s)} scores for {len(b)} canaries")
    if b.sum() < 2 or (~b).sum() < 2:  # a variance needs two of each
        return {}
    pooled = math.sqrt((s[b].var(ddof=1) * (b.sum() - 1) + s[~b].var(ddof=1) * ((~b).sum() - 1)) / (len(s) - 2))
    gap = abs(float(s[b].mean() - s[~b].mean()))
    mu = gap / pooled if pooled > 0 else (math.inf if gap > 0 else 0.0)
    if mu == 0:
        return {"epsilon_estimate": 0.0, "mu_estimate": 0.0}
    eps = math.inf if not math.isfinite(mu) or mu > 50 else epsilon(1.0 / mu, 1.0, 1, delta, "pld")
    return {"epsilon_estimate": float(eps), "mu_estimate": float(mu)}
