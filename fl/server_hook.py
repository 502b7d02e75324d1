"""The server-side hook: sees every client's reply before aggregation.

For each round it (1) rejects failed and invalid replies (NaN/Inf, wrong names,
shapes or dtypes) with a logged reason, (2) strips the simulation-only ground
truth a targeted client attached, (3) keeps every client's reported privacy ledger (checkpointed
with the round, handed back to the client after ``--resume``) and sets aside replies of clients
whose budget is spent, (4) runs the configured attack on what the
server saw from each victim, and scores it against that ground truth. The attack
sees the update as it left the client (after the client's defenses, before any
server-side defense). Malicious attacks may also change the model sent to victims
(:meth:`ServerHook.before_send`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict

import attacks  # noqa: F401  (registers built-in attacks)
from attacks.base import Attack, Observation
from fl import ground_truth
from fl.arrays import InvalidUpdate, check_update, from_record, like, record_nbytes
from fl.protocol import REPORT_KEY, RESTORE_KEY
from fl.config import Config
from fl.plugins import build_attack
from fl.replies import check_weight, harmonise_metrics, outliers, update_norm
from models.tasks import TaskSpec

log = logging.getLogger("fedprobe")


@dataclass
class RoundReport:
    accepted: list[Message]
    metrics: dict[str, float] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)  # one line per failure / rejection
    attack_rows: list[dict[str, Any]] = field(default_factory=list)  # per-victim scores
    out_of_budget: list[int] = field(default_factory=list)  # partitions that refused: privacy budget spent
    # id(reply's ArrayRecord) -> (that record, its tensors): decoded once here, reused by the aggregation
    decoded: dict[int, tuple[Any, dict[str, torch.Tensor]]] = field(default_factory=dict)


@dataclass
class _Candidate:
    """A reply that passed the per-reply checks, with what the server knows about it."""

    reply: Message
    node: int
    pid: int
    base: dict[str, torch.Tensor]  # the model this client was sent
    received: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor]


def short_reason(reason: str, limit: int = 300) -> str:
    """The last meaningful line of a (Ray) traceback, without terminal colours."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", reason).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("File ", "^", "~"))] or ["unknown error"]
    return lines[-1].rstrip("'>")[:limit]


