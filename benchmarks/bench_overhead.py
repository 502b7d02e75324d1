"""fedprobe's overhead against a bare Flower app of the quickstart-pytorch kind, like for like.

Both sides run on Flower's simulation engine (Ray backend, same client resources), train
the same model (the quickstart's tiny ViT) on the same partitions with the same optimizer
(plain SGD, the quickstart's lr), the same local epochs and batch size, and evaluate
centrally on the same test split every round. Two settings:

* ``nodp``: no defense on either side;
* ``dp``:   Opacus DP-SGD on both sides, with the quickstart's noise multiplier and clip norm.
  The bare client does what Flower's Opacus example does: a fresh ``PrivacyEngine`` per
  message, ``make_private`` (Poisson sampling, as fedprobe's default) and
  ``get_epsilon`` for its reply.

The bare ClientApp rebuilds its model for every message (quickstart-pytorch's pattern);
data loading is cached in-process on both sides (``fl.data.load_federated``). No attack runs.
fedprobe logs to an MLflow store created *before* the timed window. The window is the
ServerApp's ``main`` (Ray start-up and teardown excluded); CPU time is the whole process tree's
(this driver, Ray's daemons and the client actors; ``psutil``), read at the window's ends.

A/B runs are interleaved (bare, fedprobe, then fedprobe, bare, ...); each pair gives one
ratio; the table reports the median ratio by wall time and by CPU time, per setting. The last
line is the median wall-time ratio of client updates per second without DP:

    fedprobe/bare updates/s ratio: <ratio>

    python benchmarks/bench_overhead.py [--clients 10] [--per-round 10] [--rounds 5] [--repeats 3]
                                        [--settings nodp dp] [--supernodes 0]

``--supernodes N`` runs fedprobe's clients on N SuperNodes (``fl.packing``) while the bare app keeps
one per client: the same training on the same engine in fewer Flower messages, reported as such,
never as the like-for-like headline.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import psutil  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from defenses.randomness import SECRET_ENV, new_secret  # noqa: E402
from fl.config import Config, config_from_dict, load_config  # noqa: E402
from fl.server_app import RunOptions, run_federation  # noqa: E402
from fl.simulation import backend_config, run_apps  # noqa: E402
from fl.training import evaluate  # noqa: E402
from models.tasks import logits_of, per_example_loss  # noqa: E402


def tree_cpu() -> float:
    """User + system CPU seconds of this process and all its live descendants (Ray's daemons, the actors)."""
    total = 0.0
    for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # a helper that exited between listing and reading
            pass
    return total


def _dp_params(cfg: Config) -> dict[str, Any] | None:
    return next((d.params for d in cfg.defenses if d.name == "dp_sgd"), None)


def _bare_client_app(cfg: Config) -> ClientApp:
    app = ClientApp()
    dp = _dp_params(cfg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import warnings

        from fl.data import load_federated
        from models import build_model, task_for

        pid = int(context.node_config["partition-id"])
        data = load_federated(cfg.data, cfg.federation.num_clients, cfg.experiment.seed)
        task = task_for(cfg.model, data.task)
        train_ds, _ = data.partition(pid)
        model = build_model(cfg.model, task, seed=cfg.experiment.seed)  # rebuilt per message (quickstart-pytorch)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.optimizer.lr)
        loader = DataLoader(train_ds, batch_size=cfg.federation.batch_size, shuffle=True, collate_fn=data.collate)
        module, metrics = model, {"num-examples": len(train_ds)}
        if dp is not None:  # Flower's Opacus example: a fresh engine per message
            from opacus import PrivacyEngine

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                engine = PrivacyEngine(secure_mode=False)
                module, opt, loader = engine.make_private(
                    module=model, optimizer=opt, data_loader=loader, noise_multiplier=dp["noise_multiplier"],
                    max_grad_norm=dp["max_grad_norm"], poisson_sampling=True)
        module.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(cfg.federation.local_epochs):
                for batch in loader:
                    if len(batch["labels"]) == 0:
                        continue
                    loss = per_example_loss(logits_of(module, batch, task), batch["labels"], task).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        if dp is not None:
            metrics["epsilon"] = float(engine.get_epsilon(dp["delta"]))
        state = {k: v for k, v in model.state_dict().items() if k in msg.content["arrays"]}
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


MARKS: list[tuple[float, float]] = []  # (wall, tree CPU) at each central evaluation, both sides


def _mark() -> None:
    MARKS.append((time.perf_counter(), tree_cpu()))


def _timed(body: Any) -> dict[str, tuple[float, float]]:
    """{"run": (wall, CPU) of the whole window, "steady": the same from round 1's evaluation to the last round's}."""
    MARKS.clear()
    t0, c0 = time.perf_counter(), tree_cpu()
    body()
    t1, c1 = time.perf_counter(), tree_cpu()
    # MARKS[0]: the initial model's evaluation; MARKS[1]: after round 1 (actors warm, partition query done)
    (s0, sc0), (s1, sc1) = MARKS[1], MARKS[-1]
    return {"run": (t1 - t0, c1 - c0), "steady": (s1 - s0, sc1 - sc0)}


def _marking_evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
    _mark()
    return evaluate(*args, **kwargs)


def run_bare(cfg: Config) -> dict[str, tuple[float, float]]:
    from fl.data import load_federated
    from models import build_model, task_for

    out: dict[str, dict[str, tuple[float, float]]] = {}
    server = ServerApp()
    fed = cfg.federation

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        def body() -> None:
            data = load_federated(cfg.data, fed.num_clients, cfg.experiment.seed)
            task = task_for(cfg.model, data.task)
            model = build_model(cfg.model, task, seed=cfg.experiment.seed)
            trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

            def central(rnd: int, arrays: ArrayRecord) -> MetricRecord:
                model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
                return MetricRecord(_marking_evaluate(model, data.test, task, data.collate))

            FedAvg(fraction_train=fed.clients_per_round / fed.num_clients, fraction_evaluate=0.0,
                   min_available_nodes=fed.num_clients).start(
                grid=grid, initial_arrays=ArrayRecord(trainable), num_rounds=fed.rounds, evaluate_fn=central)

        out["t"] = _timed(body)

    run_apps(server, _bare_client_app(cfg), fed.num_clients, backend_config(cfg))
    return out["t"]


def run_fedprobe(cfg: Config, uri: str) -> dict[str, tuple[float, float]]:
    import fl.server_app
    from fl.client_app import app as client_app

    fl.server_app.evaluate = _marking_evaluate  # the same marks as the bare server's evaluate_fn
    out: dict[str, dict[str, tuple[float, float]]] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        out["t"] = _timed(lambda: run_federation(grid, cfg, RunOptions(tracking_uri=uri, progress=False)))

    run_apps(server, client_app, cfg.federation.supernodes or cfg.federation.num_clients, backend_config(cfg))
    return out["t"]


def make_config(setting: str, clients: int, per_round: int, rounds: int, tmp: str, supernodes: int = 0) -> Config:
    base = load_config("experiments/quickstart.toml", [
        f"federation.num_clients={clients}", f"federation.clients_per_round={per_round}",
        f"federation.supernodes={supernodes}",
        f"federation.rounds={rounds}", "attack.name='none'", f"tracking.output_dir='{tmp}/out'",
        "tracking.log_model=false"])
    data = base.to_dict()
    if setting == "nodp":
        data["defenses"] = []
    return config_from_dict(data)


def create_store(uri: str) -> None:
    """The MLflow store's schema, made before any timed window (fedprobe's first run would otherwise pay for it)."""
    import mlflow

    mlflow.MlflowClient(tracking_uri=uri).search_experiments()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=None, help="clients per round (default: all)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="A/B pairs per setting")
    ap.add_argument("--settings", nargs="+", default=["nodp", "dp"], choices=["nodp", "dp"])
    ap.add_argument("--supernodes", type=int, default=0,
                    help="fedprobe's federation.supernodes (0: one SuperNode per client, as the bare app; like for "
                         "like). N packs fedprobe's clients on N SuperNodes (fl.packing): not like for like")
    args = ap.parse_args()
    per_round = args.per_round or args.clients
    os.environ.setdefault(SECRET_ENV, new_secret())  # the clients' DP noise key (fl.simulation does this for a run)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        create_store(uri)
        for setting in args.settings:
            cfg = make_config(setting, args.clients, per_round, args.rounds, tmp, args.supernodes)
            pairs = []
            for rep in range(args.repeats):
                order = ("bare", "fedprobe") if rep % 2 == 0 else ("fedprobe", "bare")
                got = {}
                for side in order:
                    got[side] = run_bare(cfg) if side == "bare" else run_fedprobe(cfg, uri)
                    run, steady = got[side]["run"], got[side]["steady"]
                    print(f"  {setting} pair {rep + 1}: {side:8s} run wall {run[0]:6.2f} s cpu {run[1]:6.2f} s | "
                          f"rounds 2-{args.rounds} wall {steady[0]:6.2f} s cpu {steady[1]:6.2f} s", flush=True)
                pairs.append(got)
            for window, n_updates in (("run", per_round * args.rounds), ("steady", per_round * (args.rounds - 1))):
                def med(side: str, i: int) -> float:
                    return statistics.median(n_updates / p[side][window][i] for p in pairs)
                rows.append((setting, window, med("bare", 0), med("fedprobe", 0),
                             statistics.median(p["bare"][window][0] / p["fedprobe"][window][0] for p in pairs),
                             med("bare", 1), med("fedprobe", 1),
                             statistics.median(p["bare"][window][1] / p["fedprobe"][window][1] for p in pairs)))
    print(f"\n{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.clients} clients, {per_round} per round, {args.rounds} rounds, {args.repeats} interleaved pairs"
          + (f", fedprobe on {args.supernodes} SuperNodes (bare: {args.clients})" if args.supernodes else "") + "; "
          "medians of per-pair ratios (fedprobe / bare updates per second)")
    print("| setting | window | bare updates/s | fedprobe updates/s | ratio (wall) | bare updates/CPU-s | "
          "fedprobe updates/CPU-s | ratio (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for setting, window, b, o, wall, bc, oc, cpu in rows:
        label = "whole run" if window == "run" else f"rounds 2-{args.rounds}"
        print(f"| {setting} | {label} | {b:.2f} | {o:.2f} | {wall:.3f} | {bc:.2f} | {oc:.2f} | {cpu:.3f} |")
    headline = next((r for r in rows if r[0] == "nodp" and r[1] == "run"), rows[0])
    print(f"fedprobe/bare updates/s ratio: {headline[4]:.3f}")

if __name__ == "__main__":
    main()
