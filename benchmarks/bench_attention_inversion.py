"""Attention-weight inversion (seed 6, issue 17): how often Newton solves fresh problems, by ridge, heads and size.

For each (heads, d, n tokens) and each ridge lam, draws ``--problems`` random problems (W_Q, W_K with
N(0, 1/d) entries, X with N(0, 1) entries; the same problems for every lam), runs ``invert`` (Newton, 100 steps,
up to ``--restarts`` seeded restarts, stopping at the first converged one) and reports: problems whose attention maps
were matched (relative attention error < 1e-6), how many runs said ``converged``, problems whose X was recovered
(relative X error < 1e-4 after sign alignment, and after orthogonal-Procrustes alignment), restarts used, Newton
steps of the best run (median), and the X errors (median). Identifiability (``identifiability``): the dimension
of the continuous family {R : R^T W_h R = W_h} (the problems' values), and whether H (n - 1) >= d; a problem whose
maps are matched but whose X is not recovered has another X with the same maps. Counts and iterations only: no
timings, so the table does not depend on machine load.

    python benchmarks/bench_attention_inversion.py [--problems 10] [--heads 1 4] [--d 4 8 16] [--n 4 8 16]
    python benchmarks/bench_attention_inversion.py --problems 4 --d 8 --n 4 6 8 12 --lam 0 1e-6   # the ridge table
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics

import torch


from attacks.attention_inversion import attention_map, identifiability, invert, qk_product, score  # noqa: E402


RECOVERED = 1e-4  # relative X error after alignment below which X counts as recovered


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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=10, help="fresh random problems per row")
    ap.add_argument("--heads", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--d", type=int, nargs="+", default=[4, 8, 16], help="embedding dimensions")
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8, 16], help="token counts")
    ap.add_argument("--lam", type=float, nargs="+", default=[0.0], help="ridges (the old comparison: 0 1e-6)")
    ap.add_argument("--restarts", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"# attention inversion, {datetime.date.today()}, {platform.machine()}, torch {torch.__version__}, "
          f"{args.problems} problems per row, {args.restarts} restarts\n")
    print("| heads | d | n | symmetry dim | H(n-1) >= d | lam | attention matched | said converged | "
          "X recovered (sign) | X recovered (Procrustes) "
          "| restarts used | Newton steps (median) | X error sign / Procrustes (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    table = {}
    for heads in args.heads:
        for d in args.d:
            if d % heads:
                continue
            for n in args.n:
                for lam in args.lam:
                    problems = [problem(p, heads, n, d) for p in range(args.problems)]
                    rows = [solve(W, X, lam, args.restarts) for W, X in problems]
                    ident = [identifiability(W, n) for W, _ in problems]
                    sym = sorted({i["symmetry_dim"] for i in ident})
                    table[(heads, d, n, lam)] = rows
                    k = len(rows)
                    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
                    count = lambda f: f"{sum(1 for r in rows if f(r))}/{k}"  # noqa: E731
                    print(f"| {heads} | {d} | {n} | {'/'.join(map(str, sym))} | "
                          f"{'yes' if ident[0]['enough_equations'] else 'no'} | {lam:g} | "
                          f"{count(lambda r: r['solved'])} | "
                          f"{count(lambda r: r['converged'])} | {count(lambda r: r['x_sign'] < RECOVERED)} | "
                          f"{count(lambda r: r['x_proc'] < RECOVERED)} | {sum(r['restarts'] for r in rows):.0f} | "
                          f"{med('steps'):.0f} | {med('x_sign'):.3g} / {med('x_proc'):.3g} |", flush=True)
    return table

if __name__ == "__main__":
    main()
