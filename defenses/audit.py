"""The audit plugin contract: an empirical epsilon lower bound beside the accountant's upper bound.

An audit has three parts, kept apart as attacks and their ground truth are:

* **client side** (:meth:`Audit.client_setup`, inside the canary clients' training round):
  plants canaries, decides from the client's private randomness which are included;
  client-level audits instead add whole canary *clients* to the aggregation
  (:meth:`Audit.server_canaries`, called by the central-DP defense before its noise) or release
  canary clients' updates through the clients' own defense (``update_canaries``, for update noise);
* **server side** (:meth:`Audit.observe`, :meth:`Audit.observe_global`, :meth:`Audit.scores`): a
  test statistic per canary from what the adversary sees (the canary clients' updates for
  record-level DP, the global models for central DP); it gets nothing else;
* **out of band** (:meth:`Audit.included`, :meth:`Audit.result`): the auditor who planted the
  canaries knows which were included (it holds the clients' secret, see
  :mod:`defenses.randomness`) and turns the server's guesses into the one-run lower bounds
  (:mod:`defenses.audit_bound`). The inclusion bits are never in a Flower message.

``[audit]`` in the config names a registered audit (``fedprobe list``), its ``params``, the
partitions that carry canaries (``clients``) and the ``confidence`` of the bound. The run logs
``audit_epsilon_lower`` beside ``epsilon`` every round (the bound over every round so far) and at
the end, with ``audit_canaries``, ``audit_guesses`` and ``audit_correct``, and the f-DP bound
``audit_epsilon_lower_gdp`` with ``audit_gdp_guesses`` and ``audit_gdp_correct``, and the Gaussian-fit
estimate ``audit_epsilon_estimate`` (Andrew et al.'s kind: no confidence, not a bound).
"""

from __future__ import annotations

from typing import Any

import torch

from defenses.base import ClientContext
from fl.registry import Registry

AUDITS: Registry[type["Audit"]] = Registry("audit", entry_point_group="fedprobe.audits", base="defenses.audit:Audit")


class Audit:
    """Base class: every hook is a no-op; an audit overrides what it needs."""

    def __init__(self, **params: Any) -> None:
        if params:
            raise TypeError(f"unexpected parameters {sorted(params)}")

    def bind(self, *, seed: int, clients: list[int], delta: float, confidence: float, defenses: list[Any],
             federation: dict[str, Any] | None = None) -> None:
        """Public facts of the run (experiment seed, canary partitions, the defenses' delta, the federation's
        sizes); called on both sides."""
        self.seed, self.clients, self.delta, self.confidence = seed, list(clients), float(delta), float(confidence)
        self.defenses = defenses
        self.federation = dict(federation or {})

    # client side ---------------------------------------------------------------------
    def client_setup(self, ctx: ClientContext) -> None:
        """After the defenses' setup, in a canary client: plant this round's canaries."""

    # server side ---------------------------------------------------------------------
    def observe(self, server_round: int, partition_id: int, sent: dict[str, torch.Tensor],
                received: dict[str, torch.Tensor]) -> None:
        """One canary client's reply as the server saw it (global model sent, model received)."""

    def server_canaries(self, server_round: int, global_state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Client-level audits: this round's canary-client updates, aggregated beside the real ones (central DP)."""
        return []

    def observe_global(self, server_round: int, before: dict[str, torch.Tensor],
                       after: dict[str, torch.Tensor]) -> None:
        """The new global model (client-level audits score what an observer of the global model sees)."""

    def scores(self) -> dict[int, Any]:
        """partition -> per-canary test statistic (higher: more likely included)."""
        return {}

    def checkpoint_state(self) -> dict[str, Any]:
        """What the server side must keep across a kill (checkpointed with the round)."""
        return {}

    def restore(self, saved: dict[str, Any]) -> None:
        """Back from :meth:`checkpoint_state` on ``--resume``."""

    # out of band ---------------------------------------------------------------------
    def included(self, partition_id: int) -> Any:
        """Which of the partition's canaries were included (the auditor's ground truth)."""
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        """The lower bounds from every canary scored so far: Steinke et al.'s (``epsilon_lower``, ``canaries``,
        ``guesses``, ``correct``), the f-DP one under the Gaussian hypothesis (``epsilon_lower_gdp``, ...), and the
        Gaussian-fit estimate (``epsilon_estimate``, not a bound)."""
        from defenses.audit_bound import best_guess_bound, gaussian_fit_estimate, gdp_guess_bound
        import numpy as np

        scores = self.scores()
        if not scores:
            return {}
        s = np.concatenate([np.asarray(scores[p], dtype=float) for p in sorted(scores)])
        b = np.concatenate([np.asarray(self.included(p), dtype=bool) for p in sorted(scores)])
        return {**best_guess_bound(s, b, self.delta, self.confidence), **gdp_guess_bound(s, b, self.delta, self.confidence),
                **gaussian_fit_estimate(s, b, self.delta)}
