"""Audit your own Flower app: fedprobe's attacks, defenses and tracking around a user's ClientApp and ServerApp.

Three pieces; the user's model, data, ``train()`` and ``strategy.start(...)`` call stay as they were:

* :class:`AuditStrategy` wraps ANY Message-API ``Strategy`` (FedAvg, FedProx, FedAdam, ... or the user's own)::

      strategy = AuditStrategy(FedAvg(fraction_train=1.0), attack="idlg", model=Net,
                               task=image_task(num_classes=10, image_shape=(3, 32, 32)), victims=[0], rounds=[1])
      result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3, evaluate_fn=central_eval)

  It records what was sent to each node, checks every reply (names, shapes, dtypes, NaN/Inf, the aggregation
  weight) and rejects bad ones with a logged reason, runs the attack on what the server saw from each victim in
  the chosen rounds and scores it against the victim's real batch (out of band, :mod:`fl.ground_truth`), strips
  fedprobe's records, then hands the replies to the wrapped strategy. It tracks the run in MLflow as
  ``fedprobe run`` does: tags and provenance, params, per-round metrics (the strategy's aggregated train and
  evaluate metrics, the ``evaluate_fn`` results, ``attack_*``, ``epsilon``, client counts), ``final_*``,
  ``summary.json``; attack images and texts are written under ``<output_dir>/runs/<run id>/`` and logged as
  artifacts.
* :func:`audit_mod` is a Flower client mod (``ClientApp(mods=[audit_mod(...)])``): it reports the facts an attack
  needs (learning rate, batch size, local steps, optimizer with momentum, partition id) in a ``fedprobe-facts``
  record, applies update defenses (clip, noise, prune) to the outgoing arrays, and, when the server's audit asks
  and the user gave an ``oracle``, leaves the victim's batch for the scorer on the (shared, simulation) disk --
  never in the reply.
* :func:`central_dp` wraps any FedAvg-like strategy in Flower's server-side fixed-clipping DP, uniformly
  weighted without fedprobe-only keys, its client-level epsilon logged by AuditStrategy.
* :func:`private_training` is DP-SGD (Opacus, through fedprobe's ``dp_sgd`` defense) around the user's own
  training loop, with the privacy ledger composed across rounds in ``context.state`` and the epsilon reported
  through the mod.

The threat model is honest-but-curious: a malicious (model-crafting) attack needs ``fedprobe run``. An attack sees
the update as it left the client (after its update defenses). Everything here is simulation-grade: a real
deployment gets the facts and the reply checks, but no ground truth, so attacks are logged unscored.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

import attacks  # noqa: F401  (registers the built-in attacks)
import defenses  # noqa: F401  (registers the built-in defenses)
from attacks.base import ATTACKS, Attack, Observation
from defenses.base import DEFENSES, ClientContext, Defense
from fl import ground_truth
from fl.arrays import InvalidUpdate, check_update, from_record, to_record
from fl.replies import check_weight
from models.tasks import TaskSpec

log = logging.getLogger("fedprobe")

AUDIT_KEY = "fedprobe-audit"  # train config: {"token", "dir", "victims"} in the rounds the audit attacks
FACTS_KEY = "fedprobe-facts"  # reply: what the client reports for the attack (stripped before aggregation)
PRIVACY_KEY = "fedprobe-private-training"  # context.state: the DP-SGD ledger of private_training
PRIVACY_METRICS_KEY = "fedprobe-privacy-metrics"  # context.state: this round's epsilon etc., for the mod
UPDATE_STATE_KEY = "fedprobe-update-defenses"  # context.state: the update defenses' state (update_noise's ledger)
REQUIRED_FACTS = ("lr", "batch_size")


def image_task(num_classes: int, image_shape: Sequence[int], mean: Sequence[float] = (),
               std: Sequence[float] = ()) -> TaskSpec:
    """An image-classification task for a plain ``nn.Module`` called as ``model(x)`` (returns logits).
    ``mean`` / ``std``: the normalisation the app applies, so reconstructions are shown and scored in [0, 1]."""
    return TaskSpec(kind="image", num_classes=int(num_classes), image_shape=tuple(int(s) for s in image_shape),
                    mean=tuple(mean), std=tuple(std), call="positional")


# -- the client side ------------------------------------------------------------------------------------------


def _batch_of(data: Any) -> dict[str, torch.Tensor]:
    """The oracle's answer as fedprobe's batch dict: a dict, an (inputs, labels) pair, or an iterable of either."""
    if isinstance(data, dict):
        if "labels" in data and ("pixel_values" in data or "input_ids" in data):
            return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        raise ValueError("audit_mod oracle returned a dict without 'labels' and 'pixel_values'/'input_ids'; "
                         "return (inputs, labels) instead")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        return {"input_ids" if not x.is_floating_point() else "pixel_values": x, "labels": y}
    parts = [_batch_of(b) for b in data]
    if not parts:
        raise ValueError("audit_mod oracle returned no examples")
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _complete_facts(facts: dict[str, Any], reply: Message, context: Context) -> dict[str, Any]:
    missing = [k for k in REQUIRED_FACTS if k not in facts]
    if missing:
        raise ValueError(f"audit_mod facts lack {', '.join(missing)}: report at least lr and batch_size "
                         "(and epochs or local_steps, optimizer, momentum)")
    out = dict(facts)
    metrics = reply.content.metric_records.get("metrics")
    if "num_examples" not in out and metrics is not None and "num-examples" in metrics:
        out["num_examples"] = int(metrics["num-examples"])
    n, bs = int(out.get("num_examples", 0)), int(out["batch_size"])
    if "local_steps" not in out and n > 0:  # a torch DataLoader without drop_last: ceil(n / bs) steps per epoch
        out["local_steps"] = int(out.get("epochs", 1)) * math.ceil(n / bs)
    out.setdefault("partial_batches", True)
    out.setdefault("optimizer", "sgd")
    out.setdefault("model_mode", "train")
    out.setdefault("partition_id", int(context.node_config.get("partition-id", -1)))
    return out


def _spec(d: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(d, str):
        return {"name": d, "params": {}}
    if isinstance(d, dict) and "name" in d:
        return {"name": str(d["name"]), "params": dict(d.get("params") or {})}
    raise ValueError(f"audit_mod defenses: {d!r} is not a name or {{'name': ..., 'params': {{...}}}}")


def _apply_update_defenses(reply: Message, sent: dict[str, torch.Tensor], defenses: Sequence[Defense],
                           server_round: int, pid: int, state: dict[str, Any]) -> dict[str, float]:
    """client - global through each defense's transform_update, in order; the reply's arrays replaced.
    ``state`` is the client's defense state across rounds (update_noise's ledger); returns the defenses' metrics."""
    key = next((k for k, _ in reply.content.array_records.items()), None)
    if key is None:
        return {}
    received = from_record(reply.content[key])
    update = {k: v - sent[k] if k in sent and v.is_floating_point() else v for k, v in received.items()}
    floating = {k: v for k, v in update.items() if v.is_floating_point()}
    ctx = ClientContext(model=torch.nn.Module(), optimizer=None, loader=None,  # type: ignore[arg-type]
                        server_round=server_round, partition_id=pid, num_examples=0, sample_rate=0.0, local_steps=0,
                        epochs=0, device=torch.device("cpu"), task=None, sampled_fraction=1.0, state=state)
    for d in defenses:
        floating = d.transform_update(floating, ctx)
    out = {k: (sent[k] + floating[k]).to(received[k].dtype) if k in floating else received[k] for k in received}
    reply.content[key] = to_record(out)
    return {k: float(v) for k, v in ctx.metrics.items()}


