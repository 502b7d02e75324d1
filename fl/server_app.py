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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from defenses.audit import Audit
from fl.arrays import from_record, load_trainable, to_record, trainable_state
from fl.protocol import CONFIG_KEY
from fl.config import Config, config_from_dict, load_config
from fl.server_hook import ServerHook
from fl.strategy import PartitionSampledFedAvg, discover_partitions
from fl import ground_truth
from fl.tracking import Tracker, provenance, publish_view
from fl.training import build_defenses, evaluate, resolve_device, seed_everything

log = logging.getLogger("fedprobe")


class RoundFailed(RuntimeError):
    """Too few valid replies in a round (see federation.min_replies)."""


@dataclass
class RunOptions:
    tracking_uri: str = ""
    progress: bool = True
    resume_run_id: str = ""
    resume_extend: bool = False  # --resume-extend: the resumed run may have more federation.rounds
    parent_run_id: str = ""  # attach as a child run (sweeps)
    run_name: str = ""
    on_start: Any = None  # called with the MLflow run id once it is known (fedprobe run keeps the client secret)
    stop_after_round: int = 0  # testing: stop as if killed right after this round's checkpoint (0 = never)
    resume_checkpoint: Any = None  # what check_resume returned before Ray started (fedprobe run): not loaded again


class RunInterrupted(RuntimeError):
    """The run stopped after a checkpoint, as a kill would (``RunOptions.stop_after_round``)."""


def _tags(cfg: Config) -> dict[str, str]:
    return {
        "fedprobe.dataset": cfg.data.dataset, "fedprobe.model": f"{cfg.model.family}-{cfg.model.size}",
        "attack": cfg.attack.name, "defense": "+".join(d.name for d in cfg.defenses) or "none",
        "optimizer": cfg.optimizer.name, "attention": cfg.model.attention, "adapter": cfg.model.adapter,
        "fedprobe.config_digest": cfg.digest(),
    }


def describe(cfg: Config) -> str:
    """The run's description when the config has none (MLflow shows it on the run page)."""
    fed = cfg.federation
    defenses = ", ".join(f"{d.name} {d.params}" if d.params else d.name for d in cfg.defenses) or "no defense"
    return (f"{cfg.experiment.name}: {cfg.model.family}-{cfg.model.size} on {cfg.data.dataset}, {fed.num_clients} "
            f"clients x {fed.rounds} rounds, {cfg.optimizer.name} lr {cfg.optimizer.lr:g}; attack "
            f"{cfg.attack.name}; {defenses}; seed {cfg.experiment.seed}")


def _checkpoint_path(cfg: Config, run_id: str) -> Path:
    return Path(cfg.tracking.output_dir) / "checkpoints" / f"{run_id}.pt"


class ResumeError(ValueError):
    """``--resume`` of a run that cannot be resumed as it is (one line: why, and what to do)."""


