"""Steps and wall time to a target training loss: each wrapper against its base optimizer.

Tasks (offline, scikit-learn data only):
  logreg  multinomial logistic regression on standardised sklearn digits (64 -> 10), batch 64
  vit     tiny ViT (transformers ViTForImageClassification: hidden 32, 2 layers, 2 heads,
          8x8 images, patch 2) on sklearn digits trained centrally, batch 64

For every (task, base, method) and seed: train until the full training loss (evaluated every
``eval_every`` steps, not timed) reaches the target, or ``max_steps``. Wall time counts the
optimizer steps only (forward, backward, step). Reported: mean and std over the seeds that
reached the target, and how many reached it.

    .venv/bin/python benchmarks/bench_optimizers.py --seeds 5 --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import optimizers  # noqa: E402

METHODS = ["base", "dbd", "rdbd", "ra", "rva"]


@dataclass
class Task:
    name: str
    bases: dict[str, float]  # base optimizer -> lr
    target: float
    max_steps: int
    eval_every: int


TASKS = {
    "logreg": Task("logreg", {"sgd": 0.1, "momentum": 0.05, "adam": 0.01}, target=0.12, max_steps=1500, eval_every=5),
    "vit": Task("vit", {"adam": 0.003}, target=0.5, max_steps=800, eval_every=10),
}


def load_digits(image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = d.data.astype(np.float32)
    if image:
        x = (x / 16.0 - 0.5) / 0.5
        xt = torch.from_numpy(x).view(-1, 1, 8, 8)
    else:
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        xt = torch.from_numpy(x)
    return xt, torch.from_numpy(d.target).long()


def make_model(task: str) -> nn.Module:
    if task == "logreg":
        return nn.Linear(64, 10)
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(cfg)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x) if isinstance(model, nn.Linear) else model(pixel_values=x)
    return out if isinstance(out, torch.Tensor) else out.logits


def run(task: Task, base: str, method: str, seed: int, x: torch.Tensor, y: torch.Tensor) -> tuple[int | None, float, dict]:
    torch.manual_seed(seed)
    model = make_model(task.name)
    name, options = parse_method(method)
    name = base if name == "base" else name
    opt = optimizers.build(name, model.parameters(), base=base, lr=task.bases[base], **options)
    g = torch.Generator().manual_seed(1000 + seed)
    n, bs, step, elapsed = len(x), 64, 0, 0.0
    while step < task.max_steps:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - bs + 1, bs):
            idx = perm[i : i + bs]
            t0 = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(logits(model, x[idx]), y[idx]).backward()
            opt.step()
            elapsed += time.perf_counter() - t0
            step += 1
            if step % task.eval_every == 0:
                with torch.no_grad():
                    loss = nn.functional.cross_entropy(logits(model, x), y).item()
                if not np.isfinite(loss):
                    return None, elapsed, optimizers.diagnostics(opt)
                if loss <= task.target:
                    return step, elapsed, optimizers.diagnostics(opt)
            if step >= task.max_steps:
                break
    return None, elapsed, optimizers.diagnostics(opt)


def parse_method(spec: str) -> tuple[str, dict]:
    """``"ra@rule=direction;scope=tensor"`` -> ("ra", {"rule": "direction", "scope": "tensor"})."""
    from fl.config import parse_value

    name, _, rest = spec.partition("@")
    return name, {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in rest.split(";") if kv)}


def fmt(vals: list[float], digits: int) -> str:
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="logreg,vit")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma list; 'name@key=value;key=value' passes wrapper options, e.g. ra@rule=direction")
    ap.add_argument("--write", default="", help="append the markdown section to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lines = [
        f"## Optimizer wrappers vs base: steps and time to a target loss ({dt.date.today().isoformat()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), torch "
        f"{torch.__version__}, 1 thread. Command: `.venv/bin/python benchmarks/bench_optimizers.py "
        f"--tasks {args.tasks} --seeds {args.seeds}"
        + (f" --methods '{args.methods}'" if args.methods != ",".join(METHODS) else "") + "`",
        "",
        "Steps/time: mean ± std over the seeds that reached the target (reached = n/seeds); "
        "time = optimizer steps only (forward, backward, step), evaluation excluded. Wrapper options are the defaults "
        "unless the method names them (name@key=value).",
        "",
        "| task (target loss) | base (lr) | method | reached | steps | time [s] | diagnostics (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for tname in args.tasks.split(","):
        task = TASKS[tname]
        x, y = load_digits(image=tname == "vit")
        for base, lr in task.bases.items():
            for method in args.methods.split(","):
                steps, times, diags = [], [], []
                for seed in range(args.seeds):
                    s, t, d = run(task, base, method, seed, x, y)
                    diags.append(d)
                    if s is not None:
                        steps.append(s)
                        times.append(t)
                keys = sorted(diags[0])
                dtext = ", ".join(f"{k} {statistics.mean(d[k] for d in diags):.3g}" for k in keys if k in
                                  ("lr_scale", "revert_rate", "reject_rate", "gain"))
                row = (f"| {tname} ({task.target}) | {base} ({lr}) | {method} | {len(steps)}/{args.seeds} | "
                       f"{fmt(steps, 0)} | {fmt(times, 2)} | {dtext or '-'} |")
                lines.append(row)
                print(row, flush=True)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
