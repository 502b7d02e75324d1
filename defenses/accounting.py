"""Privacy accounting: the one place where fedprobe turns noise into epsilon.

Every epsilon the project reports comes from :func:`epsilon` or :class:`PrivacyLedger`,
thin layers over two accountant families: Opacus's (``rdp``: Rényi DP of the
Poisson-subsampled Gaussian mechanism, Mironov et al. 2019; ``prv``: numerical composition
of privacy-loss random variables, Gopi et al. 2021) and Google's ``dp-accounting``
(``pld``: privacy-loss distributions, Koskela et al. / Doroshenko et al. 2022, the
tightest of the three). Nothing here re-derives the analysis; it validates inputs, keeps
a JSON-serialisable history and asks the library. ``tests/defenses/test_accounting.py``
cross-checks the families on the same histories.

A history entry (z, q, t) is t Poisson-subsampled Gaussian releases at rate q (q = 1: no
subsampling). :func:`sampler_release` says which (q, t) a DP-SGD round must be accounted
at for the sampler it actually used.

A :class:`PrivacyLedger` is the per-client (or per-server) accountant state. It stores
``history = [(noise_multiplier, sample_rate, steps), ...]`` exactly as Opacus's
``IAccountant.history`` does, so the epsilon after round r composes every earlier round:
``ledger.record(z, q, steps)`` once per round, ``ledger.epsilon(delta)`` any time,
``ledger.to_dict()`` into ``ctx.state`` and ``PrivacyLedger.from_dict`` next round.

Client sampling (project choice, documented in ``defenses/README`` of the report):
a client-side ledger composes only the rounds the client actually trained, at its local
sampling rate q = batch/n. The server chooses who trains, so sampling clients gives no
amplification against the server (the threat model of the attacks); a client that is
not sampled spends nothing. This is exact conditional on the public participation
pattern, and conservative for any observer who does not know it. Server-level (central)
DP does use amplification by client sampling, q = clients_per_round / num_clients, see
``defenses/central_dp.py``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable


ACCOUNTANTS = ("rdp", "prv", "pld")


def _check(noise_multiplier: float, sample_rate: float, steps: int, accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1] (batch_size / num_examples), got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")


def check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), e.g. 1e-5 (below 1/num_examples), got {delta!r}")


def check_epsilon(target_epsilon: float) -> None:
    if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")


def epsilon_of_history(history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """epsilon(delta) of the composition of every (noise_multiplier, sample_rate, steps) in ``history``.

    Returns 0.0 for an empty history and ``inf`` when any entry has noise 0 and steps > 0
    (no noise, no guarantee).
    """
    check_delta(delta)
    hist = []
    for z, q, t in history:
        _check(float(z), float(q), int(t), accountant)
        if t == 0:
            continue
        if z == 0:
            return math.inf
        hist.append((float(z), float(q), int(t)))
    if not hist:
        return 0.0
    if accountant == "pld":
        return _pld_epsilon(hist, delta)
    if accountant == "rdp":
        return _rdp_epsilon(hist, delta)
    from opacus.accountants import create_accountant  # lazy: importing opacus takes seconds

    acc = create_accountant(mechanism=accountant)
    acc.history = hist
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(q: float, z: float) -> Any:
    """Opacus's RDP curve of one sampled Gaussian step at its default orders (computed once per (q, z))."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as privacy_analysis

    curve = privacy_analysis.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.setflags(write=False)
    return curve