def audit_mod(*, facts: dict[str, Any] | Callable[[Message, Context], dict[str, Any]],
              oracle: Callable[[Message, Context], Any] | None = None,
              defenses: Sequence[dict[str, Any] | str] = ()) -> Callable[..., Message]:
    """A Flower client mod that makes a ClientApp auditable by :class:`AuditStrategy`.

    ``facts``: a dict, or ``facts(msg, context) -> dict``, with at least ``lr`` and ``batch_size``; also
    ``epochs`` or ``local_steps`` (default: one epoch), ``optimizer`` (``"sgd"``), ``momentum``,
    ``weight_decay``, ``partition_id`` (default: the node config's ``partition-id``), ``num_examples``
    (default: the reply's ``num-examples``). ``oracle(msg, context)``: the examples this client trained on this
    round, in loader order -- ``(inputs, labels)``, a batch dict, or an iterable of either; simulation only,
    called only for a victim in an attacked round. ``defenses``: update defenses applied to the outgoing arrays,
    in order (``"clip"`` or ``{"name": "clip", "params": {"max_norm": 1.0}}``); the list is public, as in
    ``fedprobe run``, so a defense-aware attack models it.
    """
    specs = [_spec(d) for d in defenses]
    update_defenses = [DEFENSES.create(d["name"], **d["params"]) for d in specs]

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        request: dict[str, Any] = {}
        for _, cfg in msg.content.config_records.items():
            if AUDIT_KEY in cfg:
                request = json.loads(str(cfg[AUDIT_KEY]))
                del cfg[AUDIT_KEY]  # the user's train() sees its own config only
        sent = {}
        if update_defenses:
            arrays = next((r for _, r in msg.content.array_records.items()), None)
            sent = from_record(arrays) if arrays is not None else {}
        context.state.pop(PRIVACY_METRICS_KEY, None)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        config = next((r for _, r in msg.content.config_records.items()), {})
        server_round = int(request.get("round", config.get("server-round", 0)))
        f = _complete_facts(facts(msg, context) if callable(facts) else dict(facts), reply, context)
        pid = int(f["partition_id"])
        public, privacy_metrics = list(specs), {}
        privacy = context.state.get(PRIVACY_METRICS_KEY)
        if privacy is not None:  # private_training ran in this round: its epsilon and its (public) parameters
            done = json.loads(str(privacy["json"]))
            privacy_metrics.update(done["metrics"])
            public.insert(0, done["spec"])
        if update_defenses and sent:
            kept = context.state.get(UPDATE_STATE_KEY)
            state = json.loads(str(kept["json"])) if kept is not None else {}
            privacy_metrics.update(_apply_update_defenses(reply, sent, update_defenses, server_round, pid, state))
            context.state[UPDATE_STATE_KEY] = ConfigRecord({"json": json.dumps(state)})
        if privacy_metrics:
            f["privacy"] = json.dumps(privacy_metrics)
        if public:
            f["defenses"] = json.dumps(public)
        if request and oracle is not None and pid in request.get("victims", []):
            ground_truth.write(request["dir"], request["token"], server_round, pid, _batch_of(oracle(msg, context)))
        reply.content[FACTS_KEY] = ConfigRecord({k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                                                 for k, v in f.items()})
        return reply

    return mod


