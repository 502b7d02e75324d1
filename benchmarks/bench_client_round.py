"""Client CPU per update, in process: the model rebuilt per message vs reused (``fl.model_pool``), interleaved.

What one simulated client does for a train message, without Ray or Flower's transport: parse the
config, deserialise the global model, ``fl.training.train_client``, serialise the reply. Blocks of
``--clients`` updates alternate between ``FEDPROBE_MODEL_REUSE=0`` (a fresh build per message, as
before issue 19) and reuse; the ratio per pair of blocks is reported as a median. One torch thread.

    python benchmarks/bench_client_round.py [--config experiments/quickstart.toml] [--pairs 5] [--dp]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

os.environ.setdefault("FEDPROBE_CLIENT_SECRET", "bench-client-round")  # dp_sgd's noise key (fl.simulation sets it)

import torch  # noqa: E402

from fl import model_pool  # noqa: E402
from fl.arrays import from_record, to_record, trainable_state  # noqa: E402
from fl.config import config_from_dict, load_config  # noqa: E402
from fl.data import load_federated  # noqa: E402
from fl.training import train_client  # noqa: E402
from models import build_model, task_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="experiments/quickstart.toml")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--dp", action="store_true", help="keep the config's defenses (default: none)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [f"federation.num_clients={args.clients}", "attack.name='none'"])
    data = cfg.to_dict()
    if not args.dp:
        data["defenses"] = []
    cfg = config_from_dict(data)
    fed = load_federated(cfg.data, args.clients, cfg.experiment.seed)
    model = build_model(cfg.model, task_for(cfg.model, fed.task), seed=cfg.experiment.seed)
    glob = to_record({k: v.detach().clone() for k, v in trainable_state(model).items()})
    cfg_json = cfg.to_json()

    def block(reuse: bool, rnd: int) -> float:
        os.environ["FEDPROBE_MODEL_REUSE"] = "1" if reuse else "0"
        model_pool.clear()
        c0 = time.process_time()
        for pid in range(args.clients):
            c = config_from_dict(json.loads(cfg_json))
            to_record(train_client(c, pid, from_record(glob), rnd, {}).state)
        return (time.process_time() - c0) / args.clients

    block(True, 1)  # warm-up: imports, data, allocator
    fresh, reused = [], []
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        for reuse in order:
            (reused if reuse else fresh).append(block(reuse, i + 1))
    ratios = [f / r for f, r in zip(fresh, reused)]
    print(f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.config}{' (defenses kept)' if args.dp else ' (no defense)'}, {args.pairs} interleaved pairs of "
          f"{args.clients} updates")
    print(f"CPU ms per update: fresh build {1e3 * statistics.median(fresh):.1f}, "
          f"reused model {1e3 * statistics.median(reused):.1f}; fresh/reused median ratio "
          f"{statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
