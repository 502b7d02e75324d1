"""The RDP accountant's cost per call, Opacus's RDPAccountant vs fedprobe's cached curve (issue 19).

A DP-SGD client computes its epsilon every round from its whole history. Opacus recomputes every entry's RDP
curve (a sum over 60+ orders of series) on each call; ``defenses.accounting`` caches the one-step curve per
(q, z) and scales it by the step count, which is the same arithmetic (the test suite checks bit-for-bit
equality). Calls alternate A/B in one process; CPU time per call (process time), medians over ``--reps``.

    python benchmarks/bench_accounting.py [--reps 200]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time


from opacus.accountants import RDPAccountant  # noqa: E402

from defenses.accounting import epsilon_of_history  # noqa: E402

HISTORIES = {  # (noise multiplier, sample rate, steps) as the runs record them
    "quickstart client, round 3 (sigma 0.5, q 1/9, 27 steps)": [(0.5, 1 / 9, 27)],
    "flagship point, round 30 (sigma 0.1, q 1, 30 releases)": [(0.1, 1.0, 30)],
    "mixed history (3 entries)": [(0.5, 1 / 9, 9), (0.5, 1 / 8, 18), (1.2, 0.05, 100)],
}


def opacus_eps(hist: list[tuple[float, float, int]]) -> float:
    acc = RDPAccountant()
    acc.history = list(hist)
    return float(acc.get_epsilon(delta=1e-5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    print(f"# RDP accountant per call, {datetime.date.today()}, {platform.machine()}, {args.reps} A/B pairs\n")
    print("| history | Opacus RDPAccountant (ms) | fedprobe cached (ms) | ratio | same epsilon |")
    print("|---|---|---|---|---|")
    for label, hist in HISTORIES.items():
        a, b = [], []
        for _ in range(args.reps):
            t = time.process_time()
            ea = opacus_eps(hist)
            a.append(time.process_time() - t)
            t = time.process_time()
            eb = epsilon_of_history(hist, 1e-5, "rdp")
            b.append(time.process_time() - t)
        ma, mb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
        print(f"| {label} | {ma:.2f} | {mb:.3f} | {ma / max(mb, 1e-9):.0f}x | {ea == eb} |", flush=True)


if __name__ == "__main__":
    main()
