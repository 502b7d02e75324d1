"""Canaries for the two DP guarantees fedprobe accounts: records under DP-SGD, clients under central DP.

``gradient_canaries`` (record-level): a white-box audit of client-side DP-SGD by the server that sees every update.

Nasr et al. (USENIX 2023) audit DP-SGD tightly with canaries that exist only as gradients: a
canary is a record whose clipped gradient is C * e_j, all of its norm on one coordinate j of
the model. fedprobe's server is exactly their adversary (it sees each client's update), so:

* **client** (a canary partition, inside its DP-SGD round): m canaries on m distinct coordinates,
  chosen publicly from the experiment seed; canary i is in the client's data with probability
  1/2, decided once per run from the client's private randomness. An included canary is sampled
  like any record (Poisson at the loader's rate, or once per pass of fixed-size shuffled
  batches) and, when sampled, its gradient C * e_j is added to the clipped sum *before* Opacus
  adds the noise, so the accountant's epsilon covers it as it covers every record.
* **server**: the statistic of canary i is the drop of its coordinate over every round,
  sum_r -(received_r - sent_r)[j_i] (a sampled canary moves it by -lr C / B under SGD); the
  server knows the coordinates and nothing else.
* **out of band**: the one-run bound of Steinke et al. (2023) and the f-DP one of Mahloujifar et al. (2025)
  from the inclusion bits (:mod:`defenses.audit_bound`).

What the audit assumes: the canaries are records of the client that DP-SGD protects like any
other; the real data's gradients on the canary coordinates act as extra noise (they loosen the
bound, never break it); the server sees only the round's update, not each step, so with several
local steps the bound measures a weaker adversary than the accountant assumes (the accountant's
epsilon is an upper bound for every adversary, including one that sees each step). An empty
Poisson batch is skipped by the training loop and takes its canaries with it (probability
(1 - q)^n per step, negligible for the project's partitions).

``canary_clients`` (client-level, central DP; Andrew et al., ICLR 2024): m canary clients whose update
is always C * u_i, u_i a random unit direction (public, from the experiment seed; memory m x the
number of trainable parameters x 4 bytes). Canary i is in the federation with probability 1/2 (private)
and, when in, is sampled each round at the run's client rate, like a real client; its update joins
the clipped sum before the central noise, at the fixed denominator m = clients_per_round (DP-FedAvg's
estimator, sensitivity C / m per client, exactly what the accountant assumes). The adversary is an
observer of the global models: the statistic is sum_r <u_i, theta_r - theta_{r-1}> (in units of one
canary's contribution). Andrew et al. estimate epsilon from the cosine distributions; fedprobe turns
the same statistic into the one-run *bounds* of :mod:`defenses.audit_bound`, which hold at their confidence.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from defenses.audit import AUDITS, Audit
from defenses.base import ClientContext
from defenses.randomness import has_stable_secret, private_generator


def _defense_params(defenses: list[Any], wanted: str) -> dict[str, Any] | None:
    """The params of the first defense named ``wanted`` (config dicts or DefenseConfig objects)."""
    for d in defenses:
        name = d.get("name") if isinstance(d, dict) else getattr(d, "name", "")
        if name == wanted:
            return dict(d.get("params", {}) if isinstance(d, dict) else d.params)
    return None


def _named_coordinates(flat: np.ndarray, sizes: dict[str, int]) -> list[tuple[str, int]]:
    """(parameter name, index within it) of each flat index into the parameters taken in sorted-name order."""
    names = sorted(sizes)
    starts = np.cumsum([0] + [sizes[n] for n in names])
    where = np.searchsorted(starts, flat, side="right") - 1
    return [(names[w], int(f - starts[w])) for w, f in zip(where, flat)]


def _check_design(audit: str, canaries: Any, magnitude: Any, example: int, of: str) -> None:
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 2:
        raise ValueError(f"{audit} canaries must be an integer >= 2 (e.g. {example}), got {canaries!r}")
    if not (isinstance(magnitude, (int, float)) and 0 < magnitude <= 1):
        raise ValueError(f"{audit} magnitude (a fraction of {of}) must be in (0, 1], got {magnitude!r}")


@AUDITS.register("gradient_canaries")
class GradientCanaries(Audit):
    """Dirac gradient canaries in DP-SGD clients (Nasr et al. 2023); one-run epsilon lower bound (Steinke et al. 2023)."""

    def __init__(self, canaries: int = 1000, magnitude: float = 1.0) -> None:
        _check_design("gradient_canaries", canaries, magnitude, 1000, "max_grad_norm")
        self.m = canaries
        self.magnitude = float(magnitude)
        self._scores: dict[int, np.ndarray] = {}
        self._coords: dict[tuple[tuple[str, int], ...], list[tuple[str, int]]] = {}

    def bind(self, **facts: Any) -> None:
        super().bind(**facts)
        if _defense_params(self.defenses, "dp_sgd") is None:
            raise ValueError("gradient_canaries audits client-side DP-SGD: add a [[defenses]] entry with "
                             "name = \"dp_sgd\" (noise_multiplier = 0 audits clipping alone)")

    # public design: which coordinate carries canary i ----------------------------------
    def coordinates(self, sizes: dict[str, int]) -> list[tuple[str, int]]:
        """(parameter name, flat index) of every canary; from the experiment seed, known to the server."""
        key = tuple(sorted(sizes.items()))
        if key not in self._coords:
            self._coords[key] = self._draw_coordinates(sizes)
        return self._coords[key]

    def _draw_coordinates(self, sizes: dict[str, int]) -> list[tuple[str, int]]:
        names = sorted(sizes)
        total = sum(sizes[n] for n in names)
        if total < self.m:
            raise ValueError(f"gradient_canaries: {self.m} canaries need as many trainable coordinates, "
                             f"the model has {total}")
        flat = np.random.default_rng([self.seed, 0xA0D1]).choice(total, size=self.m, replace=False)
        return _named_coordinates(flat, sizes)

    # out of band: the auditor's ground truth -------------------------------------------
    def included(self, partition_id: int) -> np.ndarray:
        if not has_stable_secret():
            raise RuntimeError("gradient_canaries needs the clients' secret fixed for the run (FEDPROBE_CLIENT_SECRET; "
                               "fedprobe run sets one); without it the canaries' inclusion changes every round")
        gen = private_generator("audit-inclusion", partition_id)
        return (torch.rand(self.m, generator=gen) < 0.5).numpy()

    # client side ----------------------------------------------------------------------
    def client_setup(self, ctx: ClientContext) -> None:
        opt = ctx.optimizer
        if not hasattr(opt, "add_noise") or not hasattr(opt, "max_grad_norm"):
            raise ValueError("gradient_canaries plants canaries in DP-SGD's clipped sum: dp_sgd must come before "
                             "it and train this client")
        if ctx.refused:
            return
        params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
        coords = self.coordinates({n: p.numel() for n, p in params.items()})
        present = torch.from_numpy(self.included(ctx.partition_id))
        groups: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in sorted({n for n, _ in coords}):
            idx = [i for i, (n, _) in enumerate(coords) if n == name]
            groups[name] = (torch.tensor(idx), torch.tensor([coords[i][1] for i in idx]))
        poisson = bool(_defense_params(self.defenses, "dp_sgd").get("poisson_sampling", True))
        batches = max(1, len(ctx.loader))
        value = float(opt.max_grad_norm) * self.magnitude
        gen = private_generator("audit-sampling", ctx.server_round, ctx.partition_id)
        original = opt.add_noise
        step = {"t": 0, "slot": None}

        def add_noise() -> None:
            t = step["t"]
            step["t"] += 1
            if poisson:  # each included canary is sampled like a record: rate 1/len(loader)
                sampled = torch.rand(self.m, generator=gen) < 1.0 / batches
            else:  # fixed-size shuffled batches: once per pass, in a step drawn privately
                if t % batches == 0:
                    step["slot"] = torch.randint(0, batches, (self.m,), generator=gen)
                sampled = step["slot"] == t % batches
            on = present & sampled
            for name, (which, flat) in groups.items():
                sel = on[which]
                if bool(sel.any()):
                    p = params[name]
                    grad = p.summed_grad.view(-1)  # [numel]: the clipped per-example sum, before noise
                    grad.index_add_(0, flat[sel].to(grad.device),
                                    torch.full((int(sel.sum()),), value, dtype=grad.dtype, device=grad.device))
            original()

        opt.add_noise = add_noise

    # server side ----------------------------------------------------------------------
    def observe(self, server_round: int, partition_id: int, sent: dict[str, torch.Tensor],
                received: dict[str, torch.Tensor]) -> None:
        coords = self.coordinates({n: v.numel() for n, v in sent.items()})
        drop = np.array([float(sent[n].reshape(-1)[i] - received[n].reshape(-1)[i]) for n, i in coords])
        self._scores[partition_id] = self._scores.get(partition_id, np.zeros(self.m)) + drop

    def scores(self) -> dict[int, np.ndarray]:
        return dict(self._scores)

    def checkpoint_state(self) -> dict[str, Any]:
        return {str(p): s.tolist() for p, s in self._scores.items()}

    def restore(self, saved: dict[str, Any]) -> None:
        self._scores = {int(p): np.asarray(s, dtype=float) for p, s in saved.items()}


class _CanaryClientAudit(Audit):
    """Client-level audits: one score per canary client, under the pseudo-partition -1."""

    _scores: np.ndarray

    def scores(self) -> dict[int, np.ndarray]:
        return {-1: self._scores.copy()} if self._scores.any() else {}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"-1": self._scores.tolist()}

    def restore(self, saved: dict[str, Any]) -> None:
        if "-1" in saved:
            self._scores = np.asarray(saved["-1"], dtype=float)


@AUDITS.register("canary_clients")
class CanaryClients(_CanaryClientAudit):
    """Random-direction canary clients in central DP (Andrew et al. 2024); one-run client-level lower bound."""

    def __init__(self, canaries: int = 200, magnitude: float = 1.0) -> None:
        _check_design("canary_clients", canaries, magnitude, 200, "clipping_norm")
        self.m = canaries
        self.magnitude = float(magnitude)
        self._scores = np.zeros(canaries)
        self._directions: dict[tuple[tuple[str, tuple[int, ...]], ...], dict[str, torch.Tensor]] = {}

    def bind(self, **facts: Any) -> None:
        super().bind(**facts)
        params = _defense_params(self.defenses, "central_dp")
        if params is None:
            raise ValueError("canary_clients audits central DP: add a [[defenses]] entry with name = \"central_dp\"")
        self.clip = float(params.get("clipping_norm", 1.0))
        n = int(self.federation.get("num_clients", 1))
        self.per_round = int(self.federation.get("clients_per_round") or n)  # m: the fixed denominator
        self.rate = self.per_round / n if params.get("amplification", True) else 1.0
        self.clients = [-1]  # the canaries are clients of their own; no real partition carries them

    def directions(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """Unit direction of every canary client, [m, numel] per parameter; public (from the experiment seed)."""
        key = tuple(sorted(shapes.items()))
        if key not in self._directions:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, 0xCA1]).generate_state(1)[0]))
            raw = {n: torch.randn(self.m, int(np.prod(s)) if s else 1, generator=g) for n, s in sorted(shapes.items())}
            norm = torch.sqrt(sum((v ** 2).sum(1) for v in raw.values()))  # [m]
            self._directions[key] = {n: v / norm[:, None] for n, v in raw.items()}
        return self._directions[key]

    def included(self, partition_id: int = -1) -> np.ndarray:
        if not has_stable_secret():
            raise RuntimeError("canary_clients needs the secret fixed for the run (FEDPROBE_CLIENT_SECRET; fedprobe run "
                               "sets one)")
        return (torch.rand(self.m, generator=private_generator("audit-canary-clients")) < 0.5).numpy()

    def server_canaries(self, server_round: int, global_state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The sum of this round's participating canary updates (each C * u_i), as one update to add to the sum."""
        dirs = self.directions({n: tuple(v.shape) for n, v in global_state.items()})
        sampled = torch.rand(self.m, generator=private_generator("audit-canary-sampling", server_round)) < self.rate
        on = (torch.from_numpy(self.included()) & sampled).float()  # [m]
        value = self.clip * self.magnitude
        return [{n: (value * (on @ d)).reshape(global_state[n].shape).to(global_state[n].dtype) for n, d in dirs.items()}]

    def observe_global(self, server_round: int, before: dict[str, torch.Tensor],
                       after: dict[str, torch.Tensor]) -> None:
        dirs = self.directions({n: tuple(v.shape) for n, v in before.items()})
        proj = sum(d @ (after[n] - before[n]).reshape(-1).float() for n, d in dirs.items())  # [m]: <u_i, delta>
        self._scores += proj.numpy() * self.per_round / self.clip  # in units of one canary's contribution



