"""Central (server-side) DP: Flower's fixed-clipping wrapper, with the server-level epsilon accounted.

Flower's ``DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier,
clipping_norm, num_sampled_clients)`` clips each client's update to norm C, aggregates,
and adds N(0, (z C / m)^2) to the mean of the m sampled updates (DP-FedAvg, McMahan et al.
2018). This protects clients against whoever sees the *global model*, not against the
server itself: the server (and fedprobe's attack hook, which reads replies before
aggregation) sees clean per-client updates.

Accounting (project choice): client-level DP, one release per round, Poisson-subsampled
Gaussian with q = m / N (clients_per_round / num_clients) and noise multiplier z, composed
over rounds with :mod:`defenses.accounting`. Flower samples exactly m clients without
replacement; the Poisson RDP bound is the standard approximation used by DP-FedAvg.
``amplification = false`` accounts q = 1 (no amplification, what Flower's own accountant
supports). The guarantee needs uniform aggregation weights (FedAvg weighting by ``num-examples``
with unequal client sizes breaks the C/m sensitivity), so the wrapper sets every reply's weight
(the wrapped strategy's ``weighted_by_key``, whatever the clients send) to 1 before aggregating:
any FedAvg-like strategy works, and clients need no fedprobe-only key. The metric
``central_dp_uniform_weights`` says whether the clients' own weights were already equal.
The noise is drawn from a private stream (:func:`defenses.randomness.private_numpy_global`),
not from numpy's publicly seeded global RNG, so whoever knows the config cannot replay it.
"""

from __future__ import annotations

import math
from typing import Any

from defenses.accounting import ACCOUNTANTS, check_delta, epsilon
from defenses.base import DEFENSES, Defense
from defenses.randomness import private_numpy_global


def _federation(config: Any) -> tuple[int, int]:
    fed = config["federation"] if isinstance(config, dict) else config.federation
    get = (lambda k: fed.get(k, 0)) if isinstance(fed, dict) else (lambda k: getattr(fed, k))
    n = int(get("num_clients"))
    return n, int(get("clients_per_round") or n)


def _make_wrapper(strategy: Any, noise_multiplier: float, clipping_norm: float, m: int) -> Any:
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    class _Checked(DifferentialPrivacyServerSideFixedClipping):
        """Flower's wrapper, recording whether the aggregation weights were uniform; audit canaries join the sum."""

        uniform_weights = True
        defense: Any = None  # the CentralDP that made this wrapper (its epsilon: defense.server_metrics)
        canaries: Any = None  # an audit with server_canaries (defenses.canaries.CanaryClients)
        _round = 0

        def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
            if self.canaries is not None:  # canary clients' (norm-C) updates, at the fixed denominator m, before noise
                import torch

                keys = list(aggregated_arrays.keys())
                mean = dict(zip(keys, aggregated_arrays.to_numpy_ndarrays()))
                current = dict(zip(self.current_arrays.keys(), self.current_arrays.to_numpy_ndarrays()))
                extra = self.canaries.server_canaries(self._round, {k: torch.from_numpy(np.asarray(current[k]))
                                                                    for k in keys})
                for upd in extra:
                    for k in keys:
                        mean[k] = mean[k] + upd[k].numpy().astype(mean[k].dtype) / self.num_sampled_clients
                aggregated_arrays = ArrayRecord({k: Array(np.asarray(mean[k])) for k in keys})
            return super()._add_noise_to_aggregated_arrays(aggregated_arrays)

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            key = getattr(self.strategy, "weighted_by_key", "num-examples")
            weights = []
            for r in replies:
                if not r.has_error():
                    for rec in r.content.metric_records.values():
                        if key in rec:
                            weights.append(float(rec[key]))
                            rec[key] = 1.0  # uniform aggregation: the C/m sensitivity holds whatever the sizes
            self.uniform_weights = len(set(weights)) <= 1
            self._round = server_round
            # Flower draws the noise from numpy's global RNG, which fedprobe seeds publicly: draw it privately
            with private_numpy_global("central_dp", server_round):
                return super().aggregate_train(server_round, replies)

    return _Checked(strategy, noise_multiplier, clipping_norm, m)


@DEFENSES.register("central_dp")
class CentralDP(Defense):
    """Server-side central DP (Flower fixed clipping), client-level epsilon under client sampling."""

    def __init__(self, noise_multiplier: float = 1.0, clipping_norm: float = 1.0, delta: float = 1e-5,
                 accountant: str = "rdp", amplification: bool = True) -> None:
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"central_dp noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if not 0 < clipping_norm < math.inf:
            raise ValueError(f"central_dp clipping_norm must be a finite number > 0, got {clipping_norm!r}")
        check_delta(delta)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"central_dp accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.clipping_norm = float(clipping_norm)
        self.delta = delta
        self.accountant = accountant
        self.amplification = amplification
        self.wrapper: Any = None
        self.num_clients = self.num_sampled = 0

    @property
    def sample_rate(self) -> float:
        return self.num_sampled / self.num_clients if self.amplification else 1.0

    def wrap_strategy(self, strategy: Any, config: Any) -> Any:
        self.num_clients, self.num_sampled = _federation(config)
        self.wrapper = _make_wrapper(strategy, self.noise_multiplier, self.clipping_norm, self.num_sampled)
        self.wrapper.defense = self
        return self.wrapper

    def attach_canaries(self, audit: Any) -> None:
        """A client-level audit's canary clients join every aggregation (before the noise)."""
        if self.wrapper is None:
            raise RuntimeError("central_dp: attach_canaries after wrap_strategy")
        self.wrapper.canaries = audit

    def server_metrics(self, server_round: int) -> dict[str, float]:
        """epsilon after ``server_round`` releases (one per completed round; resume-safe)."""
        if not self.num_clients:
            return {}
        eps = epsilon(self.noise_multiplier, self.sample_rate, int(server_round), self.delta, self.accountant)
        return {
            "central_epsilon": eps,
            "central_delta": float(self.delta),
            "central_noise_std": self.noise_multiplier * self.clipping_norm / self.num_sampled,
            "central_sample_rate": self.sample_rate,
            "central_dp_uniform_weights": float(getattr(self.wrapper, "uniform_weights", True)),
        }