def _rdp_epsilon(hist: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus's ``RDPAccountant.get_epsilon`` on ``hist``, bit for bit, without recomputing each entry's curve:
    compute_rdp(q, z, t) is the one-step curve times t, so the curve is cached per (q, z) and scaled (issue 19:
    recomputing it was 27.6 % of a DP round's CPU)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as privacy_analysis

    rdp = sum([_rdp_per_step(q, z) * t for z, q, t in hist])
    with warnings.catch_warnings():
        # "Optimal order is the smallest alpha": at eps in the hundreds the best order is Opacus's smallest (1.1),
        # so a finer grid near 1 could tighten the bound a little. The figure stays Opacus's own upper bound; the
        # warning, printed once per client per round from every Ray worker, said nothing a user can act on
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        eps, _ = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def _pld_epsilon(hist: list[tuple[float, float, int]], delta: float) -> float:
    """Google dp-accounting's PLD accountant on the composition of ``hist``."""
    import dp_accounting  # lazy: pulls in absl and scipy

    # The privacy-loss grid grows as 1/z^2: at z = 0.01 the library's default step (1e-4) needs tens of GB.
    # A step growing as (0.5/z)^2 keeps the grid size bounded; the PLD stays an upper bound (pessimistic
    # discretisation), looser by at most about the step per composition.
    z_min = min(z for z, _, _ in hist)
    interval = 1e-4 * max(1.0, (0.5 / z_min) ** 2)
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
    for z, q, t in hist:
        event: Any = dp_accounting.GaussianDpEvent(z)
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        acc.compose(event, t)
    return float(acc.get_epsilon(delta))


def sampler_release(poisson: bool, steps: int, batches_per_epoch: int) -> tuple[float, int]:
    """(sample rate, releases) to account for ``steps`` DP-SGD steps over a loader of ``batches_per_epoch``.

    * Poisson sampling (Opacus's ``DPDataLoader``, rate q = 1 / batches_per_epoch, drawn from
      the client's private randomness): ``steps`` subsampled releases at q, amplification applies.
    * Fixed-size shuffled batches: no amplification is claimed (the shuffle would have to be
      secret and its analysis is not Opacus's). Each record is in exactly one batch per pass
      over the data and the other steps do not touch it, so a pass costs one Gaussian
      release at q = 1 (add/remove adjacency, sensitivity C, as Opacus); ``steps`` steps are
      ceil(steps / batches_per_epoch) passes (a partial pass may hold the record).
    """
    if batches_per_epoch < 1:
        raise ValueError(f"a DP-SGD loader needs at least one batch, got {batches_per_epoch}")
    if poisson:
        return 1.0 / batches_per_epoch, int(steps)
    return 1.0, int(math.ceil(steps / batches_per_epoch))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """epsilon after ``steps`` Poisson-subsampled Gaussian steps (Opacus accountant ``accountant``).

    ``noise_multiplier`` is sigma / sensitivity (Opacus convention: noise std = sigma * C),
    ``sample_rate`` q is the per-step inclusion probability of one record.
    """
    _check(noise_multiplier, sample_rate, steps, accountant)
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """Smallest noise multiplier (Opacus's binary search, tolerance 0.01) reaching ``target_epsilon`` after ``steps``."""
    check_epsilon(target_epsilon)
    check_delta(delta)
    _check(0.0, sample_rate, steps, accountant)
    if steps == 0:
        return 0.0
    if accountant == "pld":
        return _bisect_noise(target_epsilon, delta, sample_rate, steps, accountant)
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))
    except ValueError as exc:  # "The privacy budget is too low."
        raise ValueError(f"target_epsilon={target_epsilon} is unreachable with delta={delta}, q={sample_rate}, "
                         f"steps={steps} ({exc}); raise target_epsilon or lower the number of steps") from None


def _bisect_noise(target_epsilon: float, delta: float, q: float, steps: int, accountant: str,
                  tolerance: float = 0.01) -> float:
    """Opacus's search (double the noise until epsilon <= target, then bisect to ``tolerance``) for any accountant."""
    lo, hi = 0.0, 10.0
    while epsilon_of_history([(hi, q, steps)], delta, accountant) > target_epsilon:
        hi *= 2
        if hi > 2**12:
            raise ValueError(f"target_epsilon={target_epsilon} is unreachable with delta={delta}, q={q}, "
                             f"steps={steps}; raise target_epsilon or lower the number of steps")
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if mid > 0 and epsilon_of_history([(mid, q, steps)], delta, accountant) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass
class PrivacyLedger:
    """Composable, JSON-serialisable accountant state: one entry per recorded release."""

    accountant: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
        self.history = [(float(z), float(q), int(t)) for z, q, t in self.history]

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add ``steps`` releases at (noise_multiplier, sample_rate); merges with the last entry when equal."""
        _check(noise_multiplier, sample_rate, steps, self.accountant)
        if steps == 0:
            return
        z, q = float(noise_multiplier), float(sample_rate)
        if self.history and self.history[-1][:2] == (z, q):
            self.history[-1] = (z, q, self.history[-1][2] + steps)
        else:
            self.history.append((z, q, steps))

    @property
    def steps(self) -> int:
        return sum(t for _, _, t in self.history)

    def epsilon(self, delta: float) -> float:
        return epsilon_of_history(self.history, delta, self.accountant)

    def to_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant, "history": [list(h) for h in self.history]}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, accountant: str = "rdp") -> "PrivacyLedger":
        """Restore from :meth:`to_dict` (or start empty when ``d`` is None)."""
        if not d:
            return cls(accountant=accountant)
        if d.get("accountant", accountant) != accountant:
            raise ValueError(f"stored privacy ledger uses accountant {d.get('accountant')!r}, not {accountant!r}; "
                             "keep one accountant for the whole run")
        return cls(accountant=accountant, history=[tuple(h) for h in d.get("history", [])])
