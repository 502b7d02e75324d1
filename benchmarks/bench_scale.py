"""Scale: rounds per minute and peak memory with many virtual clients, 10 % sampled per round (or --per-round).

Clients are ephemeral (one reused model per Ray actor, fl.model_pool) and partitions are index
arrays computed lazily, so memory should stay bounded as the federation grows. ``--supernodes``
runs the clients on fewer SuperNodes (``federation.supernodes``, fl.packing: one message per node
and round); 0 is one SuperNode per client, Flower's usual layout.

Peak memory is the largest summed RSS of this process and all its children (the Ray workers),
and the driver's own, sampled every 0.5 s. The sampler's own CPU time is reported as a share of
the driver's, so that it is seen not to weigh on what it measures.

    python benchmarks/bench_scale.py [--clients 100 1000 5000] [--rounds 3] [--supernodes 0 2] [--per-round 100]
"""

from __future__ import annotations

import argparse
import itertools
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
    """Peak RSS of the whole tree and of the driver alone; the sampler thread's own CPU seconds."""

    def __init__(self) -> None:
        self.peak = self.peak_driver = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        tree: list[psutil.Process] = []
        for tick in itertools.count():
            if self._stop.is_set():
                break
            if tick % 10 == 0:  # the process list every 5 s (a walk of /proc); their RSS every 0.5 s (one read each)
                tree = [me, *me.children(recursive=True)]
            total = 0
            for p in tree:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.peak_driver = max(self.peak_driver, me.memory_info().rss)
            self.cpu_s = time.thread_time()
            time.sleep(0.5)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _driver_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 5000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=0, help="clients sampled per round (0 = 10 %% of them)")
    ap.add_argument("--supernodes", type=int, nargs="+", default=[0],
                    help="SuperNodes per run (federation.supernodes); 0 = one per client")
    args = ap.parse_args()
    rows = []
    for n in args.clients:
        k = args.per_round or max(1, n // 10)
        for nodes in args.supernodes:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = load_config(None, [
                    "data.dataset='textgen'", f"data.params.n_samples={max(5000, 10 * n)}", "model.family='bert'",
                    f"federation.num_clients={n}", f"federation.clients_per_round={k}",
                    f"federation.supernodes={min(nodes, n)}",
                    f"federation.rounds={args.rounds}", "federation.local_steps=1", "federation.batch_size=8",
                    "optimizer.name='adam'", "optimizer.lr=0.003", f"tracking.output_dir='{tmp}/out'",
                    "tracking.log_model=false"])
                t0, c0 = time.perf_counter(), _driver_cpu_s()
                with PeakRSS() as mem:
                    summary = simulate(cfg, RunOptions(tracking_uri=f"sqlite:///{tmp}/m.db", progress=False))
                wall, driver_cpu = time.perf_counter() - t0, _driver_cpu_s() - c0
                from mlflow import MlflowClient

                hist = MlflowClient(f"sqlite:///{tmp}/m.db").get_metric_history(summary["run_id"], "round_seconds")
                seconds = [m.value for m in sorted(hist, key=lambda m: m.step)]
                steady = seconds[1:] or seconds  # round 1 also starts the Ray actors (imports, model build)
                row = (n, k, nodes or n, seconds[0], 60.0 * len(steady) / sum(steady), wall,
                       mem.peak / 2**30, mem.peak_driver / 2**30, 100.0 * mem.cpu_s / max(driver_cpu, 1e-9))
                rows.append(row)
                print(f"{n} clients on {nodes or n} SuperNodes: round 1 {row[3]:.1f} s, then {row[4]:.2f} rounds/min, "
                      f"wall {wall:.0f} s, peak RSS {row[6]:.2f} GiB (driver {row[7]:.2f}), sampler {row[8]:.2f} % of "
                      "the driver's CPU", flush=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs; textgen + bert tiny, 1 local step, batch 8")
    print("| clients | sampled/round | SuperNodes | round 1 (s, with actor start) | rounds/min after round 1 | "
          "wall (s, incl. Ray start) | peak RSS (GiB, all) | driver RSS (GiB) | sampler CPU (% of driver) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, k, nodes, first, rpm, wall, peak, driver, share in rows:
        print(f"| {n} | {k} | {nodes} | {first:.1f} | {rpm:.2f} | {wall:.0f} | {peak:.2f} | {driver:.2f} | {share:.2f} |")

if __name__ == "__main__":
    main()
