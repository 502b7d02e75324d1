"""Federated, client-side RICL: each client learns the prompt's weights on its own validation split.

    python -m experiments.ricl_federated [--clients 4] [--quick] [--tracking-uri URI]
                                         [--task classification] [--prompt imbalanced] [--method ricl]

Protocol (Flower Message API, one TRAIN message per node and problem instance):

1. The server trains (or loads from the cache ``cache_dir``, shared with
   ``experiments.ricl``) the frozen in-context learner, draws a prompt of m examples
   and sends it to every node as arrays (``xs`` [m, d], ``ys`` [m]) with the options as
   JSON in the message config (cache dir included).
2. Each client loads the same frozen model from that cache, draws its *own*
   validation split of ``n_val`` points from D_val, deterministically from
   (seed, instance, partition-id), runs :func:`models.icl.reweight.ricl_client_weights`
   (RICL or LARICL) and replies with only the m weights (ArrayRecord ``weights``) and
   its metrics (``val_loss``, ``val_loss_uniform``, ``num-examples``).
3. The server averages the weights by validation size
   (:func:`models.icl.reweight.aggregate_client_weights`) and evaluates plain ICL
   (w = 1), federated RICL, each client's own weights alone (``client-only``) and,
   as a simulation-only reference, RICL on the pooled validation splits (``central``)
   on a held-out test set. Everything is logged to one MLflow run.

Simulation choices [derived]: the task f (β) of an instance is drawn from
(seed, instance) on every side and never travels: the server's prompt and the
clients' data are labelled by the same f, as in the centralised experiment. The
simulation runs on :func:`fl.simulation.serve` (Flower's runtime, a private local Ray
instance), the engine ``fedprobe run`` uses.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from experiments.ricl import RICLExperiment
from fl.arrays import from_record, to_record
from models.icl.model import ICLModelConfig
from models.icl.reweight import Reweightable, aggregate_client_weights, ricl_client_weights
from models.icl.tasks import PROMPT_KINDS, ICLTask, Prompt, sample_beta, sample_prompt, sample_queries
from models.icl.toys import WeightedRidgeICL
from models.icl.train import output_loss, train_icl_model

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

log = logging.getLogger("fedprobe")

OPTIONS_KEY = "ricl-options"
METHODS = ("icl", "fed_ricl", "client_only", "central")
_TRAIN_DEFAULTS = RICLExperiment().train  # same learner and cache key as the centralised experiment


@dataclass
class FedRICLOptions:
    """Everything a client needs travels in the message as ``json.dumps(asdict(options))``.

    Defaults match ``experiments.ricl`` (model size, training, cache) so the trained
    learner is shared. ``model = "ridge"`` swaps in the closed-form weighted-ridge
    in-context learner of ``models.icl.toys`` (fast; used by the tests).
    """

    seed: int = 0
    instances: int = 4  # problem instances (task, prompt, splits); one federated round each
    task: str = "classification"
    prompt: str = "imbalanced"
    dim: int = 5
    n_examples: int = 20
    major_frac: float = 0.85
    model: str = "transformer"  # "transformer" (trained, cached) | "ridge" (toy)
    train: dict[str, Any] = field(default_factory=lambda: dict(_TRAIN_DEFAULTS))
    cache_dir: str = "fedprobe-output/ricl/cache"
    method: str = "ricl"  # "ricl" | "laricl"
    loss: str = ""  # "" -> the task's loss (mse / bce)
    n_val: int = 64  # validation points per client
    n_test: int = 1024  # server's held-out test points
    lam: float = 0.01
    steps: int = 100
    lr: float = 0.05
    laricl_lams: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    central_reference: bool = True
    timeout: float = 600.0  # seconds to wait for the replies of one round

    def __post_init__(self) -> None:
        if self.model not in ("transformer", "ridge"):
            raise ValueError(f"model must be 'transformer' or 'ridge', got {self.model!r}")
        if self.method not in ("ricl", "laricl"):
            raise ValueError(f"method must be 'ricl' or 'laricl', got {self.method!r}")
        if self.prompt not in PROMPT_KINDS:
            raise ValueError(f"prompt must be one of {PROMPT_KINDS}, got {self.prompt!r}")
        if self.loss not in ("", "mse", "bce"):
            raise ValueError(f"loss must be '', 'mse' or 'bce', got {self.loss!r}")
        if self.n_val < 1 or self.n_test < 1 or self.instances < 1:
            raise ValueError("n_val, n_test and instances must be >= 1")
        unknown = set(self.train) - set(_TRAIN_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown train key(s) {sorted(unknown)}; allowed: {sorted(_TRAIN_DEFAULTS)}")
        self.train = {**_TRAIN_DEFAULTS, **self.train}

    @property
    def icl_task(self) -> ICLTask:
        return ICLTask(kind=self.task, dim=self.dim, n_examples=self.n_examples,  # type: ignore[arg-type]
                       major_frac=self.major_frac)

    @property
    def loss_name(self) -> str:
        return self.loss or self.icl_task.loss

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FedRICLOptions":
        return cls(**json.loads(text))

    def method_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ricl_client_weights`` (method included)."""
        if self.method == "ricl":
            return {"method": "ricl", "loss": self.loss_name, "lam": self.lam, "steps": self.steps, "lr": self.lr}
        return {"method": "laricl", "loss": self.loss_name, "lam": self.laricl_lams}


