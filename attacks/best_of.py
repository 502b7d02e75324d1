"""``best_of``: several attacks on each victim, the strongest reported per victim.

A privacy number is only worth what the strongest attack says, so a leakage
measurement runs a portfolio: ``members`` is a list of attack names or tables
``{name, label, params}``; each member attacks the same observation. The harness then
scores every member against the ground truth (out of band, after all returned) and
reports the strongest per victim as the headline (``attack_psnr``, ...) -- an upper
bound over the listed attackers, each of which alone is a realistic one -- beside each
member's own scores (``attack_<label>/<score>``) and ``attack_best_member`` (its index).
Strongest: the highest (recovered_fraction, psnr) for images, token accuracy for text,
label accuracy otherwise.

Default members, by task (threat models: see each attack's docstring):
* images: ``april`` (closed form, scale-invariant), ``idlg`` (L2, random start; models no
  defense), ``idlg_cosine`` (scale-invariant, so clipping cannot hide from it; started from
  APRIL's closed form), ``idlg_cosine_tv`` (the same from a random start with a TV prior of
  3e-3), ``idlg_defense_aware`` (L2 on a simulation of the client's public defenses --
  DP-SGD clipping, update clipping, pruning masks -- weighted per tensor against the known
  DP noise, started from APRIL), ``inverting_gradients`` (cosine + TV, signed Adam).
  [project's choice] TV weight and starts chosen on validation victims 1-3 of
  ``experiments/attack_dlg_digits.toml`` under DP-SGD sigma 0.01 (benchmarks/RESULTS.md).
* text: ``span_text`` (exact recovery from first-layer gradient spans; skipped, with the reason, where the span does
  not pin the batch down: DP noise, FedAvg, B x n >= d), ``tag`` and ``tag_cosine``.
"""

from __future__ import annotations

import time
from typing import Any

from attacks.base import ATTACKS, Attack, Observation, Reconstruction

IMAGE_MEMBERS: tuple[dict[str, Any], ...] = (
    {"name": "april"},
    {"name": "idlg", "params": {"iterations": 400}},
    {"name": "idlg", "label": "idlg_cosine", "params": {"iterations": 400, "objective": "cosine", "init": "april"}},
    {"name": "idlg", "label": "idlg_cosine_tv", "params": {"iterations": 400, "objective": "cosine", "tv": 3e-3}},
    {"name": "idlg", "label": "idlg_defense_aware", "params": {"iterations": 400, "defense_aware": True,
                                                               "init": "april"}},
    {"name": "inverting_gradients", "params": {"iterations": 500, "restarts": 1}},
)
TEXT_MEMBERS: tuple[dict[str, Any], ...] = (
    {"name": "span_text", "params": {"fallback": "none"}},  # exact where the span pins the batch, else skipped
    {"name": "tag"},
    {"name": "tag", "label": "tag_cosine", "params": {"objective": "cosine"}},
)


def _normalise(members: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in members:
        m = {"name": m} if isinstance(m, str) else dict(m)
        unknown = sorted(set(m) - {"name", "label", "params"})
        if "name" not in m or unknown:
            raise ValueError(f"best_of member {m!r}: give a name (and optionally label, params); unknown keys {unknown}")
        m.setdefault("label", m["name"])
        m.setdefault("params", {})
        out.append(m)
    labels = [m["label"] for m in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"best_of member labels must be distinct, got {labels}; set label = ... on repeated attacks")
    return out


@ATTACKS.register("best_of")
class BestOf(Attack):
    """Runs several attacks on each victim; the scorer reports the strongest per victim."""

    def __init__(self, members: list[Any] | None = None) -> None:
        super().__init__()
        if members is not None and not list(members):
            raise ValueError("best_of members is empty: name at least one attack, or leave members unset for the "
                             "default set")
        self.members = None if members is None else _normalise(list(members))
        for spec in self.members or []:
            self._build(spec)  # fail now (bad name or params), not after the first round

    @staticmethod
    def _build(spec: dict[str, Any]) -> Attack:
        if spec["name"] == "best_of":
            raise ValueError("best_of cannot contain best_of")
        att = ATTACKS.create(spec["name"], **spec["params"])
        if att.threat_model != "honest":
            raise ValueError(f"best_of members observe an honest server's view; {spec['name']!r} is "
                             f"{att.threat_model} (run it on its own)")
        return att

    def specs(self, obs: Observation) -> list[dict[str, Any]]:
        if self.members is not None:
            return self.members
        return _normalise(list(TEXT_MEMBERS if obs.task.kind in ("text", "lm") else IMAGE_MEMBERS))

    def attack(self, obs: Observation) -> Reconstruction:
        t0 = time.perf_counter()
        members: list[tuple[str, Reconstruction]] = []
        metrics: dict[str, float] = {}
        errors: list[str] = []
        index: list[int] = []  # each member's place in the member list (attack_best_member names it)
        for i, spec in enumerate(self.specs(obs)):
            try:
                rec = self._build(spec).attack(obs)
            except ValueError as exc:  # a member whose threat model does not fit this victim (e.g. april on text)
                errors.append(f"{spec['label']}: {exc}")
                metrics[f"{spec['label']}/skipped"] = 1.0
                continue
            members.append((spec["label"], rec))
            index.append(i)
            metrics.update({f"{spec['label']}/{k}": float(v) for k, v in rec.metrics.items()})
        if not members:
            raise ValueError("no best_of member could attack this victim: " + "; ".join(errors))
        metrics["budget_limited"] = max(float(r.metrics.get("budget_limited", 0.0)) for _, r in members)
        metrics["attack_seconds"] = time.perf_counter() - t0
        first = members[0][1]
        return Reconstruction(inputs=first.inputs, tokens=first.tokens, labels=first.labels, metrics=metrics,
                              artifacts={"members": members, "member_index": index, "member_errors": errors})
