"""What a run leaves behind, beside the round loop: the MLflow run, a checkpoint after every round, the summary.

``fl.server_app.run_federation`` is the loop (the shape of Flower's ``Strategy.start``); :class:`RunRecorder`
is everything it records: it starts or resumes the tracked run (``--resume`` continues the same MLflow run from the
last checkpoint, after :func:`check_resume` refused anything that would not be the same run), writes the checkpoint
of each round *before* its metrics are logged (a kill in between is repaired on resume, never logged twice), logs
per-round and per-victim metrics and attack artifacts, and finishes with ``final_*``, ``summary.json`` and the
experiment's shared view.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fl import stopping
from fl.config import Config, config_from_dict
from fl.tracking import Tracker, provenance, publish_view

log = logging.getLogger("fedprobe")


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


def _tags(cfg: Config) -> dict[str, str]:
    return {
        "fedprobe.dataset": cfg.data.dataset, "fedprobe.model": cfg.model.label(),
        "attack": cfg.attack.name, "defense": "+".join(d.name for d in cfg.defenses) or "none",
        "optimizer": cfg.optimizer.name, "attention": cfg.model.attention, "adapter": cfg.model.adapter,
        "fedprobe.config_digest": cfg.digest(),
    }


def describe(cfg: Config) -> str:
    """The run's description when the config has none (MLflow shows it on the run page)."""
    fed = cfg.federation
    defenses = ", ".join(f"{d.name} {d.params}" if d.params else d.name for d in cfg.defenses) or "no defense"
    return (f"{cfg.experiment.name}: {cfg.model.label()} on {cfg.data.dataset}, {fed.num_clients} "
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


class RunRecorder:
    """The tracked run of one ``run_federation`` call: start or resume, checkpoints, metrics, summary."""

    def __init__(self, cfg: Config, options: RunOptions, global_state: dict[str, torch.Tensor],
                 counts: tuple[int, int]) -> None:
        self.cfg = cfg
        self.ckpt: dict[str, Any] = {}
        if options.resume_run_id:
            self.ckpt = options.resume_checkpoint or check_resume(cfg, options.resume_run_id, options.tracking_uri,
                                                                  options.resume_extend)
        source_tags, versions = provenance(cfg.experiment.description or describe(cfg))
        self.tracker = Tracker(options.tracking_uri or cfg.tracking.uri, cfg.tracking.experiment,
                               options.run_name or cfg.tracking.run_name or cfg.experiment.name,
                               tags={**_tags(cfg), **source_tags},
                               parent_run_id=options.parent_run_id or None, run_id=options.resume_run_id or None)
        self.path = _checkpoint_path(cfg, self.tracker.run_id)
        if options.on_start is not None:
            options.on_start(self.tracker.run_id)
        self.global_state, self.start_round = global_state, 1
        self.history: list[dict[str, float]] = []
        self.events: list[str] = []
        self.hook_state: dict[str, Any] = {}  # the clients' privacy ledgers, handed back as each is next sampled
        if self.ckpt:
            self.global_state, self.start_round = self.ckpt["global_state"], self.ckpt["round"] + 1
            self.history, self.events = self.ckpt["history"], list(self.ckpt.get("events", []))
            self.hook_state = self.ckpt.get("hook", {})
            log.warning("resuming run %s after round %d", self.tracker.run_id, self.ckpt["round"])
        else:
            trainable, total = counts
            self.tracker.log_params(cfg.to_dict())
            self.tracker.log_params({"model.trainable_parameters": trainable, "model.total_parameters": total,
                                     **versions})
            self.tracker.log_dict(cfg.to_dict(), "config.json")
        self.t_start = time.perf_counter()

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    @property
    def artifact_dir(self) -> Path:
        return Path(self.cfg.tracking.output_dir) / "runs" / self.run_id

    def checkpoint(self, rnd: int, metrics: dict[str, float], global_state: dict[str, torch.Tensor],
                   hook_state: dict[str, Any]) -> None:
        _save_checkpoint(self.path, {"round": rnd, "global_state": global_state, "history": self.history,
                                     "config": self.cfg.to_dict(), "digest": self.cfg.digest(), "hook": hook_state,
                                     "events": self.events, "last_metrics": metrics})

    def begin(self, evaluate_initial: Any, hook_state: dict[str, Any]) -> None:
        """Round 0: the initial model's metrics (checkpointed, so a run killed in round 1 is resumable too); on
        resume, the last checkpointed round's metrics if the kill came before they were logged."""
        if not self.ckpt:
            metrics0 = evaluate_initial()
            self.checkpoint(0, metrics0, self.global_state, hook_state)
            self.tracker.log_metrics(metrics0, step=0)
        elif not self.tracker.has_step("accuracy", self.ckpt["round"]):
            self.tracker.log_metrics(self.ckpt.get("last_metrics", {}), step=self.ckpt["round"])

    def event(self, line: str) -> None:
        log.warning(line)
        self.events.append(line)

    def end_round(self, rnd: int, metrics: dict[str, float], global_state: dict[str, torch.Tensor],
                  hook_state: dict[str, Any], attack_rows: list[dict[str, Any]]) -> None:
        """Checkpoint, then log: a kill in between is repaired on resume, never logged twice."""
        self.history.append({"round": rnd, **metrics})
        self.checkpoint(rnd, metrics, global_state, hook_state)
        # one MLflow batch per round: the round's metrics and every victim's (a kill cannot split them)
        self.tracker.log_metrics({**metrics, **_per_victim_metrics(attack_rows)}, step=rnd)
        for row in attack_rows:
            for path in row.get("artifacts", []):
                self.tracker.log_artifact(path, f"attacks/round_{rnd}")

    def finish(self, status: str, global_state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """``final_*``, ``summary.json``, the run's status; returns the summary. Never raises (tracking must not hide
        the run's own error). After a stop signal (:mod:`fl.stopping`) the status is ``KILLED``, whatever ended the
        rounds."""
        if stopping.requested.is_set():
            status = "KILLED"
        summary = run_summary(self.tracker, status, self.history, self.events, self.t_start,
                              rounds_completed=len(self.history), config_digest=self.cfg.digest())
        try:
            if status == "FINISHED" and self.cfg.tracking.log_model:
                self.tracker.log_torch_state(global_state, "model/global_state.pt")
        except Exception as exc:  # noqa: BLE001
            log.error("could not log the global model of MLflow run %s: %s", self.run_id, exc)
        close_run(self.tracker, summary, step=len(self.history))
        return summary


def run_summary(tracker: Tracker, status: str, history: list[dict[str, float]], events: list[str], t_start: float,
                **fields: Any) -> dict[str, Any]:
    """What ``summary.json`` holds (``fedprobe run`` and :class:`fl.audit.AuditStrategy` alike): the run's ids and
    status, ``final`` (the last value of every metric seen in any round: attacks may skip the last round), the events,
    and ``fields`` (rounds completed, config digest)."""
    final: dict[str, float] = {}
    for row in history:
        final.update({k: v for k, v in row.items() if k != "round"})
    return {"run_id": tracker.run_id, "tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id,
            "status": status, **fields, "seconds": time.perf_counter() - t_start, "final": final, "events": events}


def close_run(tracker: Tracker, summary: dict[str, Any], step: int) -> None:
    """End a tracked run: ``final_*`` at ``step``, ``summary.json``, ``events.txt`` (when there were events), the
    status, and the experiment's shared view. Never raises: tracking must not hide the run's own error."""
    final = summary["final"]
    try:
        if summary["events"]:
            tracker.log_text("\n".join(summary["events"]) + "\n", "events.txt")
        tracker.log_metrics({f"final_{k}": v for k, v in final.items()}, step=step)
        tracker.log_dict(summary, "summary.json")
        tracker.finish(summary["status"])
        publish_view(tracker.client, tracker.experiment_id, [f"final_{k}" for k in final])
    except Exception as exc:  # noqa: BLE001
        log.error("could not finalise MLflow run %s: %s", tracker.run_id, exc)


def _per_victim_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each victim's attack scores as ``per_victim/<metric>/client_<id>``: one "per_victim" chart section in MLflow,
    below the run's headline metrics."""
    return {f"per_victim/{k}/client_{row['client']}": v for row in rows for k, v in row.items()
            if k.startswith("attack_") and isinstance(v, float)}