# ---------------------------------------------------------------- shared by both sides

_MODELS: dict[str, Reweightable] = {}  # per process (a Ray actor serves many messages)


def load_model(opts: FedRICLOptions) -> Reweightable:
    """The frozen in-context learner: trained once under ``opts.cache_dir``, then loaded."""
    t = opts.train
    key = json.dumps([opts.model, opts.task, opts.dim, opts.n_examples, opts.major_frac, t,
                      str(Path(opts.cache_dir).resolve())], sort_keys=True)
    if key not in _MODELS:
        if opts.model == "ridge":
            _MODELS[key] = WeightedRidgeICL(ridge=1e-2, intercept=True)
        else:
            mcfg = ICLModelConfig(dim=opts.dim, n_examples=opts.n_examples, n_embd=t["n_embd"], n_layer=t["n_layer"],
                                  n_head=t["n_head"])
            _MODELS[key] = train_icl_model(opts.icl_task, mcfg, steps=t["steps"], batch=t["batch"], lr=t["lr"],
                                           seed=t["seed"], cache_dir=opts.cache_dir)
    return _MODELS[key]


def _gen(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:  # simple, stable mixing of the parts into one 63-bit seed
        seed = (seed * 1_000_003 + int(p) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def instance_beta(opts: FedRICLOptions, instance: int) -> torch.Tensor:
    """The task f (β) of one problem instance: the same on server and clients, never sent."""
    return sample_beta(opts.icl_task, _gen(opts.seed, instance, 0))


def instance_prompt(opts: FedRICLOptions, instance: int) -> Prompt:
    """The server's prompt of one instance (m examples of f under the ``opts.prompt`` distribution)."""
    beta = instance_beta(opts, instance)
    return sample_prompt(opts.icl_task, opts.prompt, _gen(opts.seed, instance, 2), beta=beta)  # type: ignore[arg-type]


def client_val_split(opts: FedRICLOptions, instance: int, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``partition_id``'s own validation split: n_val points of D_val, from (seed, instance, pid)."""
    return sample_queries(opts.icl_task, instance_beta(opts, instance), opts.n_val,
                          _gen(opts.seed, instance, 1, partition_id))


# ---------------------------------------------------------------- client

client_app = ClientApp()


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Learn the m prompt weights on this client's validation split; reply with w and metrics only."""
    torch.set_num_threads(1)
    opts = FedRICLOptions.from_json(str(msg.content["config"][OPTIONS_KEY]))
    instance = int(msg.content["config"]["instance"])
    pid = int(context.node_config.get("partition-id", 0))
    arrays = from_record(msg.content["arrays"])
    prompt = Prompt(xs=arrays["xs"], ys=arrays["ys"], beta=torch.zeros(arrays["xs"].shape[1]))  # β stays unknown
    model = load_model(opts)
    reply = ricl_client_weights(model, prompt, client_val_split(opts, instance, pid), **opts.method_kwargs())
    content = RecordDict({
        "arrays": to_record({"weights": reply["weights"].float()}),
        "metrics": MetricRecord({"val_loss": float(reply["val_loss"]),
                                 "val_loss_uniform": float(reply["val_loss_uniform"]),
                                 "num-examples": int(reply["num_examples"]), "partition-id": pid}),
    })
    return Message(content, reply_to=msg)


# ---------------------------------------------------------------- server

def _test_metrics(model: Reweightable, prompt: Prompt, test: tuple[torch.Tensor, torch.Tensor], w: torch.Tensor | None,
                  opts: FedRICLOptions) -> dict[str, float]:
    xt, yt = test
    with torch.no_grad():
        pred = model.predict(prompt, xt, None if w is None else w.to(xt.dtype))
        out = {"loss": output_loss(pred, yt.to(pred.dtype), opts.loss_name).item()}
        if opts.task == "classification":
            out["acc"] = ((pred > 0) == (yt > 0)).float().mean().item()
    return out


def _reply_shape(reply: Message) -> dict[str, Any]:
    """What a client actually sent: record names, array names and element count (for the audit)."""
    arrays = reply.content["arrays"]
    return {"records": sorted(reply.content.keys()), "arrays": {k: list(a.shape) for k, a in arrays.items()},
            "numel": int(sum(torch.Size(a.shape).numel() for a in arrays.values()))}


def run_instance(grid: Grid, opts: FedRICLOptions, instance: int, model: Reweightable) -> dict[str, Any]:
    """One round: send the prompt to every node, aggregate the weights, evaluate on the test set."""
    task = opts.icl_task
    prompt = instance_prompt(opts, instance)
    test = sample_queries(task, prompt.beta, opts.n_test, _gen(opts.seed, instance, 3))
    config = ConfigRecord({OPTIONS_KEY: opts.to_json(), "instance": instance})
    node_ids = sorted(grid.get_node_ids())
    messages = [Message(RecordDict({"arrays": to_record({"xs": prompt.xs, "ys": prompt.ys}), "config": config}),
                        message_type=MessageType.TRAIN, dst_node_id=n) for n in node_ids]
    clients: list[dict[str, Any]] = []
    errors: list[str] = []
    for reply in grid.send_and_receive(messages, timeout=opts.timeout):
        if reply.has_error():
            errors.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            continue
        m = reply.content["metrics"]
        clients.append({"partition_id": int(m["partition-id"]), "num_examples": int(m["num-examples"]),
                        "val_loss": float(m["val_loss"]), "val_loss_uniform": float(m["val_loss_uniform"]),
                        "weights": from_record(reply.content["arrays"])["weights"], "sent": _reply_shape(reply)})
    if not clients:
        raise RuntimeError(f"instance {instance}: no client replied ({'; '.join(errors) or 'no replies'})")
    clients.sort(key=lambda c: c["partition_id"])
    w_fed = aggregate_client_weights(clients)
    row: dict[str, Any] = {
        "instance": instance, "clients": clients, "errors": errors, "weights_fed": w_fed,
        "icl": _test_metrics(model, prompt, test, None, opts),
        "fed_ricl": _test_metrics(model, prompt, test, w_fed, opts),
    }
    per_client = [_test_metrics(model, prompt, test, c["weights"], opts) for c in clients]
    row["client_only"] = {k: statistics.fmean(r[k] for r in per_client) for k in per_client[0]}
    if opts.central_reference:  # simulation-only oracle: RICL on the union of the clients' splits
        splits = [client_val_split(opts, instance, c["partition_id"]) for c in clients]
        pooled = (torch.cat([s[0] for s in splits]), torch.cat([s[1] for s in splits]))
        w_c = ricl_client_weights(model, prompt, pooled, **opts.method_kwargs())["weights"]
        row["central"] = _test_metrics(model, prompt, test, w_c, opts)
    if opts.task == "classification":  # diagnostic: weight of the over-represented class
        row["w_major"], row["w_minor"] = w_fed[prompt.ys > 0].mean().item(), w_fed[prompt.ys < 0].mean().item()
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """method -> metric -> (mean, std) over instances."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for m in METHODS:
        if m not in rows[0]:
            continue
        out[m] = {}
        for k in rows[0][m]:
            vals = [r[m][k] for r in rows]
            out[m][k] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return out


def result_table(summary: dict[str, dict[str, tuple[float, float]]], opts: FedRICLOptions) -> str:
    metrics = list(next(iter(summary.values())))
    names = {"loss": f"test {opts.loss_name.upper()}", "acc": "test acc"}
    lines = ["| method | " + " | ".join(names[k] for k in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for m, res in summary.items():
        lines.append(f"| {m} | " + " | ".join(f"{res[k][0]:.4f} ± {res[k][1]:.4f}" for k in metrics) + " |")
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return [round(v, 6) for v in x.tolist()]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def run_ricl_federation(grid: Grid, opts: FedRICLOptions, tracking_uri: str = "", run_name: str = "") -> dict[str, Any]:
    """The server's whole job: every instance, then the summary, logged to MLflow (experiment ``ricl-federated``)."""
    from fl.tracking import Tracker

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tracker = Tracker(tracking_uri, "ricl-federated",
                      run_name or "ricl-fed-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
                      tags={"fedprobe.mode": "client-side-ricl", "method": opts.method})
    status = "FAILED"
    try:
        tracker.log_params({**asdict(opts), "num_nodes": len(list(grid.get_node_ids()))})
        model = load_model(opts)  # trains into the cache before any client needs it
        rows = []
        for i in range(opts.instances):
            row = run_instance(grid, opts, i, model)
            rows.append(row)
            metrics = {f"{m}.{k}": v for m in METHODS if m in row for k, v in row[m].items()}
            for c in row["clients"]:
                metrics.update({f"client_{c['partition_id']}.{k}": c[k] for k in ("val_loss", "val_loss_uniform")})
            metrics.update({k: row[k] for k in ("w_major", "w_minor") if k in row})
            metrics["clients_replied"] = len(row["clients"])
            tracker.log_metrics(metrics, step=i)
            log.info("instance %d: icl %.4f fed_ricl %.4f", i, row["icl"]["loss"], row["fed_ricl"]["loss"])
        summary = summarise(rows)
        tracker.log_metrics({f"{m}.{k}.{s}": v[j] for m, res in summary.items() for k, v in res.items()
                             for j, s in enumerate(("mean", "std"))}, step=opts.instances)
        result = {"run_id": tracker.run_id, "tracking_uri": tracker.uri, "options": asdict(opts),
                  "summary": summary, "table": result_table(summary, opts), "instances": _jsonable(rows),
                  "seconds": time.perf_counter() - t0}
        tracker.log_dict(result, "ricl_federated.json")
        status = "FINISHED"
        return result
    finally:
        tracker.finish(status)


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: options from the run config key ``ricl-options`` (JSON), else defaults."""
    rc = context.run_config
    opts = FedRICLOptions.from_json(str(rc[OPTIONS_KEY])) if OPTIONS_KEY in rc else FedRICLOptions()
    result = run_ricl_federation(grid, opts, str(rc.get("tracking-uri", "")))
    print(result["table"], flush=True)


def simulate(opts: FedRICLOptions, num_clients: int, tracking_uri: str = "", run_name: str = "",
             verbose: bool = False) -> dict[str, Any]:
    """Run the protocol on fedprobe's simulation engine (:func:`fl.simulation.serve`: Flower's runtime on a private
    local Ray instance, ``num_clients`` SuperNodes, 1 CPU each). Only the two app bodies are this module's: the
    messages carry a prompt and m weights, not a model, so fedprobe's own ClientApp and round loop do not apply."""
    from fl.simulation import local_init_args, serve

    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    opts = replace(opts, cache_dir=str(Path(opts.cache_dir).resolve()))  # one machine: the actors' cwd may differ
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0},
               "init_args": local_init_args(min(num_clients, os.cpu_count() or 1))}
    return serve(lambda grid, context: run_ricl_federation(grid, opts, tracking_uri, run_name), client_app,
                 num_clients, backend, verbose)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="Federated client-side RICL (Flower simulation, Ray backend)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 instances, short training and RICL")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--task", default="classification", choices=("classification", "regression"))
    ap.add_argument("--prompt", default="imbalanced", choices=PROMPT_KINDS)
    ap.add_argument("--method", default="ricl", choices=("ricl", "laricl"))
    ap.add_argument("--model", default="transformer", choices=("transformer", "ridge"))
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--n-val", type=int, default=64, help="validation points per client")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default="fedprobe-output/ricl/cache")
    ap.add_argument("--out", default="fedprobe-output/ricl_federated", help="where the result JSON is written")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    opts = FedRICLOptions(seed=args.seed, instances=args.instances, task=args.task, prompt=args.prompt,
                          method=args.method, model=args.model, n_val=args.n_val, cache_dir=args.cache_dir)
    if args.quick:
        opts.instances, opts.n_test, opts.steps = min(opts.instances, 2), 256, 20
        opts.train = {**opts.train, "steps": 30}
    t0 = time.time()
    result = simulate(opts, args.clients, args.tracking_uri)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ricl_federated.json").write_text(json.dumps(result, indent=1))
    cmd = "python -m experiments.ricl_federated " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n`{cmd}`: {args.clients} clients × {opts.n_val} validation points, {opts.instances} instances, "
          f"{opts.task}/{opts.prompt} prompts, {opts.method}, wall {time.time() - t0:.0f}s, "
          f"MLflow run {result['run_id']}\n")
    print(result["table"])
    return result


if __name__ == "__main__":
    main()
