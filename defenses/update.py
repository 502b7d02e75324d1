"""Defenses on the outgoing update: clipping, update noise, pruning.

``update_noise`` is the gradient-leakage seed's defense (seed spec section 5, [derived]):
release u~ = clip(u, C) + noise. With Gaussian noise N(0, (sigma C)^2 I) one round is the
Gaussian mechanism; rounds compose through the RDP/PRV accountant with sample rate 1 (each
round releases the whole client update). With Laplace noise Lap(sigma C) per coordinate the
update is clipped in L1 norm (L2 clipping would give L1 sensitivity sqrt(d) C) and one round
is (Delta_1 / b, 0)-DP; rounds compose by basic composition. Noise without clipping
(``clip_norm = 0``) is allowed, but has unbounded sensitivity: reported as
``update_noise_formal = 0`` and ``epsilon = inf``.

Sensitivity (project choice): neighbouring client datasets may differ in any way
("replace"), so two clipped updates differ by at most 2C and the accounted noise
multiplier is sigma / 2. ``adjacency = "add_remove"`` uses sensitivity C (user-level DP
in the style of DP-FedAvg, where a client's update is either present or absent).

The noise draws from the client's private randomness (:mod:`defenses.randomness`); a
``seed`` makes it reproducible from the config, and ``update_noise_secret = 0`` says the
epsilon then does not hold against the server. ``max_epsilon`` makes a client refuse a
round that would take its epsilon past the budget.

``prune`` is the DLG paper's defense (Zhu et al. 2019, section 5): entries of the update
with the smallest magnitudes are set to zero, a fraction ``sparsity`` per tensor (or over
the whole update with ``scope = "global"``). It has no formal guarantee.
"""

from __future__ import annotations

import math

import torch

from defenses.accounting import PrivacyLedger, check_delta
from defenses.base import DEFENSES, ClientContext, Defense
from defenses.dp_sgd import seeded_generator
from defenses.randomness import private_generator


def global_norm(update: dict[str, torch.Tensor], p: float = 2.0) -> float:
    """Norm of the update seen as one flat vector."""
    if not update:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.float(), ord=p) for v in update.values()]), ord=p))


def clip_update(update: dict[str, torch.Tensor], max_norm: float, p: float = 2.0) -> tuple[dict[str, torch.Tensor], float]:
    """Scale the whole update by min(1, C / ||u||_p); returns (clipped, norm before)."""
    norm = global_norm(update, p)
    scale = min(1.0, max_norm / (norm + 1e-12))
    return {k: v * scale for k, v in update.items()}, norm


@DEFENSES.register("clip")
class Clip(Defense):
    """Clip the update to L2 norm max_norm (no noise, no formal guarantee)."""

    def __init__(self, max_norm: float = 1.0) -> None:
        if not 0 < max_norm < math.inf:
            raise ValueError(f"clip max_norm must be a finite number > 0, got {max_norm!r}")
        self.max_norm = float(max_norm)

    def transform_update(self, update: dict[str, torch.Tensor], ctx: ClientContext) -> dict[str, torch.Tensor]:
        out, norm = clip_update(update, self.max_norm)
        ctx.metrics.update({"update_norm": norm, "update_clipped": float(norm > self.max_norm)})
        return out


