"""fedprobe's Flower ClientApp: local training with defenses, on the Message API.

The server sends the resolved experiment config with every train message, so a
client needs nothing but its ``partition-id`` (node config) to take part.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl import ground_truth
from fl.arrays import from_record, like, to_record
from fl.config import config_from_dict
from fl.packing import PACK_KEY, members_of, reply_content
from fl.protocol import CONFIG_KEY, REPORT_KEY, RESTORE_KEY, STATE_KEY
from fl.training import derive_seed, train_client

app = ClientApp()

# In Ray's workers: Flower's actor lifecycle lines ("Manually terminating ClientAppActor") reach the user's
# terminal through Ray's log forwarding; fedprobe run --verbose (FEDPROBE_VERBOSE=1, inherited) keeps them.
if os.environ.get("FEDPROBE_VERBOSE") != "1":
    logging.getLogger("flwr").setLevel(logging.ERROR)

# Opacus' hooks warn on every step when inputs need no gradient (the usual case): noise, not news.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


class InjectedClientFailure(RuntimeError):
    """A crash injected by ``federation.failure_rate`` (fault-tolerance testing)."""


def _partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report which data partition this node holds (the server samples by partition)."""
    return Message(RecordDict({"info": ConfigRecord({"partition-id": _partition_id(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One partition's round, or, for a packed message (``fl.packing``), each of its partitions' in turn on
    this process's one model; a partition that raises fails alone (its reason goes back in the reply)."""
    if PACK_KEY not in msg.content:
        return Message(_train_one(msg.content, _partition_id(context), context, STATE_KEY), reply_to=msg)
    results: list[tuple[int, RecordDict | str]] = []
    shared: dict[tuple[str, int], Any] = {}  # the members share one config and one global model: parse once
    for pid, content in members_of(msg.content):
        try:
            results.append((pid, _train_one(content, pid, context, f"{STATE_KEY}.{pid}", shared)))
        except Exception as exc:  # noqa: BLE001  (as Flower reports a ClientApp's exception: type and message)
            results.append((pid, f"{type(exc).__name__}: {exc}"))
    return Message(reply_content(results), reply_to=msg)


def _once(shared: dict[tuple[str, int], Any] | None, kind: str, record: Any, make: Callable[[], Any]) -> Any:
    """``make()``, or, within one packed message, its value for the same record object (``shared`` is keyed by
    the record's id, alive for the whole message). Nothing downstream mutates a parsed config or the global
    tensors (tests/fl/test_packing.py: packed == unpacked, bit for bit)."""
    if shared is None:
        return make()
    key = (kind, id(record))
    if key not in shared:
        shared[key] = make()
    return shared[key]


def _train_one(msg_content: RecordDict, pid: int, context: Context, state_key: str,
               shared: dict[tuple[str, int], Any] | None = None) -> RecordDict:
    """Train partition ``pid`` from one train message's content; the reply's content. ``state_key``: where its
    defense state lives in ``context.state``; ``shared``: the packed message's parse cache (see ``_once``)."""
    cfg_record = msg_content["config"]
    cfg = _once(shared, "config", cfg_record, lambda: config_from_dict(json.loads(str(cfg_record[CONFIG_KEY]))))
    server_round = int(cfg_record["server-round"])

    rate = cfg.federation.failure_rate
    if rate > 0 and np.random.default_rng(derive_seed(cfg.experiment.seed, server_round, pid, 7)).random() < rate:
        raise InjectedClientFailure(f"client {pid} crashed in round {server_round} (injected, failure_rate={rate})")

    state_record = context.state.get(state_key)
    client_state = json.loads(str(state_record["json"])) if state_record is not None else {}
    if not client_state and RESTORE_KEY in cfg_record:  # a resumed run: this process lost the ledger, the server kept it
        client_state = json.loads(str(cfg_record[RESTORE_KEY]))
    result = train_client(
        cfg, pid, _once(shared, "arrays", msg_content["arrays"], lambda: from_record(msg_content["arrays"])),
        server_round, client_state,
        record_oracle=ground_truth.CONFIG_KEY in cfg_record,
    )
    context.state[state_key] = ConfigRecord({"json": json.dumps(result.client_state)})

    content = RecordDict({
        "arrays": like(msg_content["arrays"], result.state),  # the form the server chose (fl.arrays)
        "metrics": MetricRecord(result.metrics),
        "meta": ConfigRecord({**{k: v for k, v in result.meta.items()},
                              REPORT_KEY: json.dumps(result.client_state, sort_keys=True)}),
    })
    if result.shared:  # what the client mode shares with the server beyond its update (attention maps)
        content["shared"] = to_record(result.shared)
    if result.oracle:  # simulation-only ground truth: to the scorer's folder, never into the reply (fl.ground_truth)
        ground_truth.write(cfg.tracking.output_dir, str(cfg_record[ground_truth.CONFIG_KEY]), server_round, pid,
                           result.oracle)
    return content
