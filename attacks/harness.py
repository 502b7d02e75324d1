"""Run one attack on one observation, score it against ground truth, save artifacts.

Ground truth (the simulation's copy of the victim's batch, in the batch-dict format of
``models.tasks``) is used here only, after the attack returned; it never reaches the
attack. Score names are unprefixed (``psnr``, ``psnr_median``, ``ssim``,
``recovered_fraction``, ``exact_fraction``, ``token_accuracy``, ``exact_sentences``, ``rouge1``, ``rouge2``,
``rougeL``, ``label_accuracy``, ``label_baseline``) followed by the attack's own metrics.
A ``best_of`` reconstruction (``artifacts["members"]``) is scored member by member and
the strongest is kept (:func:`score_best`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from attacks.base import Attack, Observation, Reconstruction
from attacks.metrics import (
    EXACT_PSNR,
    RECOVERED_PSNR,
    image_scores,
    label_accuracy,
    label_baseline,
    match_images,
    per_example_psnr,
    text_scores,
)
from models.tasks import TaskSpec


def to_unit_range(x: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """Undo the task's normalisation and clamp to [0, 1] (identity when mean/std are unset)."""
    x = x.detach().float().cpu()
    if task.mean:
        shape = (1, -1, 1, 1)
        x = x * torch.tensor(task.std).view(shape) + torch.tensor(task.mean).view(shape)
    return x.clamp(0, 1)


def score(rec: Reconstruction, ground_truth: dict[str, torch.Tensor] | None, task: TaskSpec,
          recovered_psnr: float = RECOVERED_PSNR, label_prior: Sequence[float] | None = None,
          image_prior: torch.Tensor | None = None, token_prior: torch.Tensor | None = None) -> dict[str, float]:
    """Reconstruction scores for whatever the reconstruction and ground truth both hold.

    ``label_prior`` (class frequencies the server knows, e.g. of its own test split) adds
    ``label_baseline``: the score of the best data-free guess on the same batch. ``image_prior``
    (a mean image [C, H, W] the server knows, in the task's normalised space) adds ``psnr_baseline``:
    the median PSNR of that one image against each original, the data-free guess's score, and
    ``recovered_baseline``: the share of originals that guess already "recovers" (PSNR >= ``recovered_psnr``).
    ``token_prior`` (one token per position [L], e.g. each position's most frequent token in the server's split)
    adds ``token_baseline`` and ``rouge1_baseline``: that one sentence, guessed for every example, scored the same way."""
    if not ground_truth:
        return {}
    out: dict[str, float] = {}
    if rec.inputs is not None and "pixel_values" in ground_truth:
        orig = to_unit_range(ground_truth["pixel_values"], task)
        out.update(image_scores(to_unit_range(rec.inputs, task), orig, recovered_psnr=recovered_psnr))
        if image_prior is not None:
            guess = to_unit_range(image_prior.reshape(1, *orig.shape[1:]), task).expand_as(orig)
            guess_psnr = per_example_psnr(guess, orig)
            out["psnr_baseline"] = float(guess_psnr.clamp(max=EXACT_PSNR).median())
            out["recovered_baseline"] = float((guess_psnr >= recovered_psnr).float().mean())  # the guess's "recovered"
    if rec.tokens is not None and "input_ids" in ground_truth:
        ids, mask = ground_truth["input_ids"].cpu(), ground_truth.get("attention_mask")
        out.update(text_scores(rec.tokens.cpu(), ids, mask))
        if token_prior is not None and token_prior.shape[-1] == ids.shape[-1]:
            guess = text_scores(token_prior.cpu().reshape(1, -1).expand_as(ids), ids, mask)
            out["token_baseline"], out["rouge1_baseline"] = guess["token_accuracy"], guess["rouge1"]
    if "X" in rec.artifacts and "W" in rec.artifacts and "attention_input" in ground_truth:
        out.update(_layer_input_scores(rec.artifacts["X"], ground_truth["attention_input"], rec.artifacts["W"]))
    if rec.labels is not None and "labels" in ground_truth and task.kind != "lm":
        out["label_accuracy"] = label_accuracy(rec.labels.cpu(), ground_truth["labels"].cpu())
        if label_prior is not None:
            out["label_baseline"] = label_baseline(ground_truth["labels"].cpu(), label_prior)
    return out


def _layer_input_scores(X_hat: torch.Tensor, X_true: torch.Tensor, W: torch.Tensor) -> dict[str, float]:
    """attention_inversion's errors (attacks.attention_inversion.score) per example, averaged.
    ``X_hat`` is [B, d, n] (columns are tokens); the client recorded the layer input as [B, n, d]."""
    from attacks.attention_inversion import score as inversion_score

    rows = [inversion_score(X_hat[b].double(), X_true[b].double().T, W.double()) for b in range(min(len(X_hat), len(X_true)))]
    return {f"layer_input_{k}" if k.startswith("x_") else k: float(sum(r[k] for r in rows) / len(rows)) for k in rows[0]}