@DEFENSES.register("update_noise")
class UpdateNoise(Defense):
    """Clip the update to C, add Gaussian or Laplace noise of scale sigma*C; epsilon composed over rounds."""

    STATE_KEY = "update_noise"

    def __init__(
        self,
        noise_multiplier: float = 1.0,
        clip_norm: float = 1.0,
        mechanism: str = "gaussian",
        noise_std: float = 0.0,
        delta: float = 1e-5,
        accountant: str = "rdp",
        adjacency: str = "replace",
        seed: int | None = None,
        max_epsilon: float | None = None,
    ) -> None:
        if mechanism not in ("gaussian", "laplace"):
            raise ValueError(f"update_noise mechanism must be 'gaussian' or 'laplace', got {mechanism!r}")
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"update_noise noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if not 0 <= clip_norm < math.inf:
            raise ValueError(f"update_noise clip_norm must be a finite number >= 0 (0 = no clipping, no guarantee), "
                             f"got {clip_norm!r}")
        if not 0 <= noise_std < math.inf:
            raise ValueError(f"update_noise noise_std must be a finite number >= 0, got {noise_std!r}")
        if clip_norm == 0 and noise_std == 0:
            raise ValueError("update_noise without clipping needs noise_std > 0 (the absolute noise scale)")
        if adjacency not in ("replace", "add_remove"):
            raise ValueError(f"update_noise adjacency must be 'replace' or 'add_remove', got {adjacency!r}")
        check_delta(delta)
        if max_epsilon is not None and not (isinstance(max_epsilon, (int, float)) and max_epsilon > 0):
            raise ValueError(f"update_noise max_epsilon must be a number > 0, got {max_epsilon!r}")
        self.max_epsilon = max_epsilon
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.mechanism = mechanism
        self.noise_std = float(noise_std)
        self.delta = delta
        self.accountant = accountant
        self.adjacency = adjacency
        self.seed = seed
        PrivacyLedger(accountant=accountant)  # validates the accountant name

    @property
    def scale(self) -> float:
        """Gaussian std or Laplace scale b of the noise per coordinate."""
        return self.noise_multiplier * self.clip_norm if self.clip_norm > 0 else self.noise_std

    @property
    def formal(self) -> bool:
        return self.clip_norm > 0 and self.noise_multiplier > 0

    def noise_like(self, update: dict[str, torch.Tensor], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in update.items():
            if self.mechanism == "gaussian":
                n = torch.randn(v.shape, generator=generator, dtype=torch.float32)
            else:  # Laplace(0, 1) = Exp(1) - Exp(1)
                u = torch.rand((2, *v.shape), generator=generator, dtype=torch.float32).clamp_min(1e-12)
                n = -u[0].log() + u[1].log()
            out[k] = (n * self.scale).to(device=v.device, dtype=v.dtype)
        return out

    def release(self, update: dict[str, torch.Tensor], server_round: int, partition_id: int) -> dict[str, torch.Tensor]:
        """The mechanism itself: clip, then add the client's noise (no accounting; audits call it too)."""
        if self.clip_norm > 0:
            update, _ = clip_update(update, self.clip_norm, p=2.0 if self.mechanism == "gaussian" else 1.0)
        if self.seed is not None:  # reproducible from the config: the server can replay it
            gen = seeded_generator(self.seed, server_round, partition_id)
        else:
            gen = private_generator("update_noise", server_round, partition_id)
        noise = self.noise_like(update, gen)
        return {k: update[k] + noise[k] for k in update}

    def transform_update(self, update: dict[str, torch.Tensor], ctx: ClientContext) -> dict[str, torch.Tensor]:
        norm = global_norm(update, 2.0)
        out = self.release(update, ctx.server_round, ctx.partition_id)
        ctx.metrics.update({"update_norm": norm, "update_noise_std": self.scale * (math.sqrt(2) if self.mechanism == "laplace" else 1.0),
                            "update_noise_formal": float(self.formal), "update_noise_secret": float(self.seed is None),
                            "epsilon": self._account(ctx)})
        return out

    def setup(self, ctx: ClientContext) -> None:
        """Refuse the round when it would take epsilon past ``max_epsilon``."""
        if self.max_epsilon is None:
            return
        after = self._account_state(dict(ctx.state.get(self.STATE_KEY, {})))  # a copy: nothing is spent yet
        if after > self.max_epsilon:
            ctx.refuse(f"update_noise budget: epsilon would reach {after:.3g} > max_epsilon={self.max_epsilon:g}")
            ctx.metrics["privacy_budget_exhausted"] = 1.0

    def _account(self, ctx: ClientContext) -> float:
        return self._account_state(ctx.state.setdefault(self.STATE_KEY, {}))

    def _account_state(self, state: dict) -> float:
        """Record one round in ``state`` (in place) and return the epsilon so far."""
        if not self.formal:
            state["unbounded_rounds"] = state.get("unbounded_rounds", 0) + 1
            return math.inf
        sensitivity = self.clip_norm * (2.0 if self.adjacency == "replace" else 1.0)
        if self.mechanism == "laplace":
            state["pure_epsilon"] = state.get("pure_epsilon", 0.0) + sensitivity / self.scale
            eps = state["pure_epsilon"]
        else:
            ledger = PrivacyLedger.from_dict(state.get("ledger"), self.accountant)
            ledger.record(self.scale / sensitivity, 1.0, 1)
            state["ledger"] = ledger.to_dict()
            eps = ledger.epsilon(self.delta)
        return math.inf if state.get("unbounded_rounds") else eps


@DEFENSES.register("prune")
class Prune(Defense):
    """Gradient pruning (DLG paper): zero the fraction `sparsity` of update entries with the smallest magnitude."""

    def __init__(self, sparsity: float = 0.9, scope: str = "tensor") -> None:
        if not 0 <= sparsity < 1:
            raise ValueError(f"prune sparsity must be in [0, 1), got {sparsity!r}")
        if scope not in ("tensor", "global"):
            raise ValueError(f"prune scope must be 'tensor' or 'global', got {scope!r}")
        self.sparsity = float(sparsity)
        self.scope = scope

    @staticmethod
    def _threshold(x: torch.Tensor, sparsity: float) -> torch.Tensor:
        k = int(sparsity * x.numel())  # number of entries zeroed
        if k == 0:
            return x.new_tensor(-1.0)
        return x.abs().flatten().float().kthvalue(k).values.to(x.dtype)

    def transform_update(self, update: dict[str, torch.Tensor], ctx: ClientContext) -> dict[str, torch.Tensor]:
        if self.scope == "global" and update:
            flat = torch.cat([v.abs().flatten().float() for v in update.values()])
            thr = {k: self._threshold(flat, self.sparsity) for k in update}
        else:
            thr = {k: self._threshold(v, self.sparsity) for k, v in update.items()}
        out = {k: torch.where(v.abs() > thr[k], v, torch.zeros_like(v)) for k, v in update.items()}
        kept = sum(int((v != 0).sum()) for v in out.values())
        total = sum(v.numel() for v in out.values())
        ctx.metrics["prune_density"] = kept / max(total, 1)
        return out