def check_resume(cfg: Config, run_id: str, tracking_uri: str = "", extend: bool = False) -> dict[str, Any]:
    """Refuse a resume that would not continue the same run; returns the checkpoint. Safe before Ray starts.

    ``extend`` (``--resume-extend``) allows one change: more ``federation.rounds`` than the run had.
    """
    path = _checkpoint_path(cfg, run_id)
    if not path.is_file():
        raise ResumeError(f"--resume {run_id}: no checkpoint at {path} (is tracking.output_dir the run's?); "
                          "start a new run instead")
    ckpt = torch.load(path, weights_only=False)
    stored_cfg = config_from_dict(ckpt["config"])
    if extend and cfg.federation.rounds >= stored_cfg.federation.rounds:
        stored_cfg = stored_cfg.model_copy(update={"federation": stored_cfg.federation.model_copy(
            update={"rounds": cfg.federation.rounds})})
    if stored_cfg.digest() != cfg.digest():
        before, now = stored_cfg.to_dict(), cfg.to_dict()
        changed = sorted(f"{sec}.{k}" for sec in set(before) | set(now) if sec != "tracking"
                         for k in set(before.get(sec) or {}) | set(now.get(sec) or {})
                         if isinstance(before.get(sec), dict) and isinstance(now.get(sec), dict)
                         and before[sec].get(k) != now[sec].get(k))
        raise ResumeError(f"--resume {run_id}: the config differs from the run's ({', '.join(changed[:5]) or 'lists'}); "
                          "resume with the run's own config (--resume-extend allows more federation.rounds), "
                          "or start a new run")
    if ckpt["round"] >= cfg.federation.rounds:
        from fl.tracking import resolve_uri

        try:
            from mlflow import MlflowClient

            status = MlflowClient(tracking_uri=resolve_uri(tracking_uri or cfg.tracking.uri)).get_run(run_id).info.status
        except Exception:  # the store may be gone; the checkpoint alone says it is complete
            status = "complete"
        raise ResumeError(f"--resume {run_id}: all {cfg.federation.rounds} rounds are done (run {status}); nothing to "
                          "resume")
    return ckpt


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic: a kill leaves the previous checkpoint or this one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def run_federation(grid: Grid, cfg: Config, options: RunOptions | None = None) -> dict[str, Any]:
    """Run every round of one experiment on ``grid``; return the summary dict."""
    from fl.data import load_federated
    from models import build_model, count_parameters, task_for

    options = options or RunOptions()
    seed_everything(cfg.experiment.seed)
    data = load_federated(cfg.data, cfg.federation.num_clients, cfg.experiment.seed)
    task = task_for(cfg.model, data.task)  # how the model is called (a plain nn.Module: model(x))
    device = resolve_device(cfg.federation.device)
    model = build_model(cfg.model, task, seed=cfg.experiment.seed).to(device)
    global_state = {k: v.detach().cpu().clone() for k, v in trainable_state(model).items()}
    trainable, total = count_parameters(model)

    ckpt: dict[str, Any] = {}
    if options.resume_run_id:
        ckpt = options.resume_checkpoint or check_resume(cfg, options.resume_run_id, options.tracking_uri,
                                                         options.resume_extend)
    source_tags, versions = provenance(cfg.experiment.description or describe(cfg))
    tracker = Tracker(options.tracking_uri or cfg.tracking.uri, cfg.tracking.experiment,
                      options.run_name or cfg.tracking.run_name or cfg.experiment.name,
                      tags={**_tags(cfg), **source_tags},
                      parent_run_id=options.parent_run_id or None, run_id=options.resume_run_id or None)
    start_round = 1
    history: list[dict[str, float]] = []
    events: list[str] = []
    ckpt_path = _checkpoint_path(cfg, tracker.run_id)
    if options.on_start is not None:
        options.on_start(tracker.run_id)
    hook_state: dict[str, Any] = {}
    if ckpt:
        global_state, start_round, history = ckpt["global_state"], ckpt["round"] + 1, ckpt["history"]
        events = list(ckpt.get("events", []))
        hook_state = ckpt.get("hook", {})  # the clients' privacy ledgers, handed back as each is next sampled
        log.warning("resuming run %s after round %d", tracker.run_id, ckpt["round"])
    else:
        tracker.log_params(cfg.to_dict())
        tracker.log_params({"model.trainable_parameters": trainable, "model.total_parameters": total, **versions})
        tracker.log_dict(cfg.to_dict(), "config.json")

    status = "FAILED"
    t_start = time.perf_counter()
    try:
        roster = discover_partitions(grid)
        if len(roster) != cfg.federation.num_clients:
            raise RuntimeError(f"{len(roster)} of {cfg.federation.num_clients} clients answered the partition query")
        strategy: Any = PartitionSampledFedAvg(roster, cfg.federation.clients_per_round, cfg.experiment.seed,
                                               cfg.federation.min_replies)
        server_defenses = build_defenses(cfg)
        for d in server_defenses:
            strategy = d.wrap_strategy(strategy, cfg)
        artifact_dir = Path(cfg.tracking.output_dir) / "runs" / tracker.run_id
        hook = ServerHook(cfg, task, lambda: build_model(cfg.model, task, seed=cfg.experiment.seed), roster,
                          artifact_dir, decode=data.decode, label_prior=data.label_prior(),
                          image_prior=data.image_prior())
        hook.restore(hook_state)
        for d in server_defenses:  # a client-level audit's canary clients join the central-DP aggregation
            if hook.audit is not None and hasattr(d, "attach_canaries") and type(hook.audit).server_canaries is not \
                    Audit.server_canaries:
                d.attach_canaries(hook.audit)
        cfg_json = cfg.to_json()

        def checkpoint(rnd: int, metrics: dict[str, float]) -> None:  # written before the round's metrics are logged
            _save_checkpoint(ckpt_path, {"round": rnd, "global_state": global_state, "history": history,
                                         "config": cfg.to_dict(), "digest": cfg.digest(), "hook": hook.checkpoint_state(),
                                         "events": events, "last_metrics": metrics})

        if not ckpt:
            load_trainable(model, global_state)
            metrics0 = evaluate(model, data.test, task, data.collate, device=device)
            checkpoint(0, metrics0)  # a run killed in round 1 is resumable too
            tracker.log_metrics(metrics0, step=0)
        elif not tracker.has_step("accuracy", ckpt["round"]):  # killed between checkpoint and logging: log it once
            tracker.log_metrics(ckpt.get("last_metrics", {}), step=ckpt["round"])
        bar = _progress(cfg.federation.rounds, start_round - 1, options.progress)
        for rnd in range(start_round, cfg.federation.rounds + 1):
            t_round = time.perf_counter()
            config = ConfigRecord({CONFIG_KEY: cfg_json})
            messages = hook.before_send(rnd, list(strategy.configure_train(rnd, to_record(global_state), config, grid)))
            replies = list(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout))
            report = hook.inspect(rnd, global_state, messages, replies)
            for line in report.events:
                log.warning(line)
                events.append(line)
            if not report.accepted and report.out_of_budget and len(report.out_of_budget) == len(messages):
                events.append(f"round {rnd}: every sampled client's privacy budget is spent; the run stops after "
                              f"round {rnd - 1}")
                log.warning(events[-1])
                break
            if len(report.accepted) < cfg.federation.min_replies:
                raise RoundFailed(f"round {rnd}: {len(report.accepted)} valid replies, fewer than "
                                  f"federation.min_replies={cfg.federation.min_replies}")
            arrays, train_metrics = strategy.aggregate_train(rnd, report.accepted)
            if arrays is None:
                raise RoundFailed(f"round {rnd}: aggregation returned no model")
            previous_state, global_state = global_state, from_record(arrays)
            bad = [k for k, v in global_state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                raise RoundFailed(f"round {rnd}: the aggregated global model is not finite (NaN/Inf in {bad[0]}"
                                  f"{' and others' if len(bad) > 1 else ''}); the run stops (lower optimizer.lr or "
                                  "federation.max_update_ratio)")
            load_trainable(model, global_state)
            metrics = {k: float(v) for k, v in (train_metrics or {}).items() if k not in ("num-examples", "uniform-weight")}
            metrics.update(evaluate(model, data.test, task, data.collate, device=device))
            metrics.update(report.metrics)
            metrics.update(hook.audit_metrics(rnd, previous_state, global_state))
            for d in server_defenses:
                metrics.update(d.server_metrics(rnd))
            metrics["round_seconds"] = time.perf_counter() - t_round
            history.append({"round": rnd, **metrics})
            checkpoint(rnd, metrics)  # then log: a kill in between is repaired on resume, never logged twice
            tracker.log_metrics(metrics, step=rnd)
            _log_attack_rows(tracker, report.attack_rows, rnd)
            bar.update(1)
            if options.stop_after_round == rnd:
                raise RunInterrupted(f"stopped after round {rnd} (stop_after_round)")
            bar.set_postfix(loss=f"{metrics.get('train_loss', math.nan):.3f}", acc=f"{metrics.get('accuracy', math.nan):.3f}")
        bar.close()
        if cfg.tracking.log_model:
            tracker.log_torch_state(global_state, "model/global_state.pt")
        if events:
            tracker.log_text("\n".join(events) + "\n", "events.txt")
        status = "FINISHED"
    finally:
        if "hook" in locals():  # ground truth left by victims whose replies were refused
            ground_truth.clear(cfg.tracking.output_dir, hook.ground_truth_token)
        final = _final_metrics(history)
        summary = {"run_id": tracker.run_id, "tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id,
                   "status": status, "rounds_completed": len(history), "seconds": time.perf_counter() - t_start,
                   "config_digest": cfg.digest(), "final": final, "events": events}
        try:
            tracker.log_metrics({f"final_{k}": v for k, v in final.items()}, step=len(history))
            tracker.log_dict(summary, "summary.json")
            tracker.finish(status)
            publish_view(tracker.client, tracker.experiment_id, [f"final_{k}" for k in final])
        except Exception as exc:  # tracking must never hide the run's own error
            log.error("could not finalise MLflow run %s: %s", tracker.run_id, exc)
    return summary


def _final_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """Last value of every metric seen in any round (attacks may skip the last round)."""
    final: dict[str, float] = {}
    for row in history:
        final.update({k: v for k, v in row.items() if k != "round"})
    return final


def _log_attack_rows(tracker: Tracker, rows: list[dict[str, Any]], rnd: int) -> None:
    for row in rows:
        pid = row["client"]
        # one "per_victim" chart section in MLflow, below the run's headline metrics
        tracker.log_metrics({f"per_victim/{k}/client_{pid}": v for k, v in row.items()
                             if k.startswith("attack_") and isinstance(v, float)}, step=rnd)
        for path in row.get("artifacts", []):
            tracker.log_artifact(path, f"attacks/round_{rnd}")


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
    if nodes and nodes != cfg.federation.num_clients:
        log.warning("federation has %d SuperNodes: using federation.num_clients=%d", nodes, nodes)
        data = cfg.to_dict()
        data["federation"]["num_clients"] = nodes
        data["federation"]["clients_per_round"] = min(cfg.federation.clients_per_round, nodes)
        cfg = config_from_dict(data)
    summary = run_federation(grid, cfg, RunOptions(tracking_uri=str(context.run_config.get("tracking-uri", ""))))
    print(f"fedprobe summary: run {summary['run_id']} {summary['status']} {json.dumps(summary['final'])}", flush=True)
