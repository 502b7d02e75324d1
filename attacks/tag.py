"""TAG (Deng et al. 2021): text gradient matching (L2 + 0.1 L1) in the continuous ``inputs_embeds`` space.

Tokens come back by nearest embedding among the tokens whose embedding rows received gradient (breaching's
``from-limited-embedding``); a first start matches positions from the position-embedding gradient. [project's
choice] A greedy discrete refinement (``refine_sweeps``: for every position try every candidate token, keep the
one with the smallest distance on the *full* update, embedding included), in the spirit of LAMP's discrete steps;
``refine_sweeps=0`` gives plain TAG.

Labels of a causal LM (``lm_labels``): ``"soft"`` (default) optimises next-token label logits [n, L, V] jointly with
the embeddings, as breaching's TAG does (``benchmarks/bench_text_vs_breaching.py``), scored under the client's mask
(pads carry no loss, per-sentence means); ``"tokens"`` uses the current nearest tokens as hard labels. On the tiny
GPT-2 the soft labels lifted token accuracy from 0.46 to 0.69 at B = 2 (padded) and from 0.54 to 0.71 at B = 4
(unpadded), and to 1.0 on three B = 1 victims (benchmarks/RESULTS.md).

Padding: the client's batch is padded to ``task.seq_len`` with an attention mask, and pad positions carry no loss
(labels -100 for a causal LM; masked keys and a [CLS] read-out for an encoder), so their position-embedding rows
receive no update. [project's choice] The attack reads the padding off those rows (:meth:`TAG._padding`: zero rows
at the end = right padding, at the start = left padding; in a causal LM the last real token has no input gradient
either, since it predicts a pad, so the length is the last non-zero row + 2, and with left padding the last pad
predicts the first real token, so that row moves: the first real token is the first non-zero row + 1; one left
pad alone is therefore not seen, nor is left padding under eager attention, where a pad query with every key
masked attends to all positions and moves every row) and models the batch as the client
had it: pad tokens fixed at pad positions, the same attention mask, labels -100 there. A batch of several sentences
shares one mask (the longest sentence's; per-sentence lengths are not recovered). The shared machinery (budgets, restarts, threat-model knobs) is
``attacks.gradient_inversion.GradientInversion``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from attacks.base import ATTACKS, Observation, Reconstruction
from attacks.gradient_inversion import GradientInversion
from attacks.gradients import embedding_name, examples_touched, gradient_distance, observed_target, simulate
from attacks.search import SearchState as _Search


@ATTACKS.register("tag")
class TAG(GradientInversion):
    """TAG: text gradient matching (L2 + L1) in embedding space, tokens by nearest embedding."""

    objective = "tag"
    defaults = {"optimizer": "adam", "lr": 0.05, "iterations": 400, "dtype": "float32"}

    def __init__(self, **params: Any) -> None:
        self.refine_sweeps = int(params.pop("refine_sweeps", 1))
        self.init = str(params.pop("init", "positions"))
        self.exact_match = float(params.pop("exact_match", 0.9999))
        self.lm_labels = str(params.pop("lm_labels", "soft"))
        if self.lm_labels not in ("tokens", "soft"):
            raise ValueError(f"tag lm_labels must be 'tokens' or 'soft', got {self.lm_labels!r}")
        self._match_confidence = 0.0
        if self.init not in ("positions", "random"):
            raise ValueError(f"tag init must be 'positions' or 'random', got {self.init!r}")
        super().__init__(**params)
        self._cand: torch.Tensor | None = None
        self._emb: str = ""
        self._scale = 1.0
        self._init_tokens: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None  # [L] 1 = a real token, 0 = padding (from _padding)
        self._pad = 0
        self._pad_embedding: torch.Tensor | None = None

    def _candidates(self, obs: Observation, params: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """Token ids whose embedding rows carry the most update (all used tokens for untied embeddings)."""
        name = embedding_name(obs, params)
        upd = (obs.client_params[name] - obs.global_params[name]).double().norm(dim=-1)  # [V]
        k = min(upd.numel(), n * obs.task.seq_len)
        top = torch.topk(upd, k).indices
        keep = upd[top] > 1e-9 * upd.max().clamp_min(1e-30)
        return top[keep] if keep.any() else top

    def _padding(self, obs: Observation) -> torch.Tensor:
        """[L] mask of the positions that held real tokens, read off the position-embedding update (module doc)."""
        L = obs.task.seq_len
        pos = [k for k in obs.global_params if k.endswith(("position_embeddings.weight", "wpe.weight"))]
        mask = torch.ones(L, dtype=torch.long)
        if not pos:
            return mask
        rows = (obs.client_params[pos[0]] - obs.global_params[pos[0]]).double()[:L].norm(dim=-1)  # [L]
        live = torch.nonzero(rows > 1e-12 * float(rows.max().clamp_min(1e-300))).flatten()
        if len(live) == 0:
            return mask
        first, last = int(live[0]), int(live[-1])
        lm = obs.task.kind == "lm"
        if first > 0:  # left padding; in a causal LM the last pad predicts the first real token, so its row moved
            mask[:first + (1 if lm else 0)] = 0
        else:  # right padding (or none): an LM's last real token predicts a pad, so it did not move either
            mask[min(last + (2 if lm else 1), L):] = 0
        return mask

    def _init_inputs(self, obs: Observation, n: int, params: dict[str, torch.Tensor], gen: torch.Generator,
                     dtype: torch.dtype) -> torch.Tensor:
        if obs.task.kind not in ("text", "lm") or obs.task.seq_len <= 0:
            raise ValueError("tag attacks text tasks; it needs task.kind 'text' or 'lm' and task.seq_len > 0")
        self._emb = embedding_name(obs, params)
        self._cand = self._candidates(obs, params, n)
        self._mask, self._pad = self._padding(obs).to(params[self._emb].device), int(obs.task.pad_token_id)
        E = params[self._emb].detach()
        self._pad_embedding = E[self._pad].clone()  # what the client's pad positions fed the model
        self._scale = float(E.std())  # x is searched in units of the embedding's std, so lr is scale-free
        if self.init == "positions":
            tok = self._position_match(obs, n)
            self._init_tokens = tok
            if tok is not None:
                return (E[tok] / self._scale).to(dtype)
        return self.cfg["init_scale"] * torch.randn(n, obs.task.seq_len, E.shape[1], generator=gen, dtype=dtype)

    def _position_match(self, obs: Observation, n: int) -> torch.Tensor | None:
        """[project's choice] The update of position-embedding row j is the gradient at the input of
        position j (summed over the batch); the update of token t's embedding row is the same gradient
        summed over the positions holding t. So each position takes the candidate whose embedding-row
        update is most cosine-similar. Exact for one sentence with untied embeddings and no repeated
        tokens; approximate otherwise (tied GPT-2 output side, batches, repeats)."""
        pos = [k for k in obs.global_params if k.endswith(("position_embeddings.weight", "wpe.weight"))]
        if not pos or self._cand is None:
            return None
        L = obs.task.seq_len
        P = (obs.client_params[pos[0]] - obs.global_params[pos[0]]).double()[:L]  # [L, d]
        T = (obs.client_params[self._emb] - obs.global_params[self._emb]).double()[self._cand]  # [C, d]
        sim = torch.nn.functional.normalize(P, dim=-1) @ torch.nn.functional.normalize(T, dim=-1).T  # [L, C]
        real = self._real(L, sim.device)
        self._match_confidence = float(sim.max(-1).values[real].mean())
        tok = self._cand[sim.argmax(-1)]
        return self._padded(tok.expand(n, L).clone())  # a batch shares the per-position sum

    def _real(self, L: int, device: torch.device | str) -> torch.Tensor:
        """[L] bool: the positions that held real tokens (all, before _padding ran)."""
        return (self._mask.to(device) if self._mask is not None else torch.ones(L, dtype=torch.long, device=device)) > 0

    def _padded(self, tok: torch.Tensor) -> torch.Tensor:
        """``tok`` [n, L] with the pad token at padding positions."""
        return tok.masked_fill(~self._real(tok.shape[1], tok.device)[None], self._pad)

    def attack(self, obs: Observation) -> Reconstruction:
        """Analytic shortcut: when every position's update matches one token row (cosine > ``exact_match``),
        the position match is the answer and no optimisation runs (it is also immune to the client's dropout,
        which makes the gradient-matching distance itself unreliable)."""
        t0 = time.perf_counter()
        self._match_confidence = 0.0
        n = examples_touched(obs)
        if self.init == "positions" and n == 1:
            params = {k: v.detach() for k, v in obs.global_params.items()}
            self._emb = embedding_name(obs, params)
            self._cand = self._candidates(obs, params, n)
            self._mask, self._pad = self._padding(obs), int(obs.task.pad_token_id)
            tok = self._position_match(obs, n)
            if tok is not None and self._match_confidence > self.exact_match:
                y = self._labels(obs, n)
                return Reconstruction(tokens=tok, labels=y if obs.task.kind != "lm" else None, metrics={
                    "position_match_confidence": self._match_confidence, "candidate_tokens": float(len(self._cand)),
                    "iterations": 0.0, "attack_seconds": time.perf_counter() - t0})
        rec = super().attack(obs)
        rec.metrics["position_match_confidence"] = self._match_confidence
        return rec

    def _model_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The searched embeddings at real positions, the pad token's embedding (fixed) at padding positions."""
        real = self._real(x.shape[1], x.device)
        mask = real.long().expand(x.shape[0], -1)
        if not bool(real.all()) and self._pad_embedding is not None:
            x = torch.where(real[None, :, None], x, self._pad_embedding.to(x.dtype) / self._scale)
        return {"inputs_embeds": x * self._scale, "attention_mask": mask}

    def _excluded(self, obs: Observation, params: dict[str, torch.Tensor]) -> set[str]:
        return {embedding_name(obs, params)}  # inputs_embeds bypass the embedding lookup

    def _nearest(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self._cand is not None
        E = params[self._emb].detach()[self._cand]  # [C, d]
        sim = torch.nn.functional.normalize(x.detach(), dim=-1) @ torch.nn.functional.normalize(E, dim=-1).T
        return self._padded(self._cand[sim.argmax(-1)])  # [n, L]

    def _init_soft(self, search: _Search, n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor | None:
        """``lm_labels="soft"`` (a causal LM): next-token labels [n, L, V] optimised jointly with the embeddings, as
        breaching's TAG does, from its small truncated start; ``"tokens"``: the current tokens (``_refresh_labels``)."""
        t = search.obs.task
        if t.kind != "lm" or self.lm_labels != "soft":
            return super()._init_soft(search, n, gen, dtype)
        return (0.1 * torch.randn(n, t.seq_len, t.vocab_size, generator=gen, dtype=dtype)).clamp(-0.1, 0.1)

    def _lm_labels(self, tok: torch.Tensor) -> torch.Tensor:
        """A causal LM's labels for ``tok``: the tokens, -100 at padding (as the client's batch had them)."""
        return tok.masked_fill(~self._real(tok.shape[1], tok.device)[None], -100)

    def _refresh_labels(self, obs: Observation, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._lm_labels(self._nearest(x, params))  # causal LM: the labels are the current guess of the tokens

    def _finish(self, search: _Search, x: torch.Tensor, soft: torch.Tensor | None) -> Reconstruction:
        obs = search.obs
        tokens = self._nearest(x, search.params)
        y = search.labels if search.labels is not None else (soft.detach().argmax(-1) if soft is not None else None)
        before = None
        starts = [tokens] + ([self._init_tokens] if self._init_tokens is not None else [])
        if self.refine_sweeps > 0 or len(starts) > 1:
            tokens, before, after = self._refine(search, starts, y)
        rec = Reconstruction(tokens=tokens, labels=y if obs.task.kind != "lm" else None)
        rec.metrics["candidate_tokens"] = float(len(self._cand) if self._cand is not None else 0)
        if before is not None:
            rec.metrics.update({"refine_distance_before": before, "refine_distance_after": after})
        return rec

    @torch.no_grad()
    def _refine(self, search: _Search, starts: list[torch.Tensor], y: torch.Tensor | None) -> tuple[torch.Tensor, float, float]:
        """Keep the start (continuous result or position match) with the smallest full-update distance,
        then ``refine_sweeps`` greedy coordinate sweeps over candidate tokens on that distance
        (deterministic; the shared safety cap ends a sweep early and marks the result budget-limited)."""
        obs, params, model = search.obs, search.params, search.model
        steps, lr, bs = search.steps, search.lr, search.bs
        full_tgt, _, _ = observed_target(obs, params[self._emb].dtype)
        names = [k for k in full_tgt if k in params]

        def dist(tok: torch.Tensor) -> float:
            with torch.enable_grad():
                lab = self._lm_labels(tok) if obs.task.kind == "lm" else y
                inputs = {"input_ids": tok, "attention_mask": self._real(tok.shape[1], tok.device).long().expand_as(tok)}
                sim = simulate(model, params, names, inputs, lab, obs.task, steps, lr, bs,  # type: ignore[arg-type]
                               **search.replay, create_graph=False)  # scored only: no double-backward graph
                return float(gradient_distance({k: v.detach() for k, v in sim.items()}, full_tgt, "l2"))

        assert self._cand is not None
        scored = sorted(((dist(t), i) for i, t in enumerate(starts)))
        best, tokens = scored[0][0], starts[scored[0][1]]
        start = best
        for _ in range(self.refine_sweeps):
            changed = False
            real = self._real(tokens.shape[1], tokens.device)
            for i in range(tokens.shape[0]):
                for j in (j for j in range(tokens.shape[1]) if bool(real[j])):  # padding stays padding
                    if time.perf_counter() > search.deadline:
                        search.budget_limited = True
                        return tokens, start, best
                    for c in self._cand.tolist():
                        if c == int(tokens[i, j]):
                            continue
                        trial = tokens.clone()
                        trial[i, j] = c
                        d = dist(trial)
                        if d < best:
                            best, tokens, changed = d, trial, True
            if not changed:
                break
        return tokens, start, best
