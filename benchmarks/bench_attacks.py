"""Attack benchmark: PSNR / token accuracy vs attack, batch size, local steps, model state.

Usage: .venv/bin/python benchmarks/bench_attacks.py [--quick] [--out benchmarks/RESULTS.md]
Tiny HF models built here (ViT on 8x8 sklearn digits; BERT / GPT-2 on random token
sentences, vocab 128, 12 tokens), FedSGD or plain-SGD FedAvg, no defense, 1 thread.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sklearn.datasets import load_digits  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification  # noqa: E402

import attacks  # noqa: E402,F401
from attacks.attention_inversion import attention_map, invert, qk_product, score  # noqa: E402
from attacks.base import ATTACKS, Observation  # noqa: E402
from attacks.harness import run_attack  # noqa: E402
from models.tasks import TaskSpec, task_loss  # noqa: E402

IMG = TaskSpec(kind="image", num_classes=10, image_shape=(1, 8, 8), mean=(0.5,), std=(0.5,))
DIG = load_digits()


def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, num_labels=10))


def digits(n: int, start: int = 0) -> dict[str, torch.Tensor]:
    x = torch.tensor(DIG.images[start:start + n] / 16.0, dtype=torch.float32).unsqueeze(1)
    return {"pixel_values": (x - 0.5) / 0.5, "labels": torch.tensor(DIG.target[start:start + n])}


def observe(factory, start_params, batch, task, lr=0.1, steps=1, bs=None) -> Observation:
    m = factory()
    if start_params is not None:
        m.load_state_dict(start_params, strict=False)
    g0 = {k: v.detach().clone() for k, v in m.named_parameters()}
    n = len(batch["labels"])
    bs = bs or n
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    for k in range(steps):
        idx = torch.arange(k * bs, (k + 1) * bs) % n
        opt.zero_grad()
        task_loss(m, {key: v[idx] for key, v in batch.items()}, task)[0].backward()
        opt.step()
    c = {k: v.detach().clone() for k, v in m.named_parameters()}
    return Observation(1, 0, 0, g0, c, {"lr": lr, "local_steps": steps, "batch_size": bs, "num_examples": n, "optimizer": "sgd"}, task, factory)


def trained_vit_state(epochs: int = 3) -> tuple[dict[str, torch.Tensor], float]:
    m = vit()
    data = digits(1500, start=200)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(1500)
        for i in range(0, 1500, 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            task_loss(m, {k: v[idx] for k, v in data.items()}, IMG)[0].backward()
            opt.step()
    test = digits(97, start=1700)
    with torch.no_grad():
        acc = float((m(pixel_values=test["pixel_values"]).logits.argmax(-1) == test["labels"]).float().mean())
    return {k: v.detach().clone() for k, v in m.named_parameters()}, acc


def text_factory(kind: str, V: int = 128):
    def factory() -> torch.nn.Module:
        torch.manual_seed(0)
        if kind == "text":
            return BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                            intermediate_size=64, max_position_embeddings=32, num_labels=2))
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=32, eos_token_id=0, bos_token_id=0))
    return factory


def text_batch(kind: str, n: int, L: int = 12, V: int = 128, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, L), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (n,), generator=g) if kind == "text" else ids.clone()}


def row(name: str, setting: str, s: dict[str, float]) -> str:
    keys = ["psnr", "ssim", "label_accuracy", "token_accuracy", "rouge1", "rouge2", "attention_error"]
    vals = ", ".join(f"{k} {s[k]:.3f}" for k in keys if k in s)
    line = f"| {name} | {setting} | {vals} | {s.get('attack_seconds', float('nan')):.1f} |"
    print(line, flush=True)
    return line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer settings")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = ["| attack | setting | scores | seconds |", "|---|---|---|---|"]
    budget = {"max_seconds": 60.0}
    # images, FedSGD, B=1
    b1 = digits(1)
    for name, kw in [("dlg", {"iterations": 400}), ("idlg", {"iterations": 400}), ("inverting_gradients", {"iterations": 1000})]:
        lines.append(row(name, "ViT digits, B=1, FedSGD, untrained", run_attack(ATTACKS.create(name, **kw, **budget), observe(vit, None, b1, IMG), b1)))
    # batch size
    for B in ([2, 4] if args.quick else [2, 4, 8]):
        b = digits(B, start=10)
        lines.append(row("idlg", f"ViT digits, B={B}, FedSGD", run_attack(ATTACKS.create("idlg", iterations=600, **budget), observe(vit, None, b, IMG), b)))
    # local steps
    b5 = digits(5, start=20)
    lines.append(row("idlg", "ViT digits, B=1, 5 local steps (5 examples)", run_attack(ATTACKS.create("idlg", iterations=600, **budget), observe(vit, None, b5, IMG, steps=5, bs=1), b5)))
    b1s = digits(1, start=30)
    lines.append(row("idlg", "ViT digits, B=1, 5 local steps (same example)", run_attack(ATTACKS.create("idlg", iterations=600, **budget), observe(vit, None, b1s, IMG, steps=5, bs=1), b1s)))
    # trained model: honest vs malicious re-init
    state, acc = trained_vit_state()
    bt = digits(1, start=40)
    lines.append(row("idlg", f"ViT digits, B=1, trained model (test acc {acc:.2f}), honest", run_attack(ATTACKS.create("idlg", iterations=400, **budget), observe(vit, state, bt, IMG), bt)))
    att = ATTACKS.create("malicious_reinit", base="idlg", iterations=400, **budget)
    crafted = att.craft(state, 1, 0)
    lines.append(row("malicious_reinit", "same victim, server sends a fresh random-init model", run_attack(att, observe(vit, crafted, bt, IMG), bt)))
    # text
    for kind, label in [("text", "BERT-tiny cls"), ("lm", "GPT-2-tiny LM")]:
        task = TaskSpec(kind=kind, num_classes=2 if kind == "text" else 0, seq_len=12, vocab_size=128)
        for B in ([1, 2] if args.quick else [1, 2, 4]):
            bt = text_batch(kind, B)
            lines.append(row("tag", f"{label}, B={B}, FedSGD, dropout on", run_attack(ATTACKS.create("tag", iterations=300, **budget), observe(text_factory(kind), None, bt, task), bt)))
        bt = text_batch(kind, 1)
        lines.append(row("tag", f"{label}, B=1, plain TAG (random init, no refinement)", run_attack(ATTACKS.create("tag", iterations=300, init="random", refine_sweeps=0, **budget), observe(text_factory(kind), None, bt, task), bt)))
        bt = text_batch(kind, 5, seed=3)
        lines.append(row("tag", f"{label}, B=1, 5 local steps", run_attack(ATTACKS.create("tag", iterations=300, **budget), observe(text_factory(kind), None, bt, task, steps=5, bs=1), bt)))
    # attention inversion (seed 6): random problems, d=8, n=6, 4 heads, Newton from small random starts
    ok, t0 = [], time.perf_counter()
    for s in range(5):
        g = torch.Generator().manual_seed(100 + s)
        W = qk_product(torch.randn(8, 8, generator=g, dtype=torch.float64) / 8**0.5, torch.randn(8, 8, generator=g, dtype=torch.float64) / 8**0.5, 4)
        X = torch.randn(8, 6, generator=g, dtype=torch.float64)
        best = min((invert(W, attention_map(X, W), seed=r, steps=100) for r in range(3)), key=lambda r: r.losses[-1])
        ok.append(score(best.X, X, W))
    mean = {k: sum(o[k] for o in ok) / len(ok) for k in ok[0]}
    mean["attack_seconds"] = (time.perf_counter() - t0) / len(ok)
    lines.append(row("attention_inversion", "d=8, n=6, 4 heads, Newton, 3 restarts (mean of 5)", mean)
                 + f" x_error_sign {mean['x_error_sign']:.3f}, x_error_procrustes {mean['x_error_procrustes']:.3f}, "
                   f"solved {sum(o['attention_error'] < 1e-4 for o in ok)}/5")
    if args.out:
        head = (f"\n## Attacks ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores shared, torch {torch.__version__})\n\n"
                f"Command: `.venv/bin/python benchmarks/bench_attacks.py{' --quick' if args.quick else ''} --out {args.out}`\n\n")
        with open(args.out, "a") as f:
            f.write(head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
