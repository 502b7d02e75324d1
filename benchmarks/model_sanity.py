"""Can the tiny models learn the built-in datasets fast? (guides quickstart defaults)

Trains centrally for a few epochs, and runs an in-process FedAvg with the quickstart
schedule (no Flower: the same math, to isolate model/data quality from FL plumbing).

    .venv/bin/python benchmarks/model_sanity.py --dataset digits --family vit --lr 3e-3
    .venv/bin/python benchmarks/model_sanity.py --dataset textgen --family bert --mode fedavg
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from fl.config import DataConfig, ModelConfig, parse_value
from fl.data import load_federated
from models import build_model, count_parameters
from models.tasks import logits_of, task_loss


def accuracy(model, ds, task, collate) -> float:
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for b in DataLoader(ds, batch_size=512, collate_fn=collate):
            logits = logits_of(model, b)
            if task.kind == "lm":  # next-token accuracy on scored positions
                pred, lab = logits[:, :-1].argmax(-1), b["labels"][:, 1:]
                m = lab != -100
                correct += int((pred[m] == lab[m]).sum())
                n += int(m.sum())
            else:
                correct += int((logits.argmax(-1) == b["labels"]).sum())
                n += len(b["labels"])
    model.train()
    return correct / max(n, 1)


def train(model, ds, task, collate, epochs: int, lr: float, batch: int, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for b in DataLoader(ds, batch_size=batch, shuffle=True, generator=g, collate_fn=collate):
            loss, _ = task_loss(model, b, task)
            opt.zero_grad()
            loss.backward()
            opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--family", default="vit")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--mode", choices=["central", "fedavg"], default="central")
    ap.add_argument("--epochs", type=int, default=3, help="central epochs, or FedAvg rounds")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], help="data param key=int, e.g. image_size=16")
    ap.add_argument("--mset", action="append", default=[], help="model param key=value (TOML value), e.g. patch_size=1")
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = {k: int(v) for k, v in (s.split("=") for s in args.set)}
    fd = load_federated(DataConfig(dataset=args.dataset, params=params), args.clients, args.seed)
    mparams = {k: parse_value(v) for k, v in (s.split("=") for s in args.mset)}
    mcfg = ModelConfig(family=args.family, size=args.size, params=mparams)
    model = build_model(mcfg, fd.task, seed=args.seed)
    t0 = time.perf_counter()
    if args.mode == "central":
        parts = [fd.partition(p)[0] for p in range(fd.num_partitions)]
        train(model, torch.utils.data.ConcatDataset(parts), fd.task, fd.collate, args.epochs, args.lr, args.batch, args.seed)
    else:
        for r in range(args.epochs):
            states, sizes = [], []
            for pid in range(fd.num_partitions):
                local = build_model(mcfg, fd.task, seed=args.seed)
                local.load_state_dict(model.state_dict())
                tr, _ = fd.partition(pid)
                train(local, tr, fd.task, fd.collate, args.local_epochs, args.lr, args.batch, r * 1000 + pid)
                states.append(local.state_dict())
                sizes.append(len(tr))
            w = torch.tensor(sizes, dtype=torch.float32) / sum(sizes)
            model.load_state_dict({k: sum(wi * s[k] for wi, s in zip(w, states)) for k in states[0]})
            print(f"round {r + 1}: test acc {accuracy(model, fd.test, fd.task, fd.collate):.3f}")
    dt = time.perf_counter() - t0
    print(
        f"{args.dataset} {args.family}-{args.size} {args.mode} epochs/rounds={args.epochs} lr={args.lr} "
        f"params={count_parameters(model)[1]} test_acc={accuracy(model, fd.test, fd.task, fd.collate):.3f} "
        f"train_s={dt:.1f}"
    )


if __name__ == "__main__":
    main()
