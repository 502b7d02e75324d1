"""Seconds to exact recovery, float32 beside float64 (issue 19, point 5).

The victim is the tiny ViT on 8x8 digits, FedSGD round 1 (one plain SGD step, lr 0.1, no defense), batch B.
For each attack, dtype and B, the search runs with doubling iteration budgets (L-BFGS counts its inner
iterations) until every example of the batch is exact (PSNR >= 80 dB, the harness's saturation:
``exact_fraction`` = 1) or the largest budget is spent. Reported: the PSNR and seconds of every budget, and "seconds to exact" = the seconds of the first
budget that is exact. Budgets are iterations, so the PSNR column is the same on any machine; the seconds
are this machine's (1 torch thread; compare the dtypes as a ratio measured in the same run).

    python benchmarks/bench_attack_dtype.py [--batch 1 8] [--attacks idlg dlg] [--max-iterations 1280]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attacks import IMG, digits, observe, vit_factory  # noqa: E402

from attacks.base import ATTACKS  # noqa: E402
from attacks.harness import run_attack  # noqa: E402

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--attacks", nargs="+", default=["idlg"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--first", type=int, default=20, help="the first iteration budget (then doubled)")
    ap.add_argument("--max-iterations", type=int, default=1280)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} thread(s); command: python benchmarks/bench_attack_dtype.py {' '.join(sys.argv[1:])}")
    print("| attack | B | dtype | iterations | PSNR [dB] (capped at 80) | exact examples | seconds |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    for B in args.batch:
        batch = digits(B, start=10 if B > 1 else 0)
        obs = observe(vit_factory(), None, batch, IMG)
        for name in args.attacks:
            for dtype in args.dtypes:
                budget, to_exact = args.first, None
                while budget <= args.max_iterations:
                    s = run_attack(ATTACKS.create(name, iterations=budget, dtype=dtype), obs, batch)
                    exact = s["exact_fraction"] >= 1.0
                    print(f"| {name} | {B} | {dtype} | {budget} | {s['psnr']:.1f} | "
                          f"{round(s['exact_fraction'] * B)}/{B} | {s['attack_seconds']:.2f} |", flush=True)
                    if exact:
                        to_exact = (budget, s["attack_seconds"])
                        break
                    budget *= 2
                summary.append((name, B, dtype, to_exact))
    print("\n| attack | B | dtype | seconds to exact (iterations) |")
    print("|---|---|---|---|")
    for name, B, dtype, hit in summary:
        cell = f"{hit[1]:.2f} ({hit[0]})" if hit else f"not exact within {args.max_iterations} iterations"
        print(f"| {name} | {B} | {dtype} | {cell} |")


if __name__ == "__main__":
    main()
