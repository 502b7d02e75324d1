"""Run one attack on one observation, score it against ground truth, save artifacts.

Ground truth (the simulation's copy of the victim's batch, in the batch-dict format of
``models.tasks``) is used here only, after the attack returned; it never reaches the
attack. Score names are unprefixed (``psnr``, ``ssim``, ``token_accuracy``, ``rouge1``,
``rouge2``, ``rougeL``, ``label_accuracy``) followed by the attack's own metrics.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from attacks.base import Attack, Observation, Reconstruction
from attacks.metrics import image_scores, label_accuracy, match_images, text_scores
from models.tasks import TaskSpec


def to_unit_range(x: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """Undo the task's normalisation and clamp to [0, 1] (identity when mean/std are unset)."""
    x = x.detach().float().cpu()
    if task.mean:
        shape = (1, -1, 1, 1)
        x = x * torch.tensor(task.std).view(shape) + torch.tensor(task.mean).view(shape)
    return x.clamp(0, 1)


def score(rec: Reconstruction, ground_truth: dict[str, torch.Tensor] | None, task: TaskSpec) -> dict[str, float]:
    """Reconstruction scores for whatever the reconstruction and ground truth both hold."""
    if not ground_truth:
        return {}
    out: dict[str, float] = {}
    if rec.inputs is not None and "pixel_values" in ground_truth:
        out.update(image_scores(to_unit_range(rec.inputs, task), to_unit_range(ground_truth["pixel_values"], task)))
    if rec.tokens is not None and "input_ids" in ground_truth:
        out.update(text_scores(rec.tokens.cpu(), ground_truth["input_ids"].cpu(), ground_truth.get("attention_mask")))
    if rec.labels is not None and "labels" in ground_truth and task.kind != "lm":
        out["label_accuracy"] = label_accuracy(rec.labels.cpu(), ground_truth["labels"].cpu())
    return out


def attack_and_score(attack: Attack, obs: Observation,
                     ground_truth: dict[str, torch.Tensor] | None) -> tuple[Reconstruction, dict[str, float]]:
    """(reconstruction, scores + attack metrics); the attack sees ``obs`` only."""
    t0 = time.perf_counter()
    rec = attack.attack(obs)
    scores = score(rec, ground_truth, obs.task)
    scores.update({k: float(v) for k, v in rec.metrics.items()})
    scores.setdefault("attack_seconds", time.perf_counter() - t0)
    return rec, scores


def run_attack(attack: Attack, obs: Observation, ground_truth: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """Scores and attack metrics of one attack on one observation."""
    return attack_and_score(attack, obs, ground_truth)[1]


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
        if orig is not None and orig.shape == recon.shape:
            recon = recon[match_images(recon, orig)]
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