@contextmanager
def private_training(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Any, msg: Message,
                     context: Context, *, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0,
                     delta: float = 1e-5, accountant: str = "rdp", poisson_sampling: bool = True,
                     epochs: int = 1, **dp_params: Any) -> Iterator["PrivateTraining"]:
    """DP-SGD around the user's own loop::

        with private_training(net, optimizer, trainloader, msg, context, noise_multiplier=1.0) as dp:
            train(dp.model, dp.loader, dp.optimizer, ...)      # the user's loop, unchanged
        metrics["epsilon"] = dp.epsilon                          # optional: audit_mod reports it anyway

    Opacus's ``make_private`` through fedprobe's ``dp_sgd`` defense (noise and Poisson sampling from the client's
    private randomness, :mod:`defenses.randomness`); the accountant's history is kept in ``context.state`` so the
    epsilon after round r composes rounds 1..r, as an Opacus user expects. ``epochs``: passes over ``loader``
    the loop makes this round (the accountant counts the releases).
    """
    from defenses.dp_sgd import DPSGD

    params = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, delta=delta, accountant=accountant,
                  poisson_sampling=poisson_sampling, **dp_params)
    dp = DPSGD(**params)
    stored = context.state.get(PRIVACY_KEY)
    state = json.loads(str(stored["json"])) if stored is not None else {}
    n = len(getattr(loader, "dataset", []))
    config = next((r for _, r in msg.content.config_records.items()), {})
    ctx = ClientContext(model=model, optimizer=optimizer, loader=loader,
                        server_round=int(config.get("server-round", 0)),
                        partition_id=int(context.node_config.get("partition-id", 0)), num_examples=n,
                        sample_rate=(getattr(loader, "batch_size", 1) or 1) / max(n, 1), local_steps=0,
                        epochs=int(epochs), device=next(model.parameters()).device, task=None,
                        sampled_fraction=1.0, state=state)
    dp.setup(ctx)
    session = PrivateTraining(ctx.model, ctx.optimizer, ctx.loader)
    try:
        with warnings.catch_warnings():  # Opacus's hooks warn on every step when inputs need no gradient: noise
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield session
    finally:
        dp.after_training(ctx)
        session.metrics = {k: float(v) for k, v in ctx.metrics.items()}
        context.state[PRIVACY_KEY] = ConfigRecord({"json": json.dumps(ctx.state)})
        context.state[PRIVACY_METRICS_KEY] = ConfigRecord({"json": json.dumps(
            {"metrics": session.metrics, "spec": {"name": "dp_sgd", "params": params}})})


