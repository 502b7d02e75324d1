"""One experiment protocol for the seed results (issue 17): tune each arm alike, then measure it on fresh seeds.

For every arm (a method with its own hyper-parameters):

1. **tune** the learning rate over one log grid with the same budget per arm, on *tuning* runs (their own seeds,
   and where the metric is a held-out score, the validation split): :func:`tune` returns the grid's mean per value
   and the value chosen; the test split and the evaluation seeds are never seen;
2. **evaluate** the chosen value on >= 5 *evaluation* seeds (:func:`seeds`: independent streams, disjoint from the
   tuning seeds) and report mean, std and a 95 % t-interval (:func:`interval`);
3. **compare**: where a claim says "beats", a Welch test (independent arms, :func:`welch`) or a paired test (arms run
   on the same seeds, :func:`paired`) gives its p-value;
4. **budget**: :func:`plateau` says whether a training curve is flat over its last 20 %; a budget that does not
   reach a plateau is stated as the limit;
5. **record**: :func:`log_mlflow` logs the grid, the choice and every evaluation value to MLflow, and the caller
   commits the markdown table (:func:`markdown_row`) in ``experiments/results/``.

Library code (scipy's t distribution and tests); written here only because no library ties these steps together.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TUNING_ROOT = 1  # SeedSequence roots: tuning and evaluation seeds come from different roots (never shared)
EVALUATION_ROOT = 2


@dataclass
class Trial:
    """One run: ``value`` is the metric the arm is judged by (lower is better unless the caller says otherwise),
    ``curve`` its training curve (for :func:`plateau`), ``extra`` anything else worth reporting."""

    value: float
    curve: list[float] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)


def log_grid(lo: float, hi: float, points: int) -> list[float]:
    """``points`` values from ``lo`` to ``hi``, evenly spaced in log (rounded to 4 significant digits)."""
    if not (0 < lo < hi and points >= 2):
        raise ValueError(f"log_grid needs 0 < lo < hi and points >= 2, got {lo}, {hi}, {points}")
    return [float(f"{v:.4g}") for v in np.geomspace(lo, hi, points)]


def seeds(n: int, role: str = "evaluation") -> list[int]:
    """``n`` independent 31-bit seeds for ``role`` ('tuning' or 'evaluation'): spawned from one SeedSequence per
    role, so tuning and evaluation never share a seed and each seed's streams are independent of the others'."""
    root = {"tuning": TUNING_ROOT, "evaluation": EVALUATION_ROOT}.get(role)
    if root is None:
        raise ValueError(f"role must be 'tuning' or 'evaluation', got {role!r}")
    return [int(s.generate_state(1)[0] >> 1) for s in np.random.SeedSequence(root).spawn(n)]


def tune(run: Callable[[float, int], Trial], grid: Sequence[float], tuning_seeds: Sequence[int],
         maximize: bool = False) -> tuple[float, dict[float, float]]:
    """(the grid value with the best mean over ``tuning_seeds``, {value: mean}). ``run(value, seed)`` must score
    on validation data only; ties go to the smaller value."""
    table = {float(v): statistics.fmean(run(float(v), s).value for s in tuning_seeds) for v in grid}
    sign = -1.0 if maximize else 1.0
    best = min(table, key=lambda v: (sign * table[v], v))
    return best, table


def interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, std, low, high): the two-sided t-interval of the mean."""
    from scipy import stats

    vals = [float(v) for v in values]
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return mean, 0.0, -math.inf, math.inf
    sd = statistics.stdev(vals)
    half = float(stats.t.ppf(0.5 + confidence / 2, len(vals) - 1)) * sd / math.sqrt(len(vals))
    return mean, sd, mean - half, mean + half


