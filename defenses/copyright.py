"""Copyright-protected objective (seed 9, Chu, Song, Yang, AAAI-2024, arXiv 2308.12247).

Paper / authors' code: L_total = L + gamma / L_cp, where L is the training loss over the
batch and L_cp the loss over the examples flagged as copyrighted ("protected"); its
gradient is grad L - gamma / L_cp^2 grad L_cp, so training pushes L_cp up. A model is
tau-copyright-protected when L_cp / n_1 >= tau + L_rest / n_2 (per-example means).

Fixes of the authors' run.py pitfalls (seed spec 9(e)), all project choices:
* rows are selected with a **boolean** mask (``protected.bool()``), never an integer index;
* padding never counts: ``models.tasks.per_example_loss`` ignores label -100;
* tau and perplexity are measured with **plain** cross-entropy (no gamma term) in
  ``after_training``;
* the gamma / L_cp gradient reaches the whole model by default; ``detach_body = true``
  reproduces the authors' ``hidden.detach()`` (only the output head "forgets");
* L_cp is floored at ``min_loss`` so gamma / L_cp stays finite.

Which examples are protected: the batch key ``protected`` ([B] bool) when the data
provides it; otherwise a deterministic hash of the example's content (``input_ids``, or
``pixel_values``) with ``seed`` marks a fraction ``proportion`` of the examples, the same
examples in every epoch, round and batch order (the authors draw a random split once).
"""

from __future__ import annotations

import hashlib
import math

import torch

from defenses.base import DEFENSES, ClientContext, Defense
from models.tasks import model_inputs, per_example_loss


def copyright_objective(loss: torch.Tensor, loss_cp: torch.Tensor, gamma: float) -> torch.Tensor:
    """L + gamma / L_cp (seed 9 objective)."""
    return loss + gamma / loss_cp


def hashed_mask(rows: torch.Tensor, proportion: float, seed: int = 0) -> torch.Tensor:
    """[B] bool: row i is protected iff blake2b(seed, row bytes) / 2^64 < proportion."""
    key = str(seed).encode()
    data = rows.detach().reshape(len(rows), -1).cpu().contiguous().numpy()
    out = [int.from_bytes(hashlib.blake2b(r.tobytes(), key=key, digest_size=8).digest(), "little") / 2**64 < proportion
           for r in data]
    return torch.tensor(out, dtype=torch.bool, device=rows.device)


@DEFENSES.register("copyright")
class CopyrightProtection(Defense):
    """Copyright-protected objective L + gamma / L_cp over protected examples; reports the tau margin."""

    def __init__(self, gamma: float = 0.2, proportion: float = 0.1, seed: int = 0, detach_body: bool = False,
                 min_loss: float = 1e-3, eval_batches: int = 8) -> None:
        if not (gamma >= 0 and math.isfinite(gamma)):
            raise ValueError(f"copyright gamma must be a finite number >= 0, got {gamma!r}")
        if not 0 <= proportion <= 1:
            raise ValueError(f"copyright proportion must be in [0, 1], got {proportion!r}")
        if not min_loss > 0:
            raise ValueError(f"copyright min_loss must be > 0, got {min_loss!r}")
        if eval_batches < 0:
            raise ValueError(f"copyright eval_batches must be >= 0 (0 = skip the tau metric), got {eval_batches!r}")
        self.gamma = float(gamma)
        self.proportion = float(proportion)
        self.seed = int(seed)
        self.detach_body = detach_body
        self.min_loss = float(min_loss)
        self.eval_batches = int(eval_batches)

    def protected(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] bool mask of protected rows (batch key ``protected`` or content hash)."""
        B = len(batch["labels"])
        if "protected" in batch:
            mask = torch.as_tensor(batch["protected"])
            if mask.shape != (B,):
                raise ValueError(f"batch['protected'] must have shape [B] = [{B}], got {tuple(mask.shape)}")
            return mask.bool()  # 9(e): LongTensor indexing would pick rows 0 and 1
        rows = batch["input_ids"] if "input_ids" in batch else batch.get("pixel_values")
        if rows is None:
            raise ValueError("copyright: batch has no 'protected' flag and no input_ids/pixel_values to hash")
        return hashed_mask(rows, self.proportion, self.seed)

    def _head_only_loss(self, ctx: ClientContext, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Authors' variant: the gamma term sees the body's last hidden state detached."""
        head = ctx.model.get_output_embeddings() if hasattr(ctx.model, "get_output_embeddings") else None
        if head is None:
            raise ValueError("copyright detach_body needs a model with an output head (get_output_embeddings)")
        sub = {k: v[mask] for k, v in model_inputs(batch).items()}
        hidden = ctx.model(**sub, output_hidden_states=True).hidden_states[-1].detach()  # [b, L, D]
        return per_example_loss(head(hidden), batch["labels"][mask], ctx.task)

    def loss(self, loss: torch.Tensor, ctx: ClientContext, batch: dict[str, torch.Tensor],
             per_example: torch.Tensor | None) -> torch.Tensor:
        if self.gamma == 0:
            return loss
        if per_example is None:
            raise ValueError("copyright needs the per-example loss [B] from the training loop")
        mask = self.protected(batch).to(per_example.device)
        if not bool(mask.any()):
            return loss
        cp = self._head_only_loss(ctx, batch, mask) if self.detach_body else per_example[mask]
        return copyright_objective(loss, cp.mean().clamp_min(self.min_loss), self.gamma)

    @torch.no_grad()
    def after_training(self, ctx: ClientContext) -> None:
        """tau margin and perplexities with plain cross-entropy on (up to eval_batches of) the local data."""
        if self.eval_batches == 0:
            return
        model, was_training = ctx.model, ctx.model.training
        model.eval()
        sums = {True: [0.0, 0, 0.0, 0], False: [0.0, 0, 0.0, 0]}  # loss sum, examples, token-loss sum, tokens
        for i, batch in enumerate(ctx.loader):
            if i >= self.eval_batches:
                break
            if len(batch["labels"]) == 0:
                continue
            batch = {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logits = model(**model_inputs(batch)).logits
            per = per_example_loss(logits, batch["labels"], ctx.task)  # [B]
            if ctx.task.kind == "lm":
                ntok = (batch["labels"][:, 1:] != -100).sum(1).float()
            else:
                ntok = torch.ones_like(per)
            mask = self.protected(batch).to(per.device)
            for flag in (True, False):
                m = mask if flag else ~mask
                s = sums[flag]
                s[0] += float(per[m].sum()); s[1] += int(m.sum())
                s[2] += float((per[m] * ntok[m]).sum()); s[3] += int(ntok[m].sum())
        model.train(was_training)
        mean = {f: (s[0] / s[1] if s[1] else float("nan")) for f, s in sums.items()}
        ppl = {f: (math.exp(min(s[2] / s[3], 50.0)) if s[3] else float("nan")) for f, s in sums.items()}
        ctx.metrics.update({
            "cp_tau": mean[True] - mean[False],
            "cp_loss_protected": mean[True],
            "cp_loss_unprotected": mean[False],
            "cp_ppl_protected": ppl[True],
            "cp_ppl_unprotected": ppl[False],
            "cp_protected_fraction": sums[True][1] / max(sums[True][1] + sums[False][1], 1),
        })
