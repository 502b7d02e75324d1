"""CPU time of one DP-SGD client round on the quickstart's tiny ViT: fedprobe's ``dp_sgd`` beside a plain Opacus
loop (issue 19 point 2: "DP client round <= 1.1x a plain Opacus loop; a grad sampler for HF ViT embeddings; no
recomputed norms").

A round is what a client's defense adds around training, timed whole: the DP set-up (``make_private``), one epoch
over the client's partition (B = 16, shuffled batches as fl/training.py makes them, not Poisson, so every
variant does the same work; SGD), and the epsilon after the round, each phase timed. The model is built outside the
timed window; the Flower client app around it is ``bench_overhead.py``'s business. Variants:

* ``fedprobe dp_sgd``: ``defenses.dp_sgd.DPSGD`` (hooks on the module, ``wrap_model=False``, its ViTEmbeddings grad
  sampler, the clip fraction counted inside Opacus's clipping, epsilon from the cached ledger);
* ``fedprobe, norms recomputed``: the same, with the clip fraction measured as before 2026-12-03 (a second pass
  over every per-sample gradient after each step);
* ``fedprobe, Opacus fallback``: the same, without fedprobe's ViTEmbeddings sampler (Opacus runs that module
  under functorch);
* ``plain Opacus``: ``PrivacyEngine().make_private`` with its defaults (``GradSampleModule``, its own RDP
  accountant, functorch for ViTEmbeddings), a bare loop, ``engine.get_epsilon``: what a user writes from
  Opacus's tutorial;
* ``plain Opacus + sampler``: the same with fedprobe's ViTEmbeddings sampler registered (Opacus's own cost on
  the same per-sample maths);
* ``no DP``: the bare loop.

Variants run in blocks, each block in a shuffled order (seeded), one torch thread; each figure is the median over
blocks of the block's ratio to the plain Opacus loop, so a busy machine slows every variant of a block alike.

The clipping alone is then timed on one batch's per-sample gradients (fedprobe's counting clip, Opacus's clip plus
the norms recomputed as before, Opacus's clip alone), where a ~4 % effect is not lost in a round's noise.

    python benchmarks/bench_dp_step.py [--blocks 9] [--batch 16] [--clip-reps 101]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import random
import statistics
import time
import warnings

os.environ.setdefault("FEDPROBE_CLIENT_SECRET", "bench-dp-step")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from defenses import dp_sgd  # noqa: E402
from defenses.base import ClientContext  # noqa: E402
from defenses.dp_sgd import DPSGD  # noqa: E402
from fl.config import load_config  # noqa: E402
from fl.data import load_federated  # noqa: E402
from models import build_model, task_for  # noqa: E402
from models.tasks import logits_of, per_example_loss  # noqa: E402

SIGMA, C, DELTA = 0.5, 2.0, 1e-5  # the quickstart's dp_sgd
VARIANTS = ["plain Opacus", "plain Opacus + sampler", "fedprobe dp_sgd", "fedprobe, norms recomputed",
            "fedprobe, Opacus fallback", "no DP"]


@contextlib.contextmanager
def vit_sampler(on: bool):
    """fedprobe's ViTEmbeddings grad sampler registered in Opacus (on) or absent, as in plain Opacus (off)."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    dp_sgd._install_vit_embeddings_sampler()
    ours = GradSampleHooks.GRAD_SAMPLERS[ViTEmbeddings]
    real = dp_sgd._install_vit_embeddings_sampler
    if not on:
        del GradSampleHooks.GRAD_SAMPLERS[ViTEmbeddings]
        dp_sgd._install_vit_embeddings_sampler = lambda: None
    try:
        yield
    finally:
        dp_sgd._install_vit_embeddings_sampler = real
        GradSampleHooks.GRAD_SAMPLERS[ViTEmbeddings] = ours