CANARY_CLIENT_ID0 = 1 << 30  # partition ids of simulated canary clients: far from any real partition


@AUDITS.register("update_canaries")
class UpdateCanaries(_CanaryClientAudit):
    """Canary clients released through ``update_noise`` (client-level, local to each client); one-run bounds.

    ``update_noise`` protects a whole client update: each client clips its update to C and adds its own noise,
    and the server sees every client's release. Canary client i (m of them, each its own client) has the update
    C * e_{j_i} when it is "in" and, when "out", the update its neighbour would send: -C * e_{j_i} under the
    defense's ``replace`` adjacency (updates 2C apart, its accounted sensitivity) or nothing under
    ``add_remove``. Every round each canary client's update goes through the configured ``update_noise`` itself
    (its clipping and its noise, drawn from the canary client's private randomness) and the server scores what
    comes out: sum_r release_r[j_i] / C. A Dirac direction e_{j_i} (coordinate j_i public, from the experiment
    seed) is a random direction of the parameter basis: under isotropic Gaussian noise the statistic is
    distributed as Andrew et al.'s projection on a random unit direction, and under Laplace noise an L1 clip
    keeps all of its norm. The canary clients take part in every round (sample rate 1), as the accountant
    assumes of a client that is sampled every round, so their epsilon is that of a real client sampled every
    round; their releases are scored, not aggregated.
    """

    def __init__(self, canaries: int = 1000, magnitude: float = 1.0) -> None:
        _check_design("update_canaries", canaries, magnitude, 1000, "clip_norm")
        self.m = canaries
        self.magnitude = float(magnitude)
        self._scores = np.zeros(canaries)

    def bind(self, **facts: Any) -> None:
        super().bind(**facts)
        from defenses.update import UpdateNoise

        params = _defense_params(self.defenses, "update_noise")
        if params is None:
            raise ValueError("update_canaries audits update noise: add a [[defenses]] entry with name = \"update_noise\"")
        self.defense = UpdateNoise(**params)
        if self.defense.clip_norm <= 0:
            raise ValueError("update_canaries needs update_noise clip_norm > 0 (without clipping there is no "
                             "sensitivity to audit)")
        self.clients = [-1]  # the canaries are clients of their own; no real partition carries them

    def included(self, partition_id: int = -1) -> np.ndarray:
        if not has_stable_secret():
            raise RuntimeError("update_canaries needs the secret fixed for the run (FEDPROBE_CLIENT_SECRET; fedprobe "
                               "run sets one)")
        return (torch.rand(self.m, generator=private_generator("audit-update-canaries")) < 0.5).numpy()

    def coordinates(self, total: int) -> np.ndarray:
        """Flat index j_i of every canary's direction (public, from the experiment seed)."""
        return np.random.default_rng([self.seed, 0xC1E]).integers(0, total, size=self.m)

    def _release(self, i: int, signal: float, server_round: int, shapes: dict[str, tuple[int, ...]],
                 where: tuple[str, int]) -> float:
        """Canary client i's update (signal * C on its coordinate) through update_noise; its coordinate after."""
        update = {n: torch.zeros(s) for n, s in shapes.items()}
        update[where[0]].view(-1)[where[1]] = signal * self.defense.clip_norm * self.magnitude
        out = self.defense.release(update, server_round, CANARY_CLIENT_ID0 + i)  # the configured clip and noise
        return float(out[where[0]].view(-1)[where[1]])

    def observe_global(self, server_round: int, before: dict[str, torch.Tensor],
                       after: dict[str, torch.Tensor]) -> None:
        shapes = {n: tuple(v.shape) for n, v in before.items()}
        sizes = {n: v.numel() for n, v in before.items()}
        coords = _named_coordinates(self.coordinates(sum(sizes.values())), sizes)
        out_signal = -1.0 if self.defense.adjacency == "replace" else 0.0
        inc = self.included()
        for i, pos in enumerate(coords):
            released = self._release(i, 1.0 if inc[i] else out_signal, server_round, shapes, pos)
            self._scores[i] += released / (self.defense.clip_norm * self.magnitude)  # the server's statistic

