"""Optimisation-based gradient inversion: DLG, iDLG, Inverting Gradients; TAG builds on it (``attacks.tag``).

All four search a dummy batch whose recomputed update (``attacks.gradients.simulate``)
matches the observed one; they differ in objective, optimiser, label handling and
(TAG) the search space:

* ``dlg``  (Zhu et al. 2019): L2 distance, L-BFGS; labels given, else optimised jointly
  as soft labels.
* ``idlg`` (Zhao et al. 2020): DLG with labels read off the output-bias gradient.
* ``inverting_gradients`` (Geiping et al. 2020): 1 - cosine + TV, Adam on signed
  gradients, step decay, pixels boxed to the valid range, random restarts; iDLG labels.
* ``tag`` (Deng et al. 2021): text; L2 + 0.1 L1 in the continuous ``inputs_embeds``
  space, tokens by nearest embedding among the tokens whose embedding rows received
  gradient (breaching's ``from-limited-embedding``). [project's choice] A greedy
  discrete refinement (one sweep: for every position try every candidate token, keep
  the one with the smallest gradient distance on the *full* update, embedding
  included), in the spirit of LAMP's discrete steps; ``refine_sweeps=0`` gives plain TAG.

All run on ``obs.device`` (the config's ``attack.device``) and return CPU tensors.

Budgets are deterministic: ``iterations`` per start (L-BFGS counts its inner iterations,
20 per step) and ``restarts`` fresh random starts (each with the full ``iterations``),
keeping the start with the smallest gradient distance; the same config and seed give the
same reconstruction on any machine load. ``max_seconds`` (0 = none) is only a safety cap,
checked inside every objective evaluation (so inside an L-BFGS line search too): when it
fires the search keeps its last completed step and the result carries
``budget_limited = 1``, which the server logs as an event.

Threat-model knobs on every attack: ``objective`` (``l2``, ``cosine``, ``tag``) overrides
the attack's own; ``defense_aware = true`` simulates the client's public defenses
(``attacks.threat``: DP-SGD per-example clipping, update clipping, pruning masks) inside
the recomputed update.

Labels: the threat model grants them only via ``obs.labels``; ``label_strategy`` is
``auto`` (given > iDLG > joint), ``given_or_joint`` (DLG's default), ``given``, ``idlg``
or ``joint``.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import torch

from attacks.base import ATTACKS, Attack, Observation, Reconstruction, resolve_device
from attacks.gradients import (
    OBJECTIVES,
    attack_model,
    examples_touched,
    gradient_distance,
    infer_labels,
    noise_weights,
    observed_target,
    simulate,
)
from attacks.search import BudgetExceeded, SearchState as _Search
from attacks.threat import public_defenses

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class GradientInversion(Attack):
    """Shared machinery; subclasses set the defaults (see the module docstring)."""

    objective: ClassVar[str] = "l2"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        cfg: dict[str, Any] = dict(
            optimizer="lbfgs", iterations=300, lr=1.0, tv=0.0, label_strategy="auto", max_seconds=0.0,
            dtype="float64", seed=0, boxed=False, signed=False, init_scale=1.0, tag_scale=0.1, restarts=1,
            objective=self.objective, defense_aware=False, init="random",
        )
        cfg.update(self.defaults)
        unknown = sorted(set(params) - set(cfg))
        if unknown:
            raise TypeError(f"unexpected parameters {unknown}; allowed: {sorted(cfg)}")
        cfg.update(params)
        if cfg["optimizer"] not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {cfg['optimizer']!r}")
        if cfg["label_strategy"] not in ("auto", "given_or_joint", "given", "idlg", "joint"):
            raise ValueError(f"label_strategy must be auto, given_or_joint, given, idlg or joint, got {cfg['label_strategy']!r}")
        if cfg["dtype"] not in _DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {cfg['dtype']!r}")
        if cfg["init"] not in ("random", "april"):
            raise ValueError(f"init must be 'random' or 'april' (images: the first start from APRIL's closed form), "
                             f"got {cfg['init']!r}")
        if cfg["objective"] not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg['objective']!r}")
        for key in ("iterations", "restarts"):
            if not (isinstance(cfg[key], int) and not isinstance(cfg[key], bool) and cfg[key] >= 1):
                raise ValueError(f"{key} must be an integer >= 1, got {cfg[key]!r}")
        if not (isinstance(cfg["max_seconds"], (int, float)) and math.isfinite(cfg["max_seconds"])
                and cfg["max_seconds"] >= 0):
            raise ValueError(f"max_seconds must be a finite number >= 0 (0 = no safety cap), got {cfg['max_seconds']!r}")
        self.cfg = cfg

    # ---- labels -------------------------------------------------------------------
    def _labels(self, obs: Observation, n: int) -> torch.Tensor | None:
        """Hard labels, or None meaning 'optimise soft labels jointly'."""
        s = self.cfg["label_strategy"]
        if obs.task.kind == "lm":
            return None if obs.labels is None else obs.labels.long()
        if s in ("auto", "given_or_joint", "given") and obs.labels is not None:
            return obs.labels.long().view(-1)[:n]
        if s == "given":
            raise ValueError("label_strategy='given' but the threat model grants no labels (obs.labels is None)")
        if s in ("auto", "idlg"):
            y = infer_labels(obs, n)
            if y is not None:
                return y
            if s == "idlg":
                raise ValueError("iDLG needs an output-layer bias of shape [num_classes]; use label_strategy='joint'")
        return None

    def _init_soft(self, search: _Search, n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor | None:
        """Soft-label logits [n, C] optimised jointly with the inputs when no labels are known (DLG), else None."""
        if search.labels is not None or search.obs.task.kind == "lm":
            return None
        return torch.randn(n, search.obs.task.num_classes, generator=gen, dtype=dtype)

    # ---- search space (images; TAG overrides) --------------------------------------
    def _init_inputs(self, obs: Observation, n: int, params: dict[str, torch.Tensor], gen: torch.Generator,
                     dtype: torch.dtype) -> torch.Tensor:
        c, h, w = obs.task.image_shape
        if c * h * w == 0:
            raise ValueError("image attacks need task.image_shape (C, H, W)")
        return self.cfg["init_scale"] * torch.randn(n, c, h, w, generator=gen, dtype=dtype)

    def _model_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": x}

    def _box(self, obs: Observation, x: torch.Tensor) -> None:
        if not self.cfg["boxed"] or not obs.task.mean:
            return
        mean = torch.tensor(obs.task.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(obs.task.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x.data = torch.max(torch.min(x.data, (1 - mean) / std), -mean / std)

    def _prior(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg["tv"] <= 0 or x.dim() != 4:
            return x.new_zeros(())
        tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
        return self.cfg["tv"] * tv

    def _excluded(self, obs: Observation, params: dict[str, torch.Tensor]) -> set[str]:
        return set()

    def _refresh_labels(self, obs: Observation, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    # ---- the attack ----------------------------------------------------------------
    def attack(self, obs: Observation) -> Reconstruction:
        """Run ``restarts`` searches of ``iterations`` each from fresh seeded starts on ``obs.device``;
        keep the one with the smallest gradient distance (Geiping et al.'s ``scoring_choice='loss'``)."""
        cfg, t0 = self.cfg, time.perf_counter()
        dev = resolve_device(obs.device)
        obs = obs.to(dev)
        dtype = _DTYPES[cfg["dtype"]]
        gen = torch.Generator().manual_seed(int(cfg["seed"]))
        model = attack_model(obs.model_factory, dtype, str(obs.metadata.get("model_mode", "eval"))).to(dev)
        tgt, steps, lr = observed_target(obs, dtype)
        n, bs = examples_touched(obs), int(obs.metadata["batch_size"])
        params = {k: v.detach().to(dtype).clone().requires_grad_(k in tgt) for k, v in obs.global_params.items()}
        names = [k for k in tgt if k in params and k not in self._excluded(obs, params)]
        tgt = {k: tgt[k] for k in names}
        facts = public_defenses(obs.defenses) if cfg["defense_aware"] else public_defenses(())
        weight: dict[str, Any] | None = {k: (v != 0).to(dtype) for k, v in tgt.items()} if facts.pruned else None
        if facts.noise_multiplier > 0 and facts.example_clip > 0:  # DP-SGD noise std per entry of the target
            std = facts.noise_multiplier * facts.example_clip / bs * (1.0 if steps == 1 else lr * math.sqrt(steps))
            nw = noise_weights(tgt, std)
            weight = nw if weight is None else {k: weight[k] * w for k, w in nw.items()}
        search = _Search(obs, model, params, names, tgt, self._labels(obs, n), steps, lr, bs, facts.example_clip,
                         facts.update_clip, weight, float(cfg["max_seconds"]))
        best: tuple[float, torch.Tensor, torch.Tensor | None, list[float], int] | None = None
        starts = 0
        with torch.random.fork_rng(devices=[]):  # dropout in a train-mode model draws from a seeded stream
            torch.manual_seed(int(cfg["seed"]))
            for _ in range(int(cfg["restarts"])):
                x = self._init_inputs(obs, n, params, gen, dtype)  # drawn on every start: the same random stream
                if cfg["init"] == "april" and starts == 0 and obs.task.kind == "image":
                    from attacks.april import APRIL

                    x = APRIL().attack(obs).inputs.to(dtype)  # the closed form (a blend when n > 1)
                x = x.to(dev).requires_grad_(True)
                soft = self._init_soft(search, n, gen, dtype)
                if soft is not None:
                    soft = soft.to(dev).requires_grad_(True)
                starts += 1
                history, it = self._search(search, x, soft)
                final = self._distance(search, x, soft)
                if best is None or final < best[0] or not math.isfinite(best[0]):
                    best = (final, x.detach(), None if soft is None else soft.detach(), history, it)
                if search.budget_limited:
                    break
            assert best is not None
            final, x, soft, history, it = best
            rec = self._finish(search, x, soft)
        for field_ in ("inputs", "tokens", "labels"):
            v = getattr(rec, field_)
            if v is not None:
                setattr(rec, field_, v.detach().cpu())
        rec.metrics.update({
            "grad_distance": final,
            "iterations": float(it),
            "restarts": float(starts),
            "budget_limited": float(search.budget_limited),
            "attack_seconds": time.perf_counter() - t0,
        })
        rec.artifacts["loss_history"] = history
        return rec

    def _objective(self, search: _Search, x: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        """Gradient distance without the image prior."""
        s = search
        y = s.labels if s.labels is not None else (soft if soft is not None else self._refresh_labels(s.obs, x, s.params))
        assert y is not None
        sim = simulate(s.model, s.params, s.names, self._model_inputs(x), y, s.obs.task, s.steps, s.lr, s.bs,
                       example_clip=s.example_clip, update_clip=s.update_clip, **s.replay)
        return gradient_distance(sim, s.tgt, self.cfg["objective"], self.cfg["tag_scale"], weight=s.weight)

    def _distance(self, search: _Search, x: torch.Tensor, soft: torch.Tensor | None) -> float:
        with torch.enable_grad():  # simulate differentiates the loss w.r.t. the parameters
            d = float(self._objective(search, x, soft).detach())
        return d if math.isfinite(d) else float("inf")

    def _search(self, search: _Search, x: torch.Tensor, soft: torch.Tensor | None) -> tuple[list[float], int]:
        """One optimisation from the start ``x`` (and ``soft``), in place; returns (loss history, iterations).

        Stops after ``iterations`` (deterministic); the safety cap raises inside the objective, and the
        search then restores its last completed step."""
        cfg = self.cfg
        free = [x] + ([soft] if soft is not None else [])

        def objective() -> torch.Tensor:
            search.check()
            return self._objective(search, x, soft) + self._prior(x)

        history: list[float] = []
        it = 0
        T = int(cfg["iterations"])
        saved = [p.detach().clone() for p in free]
        try:
            if cfg["optimizer"] == "lbfgs":
                opt = torch.optim.LBFGS(free, lr=cfg["lr"], max_iter=20, history_size=100, line_search_fn="strong_wolfe",
                                        tolerance_grad=1e-30, tolerance_change=1e-30)

                def closure() -> torch.Tensor:
                    opt.zero_grad()
                    loss = objective()
                    loss.backward()
                    return loss

                while it < T:
                    loss = opt.step(closure)
                    it += 20
                    self._box(search.obs, x)
                    saved = [p.detach().clone() for p in free]
                    history.append(float(loss.detach()))
                    if not math.isfinite(history[-1]) or history[-1] < 1e-28:
                        break
                return history, it
            opt = torch.optim.Adam(free, lr=cfg["lr"])
            marks = (3 / 8, 5 / 8, 7 / 8)  # Geiping et al.: step decay by 10x at 3/8, 5/8 and 7/8 of the iterations
            while it < T:
                for g in opt.param_groups:
                    g["lr"] = cfg["lr"] * 0.1 ** sum(it / T >= m for m in marks)
                opt.zero_grad()
                loss = objective()
                loss.backward()
                if cfg["signed"]:
                    for p in free:
                        p.grad.sign_()
                opt.step()
                self._box(search.obs, x)
                saved = [p.detach().clone() for p in free]
                it += 1
                history.append(float(loss.detach()))
                if not math.isfinite(history[-1]):
                    break
            return history, it
        except BudgetExceeded:
            with torch.no_grad():
                for p, v in zip(free, saved):
                    p.copy_(v)
            return history, it

    def _finish(self, search: _Search, x: torch.Tensor, soft: torch.Tensor | None) -> Reconstruction:
        y = search.labels if search.labels is not None else (soft.detach().argmax(-1) if soft is not None else None)
        return Reconstruction(inputs=x.float(), labels=y)


@ATTACKS.register("dlg")
class DLG(GradientInversion):
    """Deep Leakage from Gradients: L2 gradient matching, L-BFGS, joint soft labels unless given."""

    objective = "l2"
    defaults = {"label_strategy": "given_or_joint"}




@ATTACKS.register("idlg")
class IDLG(GradientInversion):
    """iDLG: labels from the output-bias gradient, then DLG (L2, L-BFGS)."""

    objective = "l2"
    defaults = {"label_strategy": "idlg"}


@ATTACKS.register("inverting_gradients")
class InvertingGradients(GradientInversion):
    """Inverting Gradients: 1 - cosine + total variation, signed Adam, boxed pixels, iDLG labels.

    Follows Geiping et al. 2020: cost 1 - cos(grad', grad) over all parameters, TV prior,
    Adam on the sign of the gradient, lr 0.1 decayed 10x at 3/8, 5/8, 7/8 of the run,
    pixels clamped to the valid range in the task's normalised space, several random
    restarts keeping the smallest gradient distance. [project's choice] TV weight 1e-4
    (1e-2 blurred 8x8 digits: 31 dB vs 69 dB at B=1), 2 restarts x 1000 iterations
    instead of 24 000 (a CPU budget). Known weakness (measured): on a ViT whose position
    embeddings are tiny (HF init 0.02, 16 patches) the cosine search converges to the
    digit with its patches permuted (cosine ~1, PSNR ~9 dB); L-BFGS DLG in float64 does not.
    """

    objective = "cosine"
    defaults = {"optimizer": "adam", "lr": 0.1, "iterations": 1000, "tv": 1e-4, "boxed": True, "signed": True,
                "dtype": "float32", "restarts": 2}
