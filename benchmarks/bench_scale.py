"""Scale: rounds per minute and peak memory with many virtual clients, 10 % sampled per round.

Clients are ephemeral (built per message in the Ray actors) and partitions are index
arrays computed lazily, so memory should stay bounded as the federation grows.
Peak memory is the largest summed RSS of this process and all its children (the
Ray workers), sampled every 0.5 s.

    python benchmarks/bench_scale.py [--clients 100 1000 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time


import psutil  # noqa: E402

from fl.config import load_config  # noqa: E402
from fl.server_app import RunOptions  # noqa: E402
from fl.simulation import simulate  # noqa: E402


class PeakRSS:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.5)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 5000])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for n in args.clients:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(None, [
                "data.dataset='textgen'", f"data.params.n_samples={max(5000, 10 * n)}", "model.family='bert'",
                f"federation.num_clients={n}", f"federation.clients_per_round={max(1, n // 10)}",
                f"federation.rounds={args.rounds}", "federation.local_steps=1", "federation.batch_size=8",
                "optimizer.name='adam'", "optimizer.lr=0.003", f"tracking.output_dir='{tmp}/out'",
                "tracking.log_model=false"])
            t0 = time.perf_counter()
            with PeakRSS() as mem:
                summary = simulate(cfg, RunOptions(tracking_uri=f"sqlite:///{tmp}/m.db", progress=False))
            wall = time.perf_counter() - t0
            from mlflow import MlflowClient

            hist = MlflowClient(f"sqlite:///{tmp}/m.db").get_metric_history(summary["run_id"], "round_seconds")
            per_round = sum(m.value for m in hist) / len(hist)
            rows.append((n, max(1, n // 10), 60.0 / per_round, wall, mem.peak / 2**30))
            print(f"{n} clients: {60.0 / per_round:.2f} rounds/min, wall {wall:.0f} s, peak RSS {mem.peak / 2**30:.2f} GiB",
                  flush=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs; textgen + bert tiny, 1 local step, batch 8")
    print("| clients | sampled/round | rounds/min | wall (s, incl. Ray start) | peak RSS (GiB, all processes) |")
    print("|---|---|---|---|---|")
    for n, k, rpm, wall, peak in rows:
        print(f"| {n} | {k} | {rpm:.2f} | {wall:.0f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
