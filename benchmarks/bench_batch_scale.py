"""Issue 12's batch-scale table: attack success vs batch size on the tiny ViT, honest server.

Usage: .venv/bin/python benchmarks/bench_batch_scale.py [--batches 1 2 4 8 16 32] [--victims 5] [--seeds 1]
                                                     [--modes fedsgd fedavg] [--states init trained]
                                                     [--attack best_of] [--out benchmarks/RESULTS.md]

Each victim is a real fedprobe client update (``fl.training.train_client``: the client's own
seeded data order, plain SGD lr 0.1, batch B, 1 local step (FedSGD) or 5 (FedAvg, 5 B examples
touched), no defense) from the project's tiny ViT on digits, 10 IID clients; victims differ by
(client, round seed), drawn with ``numpy.random.default_rng(seed)``, so labels repeat within a
batch as they do in training. ``trained`` starts from a model trained centrally with SGD
(lr 0.1, batch 32, 300 steps on the clients' data, test accuracy 0.989: a stand-in for round >= 10). Scores are
per victim (matched, capped PSNR), then the median and the [min, max] over victims.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import attacks  # noqa: E402,F401
from attacks.base import ATTACKS, Observation  # noqa: E402
from attacks.harness import attack_and_score  # noqa: E402
from fl.arrays import load_trainable, trainable_state  # noqa: E402
from fl.config import load_config  # noqa: E402
from fl.data import load_federated  # noqa: E402
from fl.training import train_client  # noqa: E402
from models import build_model  # noqa: E402
from models.tasks import task_loss  # noqa: E402

BASE = ["data.dataset='digits'", "model.family='vit'", "model.size='tiny'", "optimizer.name='sgd'", "optimizer.lr=0.1",
        "federation.num_clients=10", "attack.name='none'"]


def trained_state(cfg, data, steps: int = 300) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(cfg.model, data.task, seed=cfg.experiment.seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ds = torch.utils.data.ConcatDataset([data.partition(p)[0] for p in range(data.num_partitions)])
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, collate_fn=data.collate,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        opt.zero_grad()
        task_loss(model, batch, data.task)[0].backward()
        opt.step()
    return {k: v.detach().clone() for k, v in trainable_state(model).items()}


def victim(cfg, data, state, pid: int, rnd: int) -> tuple[Observation, dict[str, torch.Tensor]]:
    res = train_client(cfg, pid, state, rnd, {}, record_oracle=True)
    factory = lambda: build_model(cfg.model, data.task, seed=cfg.experiment.seed)  # noqa: E731
    obs = Observation(rnd, pid, pid, state, res.state, res.meta, data.task, factory)
    return obs, res.oracle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--victims", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    ap.add_argument("--json", default="", help="also write every victim's scores to this JSON file")
    ap.add_argument("--modes", nargs="+", default=["fedsgd", "fedavg"], choices=["fedsgd", "fedavg"])
    ap.add_argument("--states", nargs="+", default=["init", "trained"], choices=["init", "trained"])
    ap.add_argument("--attack", default="best_of")
    ap.add_argument("--attack-params", default="{}", help="JSON parameters of the attack")
    ap.add_argument("--attention", default="standard", help="attention kernel of the ViT (fedprobe list)")
    ap.add_argument("--attention-params", default="{}", help="JSON parameters of the kernel")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    base = BASE + [f"model.attention='{args.attention}'",
                   "model.attention_params=" + _toml_table(json.loads(args.attention_params))]
    attack_params = json.loads(args.attack_params)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg0 = load_config(None, base + [f"experiment.seed={seed}"])
        data = load_federated(cfg0.data, cfg0.federation.num_clients, seed)
        prior, image_prior = data.label_prior(), data.image_prior()
        states = {"init": {k: v.detach().clone() for k, v in trainable_state(
            build_model(cfg0.model, data.task, seed=seed)).items()}}
        if "trained" in args.states:
            states["trained"] = trained_state(cfg0, data)
        rng = np.random.default_rng(seed)
        draws = [(int(rng.integers(0, 10)), int(rng.integers(1, 1000))) for _ in range(args.victims)]
        for state_name in args.states:
            for mode in args.modes:
                for B in args.batches:
                    steps = 1 if mode == "fedsgd" else 5
                    cfg = load_config(None, base + [f"experiment.seed={seed}", f"federation.batch_size={B}",
                                                    f"federation.local_steps={steps}"])
                    for pid, rnd in draws:
                        obs, gt = victim(cfg, data, states[state_name], pid, rnd)
                        t0 = time.perf_counter()
                        _, s = attack_and_score(ATTACKS.create(args.attack, **attack_params), obs, gt, label_prior=prior,
                                               image_prior=image_prior)
                        s["seconds"] = time.perf_counter() - t0
                        rows.append({"seed": seed, "state": state_name, "mode": mode, "B": B, "pid": pid, **s})
                        print(f"seed {seed} {state_name} {mode} B={B} client {pid}: psnr {s['psnr']:.1f} "
                              f"rec {s['recovered_fraction']:.2f} labels {s.get('label_accuracy', float('nan')):.2f} "
                              f"(guess {s.get('label_baseline', float('nan')):.2f}) best member "
                              f"{int(s.get('best_member', -1))} {s['seconds']:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    lines = table(rows, args)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


def _toml_table(d: dict) -> str:
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + "}"


def _med(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def table(rows: list[dict], args: argparse.Namespace) -> list[str]:
    cmd = ("python benchmarks/bench_batch_scale.py --batches " + " ".join(map(str, args.batches)) +
           f" --victims {args.victims} --seeds {args.seeds}" +
           (f" --first-seed {args.first_seed}" if args.first_seed else "") + f" --modes {' '.join(args.modes)} --states "
           f"{' '.join(args.states)} --attack {args.attack}" +
           (f" --attack-params '{args.attack_params}'" if args.attack_params != "{}" else "") +
           (f" --attention {args.attention}" if args.attention != "standard" else "") +
           (f" --attention-params '{args.attention_params}'" if args.attention_params != "{}" else ""))
    out = [f"## Batch scale: {args.attack} on the tiny ViT ({args.attention} attention), honest server "
           f"({datetime.date.today()})", "",
           f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}, "
           f"{args.threads} thread. Command: `{cmd}`", "",
           f"{args.victims} victims x {args.seeds} seed(s) per row (client and round seed drawn at random; "
           "batches from the client's real data order). PSNR capped at 80 dB (exact); median [min, max] over "
           "victims; recovered = per-example PSNR >= 30 dB; labels beside the best data-free guess from the "
           "server's label prior.", "",
           "| state | mode | B | median PSNR [dB] | recovered fraction | label accuracy | label guess | L2 iDLG alone "
           "(member) PSNR [dB] | seconds |",
           "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["state"], r["mode"], r["B"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for st, mode, B in keys:
        rs = [r for r in rows if (r["state"], r["mode"], r["B"]) == (st, mode, B)]
        out.append(f"| {st} | {mode} | {B} | {_med([r['psnr_median'] for r in rs])} | "
                   f"{_med([r['recovered_fraction'] for r in rs])} | {_med([r.get('label_accuracy', 0) for r in rs])} | "
                   f"{_med([r.get('label_baseline', 0) for r in rs])} | "
                   f"{_med([r['idlg/psnr_median'] for r in rs]) if all('idlg/psnr_median' in r for r in rs) else '-'} | "
                   f"{statistics.median(r['seconds'] for r in rs):.0f} |")
    return out


if __name__ == "__main__":
    main()
