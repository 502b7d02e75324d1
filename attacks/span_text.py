"""Exact text recovery from the span of first-layer gradients, in the spirit of DAGER (Petrov et al., NeurIPS 2024).

The gradient of a linear layer's weight is a sum of outer products of its inputs and output gradients,
dL/dW = sum_i x_i delta_i^T, so its column space is spanned by the inputs x_i of the tokens that carry loss. When
the batch has fewer such tokens than the hidden size d (B * n < d), that span is a proper subspace, and a candidate
input lies in it only if it was one of the batch's inputs. For a transformer's first attention block the inputs are
known functions of (token, position): x = LN(E[token] + P[position]) (GPT-2's ``ln_1``; BERT's embedding
LayerNorm, token type 0). So:

1. **Tokens per position** (layer 1): every (vocabulary token, position) pair is tested; those whose input lies in
   the span of the first block's query/key/value weight gradient (relative distance < ``tol``) are the candidates.
   The test needs no trained weights: random initialisation is fine. The span's rank counts only the singular
   values above what float32 rounding of the sent weights adds (:func:`_rounding_floor`): the server recovers the
   gradient as (global - sent) / lr. For an encoder's batch of one, each position's nearest input is read off.
2. **Sentences** (causal LMs, layer 2): the second block's input at position p depends on the tokens 0..p only, so
   a prefix extended by a candidate is kept only if its second-block input lies in the span of the second block's
   gradient: sequences grow token by token, and false candidates of step 1 die there. An encoder (BERT) is
   bidirectional: a batch of one sentence is read off step 1 directly; larger batches are not ordered (the attack
   says so and keeps the per-position best).
3. **What the span cannot see**: a causal LM's last real token predicts a pad (or nothing), so it carries no loss and
   is not in any span; it is chosen among the candidate tokens by the smallest full-update gradient distance, one
   sentence at a time (deterministic), each sentence's gradient clipped as DP-SGD clipped it when the public
   defense list says so (the batch gradient is the mean of the clipped sentence gradients).

Where the structure does not pin the batch down (the span is full rank because B * n >= d, the update is not
FedSGD, or no sentence survives) the attack falls back to ``fallback`` (TAG, ``attacks.tag``, with
``fallback_params``) and reports ``span_fallback = 1`` with the reason as an artifact; ``fallback = "none"`` raises
instead (``best_of`` uses it so, beside its own TAG members).
FedAvg with several local steps mixes the spans of K different models: not modelled (DAGER's FedAvg variant is not
built), so those updates fall back too. Scores: token accuracy, ``exact_sentences``, ROUGE-1/2/L (the harness).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from attacks.base import ATTACKS, Attack, Observation, Reconstruction
from attacks.gradients import (
    attack_model, examples_touched, gradient_distance, infer_labels, observed_target, simulate,
)
from attacks.threat import public_defenses


ENCODER_TOL, ENCODER_GAP = 0.05, 0.3  # an encoder position is real: best distance < 0.05 and < 0.3 x the second's
VOCAB_CHUNK = 2**17  # (position, token) inputs tested at once: 2^17 x d float64 (d = 768: 0.8 GB)


def _span_basis(g: torch.Tensor, rank_tol: float, floor: float = 0.0) -> torch.Tensor:
    """Orthonormal basis [d, r] of the column space of g [d, k]: singular values above ``rank_tol`` x the largest and
    above ``floor`` (what the float32 rounding of the sent weights alone produces, :func:`_rounding_floor`)."""
    U, S, _ = torch.linalg.svd(g, full_matrices=False)
    r = int((S > max(rank_tol * float(S[0]), floor)).sum()) if S.numel() and float(S[0]) > 0 else 0
    return U[:, :r]


def _rounding_floor(sent: torch.Tensor, lr: float, margin: float = 3.0) -> float:
    """The largest singular value float32 rounding of the client's weights ``sent`` [d, k] puts into the recovered
    gradient (global - sent) / lr, times ``margin``: each entry's error is uniform within half a unit in the last
    place (std ulp / sqrt 12), and an i.i.d. d x k matrix of std s has top singular value ~ s (sqrt d + sqrt k).
    Weight-sending FL (Flower's FedAvg messages) pays it, a gradient-sending one does not: on MiniLM (lr 0.03) it
    sits at 1.7e-4 of the largest singular value and hides directions of a B = 4 batch (measured)."""
    if sent.dtype != torch.float32:
        return 0.0
    w = sent.abs()
    ulp = (torch.nextafter(w, torch.full_like(w, float("inf"))) - w).double()
    s = float(torch.sqrt((ulp**2 / 12).mean())) / max(lr, 1e-300)
    return margin * s * (sent.shape[0] ** 0.5 + sent.shape[1] ** 0.5)


def _distance(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Relative distance of each row of x [..., d] to the span of ``basis`` [d, r]."""
    proj = (x @ basis) @ basis.T
    return (x - proj).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-300)


