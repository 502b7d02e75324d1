"""CPU per update of the client's train handler and of the server's decode + aggregate, old way vs issue 19's.

Client, in process (no Ray, no Flower transport): parse the config, deserialise the global model,
``fl.training.train_client``, serialise the reply. Three variants in blocks of ``--clients`` updates,
in rotated order: a fresh build per message with one array per tensor (before issue 19), the model
reused (``fl.model_pool``), and reused with one flat array per model (``fl.arrays.to_flat_record``).
Server: decode every reply (the hook's checks), then aggregate: per-tensor records decoded again by
Flower's numpy FedAvg (before) vs flat records decoded once, torch mean (``fl.strategy``). Medians of
per-round ratios; one torch thread.

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
from fl.arrays import from_record, like, to_flat_record, to_record, trainable_state  # noqa: E402
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

    glob_flat = to_flat_record({k: v.detach().clone() for k, v in trainable_state(model).items()})

    def block(variant: str, rnd: int) -> float:
        reuse, flat = variant != "fresh build, per-tensor", variant == "reused, flat"
        os.environ["FEDPROBE_MODEL_REUSE"] = "1" if reuse else "0"
        model_pool.clear()
        sent = glob_flat if flat else glob
        c0 = time.process_time()
        for pid in range(args.clients):
            c = config_from_dict(json.loads(cfg_json))
            like(sent, train_client(c, pid, from_record(sent), rnd, {}).state)
        return (time.process_time() - c0) / args.clients

    variants = ["fresh build, per-tensor", "reused, per-tensor", "reused, flat"]
    block(variants[-1], 1)  # warm-up: imports, data, allocator
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.pairs):
        for v in variants[i % 3:] + variants[:i % 3]:  # rotated order
            cpu[v].append(block(v, i + 1))
    print(f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.config}{' (defenses kept)' if args.dp else ' (no defense)'}, {args.pairs} rotated rounds of "
          f"{args.clients}-update blocks")
    print("| client handler | CPU ms / update (median) | old / this (median of per-round ratios) |")
    print("|---|---|---|")
    old = cpu[variants[0]]
    for v in variants:
        ratio = statistics.median(o / x for o, x in zip(old, cpu[v]))
        print(f"| {v} | {1e3 * statistics.median(cpu[v]):.1f} | {ratio:.3f} |")
    server(args.clients, {k: v.detach().clone() for k, v in trainable_state(model).items()}, args.pairs)


def server(clients: int, state: dict[str, torch.Tensor], pairs: int) -> None:
    """The server's share per round: decode every reply (the hook's checks), then FedAvg them."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fl.strategy import PartitionSampledFedAvg

    gen = torch.Generator().manual_seed(0)
    states = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()} for _ in range(clients)]

    def replies(encode) -> list[RecordDict]:
        return [RecordDict({"arrays": encode(s), "metrics": MetricRecord({"num-examples": 10.0 + i})})
                for i, s in enumerate(states)]

    per_tensor, flat = replies(to_record), replies(to_flat_record)

    def old() -> None:  # the hook decodes each reply, then Flower's FedAvg decodes them again (numpy)
        for c in per_tensor:
            from_record(c["arrays"])
        from_record(aggregate_arrayrecords(per_tensor, "num-examples"))

    def new() -> None:  # one flat array per reply, decoded once, torch mean on the decoded tensors
        strategy = PartitionSampledFedAvg({}, clients, 0)
        strategy.decoded = {id(c["arrays"]): (c["arrays"], from_record(c["arrays"])) for c in flat}
        from_record(strategy._weighted_mean(flat))

    times: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(pairs * 4):
        for name, fn in ((("old", old), ("new", new)) if i % 2 == 0 else (("new", new), ("old", old))):
            c0 = time.process_time()
            fn()
            times[name].append(time.process_time() - c0)
    ratio = statistics.median(o / n for o, n in zip(times["old"], times["new"]))
    print(f"server, {clients} replies of {len(state)} tensors: decode + aggregate {1e3 * statistics.median(times['old']):.1f}"
          f" ms per-tensor (decoded twice, numpy FedAvg) vs {1e3 * statistics.median(times['new']):.1f} ms flat "
          f"(decoded once, torch); old/new {ratio:.3f}")

if __name__ == "__main__":
    main()
