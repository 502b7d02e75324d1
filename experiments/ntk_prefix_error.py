"""Experiment 2 (issue 3): NTK-Attention trained to imitate an explicit prefix of m tokens (seed Section 4.4).

    python -m experiments.ntk_prefix_error [--m 2 8 32 128 512 2048] [--steps 1000] [--tracking-uri sqlite:///mlflow.db]

Done as the paper describes (spec 1(e) fixes the authors' script): a one-layer, one-head attention with random
W_Q, W_K, W_V (scaled by 1/sqrt(d), so exp() does not overflow) and a fixed random prefix P (m x d). Teacher:
PrefixAttn(X, P) over the rows of X only (queries from X, keys/values [P; X]). Student: NTK-Attention on X alone
with trainable Z (d x d) and k (d); it never sees P. Both are trained/validated on fresh Gaussian X.
Reported: validation MSE per entry, and the same for Z = k = 0 (plain attention, i.e. "forget the prefix").
"""

from __future__ import annotations

import argparse
import time

import torch

from models.attention import ntk_attention, prefix_attention
from experiments.script import add_common_args, start


def run_m(m: int, d: int, L: int, steps: int, batch: int, lr: float, n_val: int, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    W = [torch.randn(d, d, generator=g) / d ** 0.5 for _ in range(3)]  # W_Q, W_K, W_V
    P = torch.randn(m, d, generator=g)
    pk, pv = (P @ W[1]).unsqueeze(0), (P @ W[2]).unsqueeze(0)  # [1, m, d]

    def qkv(x):  # x [b, L, d] -> q, k, v [b, 1, L, d]
        return [(x @ w).unsqueeze(1) for w in W]

    def teacher(x):
        q, k, v = qkv(x)
        return prefix_attention(q, k, v, pk, pv)

    z = torch.nn.Parameter(torch.randn(1, d, d, generator=g) * 1e-2)
    zk = torch.nn.Parameter(torch.randn(1, d, generator=g) * 1e-2)
    opt = torch.optim.Adam([z, zk], lr=lr)
    for _ in range(steps):
        x = torch.randn(batch, L, d, generator=g)
        with torch.no_grad():
            y = teacher(x)
        loss = ((ntk_attention(*qkv(x), z, zk) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x = torch.randn(n_val, L, d, generator=g)
        y = teacher(x)
        mse = ((ntk_attention(*qkv(x), z, zk) - y) ** 2).mean().item()
        base = ((ntk_attention(*qkv(x), 0 * z, 0 * zk) - y) ** 2).mean().item()
    return {"mse": mse, "mse_no_prefix": base, "ratio": mse / base}


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[2, 8, 32, 128, 512, 2048])
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--length", type=int, default=32, help="input tokens L")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--n-val", type=int, default=512)
    add_common_args(ap)
    a = ap.parse_args(argv)
    tracker = start(a, "ntk_prefix_error", "ntk-prefix")
    t0, res = time.time(), {}
    lines = ["| m | val MSE (NTK) | val MSE (Z=k=0) | ratio |", "|---|---|---|---|"]
    for i, m in enumerate(a.m):
        r = res[m] = run_m(m, a.dim, a.length, a.steps, a.batch, a.lr, a.n_val, a.seed)
        lines.append(f"| {m} | {r['mse']:.3e} | {r['mse_no_prefix']:.3e} | {r['ratio']:.3f} |")
        print(lines[-1], f"({time.time() - t0:.0f}s)", flush=True)
        if tracker:
            tracker.log_metrics({"m": m, **r}, step=i)
    text = "\n".join(lines)
    if tracker:
        tracker.log_text(text, "ntk_prefix_error.md")
        tracker.finish()
    return res


if __name__ == "__main__":
    main()
