"""What the server publicly knows of a client's defenses, as an attack can use it.

fedprobe's config names every client defense and its parameters, and a deployed
federation publishes them too (clients must agree on the protocol), so the threat
model grants them to the attack. :func:`public_defenses` reads
``Observation.defenses`` (the ``[[defenses]]`` entries: name and params) into the few
facts a gradient-matching attack models:

* ``example_clip``: DP-SGD's per-example clip norm C (flat clipping); the client's
  gradient is mean_i clip_C(g_i) + noise, so the attack clips its simulated
  per-example gradients the same way (Opacus's factor min(1, C / (|g_i| + 1e-6))).
* ``noise_multiplier``: DP-SGD's sigma (noise std sigma C / B per coordinate); an L2
  objective is then the Gaussian log-likelihood, so it needs no change.
* ``update_clip``: ``clip`` / ``update_noise`` scale the whole update to norm <= C;
  the attack scales its simulated update the same way.
* ``prune``: the pruned entries are visible as exact zeros, so matching skips them.

Anything else (a plugin defense, per-layer clipping, Laplace noise) is listed in
``unmodelled``: an attack then falls back to scale-invariant matching, and a report
must not credit that defense against this attack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

MODELLED = ("dp_sgd", "clip", "update_noise", "prune")


@dataclass(frozen=True)
class PublicDefenses:
    example_clip: float = 0.0  # DP-SGD per-example clip norm (0: none)
    noise_multiplier: float = 0.0  # DP-SGD sigma
    update_clip: float = 0.0  # whole-update L2 clip norm (0: none)
    pruned: bool = False  # entries set to zero by the client
    modelled: tuple[str, ...] = ()
    unmodelled: tuple[str, ...] = ()


def public_defenses(defenses: Iterable[dict[str, Any]]) -> PublicDefenses:
    """Facts an attack may model from the public defense list ``[{"name": ..., "params": {...}}]``."""
    facts: dict[str, Any] = {}
    modelled: list[str] = []
    unmodelled: list[str] = []
    for d in defenses:
        name, params = str(d.get("name", "")), dict(d.get("params") or {})
        if name == "dp_sgd" and params.get("clipping", "flat") == "flat":
            facts["example_clip"] = float(params.get("max_grad_norm", 1.0))
            facts["noise_multiplier"] = float(params.get("noise_multiplier") or 0.0)
        elif name == "clip":
            facts["update_clip"] = float(params.get("max_norm", 1.0))
        elif name == "update_noise" and params.get("mechanism", "gaussian") == "gaussian":
            clip = float(params.get("clip_norm", 1.0))
            if clip > 0:
                facts["update_clip"] = clip
        elif name == "prune":
            facts["pruned"] = True
        else:
            unmodelled.append(name)
            continue
        modelled.append(name)
    return PublicDefenses(**facts, modelled=tuple(modelled), unmodelled=tuple(unmodelled))
