"""fedprobe's overhead against a bare Flower app with the same model, data and rounds.

Both run on Flower's simulation engine (Ray backend, same client resources); each
ClientApp trains the same model on the same partition for the same local steps,
and both servers evaluate centrally on the same test split each round. Measured
inside the ServerApp (Ray start-up excluded): client updates per second and the
ratio fedprobe / bare.

    python benchmarks/bench_overhead.py [--clients 10] [--rounds 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from fl.config import Config, load_config  # noqa: E402
from fl.server_app import RunOptions, run_federation  # noqa: E402
from fl.simulation import backend_config, run_apps  # noqa: E402
from fl.training import evaluate  # noqa: E402
from models.tasks import logits_of, per_example_loss  # noqa: E402

CFG: Config | None = None  # set before each simulation (Ray actors pickle the apps with it)


def _bare_client_app(cfg: Config) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from fl.data import load_federated
        from models import build_model

        pid = int(context.node_config["partition-id"])
        data = load_federated(cfg.data, cfg.federation.num_clients, cfg.experiment.seed)
        train_ds, _ = data.partition(pid)
        model = build_model(cfg.model, data.task, seed=cfg.experiment.seed)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.optimizer.lr)
        model.train()
        for batch in DataLoader(train_ds, batch_size=cfg.federation.batch_size, shuffle=True, collate_fn=data.collate):
            loss = per_example_loss(logits_of(model, batch), batch["labels"], data.task).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {k: v for k, v in model.state_dict().items() if k in msg.content["arrays"]}
        return Message(RecordDict({"arrays": ArrayRecord(state),
                                   "metrics": MetricRecord({"num-examples": len(train_ds)})}), reply_to=msg)

    return app


def _simulate(cfg: Config, server_app: ServerApp, client_app: ClientApp) -> None:
    run_apps(server_app, client_app, cfg.federation.num_clients, backend_config(cfg))


def run_bare(cfg: Config) -> float:
    from fl.data import load_federated
    from models import build_model

    out: dict[str, float] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        t0 = time.perf_counter()
        data = load_federated(cfg.data, cfg.federation.num_clients, cfg.experiment.seed)
        model = build_model(cfg.model, data.task, seed=cfg.experiment.seed)
        trainable = {n: p for n, p in model.state_dict().items()
                     if n in dict(model.named_parameters()) and dict(model.named_parameters())[n].requires_grad}

        def central(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
            return MetricRecord(evaluate(model, data.test, data.task, data.collate))

        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=cfg.federation.num_clients).start(
            grid=grid, initial_arrays=ArrayRecord(trainable), num_rounds=cfg.federation.rounds, evaluate_fn=central)
        out["seconds"] = time.perf_counter() - t0

    _simulate(cfg, server, _bare_client_app(cfg))
    return out["seconds"]


def run_fedprobe(cfg: Config, uri: str) -> float:
    from fl.client_app import app as client_app

    out: dict[str, float] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        t0 = time.perf_counter()
        run_federation(grid, cfg, RunOptions(tracking_uri=uri, progress=False))
        out["seconds"] = time.perf_counter() - t0

    _simulate(cfg, server, client_app)
    return out["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("experiments/quickstart.toml", [
            f"federation.num_clients={args.clients}", f"federation.clients_per_round={args.clients}",
            f"federation.rounds={args.rounds}", "attack.name='none'", f"tracking.output_dir='{tmp}/out'",
            "tracking.log_model=false"])
        uri = f"sqlite:///{tmp}/mlflow.db"
        bare, ours = [], []
        for _ in range(args.repeats):
            bare.append(run_bare(cfg))
            ours.append(run_fedprobe(cfg, uri))
    updates = args.clients * args.rounds
    ups_bare = [updates / s for s in bare]
    ups_ours = [updates / s for s in ours]
    ratio = statistics.mean(ups_ours) / statistics.mean(ups_bare)
    print(f"| machine | clients x rounds | bare Flower updates/s | fedprobe updates/s | ratio |")
    print(f"|---|---|---|---|---|")
    print(f"| {platform.machine()}, {os.cpu_count()} CPUs | {args.clients} x {args.rounds} | "
          f"{statistics.mean(ups_bare):.2f} ± {statistics.pstdev(ups_bare):.2f} | "
          f"{statistics.mean(ups_ours):.2f} ± {statistics.pstdev(ups_ours):.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
