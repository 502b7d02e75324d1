"""fedprobe's Flower ServerApp: the federated loop in plain sight.

Each round: sample partitions -> (malicious craft) -> send -> inspect replies
(reject bad ones, attack victims) -> aggregate (FedAvg, wrapped by server-side
defenses) -> evaluate centrally on the held-out test split -> log to MLflow ->
checkpoint. ``run_federation`` is the loop; ``app`` is the ServerApp that
``flwr run .`` uses (config from the run config key ``config-path`` or
``fedprobe-config``); ``fedprobe run`` calls ``run_federation`` through
``fl.simulation``.
"""

from __future__ import annotations

import json
import os
import logging
import math
import time
from typing import Any

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from defenses.audit import Audit
from fl.arrays import from_record, load_trainable, to_flat_record, to_record, trainable_state
from fl.protocol import CONFIG_KEY
from fl.config import Config, config_from_dict, load_config
from fl.server_hook import ServerHook
from fl.strategy import PartitionSampledFedAvg, discover_partitions
from fl import ground_truth, packing
from fl.recorder import ResumeError, RunOptions, RunRecorder, check_resume  # noqa: F401  (re-exported)
from fl.training import build_defenses, evaluate, resolve_device, seed_everything

log = logging.getLogger("fedprobe")


class RoundFailed(RuntimeError):
    """Too few valid replies in a round (see federation.min_replies)."""


class RunInterrupted(RuntimeError):
    """The run stopped after a checkpoint, as a kill would (``RunOptions.stop_after_round``)."""


def run_federation(grid: Grid, cfg: Config, options: RunOptions | None = None) -> dict[str, Any]:
    """Run every round of one experiment on ``grid``; return the summary dict.

    The loop has the shape of Flower's ``Strategy.start``: configure_train -> send_and_receive -> (fedprobe's
    server hook: reply checks and the attack) -> aggregate_train -> central evaluation; what the run records
    (MLflow, checkpoints, resume, summary) is the :class:`fl.recorder.RunRecorder` beside it.
    """
    from fl.data import load_server_data
    from models import build_model, count_parameters, task_for

    options = options or RunOptions()
    grid = packing.wrap(grid, cfg.federation.num_clients, cfg.federation.supernodes)  # several clients per node
    seed_everything(cfg.experiment.seed)
    data = load_server_data(cfg.data, cfg.federation.num_clients, cfg.experiment.seed)  # the test split only
    task = task_for(cfg.model, data.task)  # how the model is called (a plain nn.Module: model(x))
    device = resolve_device(cfg.federation.device)
    model = build_model(cfg.model, task, seed=cfg.experiment.seed).to(device)
    initial = {k: v.detach().cpu().clone() for k, v in trainable_state(model).items()}
    rec = RunRecorder(cfg, options, initial, count_parameters(model))
    global_state = rec.global_state

    def evaluate_global(state: dict[str, torch.Tensor]) -> dict[str, float]:
        load_trainable(model, state)
        return evaluate(model, data.test, task, data.collate, device=device)

    status, hook = "FAILED", None
    try:
        strategy, base_strategy, hook, server_defenses = _server(grid, cfg, task, data, rec, build_model)
        cfg_json = cfg.to_json()
        # one flat array per model on the wire, unless a server-side defense wraps the strategy (fl.arrays)
        encode = to_flat_record if strategy is base_strategy else to_record
        rec.begin(lambda: evaluate_global(global_state), hook.checkpoint_state())
        bar = _progress(cfg.federation.rounds, rec.start_round - 1, options.progress)
        for rnd in range(rec.start_round, cfg.federation.rounds + 1):
            t_round = time.perf_counter()
            config = ConfigRecord({CONFIG_KEY: cfg_json})
            messages = hook.before_send(rnd, list(strategy.configure_train(rnd, encode(global_state), config, grid)))
            replies = list(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout))
            report = hook.inspect(rnd, global_state, messages, replies)
            for line in report.events:
                rec.event(line)
            if not report.accepted and report.out_of_budget and len(report.out_of_budget) == len(messages):
                rec.event(f"round {rnd}: every sampled client's privacy budget is spent; the run stops after "
                          f"round {rnd - 1}")
                break
            if len(report.accepted) < cfg.federation.min_replies:
                raise RoundFailed(f"round {rnd}: {len(report.accepted)} valid replies, fewer than "
                                  f"federation.min_replies={cfg.federation.min_replies}")
            base_strategy.decoded = report.decoded  # the hook's decoded replies, for the aggregation
            arrays, train_metrics = strategy.aggregate_train(rnd, report.accepted)
            if arrays is None:
                raise RoundFailed(f"round {rnd}: aggregation returned no model")
            previous_state, global_state = global_state, from_record(arrays)
            _check_finite(rnd, global_state)
            metrics = {k: float(v) for k, v in (train_metrics or {}).items() if k not in ("num-examples", "uniform-weight")}
            metrics.update(evaluate_global(global_state))
            metrics.update(report.metrics)
            metrics.update(hook.audit_metrics(rnd, previous_state, global_state))
            for d in server_defenses:
                metrics.update(d.server_metrics(rnd))
            metrics["round_seconds"] = time.perf_counter() - t_round
            rec.end_round(rnd, metrics, global_state, hook.checkpoint_state(), report.attack_rows)
            bar.update(1)
            if options.stop_after_round == rnd:
                raise RunInterrupted(f"stopped after round {rnd} (stop_after_round)")
            bar.set_postfix(loss=f"{metrics.get('train_loss', math.nan):.3f}", acc=f"{metrics.get('accuracy', math.nan):.3f}")
        bar.close()
        status = "FINISHED"
    finally:
        if hook is not None:  # ground truth left by victims whose replies were refused
            ground_truth.clear(cfg.tracking.output_dir, hook.ground_truth_token)
        summary = rec.finish(status, global_state)
    return summary


