"""Attack benchmark: PSNR / token accuracy vs attack, batch size, local steps, model state, attention kernel.

Usage: .venv/bin/python benchmarks/bench_attacks.py [--quick] [--budget 20] [--out benchmarks/RESULTS.md]

Models are the project's own (``models.build_model``): the tiny ViT (d=64, 2 layers, 4x4
patches on 8x8 digits, normalised with the data's mean/std) and the tiny BERT / GPT-2
(d=64, 2 layers) on random-token sentences (vocab 128, 12 tokens). Clients run plain SGD
(lr 0.1), FedSGD (1 step) or FedAvg (5 steps), no defense, 1 thread; every attack gets
``--budget`` seconds. Victims are digits 0..; the imprint attack's calibration uses the
dataset's last 256 images (the server's "public data").
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import attacks  # noqa: E402,F401
from attacks.attention_inversion import attention_map, invert, qk_product, score  # noqa: E402
from attacks.base import ATTACKS, Observation  # noqa: E402
from attacks.harness import run_attack  # noqa: E402
from fl.config import ModelConfig  # noqa: E402
from fl.data.federated import load_dataset  # noqa: E402
from models.build import build_model  # noqa: E402
from models.tasks import TaskSpec, task_loss  # noqa: E402

DATA = load_dataset("digits")
IMG = DATA.task


def vit_factory(attention: str = "standard", attention_params: dict | None = None):
    cfg = ModelConfig(family="vit", attention=attention, attention_params=attention_params or {})
    return lambda: build_model(cfg, IMG, seed=0)


def digits(n: int, start: int = 0) -> dict[str, torch.Tensor]:
    items = [DATA.data[i] for i in range(start, start + n)]
    return {k: torch.stack([it[k] for it in items]) for k in ("pixel_values", "labels")}


def observe(factory, start_params, batch, task, lr=0.1, steps=1, bs=None) -> Observation:
    """What an honest client sends back after ``steps`` plain SGD steps from ``start_params``."""
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
    md = {"lr": lr, "local_steps": steps, "batch_size": bs, "num_examples": n, "optimizer": "sgd"}
    return Observation(1, 0, 0, g0, c, md, task, factory)


def trained_vit_state(epochs: int = 3) -> tuple[dict[str, torch.Tensor], float]:
    m = vit_factory()()
    data = digits(1200, start=300)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(1200, generator=torch.Generator().manual_seed(0))
        for i in range(0, 1200, 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            task_loss(m, {k: v[idx] for k, v in data.items()}, IMG)[0].backward()
            opt.step()
    test = digits(200, start=1500)
    with torch.no_grad():
        acc = float((m(pixel_values=test["pixel_values"]).logits.argmax(-1) == test["labels"]).float().mean())
    return {k: v.detach().clone() for k, v in m.named_parameters()}, acc


def text_setup(kind: str, L: int = 12, V: int = 128, **params):
    task = TaskSpec(kind=kind, num_classes=2 if kind == "text" else 0, seq_len=L, vocab_size=V)
    family = "bert" if kind == "text" else "gpt2"
    return (lambda: build_model(ModelConfig(family=family, params=params), task, seed=0)), task


def text_batch(kind: str, n: int, L: int = 12, V: int = 128, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, L), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (n,), generator=g) if kind == "text" else ids.clone()}


def row(name: str, setting: str, s: dict[str, float]) -> str:
    keys = ["psnr", "ssim", "label_accuracy", "token_accuracy", "rouge1", "rouge2", "bins_occupied", "attention_error"]
    vals = ", ".join(f"{k} {s[k]:.3f}" for k in keys if k in s)
    line = f"| {name} | {setting} | {vals} | {s.get('attack_seconds', float('nan')):.1f} |"
    print(line, flush=True)
    return line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer settings")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per attack")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    lines = ["| attack | setting | scores | seconds |", "|---|---|---|---|"]
    bud = {"max_seconds": args.budget}
    vit = vit_factory()
    imprint = ATTACKS.create("imprint", calibration="digits", calibration_examples=256)
    crafted = imprint.craft({k: v.detach() for k, v in vit().named_parameters()}, 1, 0)

    def img_rows(setting: str, batch, steps=1, bs=None, start=None, honest=("idlg", "inverting_gradients")):
        obs = observe(vit, start, batch, IMG, steps=steps, bs=bs)
        for name in honest:
            kw = {"iterations": 400} if name == "idlg" else {}
            lines.append(row(name, setting, run_attack(ATTACKS.create(name, **kw, **bud), obs, batch)))
        lines.append(row("imprint (malicious)", setting + ", same victims",
                         run_attack(imprint, observe(vit, crafted, batch, IMG, steps=steps, bs=bs), batch)))

    # images: B = 1 (all three honest attacks), then batch size
    b1 = digits(1)
    lines.append(row("dlg", "ViT digits, B=1, FedSGD, round 1", run_attack(ATTACKS.create("dlg", iterations=400, **bud), observe(vit, None, b1, IMG), b1)))
    img_rows("ViT digits, B=1, FedSGD, round 1", b1)
    for B in ([2, 8] if args.quick else [2, 4, 8]):
        img_rows(f"ViT digits, B={B}, FedSGD, round 1", digits(B, start=10))
    # local steps: 5 SGD steps of batch 1 over 5 different examples / over the same example
    b5 = digits(5, start=20)
    img_rows("ViT digits, 5 local steps x B=1 (5 examples)", b5, steps=5, bs=1, honest=("idlg",))
    b1s = digits(1, start=30)
    lines.append(row("idlg", "ViT digits, 5 local steps x B=1 (same example)", run_attack(ATTACKS.create("idlg", iterations=400, **bud), observe(vit, None, b1s, IMG, steps=5, bs=1), b1s)))
    # training progress: round 1 vs a trained model (honest), and the malicious variants on the same victim
    state, acc = trained_vit_state()
    bt = digits(1, start=40)
    lines.append(row("idlg", "ViT digits, B=1, round 1 (untrained)", run_attack(ATTACKS.create("idlg", iterations=400, **bud), observe(vit, None, bt, IMG), bt)))
    img_rows(f"ViT digits, B=1, trained model (test acc {acc:.2f})", bt, start=state, honest=("idlg",))
    btb = digits(4, start=50)
    img_rows(f"ViT digits, B=4, trained model (test acc {acc:.2f})", btb, start=state, honest=("idlg",))
    reinit = ATTACKS.create("malicious_reinit", base="idlg", iterations=400, **bud)
    lines.append(row("malicious_reinit", "B=1 trained-model victim, server sends a fresh N(0, 0.02) model",
                     run_attack(reinit, observe(vit, reinit.craft(state, 1, 0), bt, IMG), bt)))
    # attention kernels, B=1 FedSGD round 1 (honest iDLG) -- the malicious imprint needs standard attention
    for kernel, kp in (("standard", {}), ("ntk", {}), ("sparse_topk", {"top_k": 3}), ("sketch", {})):
        try:
            fac = vit_factory(kernel, kp)
            obs = observe(fac, None, b1, IMG)
            lines.append(row("idlg", f"ViT digits, B=1, FedSGD, attention={kernel} {kp or ''}", run_attack(ATTACKS.create("idlg", iterations=400, **bud), obs, b1)))
        except Exception as exc:  # a kernel that cannot run the attack is a result, not a crash
            lines.append(f"| idlg | ViT digits, B=1, attention={kernel} | not usable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} | - |")
            print(lines[-1], flush=True)
    # text
    for kind, label in [("text", "BERT-tiny cls"), ("lm", "GPT-2-tiny LM")]:
        fac, task = text_setup(kind)
        for B in ([1] if args.quick else [1, 2]):
            bt = text_batch(kind, B)
            lines.append(row("tag", f"{label}, B={B}, FedSGD", run_attack(ATTACKS.create("tag", iterations=300, **bud), observe(fac, None, bt, task), bt)))
        bt = text_batch(kind, 1)
        lines.append(row("tag", f"{label}, B=1, plain TAG (random init, no refinement)", run_attack(ATTACKS.create("tag", iterations=300, init="random", refine_sweeps=0, **bud), observe(fac, None, bt, task), bt)))
        bt = text_batch(kind, 5, seed=3)
        lines.append(row("tag", f"{label}, 5 local steps x B=1 (5 sentences)", run_attack(ATTACKS.create("tag", iterations=300, **bud), observe(fac, None, bt, task, steps=5, bs=1), bt)))
    # closest to breaching's TAG setting (3-layer transformer, B=1): GPT-2 with 3 layers, 32 tokens, vocab 512
    fac, task = text_setup("lm", L=32, V=512, n_layer=3)
    bt = text_batch("lm", 1, L=32, V=512)
    lines.append(row("tag", "GPT-2 3 layers, vocab 512, 32 tokens, B=1 (breaching TAG-like)", run_attack(ATTACKS.create("tag", iterations=300, **bud), observe(fac, None, bt, task), bt)))
    lines.append(row("tag", "same, plain TAG (random init, no refinement)", run_attack(ATTACKS.create("tag", iterations=300, init="random", refine_sweeps=0, **bud), observe(fac, None, bt, task), bt)))
    # attention inversion (seed 6): random problems, d=8, n=6, 4 heads, Newton from small random starts
    ok, t0 = [], time.perf_counter()
    for s in range(3 if args.quick else 5):
        g = torch.Generator().manual_seed(100 + s)
        W = qk_product(torch.randn(8, 8, generator=g, dtype=torch.float64) / 8**0.5, torch.randn(8, 8, generator=g, dtype=torch.float64) / 8**0.5, 4)
        X = torch.randn(8, 6, generator=g, dtype=torch.float64)
        best = min((invert(W, attention_map(X, W), seed=r, steps=100) for r in range(3)), key=lambda r: r.losses[-1])
        ok.append(score(best.X, X, W))
    mean = {k: sum(o[k] for o in ok) / len(ok) for k in ok[0]}
    mean["attack_seconds"] = (time.perf_counter() - t0) / len(ok)
    lines.append(row("attention_inversion", f"d=8, n=6, 4 heads, Newton, 3 restarts (mean of {len(ok)})", mean)
                 + f" x_error_sign {mean['x_error_sign']:.3f}, x_error_procrustes {mean['x_error_procrustes']:.3f}, "
                   f"solved {sum(o['attention_error'] < 1e-4 for o in ok)}/{len(ok)}")
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s", flush=True)
    if args.out:
        head = (f"\n## Attacks ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores shared, torch {torch.__version__}, 1 thread, total {total:.0f} s)\n\n"
                f"Command: `.venv/bin/python benchmarks/bench_attacks.py{' --quick' if args.quick else ''} "
                f"--budget {args.budget:g} --out {args.out}`\n\n")
        with open(args.out, "a") as f:
            f.write(head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
