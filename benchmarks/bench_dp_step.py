"""CPU time of one DP-SGD step on the quickstart's tiny ViT: fedprobe's ViTEmbeddings grad sampler vs Opacus's own
functorch fallback for that module (issue 19 point 2), with a plain non-DP step beside them.

Each variant trains ``--steps`` steps of the quickstart client's batch (digits, B = 16, SGD) through
``defenses.dp_sgd.DPSGD`` (Opacus hooks, ``wrap_model=False``) in blocks, variants in rotated order, one torch
thread; the figure is the median over blocks of each block's ratio to the sampler's time, so a busy machine slows
every variant of a block alike.

    python benchmarks/bench_dp_step.py [--blocks 7] [--steps 10] [--batch 16]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

os.environ.setdefault("FEDPROBE_CLIENT_SECRET", "bench-dp-step")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from defenses.base import ClientContext  # noqa: E402
from defenses.dp_sgd import DPSGD, _install_vit_embeddings_sampler  # noqa: E402
from fl.config import load_config  # noqa: E402
from fl.data import load_federated  # noqa: E402
from models import build_model, task_for  # noqa: E402
from models.tasks import logits_of, per_example_loss  # noqa: E402


def block(variant: str, cfg, data, task, steps: int, batch: int) -> float:
    """CPU seconds of ``steps`` training steps of ``variant`` (set-up outside the timed window)."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    _install_vit_embeddings_sampler()
    ours = GradSampleHooks.GRAD_SAMPLERS[ViTEmbeddings]
    if variant == "opacus fallback":
        del GradSampleHooks.GRAD_SAMPLERS[ViTEmbeddings]
    try:
        model = build_model(cfg.model, task, seed=0)
        train, _ = data.partition(0)
        loader = DataLoader(train, batch_size=batch, shuffle=False, collate_fn=data.collate, drop_last=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ctx = ClientContext(model=model, optimizer=opt, loader=loader, server_round=1, partition_id=0,
                            num_examples=len(train), sample_rate=batch / len(train), local_steps=steps, epochs=1,
                            device=torch.device("cpu"), task=task, sampled_fraction=1.0, state={})
        dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False) if variant != "no DP" else None
        if dp is not None:
            if variant == "opacus fallback":
                from defenses import dp_sgd

                real, dp_sgd._install_vit_embeddings_sampler = dp_sgd._install_vit_embeddings_sampler, lambda: None
                try:
                    dp.setup(ctx)
                finally:
                    dp_sgd._install_vit_embeddings_sampler = real
            else:
                dp.setup(ctx)
        batches = [b for _, b in zip(range(steps), ctx.loader)]
        model.train()
        start = time.process_time()
        for b in batches:
            ctx.optimizer.zero_grad(set_to_none=True)
            per_example_loss(logits_of(ctx.model, b), b["labels"], task).mean().backward()
            ctx.optimizer.step()
        spent = time.process_time() - start
        if dp is not None:
            dp.after_training(ctx)
        return spent
    finally:
        GradSampleHooks.GRAD_SAMPLERS[ViTEmbeddings] = ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("experiments/quickstart.toml")
    data = load_federated(cfg.data, cfg.federation.num_clients, cfg.experiment.seed)
    task = task_for(cfg.model, data.task)
    variants = ["fedprobe sampler", "opacus fallback", "no DP"]
    block(variants[0], cfg, data, task, 2, args.batch)  # warm-up (imports, first-call costs)
    block(variants[1], cfg, data, task, 2, args.batch)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.blocks):
        for v in variants[i % 3:] + variants[: i % 3]:
            times[v].append(block(v, cfg, data, task, args.steps, args.batch))
    print(f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()}, 1 torch thread, "
          f"{args.blocks} blocks x {args.steps} steps, B = {args.batch}, tiny ViT (quickstart)")
    print("| variant | CPU ms per step (median) | ratio to fedprobe's sampler (median of blocks) |")
    print("|---|---|---|")
    for v in variants:
        ratio = statistics.median(t / s for t, s in zip(times[v], times[variants[0]]))
        print(f"| {v} | {1000 * statistics.median(times[v]) / args.steps:.1f} | {ratio:.3f} |")
    fallback = statistics.median(f / s for f, s in zip(times["opacus fallback"], times["fedprobe sampler"]))
    print(f"opacus-fallback/fedprobe DP step CPU ratio: {fallback:.3f}")


if __name__ == "__main__":
    main()