@contextlib.contextmanager
def norms_recomputed(on: bool):
    """The clip fraction as measured before 2026-12-03: Opacus clips unchanged, then a step hook recomputes norms."""
    if not on:
        yield
        return
    real_count, real_hook = dp_sgd._count_clipped, DPSGD._on_step

    def on_step(self, optimizer):
        real_hook(self, optimizer)
        gs = optimizer.grad_samples
        if gs and len(gs[0]) > 0:
            with torch.no_grad():
                self._count(dp_sgd.per_sample_norms(gs))

    dp_sgd._count_clipped = lambda optimizer, count: False
    DPSGD._on_step = on_step
    try:
        yield
    finally:
        dp_sgd._count_clipped, DPSGD._on_step = real_count, real_hook


def train(model, optimizer, loader, task) -> None:
    model.train()
    for b in loader:
        optimizer.zero_grad(set_to_none=True)
        per_example_loss(logits_of(model, b), b["labels"], task).mean().backward()
        optimizer.step()


def client_ctx(model, loader, train_set, task, batch: int) -> ClientContext:
    """Client 0's round-1 context, one epoch."""
    return ClientContext(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loader=loader,
                         server_round=1, partition_id=0, num_examples=len(train_set),
                         sample_rate=batch / len(train_set), local_steps=0, epochs=1, device=torch.device("cpu"),
                         task=task, sampled_fraction=1.0, state={})