def _strength(scores: dict[str, float]) -> tuple[float, ...]:
    """How strong a member was on this victim: (recovered fraction, PSNR), token accuracy, or labels."""
    if "psnr" in scores:
        return (scores.get("recovered_fraction", 0.0), scores["psnr"], scores.get("label_accuracy", 0.0))
    if "token_accuracy" in scores:
        return (scores["token_accuracy"], scores.get("rouge2", 0.0))
    return (scores.get("label_accuracy", 0.0),)


def score_best(rec: Reconstruction, ground_truth: dict[str, torch.Tensor] | None, task: TaskSpec,
               recovered_psnr: float = RECOVERED_PSNR, label_prior: Sequence[float] | None = None,
               image_prior: torch.Tensor | None = None, token_prior: torch.Tensor | None = None
               ) -> tuple[Reconstruction, dict[str, float]]:
    """(the reconstruction to show, its scores); for ``best_of`` the strongest member, with every
    member's scores as ``<label>/<score>`` and ``best_member`` (its index)."""
    members = rec.artifacts.get("members")
    if not members:
        return rec, score(rec, ground_truth, task, recovered_psnr, label_prior, image_prior, token_prior)
    per = [score(r, ground_truth, task, recovered_psnr, label_prior, image_prior, token_prior) for _, r in members]
    best = max(range(len(members)), key=lambda i: _strength(per[i]))
    out = dict(per[best])
    for (label, _), s in zip(members, per):
        out.update({f"{label}/{k}": v for k, v in s.items()})
    out["best_member"] = float(rec.artifacts.get("member_index", range(len(members)))[best])  # in the member list
    return members[best][1], out


def attack_and_score(attack: Attack, obs: Observation, ground_truth: dict[str, torch.Tensor] | None,
                     recovered_psnr: float = RECOVERED_PSNR, label_prior: Sequence[float] | None = None,
                     image_prior: torch.Tensor | None = None) -> tuple[Reconstruction, dict[str, float]]:
    """(reconstruction shown, scores + attack metrics); the attack sees ``obs`` only."""
    t0 = time.perf_counter()
    rec = attack.attack(obs)
    shown, scores = score_best(rec, ground_truth, obs.task, recovered_psnr, label_prior, image_prior)
    scores.update({k: float(v) for k, v in rec.metrics.items()})
    scores.setdefault("attack_seconds", time.perf_counter() - t0)
    return shown, scores


def run_attack(attack: Attack, obs: Observation, ground_truth: dict[str, torch.Tensor] | None,
               **kwargs: Any) -> dict[str, float]:
    """Scores and attack metrics of one attack on one observation."""
    return attack_and_score(attack, obs, ground_truth, **kwargs)[1]


GRID_COLUMNS = 16  # images per row of the PNG grid
MAX_GRID_IMAGES = 64  # a larger batch is shown by its first 64 (matched) images


def save_artifacts(rec: Reconstruction, ground_truth: dict[str, torch.Tensor] | None, task: TaskSpec, out_dir: str | Path,
                   decode: Callable[[list[int]], str] | None = None, stem: str = "attack") -> list[Path]:
    """Write ``{stem}_images.png`` (originals above reconstructions, matched order) and/or
    ``{stem}_text.txt`` (original vs recovered sentences; token ids when ``decode`` is None)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    gt = ground_truth or {}
    if rec.inputs is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recon = to_unit_range(rec.inputs, task)
        orig = to_unit_range(gt["pixel_values"], task) if "pixel_values" in gt else None
        psnrs = None
        if orig is not None and orig.shape == recon.shape:
            recon = recon[match_images(recon, orig)]
            psnrs = per_example_psnr(recon, orig).tolist()
        rows = [r for r in (orig, recon) if r is not None]
        titles = ["original", "reconstruction"][-len(rows):]
        n = min(recon.shape[0], MAX_GRID_IMAGES)
        cols = min(n, GRID_COLUMNS)
        blocks = -(-n // cols)  # each block: an originals row above its reconstructions row
        fig, axes = plt.subplots(blocks * len(rows), cols, figsize=(1.2 * cols, 1.3 * blocks * len(rows)),
                                 squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for i in range(n):
            block, col = divmod(i, cols)
            for r, (imgs, title) in enumerate(zip(rows, titles)):
                img = imgs[i].permute(1, 2, 0).numpy()
                ax = axes[block * len(rows) + r][col]
                ax.set_axis_on()
                ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(title, fontsize=7)
                if title == "reconstruction" and psnrs is not None:
                    v = psnrs[i]
                    ax.set_xlabel("exact" if v >= EXACT_PSNR else f"{v:.1f} dB", fontsize=6)
        fig.tight_layout()
        p = out / f"{stem}_images.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    if rec.tokens is not None:
        dec = decode or (lambda ids: " ".join(map(str, ids)))
        lines = []
        origs = gt.get("input_ids")
        for i in range(rec.tokens.shape[0]):
            if origs is not None and i < len(origs):
                lines.append(f"original : {dec([int(t) for t in origs[i]])}")
            lines.append(f"recovered: {dec([int(t) for t in rec.tokens[i]])}")
            lines.append("")
        p = out / f"{stem}_text.txt"
        p.write_text("\n".join(lines))
        paths.append(p)
    return paths