class PrivateTraining:
    """What :func:`private_training` hands the loop: the private model, optimizer and loader; then the metrics."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, loader: Any) -> None:
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.metrics: dict[str, float] = {}

    @property
    def epsilon(self) -> float:
        return float(self.metrics.get("epsilon", math.nan))


# -- the server side ------------------------------------------------------------------------------------------


def central_dp(strategy: Strategy, *, num_clients: int, clients_per_round: int = 0, noise_multiplier: float = 1.0,
               clipping_norm: float = 1.0, **params: Any) -> Strategy:
    """Central DP around any FedAvg-like strategy (Flower's fixed clipping, fedprobe's accounting):
    ``AuditStrategy(central_dp(FedAvg(...), num_clients=10, clients_per_round=5, noise_multiplier=1.0), ...)``.
    Replies are aggregated with equal weights whatever key the clients send; AuditStrategy logs the
    client-level ``central_epsilon`` each round. ``clients_per_round``: the m the strategy samples (0: all)."""
    from defenses.central_dp import CentralDP

    dp = CentralDP(noise_multiplier=noise_multiplier, clipping_norm=clipping_norm, **params)
    return dp.wrap_strategy(strategy, {"federation": {"num_clients": int(num_clients),
                                                      "clients_per_round": int(clients_per_round)}})


class AuditStrategy(Strategy):
    """Wrap ``strategy``: attack and score victims, check replies, track in MLflow (see the module docstring).

    ``attack``: an :class:`attacks.base.Attack` or a registered name (``fedprobe list``) with ``attack_params``.
    ``model``: the architecture, ``model() -> nn.Module`` (the user's class). ``task``: the :class:`TaskSpec`
    (:func:`image_task` for a plain CNN). ``victims``: partition ids; ``rounds``: rounds to attack (empty:
    every round). ``labels_known``: the threat model grants the victims' labels to the attack.
    """

    def __init__(self, strategy: Strategy, *, attack: Attack | str, model: Callable[[], torch.nn.Module],
                 task: TaskSpec, attack_params: dict[str, Any] | None = None, victims: Iterable[int] = (0,),
                 rounds: Iterable[int] = (1,), labels_known: bool = False, tracking_uri: str = "",
                 experiment: str = "fedprobe-audit", run_name: str = "", output_dir: str | Path = "fedprobe-output",
                 recovered_psnr: float = 30.0, params: dict[str, Any] | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> None:
        self.inner = strategy
        self.attack = attack if isinstance(attack, Attack) else ATTACKS.create(attack, **(attack_params or {}))
        if self.attack.threat_model != "honest":
            raise ValueError(f"AuditStrategy runs honest-but-curious attacks; {type(self.attack).__name__} crafts "
                             "models (a malicious server): use fedprobe run for it")
        self.attack_name = attack if isinstance(attack, str) else type(attack).__name__
        self.attack_params = dict(attack_params or {})
        self.model_factory, self.task = model, task
        self.victims, self.rounds = sorted(int(v) for v in victims), sorted(int(r) for r in rounds)
        self.labels_known, self.recovered_psnr, self.decode = labels_known, float(recovered_psnr), decode
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.output_dir = Path(output_dir).resolve()
        self.user_params = dict(params or {})
        self.token = ground_truth.new_token()
        self.tracker: Any = None
        self.history: list[dict[str, float]] = []
        self.events: list[str] = []
        self.privacy_by_client: dict[int, dict[str, float]] = {}
        self._sent: dict[int, dict[str, torch.Tensor]] = {}  # node id -> arrays sent this round
        self._round_metrics: dict[int, dict[str, float]] = {}

    def __getattr__(self, name: str) -> Any:  # the wrapped strategy's attributes (arrayrecord_key, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- Strategy ----------------------------------------------------------------------------------------------
    def summary(self) -> None:
        self.inner.summary()

    def attacked(self, server_round: int) -> bool:
        return not self.rounds or server_round in self.rounds

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent = {}
        for msg in messages:
            record = next((r for _, r in msg.content.array_records.items()), None)
            if record is not None:
                self._sent[msg.metadata.dst_node_id] = from_record(record)
            if self.attacked(server_round) and self.attack.reconstructs:
                request = json.dumps({"token": self.token, "dir": str(self.output_dir), "victims": self.victims,
                                      "round": server_round})
                cfg = next((r for _, r in msg.content.config_records.items()), None)
                if cfg is None:
                    msg.content["config"] = cfg = ConfigRecord()
                cfg[AUDIT_KEY] = request  # FedAvg shares one config between its messages: the same request
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept: list[Message] = []
        rows: list[dict[str, Any]] = []
        counts = {"clients_replied": 0.0, "clients_failed": 0.0, "clients_rejected": 0.0}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                counts["clients_failed"] += 1
                self._event(f"round {server_round}: node {node} failed: {reply.error.reason.strip().splitlines()[-1]}")
                continue
            facts = self._pop_facts(reply)
            pid = int(facts.get("partition_id", -1)) if facts else -1
            who = f"client {pid}" if pid >= 0 else f"node {node}"
            try:
                key = next((k for k, _ in reply.content.array_records.items()), None)
                if key is None:
                    raise InvalidUpdate("the reply has no ArrayRecord")
                received = from_record(reply.content[key])
                sent = self._sent.get(node)
                if sent is not None:
                    check_update(received, sent)
                check_weight(reply.content, (getattr(self.inner, "weighted_by_key", "num-examples"),),
                             record=None, required=None)
            except (InvalidUpdate, ValueError, KeyError) as exc:
                counts["clients_rejected"] += 1
                self._event(f"round {server_round}: rejected {who}: {exc}")
                continue
            kept.append(reply)
            counts["clients_replied"] += 1
            if facts and "privacy" in facts:
                privacy = {k: float(v) for k, v in json.loads(str(facts["privacy"])).items()}
                self.privacy_by_client.setdefault(pid, {}).update(privacy)
            if facts is None:
                if self.attacked(server_round) and self.victims:
                    self._event(f"round {server_round}: {who} sent no {FACTS_KEY} record (is audit_mod in its "
                                "ClientApp's mods?): not attacked")
                continue
            if self.attacked(server_round) and pid in self.victims and sent is not None:
                rows.append(self._attack_one(server_round, node, pid, sent, received, facts))
        metrics = dict(counts)
        metrics["clients_sampled"] = float(len(self._sent))
        for key in sorted({k for row in rows for k in row if k.startswith("attack_")}):
            values = [row[key] for row in rows if isinstance(row.get(key), float) and math.isfinite(row[key])]
            if values:
                metrics[key] = float(sum(values) / len(values))
        metrics.update(self._privacy_summary())
        if not kept:
            self._round_metrics[server_round] = metrics
            self._log(metrics, server_round)
            return None, None
        arrays, agg = self.inner.aggregate_train(server_round, kept)
        metrics.update({k: float(v) for k, v in (agg or {}).items() if isinstance(v, (int, float))})
        server_dp = getattr(self.inner, "defense", None)  # central_dp(...): its client-level epsilon
        if server_dp is not None and hasattr(server_dp, "server_metrics"):
            metrics.update(server_dp.server_metrics(server_round))
        self._log(metrics, server_round)
        for row in rows:
            self._log({f"per_victim/{k}/client_{row['client']}": v for k, v in row.items()
                       if k.startswith("attack_") and isinstance(v, float)}, server_round, history=False)
            for path in row.get("artifacts", []):
                self.tracker.log_artifact(path, f"attacks/round_{server_round}")
        return arrays, agg

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = [r for r in replies]
        for r in replies:
            if not r.has_error():
                self._pop_facts(r)
        agg = self.inner.aggregate_evaluate(server_round, replies)
        if agg:
            self._log({f"client_{k}" if not k.startswith(("eval", "client")) else k: float(v) for k, v in agg.items()
                       if isinstance(v, (int, float))}, server_round)
        return agg

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Any:
        """Flower's ``Strategy.start`` loop, inside one tracked MLflow run (the user's call is unchanged)."""
        from fl.recorder import close_run, run_summary
        from fl.tracking import Tracker, provenance

        description = (f"audit of {type(self.inner).__name__}: attack {self.attack_name} on clients {self.victims}, "
                       f"rounds {self.rounds or 'all'}, {num_rounds} rounds")
        source_tags, versions = provenance(description)
        self.tracker = Tracker(self.tracking_uri, self.experiment, self.run_name or f"audit-{self.attack_name}",
                               tags={"attack": self.attack_name, "fedprobe.kind": "audit",
                                     "strategy": type(self.inner).__name__, **source_tags})
        self.tracker.log_params({"attack": {"name": self.attack_name, "params": self.attack_params,
                                            "victims": self.victims, "rounds": self.rounds,
                                            "labels_known": self.labels_known},
                                 "strategy": type(self.inner).__name__, "num_rounds": num_rounds,
                                 "task": {k: v for k, v in self.task.to_dict().items() if k != "extra"},
                                 "train_config": dict(train_config or {}), **self.user_params, **versions})
        artifact_dir = self.output_dir / "runs" / self.tracker.run_id
        self._artifact_dir = artifact_dir

        def tracked_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            res = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
            if res:
                self._log({k: float(v) for k, v in res.items() if isinstance(v, (int, float))}, server_round)
            return res

        status, t0 = "FAILED", time.perf_counter()
        try:
            result = Strategy.start(self, grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                                    train_config=train_config, evaluate_config=evaluate_config,
                                    evaluate_fn=tracked_eval if evaluate_fn is not None else None)
            status = "FINISHED"
            return result
        finally:
            ground_truth.clear(self.output_dir, self.token)
            self.summary_dict = run_summary(
                self.tracker, status, self.history, self.events, t0,
                rounds_completed=len({int(r["round"]) for r in self.history if r["round"] > 0}))
            close_run(self.tracker, self.summary_dict, step=num_rounds)

    # -- helpers -----------------------------------------------------------------------------------------------
    def _pop_facts(self, reply: Message) -> dict[str, Any] | None:
        if FACTS_KEY not in reply.content.config_records:
            return None
        facts = dict(reply.content[FACTS_KEY].items())
        del reply.content[FACTS_KEY]  # the wrapped strategy sees the user's records only
        return facts

    def _event(self, line: str) -> None:
        log.warning(line)
        self.events.append(line)

    def _log(self, metrics: dict[str, float], server_round: int, history: bool = True) -> None:
        if not metrics or self.tracker is None:
            return
        self.tracker.log_metrics(metrics, step=server_round)
        if history:
            row = next((r for r in self.history if r["round"] == server_round), None)
            if row is None:
                row = {"round": float(server_round)}
                self.history.append(row)
            row.update(metrics)

    def _privacy_summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key in sorted({k for m in self.privacy_by_client.values() for k in m if k.endswith("epsilon")}):
            values = [m[key] for m in self.privacy_by_client.values() if key in m]
            out[key] = float(max(values))
            out[f"{key}_mean"] = float(sum(values) / len(values))
        return out

    def _data_free_guess(self) -> tuple[list[float] | None, torch.Tensor | None]:
        """(label prior, image prior) of a server with no data: uniform classes and a mid-grey image, scored
        beside the attack as ``label_baseline`` / ``psnr_baseline`` (what a guess gets without the update)."""
        t = self.task
        labels = [1.0 / t.num_classes] * t.num_classes if t.num_classes else None
        if t.kind != "image" or not all(t.image_shape):
            return labels, None
        grey = torch.full(t.image_shape, 0.5)
        if t.mean:
            grey = (grey - torch.tensor(t.mean).view(-1, 1, 1)) / torch.tensor(t.std).view(-1, 1, 1)
        return labels, grey

    def _attack_one(self, server_round: int, node: int, pid: int, sent: dict[str, torch.Tensor],
                    received: dict[str, torch.Tensor], facts: dict[str, Any]) -> dict[str, Any]:
        from attacks.harness import save_artifacts, score_best

        meta = {k: v for k, v in facts.items() if k not in ("privacy", "defenses")}
        public = tuple(json.loads(str(facts["defenses"]))) if "defenses" in facts else ()
        labels = ground_truth.labels(self.output_dir, self.token, server_round, pid) if self.labels_known else None
        obs = Observation(server_round=server_round, node_id=node, partition_id=pid, global_params=sent,
                          client_params=received, metadata=meta, task=self.task, model_factory=self.model_factory,
                          labels=labels, defenses=public)
        row: dict[str, Any] = {"round": server_round, "client": pid}
        t0 = time.perf_counter()
        try:
            recon = self.attack.attack(obs)
        except Exception as exc:  # an attack's failure must not stop the federation
            self._event(f"round {server_round}: attack {self.attack_name} on client {pid} failed: "
                        f"{type(exc).__name__}: {exc}")
            return row
        row["attack_seconds"] = time.perf_counter() - t0
        row.update({k if k.startswith("attack_") else f"attack_{k}": float(v) for k, v in recon.metrics.items()})
        oracle = ground_truth.read(self.output_dir, self.token, server_round, pid) if self.attack.reconstructs else None
        if oracle is None:
            if self.attack.reconstructs:
                self._event(f"round {server_round}: attack on client {pid} is unscored: the client left no ground "
                            "truth (audit_mod without an oracle, or no shared disk)")
            return row
        shown, scores = score_best(recon, oracle, self.task, self.recovered_psnr, *self._data_free_guess())
        row.update({f"attack_{k}": float(v) for k, v in scores.items()})
        out = self._artifact_dir / f"attack_round{server_round}_client{pid}"
        row["artifacts"] = [str(p) for p in save_artifacts(shown, oracle, self.task, out, decode=self.decode)]
        return row