def describe(values: Sequence[float], fmt: str = ".3g") -> str:
    """``mean ± std [low, high]`` (95 % t-interval) in ``fmt``: one table cell for a measured-over-seeds value."""
    mean, sd, lo, hi = interval(values)
    return f"{mean:{fmt}} ± {sd:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def welch(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Welch t-test p-value (independent samples, unequal variances); 1.0 when both are constant and equal."""
    from scipy import stats

    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def paired(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided paired t-test p-value (the same seeds on both arms)."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b, strict=True)]
    if statistics.pvariance(d) == 0:
        return 1.0 if statistics.fmean(d) == 0 else 0.0
    return float(stats.ttest_rel(a, b).pvalue)


def plateau(curve: Sequence[float], last: float = 0.2, rel_tol: float = 0.02) -> bool:
    """Whether ``curve`` is flat over its last ``last`` fraction: the mean of that window's second half differs
    from its first half's by at most ``rel_tol`` of their scale."""
    k = max(2, int(round(len(curve) * last)))
    if len(curve) < 4 or k > len(curve):
        return False
    window = [float(v) for v in curve[-k:]]
    first, second = statistics.fmean(window[: k // 2]), statistics.fmean(window[k // 2:])
    return abs(second - first) <= rel_tol * max(abs(first), abs(second), 1e-12)


@dataclass
class ArmResult:
    arm: str
    chosen: float
    grid: dict[float, float]
    values: list[float]
    extra: dict[str, list[float]] = field(default_factory=dict)
    plateaus: int | None = None  # evaluation runs whose curve reached a plateau (None: not checked)

    @property
    def summary(self) -> tuple[float, float, float, float]:
        return interval(self.values)

    @property
    def at_edge(self) -> bool:
        """The choice is the grid's smallest or largest value: the best may lie outside it (widen the grid)."""
        return self.chosen in (min(self.grid), max(self.grid))


def run_arm(arm: str, run: Callable[[float, int], Trial], grid: Sequence[float], n_tuning: int = 3,
            n_eval: int = 5, maximize: bool = False, evaluate: Callable[[float, int], Trial] | None = None,
            check_plateau: bool = True) -> ArmResult:
    """Steps 1-2 for one arm: tune on the tuning seeds (``run``, validation), then evaluate the chosen value on the
    evaluation seeds (``evaluate``, the test data; ``run`` when the metric has no held-out split).
    ``check_plateau=False`` where a run stops early by design (a steps-to-target metric)."""
    if n_eval < 5:
        raise ValueError(f"the protocol asks for >= 5 evaluation seeds, got {n_eval}")
    chosen, table = tune(run, grid, seeds(n_tuning, "tuning"), maximize)
    trials = [(evaluate or run)(chosen, s) for s in seeds(n_eval, "evaluation")]
    extra: dict[str, list[float]] = {}
    for t in trials:
        for k, v in t.extra.items():
            extra.setdefault(k, []).append(float(v))
    plateaus = sum(plateau(t.curve) for t in trials) if check_plateau else None
    return ArmResult(arm, chosen, table, [t.value for t in trials], extra, plateaus)


def markdown_row(r: ArmResult, digits: int = 1) -> str:
    """``| arm | chosen | mean ± std | [low, high] | extra means | plateaus |``"""
    mean, sd, lo, hi = r.summary
    extra = ", ".join(f"{k} {statistics.fmean(v):.3g}" for k, v in sorted(r.extra.items())) or "-"
    chosen = f"{r.chosen:g}" + (" (grid edge)" if r.at_edge else "")
    return (f"| {r.arm} | {chosen} | {mean:.{digits}f} ± {sd:.{digits}f} | [{lo:.{digits}f}, {hi:.{digits}f}] | "
            f"{extra} | {'n/a' if r.plateaus is None else f'{r.plateaus}/{len(r.values)}'} |")


def log_mlflow(experiment: str, results: Sequence[ArmResult], params: dict[str, Any], tracking_uri: str) -> str:
    """One MLflow run per experiment: the shared params, each arm's grid means, choice and evaluation values."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    run = client.create_run(exp_id, tags={"protocol": "experiments.protocol"})
    rid = run.info.run_id
    for k, v in params.items():
        client.log_param(rid, k, v)
    for r in results:
        arm = re.sub(r"[^\w\-. :/]", "_", r.arm)  # MLflow's key alphabet: "rdbd(adam)" -> "rdbd_adam_"
        client.log_param(rid, f"{arm}.chosen_lr", r.chosen)
        client.log_param(rid, f"{arm}.grid", ",".join(f"{v:g}" for v in r.grid))
        for i, (v, m) in enumerate(sorted(r.grid.items())):
            client.log_metric(rid, f"{arm}.tuning_mean", m, step=i)
        for i, v in enumerate(r.values):
            client.log_metric(rid, f"{arm}.eval_value", v, step=i)
        mean, sd, lo, hi = r.summary
        for k, v in (("mean", mean), ("std", sd), ("ci_low", lo), ("ci_high", hi)):
            client.log_metric(rid, f"{arm}.{k}", v)
    client.set_terminated(rid)
    return rid