@ATTACKS.register("span_text")
class SpanText(Attack):
    """Exact text recovery from the span of the first blocks' weight gradients (DAGER-style; module docstring)."""

    def __init__(self, tol: float = 1e-3, rank_tol: float = 1e-6, max_prefixes: int = 4096, fallback: str = "tag",
                 fallback_params: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not 0 < tol < 1 or not 0 < rank_tol < 1:
            raise ValueError(f"span_text tol and rank_tol must be in (0, 1), got {tol!r}, {rank_tol!r}")
        if max_prefixes < 1:
            raise ValueError(f"span_text max_prefixes must be >= 1, got {max_prefixes!r}")
        # rank_tol 1e-6: 1e-5 cut true directions of the second block at B = 16 (tiny GPT-2); the rounding floor
        # (_rounding_floor), computed per update, is the cut that matters where it is higher (MiniLM: 1.7e-4)
        self.tol, self.rank_tol, self.max_prefixes = float(tol), float(rank_tol), int(max_prefixes)
        # fallback "none": where the span does not pin the batch, raise ValueError instead (best_of then skips this
        # member and its own TAG members answer, so TAG is not run twice)
        self.fallback = None if fallback == "none" else ATTACKS.create(
            fallback, **(fallback_params if fallback_params is not None else {"iterations": 300}))

    # -- the model's first blocks ------------------------------------------------------------------------------
    @staticmethod
    def _layout(model: nn.Module) -> dict[str, Any]:
        """The modules the span test reads, for GPT-2 (causal) and BERT (encoder)."""
        if hasattr(model, "transformer") and hasattr(model.transformer, "h"):  # GPT-2
            t = model.transformer
            return {"causal": True, "wte": t.wte.weight, "wpe": t.wpe.weight, "ln": [b.ln_1 for b in t.h],
                    "proj": ["transformer.h.%d.attn.c_attn.weight" % i for i in range(len(t.h))], "conv1d": True,
                    "blocks": t.h}
        bert = getattr(model, "bert", None)
        if bert is not None:
            e = bert.embeddings
            return {"causal": False, "wte": e.word_embeddings.weight, "wpe": e.position_embeddings.weight,
                    "tt": e.token_type_embeddings.weight[0], "ln": [e.LayerNorm],
                    "proj": ["bert.encoder.layer.0.attention.self.query.weight"], "conv1d": False}
        raise ValueError("span_text knows GPT-2 (transformer.h) and BERT (bert.embeddings) models; use tag for others")

    def attack(self, obs: Observation) -> Reconstruction:
        t0 = time.perf_counter()
        if obs.task.kind not in ("text", "lm") or obs.task.seq_len <= 0:
            raise ValueError("span_text attacks text tasks (task.kind 'text' or 'lm' with task.seq_len > 0)")
        steps = max(int(obs.metadata.get("local_steps", 1)), 1)
        if steps != 1 or str(obs.metadata.get("optimizer", "sgd")).lower() == "adam":
            return self._fallback(obs, t0, "FedAvg (several local steps or Adam): spans of several models mix")
        model = attack_model(obs.model_factory, torch.float64, str(obs.metadata.get("model_mode", "eval")))
        model.load_state_dict({k: v.double() for k, v in obs.global_params.items()}, strict=False)
        lay = self._layout(model)
        grad, _, lr = observed_target(obs, torch.float64)  # the FedSGD gradient (global - client) / lr
        L = obs.task.seq_len
        g1 = grad[lay["proj"][0]]
        g1 = g1 if lay["conv1d"] else g1.T  # Conv1D [d_in, d_out]; nn.Linear [d_out, d_in]
        floor = _rounding_floor(obs.client_params[lay["proj"][0]], lr)
        b1 = _span_basis(g1, self.rank_tol, floor)
        d = g1.shape[0]
        if b1.shape[1] == 0 or b1.shape[1] >= d - 1:  # (numerically) full rank: B x n >= d, or float32 noise
            return self._fallback(obs, t0, f"first-layer gradient has rank {b1.shape[1]} of {d}: B x n >= d")
        with torch.no_grad():
            base = lay["wpe"][:L, None, :] + (lay["tt"] if "tt" in lay else 0)  # [L, 1, d]
            chunk = max(1, VOCAB_CHUNK // L)  # [L, V, d] in float64 is 3 GB for MiniLM (V 30522, d 384): by parts
            dist1 = torch.cat([_distance(lay["ln"][0](lay["wte"][None, i:i + chunk, :] + base), b1)  # [L, chunk]
                               for i in range(0, lay["wte"].shape[0], chunk)], dim=1)  # [L, V]
        cands = [torch.nonzero(dist1[p] < self.tol).flatten().tolist() for p in range(L)]
        n = examples_touched(obs)
        metrics = {"span_rank": float(b1.shape[1]), "span_dim": float(d), "span_rounding_floor": floor,
                   "span_floor_layer2": _rounding_floor(obs.client_params[lay["proj"][1]], lr)
                   if len(lay["proj"]) > 1 else 0.0,
                   "span_candidates": float(sum(len(c) for c in cands))}
        if lay["causal"]:
            prefixes = self._grow(model, lay, grad, cands, metrics, 8 * n)
            if not prefixes:
                return self._fallback(obs, t0, "no sentence survived the second-layer span test", metrics)
            if len(prefixes) > 4 * n or metrics.get("span_prefixes_capped"):
                return self._fallback(obs, t0, f"the span does not pin the batch down: {len(prefixes)} sentences grew "
                                               f"for {n} examples (rank {b1.shape[1]} of {d})", metrics)
            tokens = self._finish_causal(obs, model, prefixes, n, cands)
        else:
            # an encoder's batch of one: each position's nearest input. A rank cut at the rounding floor perturbs the
            # basis, so the true input sits at 1e-4..1e-2 rather than below tol (MiniLM, measured): a position is
            # real where its best distance is below ENCODER_TOL and well apart from the runner-up (a pad position's
            # best is ~0.1, within 2x of its second)
            two = torch.topk(dist1, 2, dim=-1, largest=False).values  # [L, 2]
            best = dist1.argmin(-1)  # [L]
            real = torch.tensor([len(c) > 0 for c in cands]) | (
                (two[:, 0] < ENCODER_TOL) & (two[:, 0] < ENCODER_GAP * two[:, 1]))
            row = torch.where(real, best, torch.full_like(best, obs.task.pad_token_id))
            if n == 1 and int(real.sum()) != b1.shape[1]:  # one sentence: each real position is one span direction
                return self._fallback(obs, t0, f"{int(real.sum())} positions read off a span of rank {b1.shape[1]}: "
                                               "the span does not pin the sentence down (directions under the "
                                               "float32 rounding floor, or inputs it does not model: dropout)",
                                      metrics)
            tokens = row.expand(n, L).clone()
            metrics["span_unordered_batch"] = float(n > 1)
        metrics.update({"span_fallback": 0.0, "attack_seconds": time.perf_counter() - t0, "iterations": 0.0})
        labels = None
        if obs.task.kind == "text":
            labels = infer_labels(obs, n)
        return Reconstruction(tokens=tokens, labels=labels, metrics=metrics)

    @torch.no_grad()
    def _grow(self, model: nn.Module, lay: dict[str, Any], grad: dict[str, torch.Tensor], cands: list[list[int]],
              metrics: dict[str, float], most: int) -> list[list[int]]:
        """Causal LM: grow prefixes token by token; keep an extension whose second-block input is in the span.
        More than ``most`` live prefixes (or ``max_prefixes`` trials) means the span does not pin the batch: stop."""
        if len(lay["proj"]) < 2:
            raise ValueError("span_text needs a second transformer block to order a causal LM's tokens")
        b2 = _span_basis(grad[lay["proj"][1]], self.rank_tol, metrics.get("span_floor_layer2", 0.0))
        metrics["span_rank_layer2"] = float(b2.shape[1])
        block0, ln2 = lay["blocks"][0], lay["ln"][1]
        live = [[t] for t in cands[0]]
        done: list[list[int]] = []
        for p in range(1, len(cands)):
            if not live:
                break
            trials = [pre + [t] for pre in live for t in cands[p]]
            if len(trials) > self.max_prefixes:
                metrics["span_prefixes_capped"] = 1.0
                trials = trials[: self.max_prefixes]
            extended: set[int] = set()
            kept: list[list[int]] = []
            if trials:
                ids = torch.tensor(trials)  # [N, p + 1]
                h0 = lay["wte"][ids] + lay["wpe"][: p + 1][None]
                out = block0(h0)
                h1 = out[0] if isinstance(out, tuple) else out  # [N, p + 1, d]
                ok = _distance(ln2(h1[:, p]), b2) < self.tol
                for i in torch.nonzero(ok).flatten().tolist():
                    kept.append(trials[i])
                    extended.add(i // max(len(cands[p]), 1))
            done += [pre for i, pre in enumerate(live) if i not in extended]
            live = kept
            if len(live) + len(done) > most:
                metrics["span_prefixes_capped"] = 1.0
                break
        done += live
        metrics["span_sentences_grown"] = float(len(done))
        return done

    @torch.no_grad()
    def _finish_causal(self, obs: Observation, model: nn.Module, prefixes: list[list[int]], n: int,
                       cands: list[list[int]]) -> torch.Tensor:
        """[n, L] tokens: the n longest grown prefixes, each completed by the last token that brings the recomputed
        update closest to the observed one (a causal LM's last token is in no span), padded with the pad token.
        The batch gradient is the mean of the sentences', so each last token is scored against the others' fixed
        gradients: one single-sentence gradient per candidate."""
        L, pad = obs.task.seq_len, int(obs.task.pad_token_id)
        prefixes = sorted(prefixes, key=len, reverse=True)[:n]
        while len(prefixes) < n:  # fewer distinct sentences than examples: repeats
            prefixes.append(list(prefixes[len(prefixes) % max(len(prefixes), 1)]))
        params = {k: v.detach().double() for k, v in obs.global_params.items()}
        tgt, _, lr = observed_target(obs, torch.float64)
        names = [k for k in tgt if k in params]
        emb = next(k for k in params if k.endswith("wte.weight"))
        upd = tgt[emb].norm(dim=-1)
        pool = torch.topk(upd, min(int(upd.numel()), 4 * L)).indices.tolist()  # tokens whose rows moved most
        rows = [pre + [pad] * (L - len(pre)) for pre in prefixes]
        leaves = {k: v.clone().requires_grad_(k in names) for k, v in params.items()}  # simulate never writes them
        clip = public_defenses(obs.defenses).example_clip  # DP-SGD clips each sentence's gradient: model it

        def one(row: list[int], length: int) -> dict[str, torch.Tensor]:
            """The gradient of one sentence's loss (the batch's is their mean: fedprobe's LM loss averages examples)."""
            ids = torch.tensor([row])
            mask = torch.tensor([[1] * length + [0] * (L - length)])
            with torch.enable_grad():
                sim = simulate(model, leaves, names,
                               {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100), obs.task,
                               1, lr, 1, example_clip=clip, create_graph=False)  # scored, never differentiated
            return {k: v.detach() for k, v in sim.items()}

        lengths = [min(len(pre) + 1, L) for pre in prefixes]
        parts = [one(r, k) for r, k in zip(rows, lengths)]
        total = {k: sum(p[k] for p in parts) for k in names}
        scaled = {k: tgt[k] * len(rows) for k in names}  # B x the mean gradient = the sum of the sentences'
        for i, pre in enumerate(prefixes):
            if len(pre) >= L:
                continue
            rest = {k: total[k] - parts[i][k] for k in names}
            best, choice, kept = None, pad, parts[i]
            for t in pool:
                trial = list(rows[i])
                trial[len(pre)] = t
                g = one(trial, lengths[i])
                dist = float(gradient_distance({k: rest[k] + g[k] for k in names}, scaled, "l2"))
                if best is None or dist < best:
                    best, choice, kept = dist, t, g
            rows[i][len(pre)] = choice
            total = {k: rest[k] + kept[k] for k in names}
            parts[i] = kept
        return torch.tensor(rows)

    def _fallback(self, obs: Observation, t0: float, why: str, metrics: dict[str, float] | None = None
                  ) -> Reconstruction:
        if self.fallback is None:
            raise ValueError(f"span_text: {why} (fallback = 'none')")
        rec = self.fallback.attack(obs)
        rec.metrics.update(metrics or {})
        rec.metrics.update({"span_fallback": 1.0, "attack_seconds": time.perf_counter() - t0})
        rec.artifacts["span_fallback_reason"] = why
        return rec
