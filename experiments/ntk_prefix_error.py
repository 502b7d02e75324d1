"""Experiment 2 (issue 3): NTK-Attention trained to imitate an explicit prefix of m tokens (seed Section 4.4).

    python -m experiments.ntk_prefix_error [--m 2 8 32 128 512 2048] [--steps 1000] [--tracking-uri sqlite:///mlflow.db]
    python -m experiments.ntk_prefix_error --protocol --m 2 32 512 2048 --steps 8000    # issue 17 protocol

Done as the paper describes (spec 1(e) fixes the authors' script): a one-layer, one-head attention with random
W_Q, W_K, W_V (scaled by 1/sqrt(d), so exp() does not overflow) and a fixed random prefix P (m x d). Teacher:
PrefixAttn(X, P) over the rows of X only (queries from X, keys/values [P; X]). Student: NTK-Attention on X alone
with trainable Z (d x d) and k (d); it never sees P. Both are trained/validated on fresh Gaussian X.
Reported: validation MSE per entry, and the same for Z = k = 0 (plain attention, i.e. "forget the prefix").

``--protocol`` (issue 17, ``experiments/protocol.py``): per m, Adam's learning rate is tuned over ``--lr-grid`` on 2
tuning seeds (the ratio on that seed's held-out X), then measured on ``--seeds`` evaluation seeds; every run trains
until its validation curve (every ``--eval-every`` steps, on a fixed held-out batch) is flat over its last 20 %
(``protocol.plateau``) *and* within 2 % of its value at half the steps (:func:`converged`), or ``--steps`` is
spent, so the table says whether the budget reached a plateau.
"""

from __future__ import annotations

import argparse
import time

import torch

from models.attention import ntk_attention, prefix_attention
from experiments.protocol import Trial, describe, log_grid, plateau, run_arm
from experiments.script import add_common_args, start


def run_m(m: int, d: int, L: int, steps: int, batch: int, lr: float, n_val: int, seed: int,
          eval_every: int = 0, min_steps: int = 1000) -> dict:
    """Train the student on m-token prefix teaching; with ``eval_every`` > 0, also record the validation curve (a
    fixed held-out batch of 256) and stop once it has converged (:func:`converged`, after ``min_steps``)."""
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
    curve: list[float] = []
    if eval_every:
        xv = torch.randn(256, L, d, generator=torch.Generator().manual_seed(seed + 1))  # its own stream
        with torch.no_grad():
            yv = teacher(xv)
    step = 0
    for step in range(1, steps + 1):
        x = torch.randn(batch, L, d, generator=g)
        with torch.no_grad():
            y = teacher(x)
        loss = ((ntk_attention(*qkv(x), z, zk) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if eval_every and step % eval_every == 0:
            with torch.no_grad():
                curve.append(((ntk_attention(*qkv(xv), z, zk) - yv) ** 2).mean().item())
            if step >= min_steps and converged(curve):
                break
    with torch.no_grad():
        x = torch.randn(n_val, L, d, generator=g)
        y = teacher(x)
        mse = ((ntk_attention(*qkv(x), z, zk) - y) ** 2).mean().item()
        base = ((ntk_attention(*qkv(x), 0 * z, 0 * zk) - y) ** 2).mean().item()
    out = {"mse": mse, "mse_no_prefix": base, "ratio": mse / base}
    return out | ({"steps": step, "curve": curve, "converged": converged(curve)} if eval_every else {})


def converged(curve: list[float], rel_tol: float = 0.02) -> bool:
    """``protocol.plateau`` (flat over the last 20 %) and, stricter, less than ``rel_tol`` better than at half the
    steps: a slowly decaying curve passes the first test over a short window (1000 -> 4000 steps still drops the
    ratio 0.29 -> 0.17, issue 17) but not the doubling test."""
    if not plateau(curve, rel_tol=rel_tol):  # also False for fewer than 4 points
        return False
    half = curve[len(curve) // 2 - 1]
    return half - curve[-1] <= rel_tol * abs(half)


def protocol_main(a: argparse.Namespace, tracker) -> dict:
    """Per m: tune lr on tuning seeds, evaluate on ``a.seeds`` evaluation seeds, each run to a plateau or the cap."""
    grid = log_grid(a.lr_grid[0], a.lr_grid[1], int(a.lr_grid[2]))
    lines = [f"lr grid {grid}; 2 tuning seeds, {a.seeds} evaluation seeds; runs stop at a plateau (last 20 % of the "
             f"validation curve, every {a.eval_every} steps, flat within 2 %, and < 2 % better than at half the steps) or at "
             f"{a.steps} steps", "",
             "| m | chosen lr | tuning means (ratio per lr) | ratio NTK / no-prefix (test) | steps used (mean) "
             "| converged |", "|---|---|---|---|---|---|"]
    res, t0 = {}, time.time()
    for i, m in enumerate(a.m):
        def trial(lr: float, seed: int, m: int = m) -> Trial:
            r = run_m(m, a.dim, a.length, a.steps, a.batch, lr, a.n_val, seed, eval_every=a.eval_every)
            return Trial(r["ratio"], r["curve"], {"steps": r["steps"], "mse": r["mse"], "converged": r["converged"]})
        arm = res[m] = run_arm(f"m={m}", trial, grid, n_tuning=2, n_eval=a.seeds, check_plateau=False)
        arm.plateaus = int(sum(arm.extra["converged"]))  # the stricter test this script stops on, not plateau()
        means = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in arm.grid.items())
        edge = " (grid edge)" if arm.at_edge else ""
        lines.append(f"| {m} | {arm.chosen:g}{edge} | {means} | {describe(arm.values, '.3f')} | "
                     f"{sum(arm.extra['steps']) / len(arm.extra['steps']):.0f} | {arm.plateaus}/{len(arm.values)} |")
        print(lines[-1], f"({time.time() - t0:.0f}s)", flush=True)
        if tracker:
            tracker.log_metrics({"m": m, "ratio": sum(arm.values) / len(arm.values), "chosen_lr": arm.chosen,
                                 "plateaus": arm.plateaus}, step=i)
    if tracker:
        tracker.log_text("\n".join(lines), "ntk_prefix_error_protocol.md")
        tracker.finish()
    return res


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[2, 8, 32, 128, 512, 2048])
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--length", type=int, default=32, help="input tokens L")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--n-val", type=int, default=512)
    ap.add_argument("--protocol", action="store_true", help="issue 17 protocol: lr tuned, seeds, run to a plateau")
    ap.add_argument("--lr-grid", type=float, nargs=3, default=[0.01, 0.1, 3], metavar=("LO", "HI", "POINTS"),
                    help="--protocol: Adam lr log grid (0.003-0.03 put every choice at its top edge)")
    ap.add_argument("--seeds", type=int, default=5, help="--protocol: evaluation seeds")
    ap.add_argument("--eval-every", type=int, default=100, help="--protocol: validation curve period (steps)")
    add_common_args(ap)
    a = ap.parse_args(argv)
    tracker = start(a, "ntk_prefix_error", "ntk-prefix")
    if a.protocol:
        return protocol_main(a, tracker)
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