class ServerHook:
    def __init__(self, cfg: Config, task: TaskSpec, model_factory: Callable[[], torch.nn.Module],
                 roster: dict[int, int], artifact_dir: Path, decode: Callable[[list[int]], str] | None = None,
                 label_prior: list[float] | None = None, image_prior: torch.Tensor | None = None,
                 token_prior: torch.Tensor | None = None) -> None:
        self.cfg = cfg
        self.label_prior = label_prior  # class frequencies of the server's own test split (for label_baseline)
        self.image_prior = image_prior  # mean image of that split (for psnr_baseline)
        self.token_prior = token_prior  # its most frequent token per position (for token_baseline)
        self.task = task
        self.model_factory = model_factory
        self.roster = roster
        self.artifact_dir = artifact_dir
        self.decode = decode
        self.attack = build_attack(cfg)
        self.ground_truth_token = ground_truth.new_token()  # this run's victims' batches: fl.ground_truth
        from fl.training import build_audit

        self.audit = build_audit(cfg)
        self.privacy_by_client: dict[int, dict[str, float]] = {}  # latest epsilon-like metrics per partition
        self.client_states: dict[int, dict[str, Any]] = {}  # latest reported accounting state per partition
        self._restore: set[int] = set()  # partitions whose state must be handed back (after --resume)

    # what survives a kill -------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {"privacy_by_client": self.privacy_by_client, "client_states": self.client_states,
                "audit": self.audit.checkpoint_state() if self.audit is not None else {}}

    def restore(self, saved: dict[str, Any] | None) -> None:
        """Resume: the ledgers come back from the checkpoint and go to each client the next time it is sampled."""
        saved = saved or {}
        self.privacy_by_client = {int(k): dict(v) for k, v in saved.get("privacy_by_client", {}).items()}
        self.client_states = {int(k): dict(v) for k, v in saved.get("client_states", {}).items()}
        self._restore = {pid for pid, st in self.client_states.items() if st}
        if self.audit is not None:
            self.audit.restore(saved.get("audit", {}))

    # which clients/rounds the attack targets ---------------------------------------
    def targets(self, server_round: int, partition_id: int) -> bool:
        a = self.cfg.attack
        if self.attack is None:
            return False
        if a.rounds and server_round not in a.rounds:
            return False
        return not a.victims or partition_id in a.victims

    def before_send(self, server_round: int, messages: list[Message]) -> list[Message]:
        """Mark targeted clients (they attach ground truth) and let a malicious attack craft their model."""
        out = []
        for msg in messages:
            pid = self.roster[msg.metadata.dst_node_id]
            targeted = self.targets(server_round, pid)
            if not targeted and pid not in self._restore:
                out.append(msg)
                continue
            content = RecordDict(dict(msg.content.items()))
            config = ConfigRecord(dict(content["config"].items()))
            if pid in self._restore:
                config[RESTORE_KEY] = json.dumps(self.client_states[pid], sort_keys=True)
                self._restore.discard(pid)
            content["config"] = config
            if not targeted:
                out.append(Message(content, message_type=msg.metadata.message_type, dst_node_id=msg.metadata.dst_node_id))
                continue
            if self.attack is not None and self.attack.reconstructs:
                config[ground_truth.CONFIG_KEY] = self.ground_truth_token  # the batch goes to disk, not the reply
            if self.attack is not None and self.attack.threat_model == "malicious":
                crafted = self.attack.craft(from_record(content["arrays"]), server_round, pid)
                content["arrays"] = like(content["arrays"], crafted)
            out.append(Message(content, message_type=msg.metadata.message_type, dst_node_id=msg.metadata.dst_node_id))
        return out

    def inspect(self, server_round: int, sent: dict[str, torch.Tensor], messages: list[Message],
                replies: list[Message]) -> RoundReport:
        report = RoundReport(accepted=[])
        sent_by_node = {m.metadata.dst_node_id: m for m in messages}
        bytes_down = sum(record_nbytes(m.content["arrays"]) for m in messages)
        bytes_up = 0
        failed = rejected = 0
        cap = self.cfg.attack.max_victims_per_round
        attacked_this_round = 0
        candidates: list[_Candidate] = []
        for reply in sorted(replies, key=lambda r: self.roster.get(r.metadata.src_node_id, 0)):
            node = reply.metadata.src_node_id
            pid = self.roster.get(node, -1)
            if reply.has_error():
                failed += 1
                report.events.append(f"round {server_round}: client {pid} failed: {short_reason(reply.error.reason)}")
                continue
            content = reply.content
            self._keep_ledger(pid, content)
            if self._refused(server_round, pid, content, report):
                continue
            if "oracle" in content:  # a reply carrying a batch is not fedprobe's client: refuse it
                rejected += 1
                report.events.append(f"round {server_round}: rejected client {pid}: its reply carries an 'oracle' "
                                     "record (ground truth never travels in a message)")
                continue
            shared = from_record(content["shared"]) if "shared" in content else {}
            if "shared" in content:  # what a client mode shares goes to the attack, never to aggregation
                del content["shared"]
            try:
                received = from_record(content["arrays"])
                check_update(received, sent)
                check_weight(content)
            except (InvalidUpdate, KeyError, ValueError) as exc:
                rejected += 1
                report.events.append(f"round {server_round}: rejected client {pid}: {exc}")
                continue
            crafted = self.attack is not None and self.attack.threat_model == "malicious" and \
                self.targets(server_round, pid) and node in sent_by_node
            # what this client trained from: the global model, or the model a malicious attack crafted for it
            base = from_record(sent_by_node[node].content["arrays"]) if crafted else sent
            candidates.append(_Candidate(reply, node, pid, base, received, shared))
        kept = self._drop_outliers(server_round, candidates, report)
        rejected += len(candidates) - len(kept)
        candidates = kept
        report.events.extend(harmonise_metrics(server_round, [(c.reply, c.pid) for c in candidates]))
        replied = {r.metadata.src_node_id for r in replies}
        missing = sorted(self.roster.get(m.metadata.dst_node_id, -1) for m in messages
                         if m.metadata.dst_node_id not in replied)
        if missing:
            report.events.append(f"round {server_round}: no reply within federation.round_timeout = "
                                 f"{self.cfg.federation.round_timeout:g} s from clients {missing}")
        for c in candidates:
            content, pid = c.reply.content, c.pid
            bytes_up += record_nbytes(content["arrays"])
            report.accepted.append(c.reply)
            report.decoded[id(content["arrays"])] = (content["arrays"], c.received)
            if self.audit is not None and pid in self.audit.clients:  # the server's test statistic, nothing else
                self.audit.observe(server_round, pid, c.base, c.received)
            for rec in content.metric_records.values():
                latest = {k: float(v) for k, v in rec.items() if k.endswith("epsilon") and isinstance(v, (int, float))}
                if latest:
                    self.privacy_by_client.setdefault(pid, {}).update(latest)
            if self.targets(server_round, pid) and (cap == 0 or attacked_this_round < cap):
                attacked_this_round += 1
                try:
                    # copies: an attack that writes into what it observes must not change the aggregate, the
                    # server's global model, or what the next victim's attack sees
                    received = {k: v.clone() for k, v in c.received.items()}
                    base = {k: v.clone() for k, v in c.base.items()}
                    row = self._attack_one(server_round, c.node, pid, base, received, dict(content["meta"]),
                                           c.shared)
                    report.attack_rows.append(row)
                    if row.pop("unscored", False):
                        report.events.append(f"round {server_round}: attack on client {pid} is unscored: the client "
                                             "left no ground truth (is tracking.output_dir shared with the clients?)")
                    if row.get("attack_budget_limited"):
                        report.events.append(f"round {server_round}: attack {self.cfg.attack.name} on client {pid} hit "
                                             "its max_seconds safety cap: its scores are budget-limited")
                except Exception as exc:  # an attack's failure must not stop the federation
                    report.events.append(f"round {server_round}: attack {self.cfg.attack.name} on client {pid} "
                                         f"failed: {type(exc).__name__}: {exc}")
        report.metrics["clients_timed_out"] = float(len(missing))
        report.metrics.update({
            "clients_sampled": float(len(messages)), "clients_replied": float(len(report.accepted)),
            "clients_out_of_budget": float(len(report.out_of_budget)),
            "clients_failed": float(failed), "clients_rejected": float(rejected),
            "bytes_down": float(bytes_down), "bytes_up": float(bytes_up), "bytes_exchanged": float(bytes_down + bytes_up),
        })
        report.metrics.update(self._privacy_summary())
        for key in sorted({k for row in report.attack_rows for k in row if k.startswith("attack_")}):
            values = [row[key] for row in report.attack_rows if key in row and np.isfinite(row[key])]
            if values:
                report.metrics[key] = float(np.mean(values))
        return report

    def _drop_outliers(self, server_round: int, candidates: list["_Candidate"],
                       report: RoundReport) -> list["_Candidate"]:
        """Replies whose update norm is over max_update_ratio x the others' median are rejected with a reason."""
        ratio = self.cfg.federation.max_update_ratio
        norms = [update_norm(c.received, c.base) for c in candidates]
        bad = set(outliers(norms, ratio))
        for i in sorted(bad):
            report.events.append(f"round {server_round}: rejected client {candidates[i].pid}: update norm {norms[i]:.3g} "
                                 f"is over federation.max_update_ratio = {ratio:g} times the other clients' median")
        return [c for i, c in enumerate(candidates) if i not in bad]

    def audit_metrics(self, server_round: int, before: dict[str, torch.Tensor],
                      after: dict[str, torch.Tensor]) -> dict[str, float]:
        """After aggregation: client-level audits see the new global model; then the out-of-band score."""
        if self.audit is None:
            return {}
        self.audit.observe_global(server_round, before, after)
        return {f"audit_{k}": float(v) for k, v in self.audit.result().items()}

    def _keep_ledger(self, pid: int, content: RecordDict) -> None:
        meta = content.config_records.get("meta")
        if meta is None or REPORT_KEY not in meta:
            return
        try:
            state = json.loads(str(meta[REPORT_KEY]))
        except ValueError:
            return
        if isinstance(state, dict) and state:
            self.client_states[pid] = state

    def _refused(self, server_round: int, pid: int, content: RecordDict, report: RoundReport) -> bool:
        """A client whose privacy budget is spent trained nothing: its reply is set aside, not aggregated."""
        metrics = content.metric_records.get("metrics")
        if metrics is None or float(metrics.get("privacy_budget_exhausted", 0.0)) != 1.0:
            return False
        report.out_of_budget.append(pid)
        reason = str(content["meta"].get("refused", "privacy budget spent")) if "meta" in content else ""
        report.events.append(f"round {server_round}: client {pid} refused to train: {reason}")
        eps = metrics.get("epsilon")
        if isinstance(eps, (int, float)):
            self.privacy_by_client.setdefault(pid, {})["epsilon"] = float(eps)
        return True

    def _privacy_summary(self) -> dict[str, float]:
        """epsilon (and any *epsilon metric) as the max over every client so far, and its mean."""
        out: dict[str, float] = {}
        for key in sorted({k for m in self.privacy_by_client.values() for k in m}):
            values = [m[key] for m in self.privacy_by_client.values() if key in m]
            out[key] = float(max(values))
            out[f"{key}_mean"] = float(np.mean(values))
        return out

    def _attack_one(self, server_round: int, node: int, pid: int, sent: dict[str, torch.Tensor],
                    received: dict[str, torch.Tensor], meta: dict[str, Any],
                    shared: dict[str, torch.Tensor]) -> dict[str, Any]:
        assert self.attack is not None
        out_dir, token = self.cfg.tracking.output_dir, self.ground_truth_token
        labels = ground_truth.labels(out_dir, token, server_round, pid) if self.cfg.attack.labels_known else None
        obs = Observation(server_round=server_round, node_id=node, partition_id=pid, global_params=sent,
                          client_params=received, metadata=meta, task=self.task, model_factory=self.model_factory,
                          labels=labels, shared=shared, device=self.cfg.attack.device,
                          defenses=tuple(d.model_dump(mode="json") for d in self.cfg.defenses))
        t0 = time.perf_counter()
        recon = self.attack.attack(obs)
        row: dict[str, Any] = {"round": server_round, "client": pid, "attack_seconds": time.perf_counter() - t0}
        row.update({k if k.startswith("attack_") else f"attack_{k}": float(v) for k, v in recon.metrics.items()})
        oracle = ground_truth.read(out_dir, token, server_round, pid) if self.attack.reconstructs else None  # after
        if self.attack.reconstructs and oracle is None:
            row["unscored"] = True
        if oracle:
            from attacks.harness import save_artifacts, score_best

            shown, scores = score_best(recon, oracle, self.task, self.cfg.attack.recovered_psnr, self.label_prior,
                                       self.image_prior, self.token_prior)
            row.update({f"attack_{k}": float(v) for k, v in scores.items()})
            out = self.artifact_dir / f"attack_round{server_round}_client{pid}"
            row["artifacts"] = [str(p) for p in save_artifacts(shown, oracle, self.task, out, decode=self.decode)]
        return row