def _server(grid: Grid, cfg: Config, task: Any, data: Any, rec: RunRecorder,
            build_model: Any) -> tuple[Any, PartitionSampledFedAvg, ServerHook, list[Any]]:
    """(the strategy: partition-sampled FedAvg wrapped by the server-side defenses, that FedAvg itself, the server
    hook, those defenses)."""
    roster = discover_partitions(grid)
    if len(roster) != cfg.federation.num_clients:
        raise RuntimeError(f"{len(roster)} of {cfg.federation.num_clients} clients answered the partition query")
    base = PartitionSampledFedAvg(roster, cfg.federation.clients_per_round, cfg.experiment.seed,
                                  cfg.federation.min_replies)
    strategy: Any = base
    server_defenses = build_defenses(cfg)
    for d in server_defenses:
        strategy = d.wrap_strategy(strategy, cfg)
    hook = ServerHook(cfg, task, lambda: build_model(cfg.model, task, seed=cfg.experiment.seed), roster,
                      rec.artifact_dir, decode=data.decode, label_prior=data.label_prior(),
                      image_prior=data.image_prior(), token_prior=data.token_prior())
    hook.restore(rec.hook_state)
    for d in server_defenses:  # a client-level audit's canary clients join the central-DP aggregation
        if hook.audit is not None and hasattr(d, "attach_canaries") and type(hook.audit).server_canaries is not \
                Audit.server_canaries:
            d.attach_canaries(hook.audit)
    return strategy, base, hook, server_defenses


def _check_finite(rnd: int, state: dict[str, torch.Tensor]) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RoundFailed(f"round {rnd}: the aggregated global model is not finite (NaN/Inf in {bad[0]}"
                          f"{' and others' if len(bad) > 1 else ''}); the run stops (lower optimizer.lr or "
                          "federation.max_update_ratio)")


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="rounds", unit="round", disable=not enabled, dynamic_ncols=True)


def config_from_context(context: Context) -> Config:
    rc = context.run_config
    if CONFIG_KEY in rc:
        return config_from_dict(json.loads(str(rc[CONFIG_KEY])))
    path = str(rc.get("config-path", "experiments/quickstart.toml"))
    overrides = [s for s in str(rc.get("overrides", "")).split(";") if s.strip()]
    return load_config(path, overrides)


app = ServerApp()  # `flwr run .`: the CLI's quiet defaults apply here too (FEDPROBE_VERBOSE=1 keeps the noise)
if os.environ.get("FEDPROBE_VERBOSE") != "1":
    from fl.quiet import quiet

    quiet()
else:
    from fl.quiet import environment

    environment()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: config from run config ``config-path`` (+ ``overrides``).

    The federation's SuperNodes are the clients: ``federation.num_clients`` follows their number.
    """
    cfg = config_from_context(context)
    nodes = len(list(grid.get_node_ids()))
    if nodes and cfg.federation.supernodes and nodes != cfg.federation.supernodes:  # clients packed on the nodes
        log.warning("federation has %d SuperNodes: using federation.supernodes=%d", nodes, nodes)
        data = cfg.to_dict()
        data["federation"]["supernodes"] = min(nodes, cfg.federation.num_clients)
        cfg = config_from_dict(data)
    elif nodes and not cfg.federation.supernodes and nodes != cfg.federation.num_clients:
        log.warning("federation has %d SuperNodes: using federation.num_clients=%d", nodes, nodes)
        data = cfg.to_dict()
        data["federation"]["num_clients"] = nodes
        data["federation"]["clients_per_round"] = min(cfg.federation.clients_per_round, nodes)
        cfg = config_from_dict(data)
    summary = run_federation(grid, cfg, RunOptions(tracking_uri=str(context.run_config.get("tracking-uri", ""))))
    print(f"fedprobe summary: run {summary['run_id']} {summary['status']} {json.dumps(summary['final'])}", flush=True)
