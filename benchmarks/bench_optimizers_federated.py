"""Issue 4 (c): the optimizer wrappers in a federated run, against their base optimizer.

experiments/opt_{rdbd,ra,rva}.toml (10 clients, tiny ViT on digits, Adam base, 5 rounds) against the same job
with optimizer.name = "adam", over several seeds: rounds to a target test accuracy, final accuracy, wall time.

    python benchmarks/bench_optimizers_federated.py [--seeds 5] [--target 0.8]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time


from mlflow import MlflowClient  # noqa: E402

from fl.config import load_config  # noqa: E402
from fl.server_app import RunOptions  # noqa: E402
from fl.simulation import simulate  # noqa: E402

ARMS = {"adam": ("experiments/opt_rdbd.toml", ["optimizer.name='adam'", "optimizer.params={}"]),
        "rdbd": ("experiments/opt_rdbd.toml", []),
        "ra": ("experiments/opt_ra.toml", []),
        "rva": ("experiments/opt_rva.toml", [])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    args = ap.parse_args()
    results: dict[str, list[tuple[float, float, float]]] = {a: [] for a in args.arms}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/m.db"
        for seed in range(args.seeds):
            for arm in args.arms:
                path, extra = ARMS[arm]
                cfg = load_config(path, [*extra, f"experiment.seed={seed}", f"tracking.output_dir='{tmp}/out'",
                                         "tracking.log_model=false"])
                t0 = time.perf_counter()
                summary = simulate(cfg, RunOptions(tracking_uri=uri, progress=False))
                wall = time.perf_counter() - t0
                hist = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(summary["run_id"], "accuracy"))
                reached = next((step for step, acc in hist if step > 0 and acc >= args.target), float("nan"))
                results[arm].append((reached, summary["final"]["accuracy"], wall))
                print(f"seed {seed} {arm}: rounds to {args.target} = {reached}, final acc {summary['final']['accuracy']:.3f},"
                      f" {wall:.0f} s", flush=True)

    def ms(values: list[float]) -> str:
        vals = [v for v in values if v == v]
        if not vals:
            return "-"
        return f"{statistics.mean(vals):.2f} ± {statistics.pstdev(vals):.2f}"

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs; 10 clients, tiny ViT, digits, 5 rounds, Adam base")
    print(f"| optimizer | reached {args.target} | rounds to {args.target} | final accuracy | wall s (incl. Ray start) |")
    print("|---|---|---|---|---|")
    for arm, rows in results.items():
        reached = [r[0] for r in rows]
        print(f"| {arm} | {sum(r == r for r in reached)}/{len(rows)} | {ms(reached)} | {ms([r[1] for r in rows])} | "
              f"{ms([r[2] for r in rows])} |")


if __name__ == "__main__":
    main()
