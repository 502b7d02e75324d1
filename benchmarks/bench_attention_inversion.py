"""Attention-weight inversion (seed 6, issue 17): how often Newton solves fresh problems, by ridge, heads and size.

For each (heads, n tokens) and each ridge lam, draws ``--problems`` random problems (d = 8, W_Q, W_K with
N(0, 1/d) entries, X with N(0, 1) entries; the same problems for every lam), runs ``invert`` (Newton, 100 steps,
up to 3 seeded restarts, stopping at the first converged one) and reports: problems whose attention maps were
matched (relative attention error < 1e-6), how many runs said ``converged``, restarts used, Newton steps of the
best run (median), and the X errors after sign and orthogonal-Procrustes alignment (median). Counts and
iterations only: no timings, so the table does not depend on machine load.

    python benchmarks/bench_attention_inversion.py [--problems 4]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics

import torch


from attacks.attention_inversion import attention_map, invert, qk_product, score  # noqa: E402


def problem(seed: int, heads: int, n: int, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    wq = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    wk = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    return qk_product(wq, wk, heads), torch.randn(d, n, generator=g, dtype=torch.float64)


def solve(W: torch.Tensor, X: torch.Tensor, lam: float, restarts: int = 3) -> dict[str, float]:
    B = attention_map(X, W)
    best, used, said = None, 0, 0
    for r in range(restarts):
        res = invert(W, B, lam=lam, steps=100, seed=r)
        used += 1
        said += int(res.converged)
        if best is None or res.losses[-1] < best.losses[-1]:
            best = res
        if res.converged:
            best = res
            break
    assert best is not None
    s = score(best.X, X, W)
    return {"solved": float(s["attention_error"] < 1e-6), "converged": float(said > 0), "restarts": float(used),
            "steps": float(best.iterations), "x_sign": s["x_error_sign"], "x_proc": s["x_error_procrustes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=4)
    args = ap.parse_args()
    print(f"# attention inversion, {datetime.date.today()}, {platform.machine()}, torch {torch.__version__}, "
          f"{args.problems} problems per row, d = 8\n")
    print("| heads | n | lam | attention matched | said converged | restarts used | Newton steps (median) | "
          "X error sign / Procrustes (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for heads in (1, 4):
        for n in (4, 6, 8, 12):
            for lam in (0.0, 1e-6):
                rows = [solve(*problem(p, heads, n), lam) for p in range(args.problems)]
                k = len(rows)
                med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
                print(f"| {heads} | {n} | {lam:g} | {sum(r['solved'] for r in rows):.0f}/{k} | "
                      f"{sum(r['converged'] for r in rows):.0f}/{k} | {sum(r['restarts'] for r in rows):.0f} | "
                      f"{med('steps'):.0f} | {med('x_sign'):.3g} / {med('x_proc'):.3g} |", flush=True)


if __name__ == "__main__":
    main()