def round_(variant: str, cfg, data, task, batch: int) -> tuple[list[float], float]:
    """CPU seconds of one client round of ``variant`` as [set-up, steps, epsilon and clean-up], and its epsilon;
    the model is built before the clock starts."""
    model = build_model(cfg.model, task, seed=0)
    train_set, _ = data.partition(0)
    loader = DataLoader(train_set, batch_size=batch, shuffle=True, collate_fn=data.collate,
                        generator=torch.Generator().manual_seed(0))
    ctx = client_ctx(model, loader, train_set, task, batch)
    eps = float("nan")
    with vit_sampler(variant not in ("plain Opacus", "fedprobe, Opacus fallback")), \
            norms_recomputed(variant == "fedprobe, norms recomputed"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        gc.collect()  # the previous round's garbage is not this round's cost
        t0 = time.process_time()
        if variant.startswith("plain Opacus"):
            from opacus import PrivacyEngine

            engine = PrivacyEngine()
            gsm, dpo, dl = engine.make_private(module=model, optimizer=ctx.optimizer, data_loader=loader,
                                               noise_multiplier=SIGMA, max_grad_norm=C, poisson_sampling=False)
            t1 = time.process_time()
            train(gsm, dpo, dl, task)
            t2 = time.process_time()
            eps = engine.get_epsilon(DELTA)
        elif variant == "no DP":
            t1 = time.process_time()
            train(model, ctx.optimizer, loader, task)
            t2 = time.process_time()
        else:
            dp = DPSGD(noise_multiplier=SIGMA, max_grad_norm=C, delta=DELTA, poisson_sampling=False, noise_seed=0)
            dp.setup(ctx)
            t1 = time.process_time()
            train(ctx.model, ctx.optimizer, ctx.loader, task)
            t2 = time.process_time()
            dp.after_training(ctx)
            eps = ctx.metrics["epsilon"]
        return [t1 - t0, t2 - t1, time.process_time() - t2], eps


def clip_phase(cfg, data, task, batch: int, reps: int) -> dict[str, float]:
    """Median CPU ms of the clipping alone on one batch's per-sample gradients: fedprobe's counting
    ``clip_and_accumulate`` vs Opacus's own followed by the norms recomputed for the clip fraction (as before)
    vs Opacus's own alone; interleaved, reps times."""
    import types

    from opacus.optimizers.optimizer import DPOptimizer

    model = build_model(cfg.model, task, seed=0)
    train_set, _ = data.partition(0)
    loader = DataLoader(train_set, batch_size=batch, shuffle=False, collate_fn=data.collate)
    ctx = client_ctx(model, loader, train_set, task, batch)
    with vit_sampler(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dp = DPSGD(noise_multiplier=SIGMA, max_grad_norm=C, poisson_sampling=False, noise_seed=0)
        dp.setup(ctx)
        opt, b = ctx.optimizer, next(iter(loader))
        opt.zero_grad(set_to_none=True)
        per_example_loss(logits_of(model, b), b["labels"], task).mean().backward()
        theirs = types.MethodType(DPOptimizer.clip_and_accumulate, opt)

        def recompute() -> None:
            theirs()
            float((dp_sgd.per_sample_norms(opt.grad_samples) > C).sum())

        fns = {"fedprobe (counts while clipping)": opt.clip_and_accumulate, "Opacus + norms recomputed (before)":
               recompute, "Opacus alone (no clip fraction)": theirs}
        out: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(reps):
            for k in random.Random(i).sample(list(fns), len(fns)):
                for p in opt.params:
                    p.summed_grad = None
                    if hasattr(p.grad_sample, "_processed"):
                        del p.grad_sample._processed
                t = time.process_time()
                fns[k]()
                out[k].append(time.process_time() - t)
        dp.after_training(ctx)
    return {k: 1000 * statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=9)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--clip-reps", type=int, default=101, help="repeats of the clipping-alone measurement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("experiments/quickstart.toml")
    data = load_federated(cfg.data, cfg.federation.num_clients, cfg.experiment.seed)
    task = task_for(cfg.model, data.task)
    for v in VARIANTS:  # warm-up: imports and first-call costs
        round_(v, cfg, data, task, args.batch)
    times: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    eps: dict[str, float] = {}
    for i in range(args.blocks):  # each block in its own (seeded) order: no variant always follows the same one
        for v in random.Random(i).sample(VARIANTS, len(VARIANTS)):
            t, eps[v] = round_(v, cfg, data, task, args.batch)
            times[v].append(t)
    steps = -(-len(data.partition(0)[0]) // args.batch)

    def ratio(v: str, to: str, phases: slice = slice(None)) -> float:
        return statistics.median(sum(a[phases]) / sum(b[phases]) for a, b in zip(times[v], times[to]))

    def ms(v: str, phase: int) -> str:
        return f"{1000 * statistics.median(t[phase] for t in times[v]):.1f}"

    print(f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()}, 1 torch thread, "
          f"{args.blocks} blocks, a round = set-up + {steps} steps (B = {args.batch}) + epsilon, tiny ViT (quickstart), "
          f"sigma {SIGMA}, C {C}")
    print("| variant | set-up ms | steps ms | epsilon + clean-up ms | round ms | round / plain Opacus "
          "| steps / plain Opacus + sampler | epsilon |")
    print("|---|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        total = f"{1000 * statistics.median(sum(t) for t in times[v]):.0f}"
        print(f"| {v} | {ms(v, 0)} | {ms(v, 1)} | {ms(v, 2)} | {total} | {ratio(v, 'plain Opacus'):.3f} "
              f"| {ratio(v, 'plain Opacus + sampler', slice(1, 2)):.3f} | {eps[v]:.6g} |")
    print("(medians over blocks; each ratio is the median of the blocks' ratios)")
    print(f"fedprobe/plain-opacus DP round CPU ratio: {ratio('fedprobe dp_sgd', 'plain Opacus'):.3f}")
    print(f"fedprobe/plain-opacus+sampler DP steps CPU ratio: "
          f"{ratio('fedprobe dp_sgd', 'plain Opacus + sampler', slice(1, 2)):.3f}")
    print(f"norms-recomputed/fedprobe DP steps CPU ratio: "
          f"{ratio('fedprobe, norms recomputed', 'fedprobe dp_sgd', slice(1, 2)):.3f}")
    clip = clip_phase(cfg, data, task, args.batch, args.clip_reps)
    print(f"\nthe clipping alone, one batch of B = {args.batch} per-sample gradients, "
          f"{args.clip_reps} interleaved repeats:")
    print("| clipping | CPU ms (median) |")
    print("|---|---|")
    for k, v in clip.items():
        print(f"| {k} | {v:.2f} |")

if __name__ == "__main__":
    main()
