"""FedAvg that samples clients by data partition, reproducibly.

Simulated node ids are random on every run, so Flower's own sampling (random
node ids from the global RNG) cannot be repeated. The server first asks every
node for its partition id (:func:`discover_partitions`), then samples partitions
with a seeded RNG and aggregates replies in partition order: same config and
seed, same rounds, same floating-point sums.

The weighted mean is taken in torch, in place, on the tensors the server hook already decoded
for its checks (``decoded``: one deserialisation per reply, issue 19); a reply whose record a
wrapping strategy replaced (server-side clipping) is decoded again. The arithmetic is Flower's
``aggregate_arrayrecords`` (``sum of value * (w / total)`` in reply order, in the arrays' dtype).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl.arrays import from_record, is_flat, to_flat_record, to_record
from fl.training import derive_seed


def discover_partitions(grid: Grid, timeout: float = 600.0) -> dict[int, int]:
    """node id -> partition id, asked once of every node with a ``query`` message."""
    node_ids = sorted(grid.get_node_ids())
    messages = [Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=n)
                for n in node_ids]
    roster: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            continue
        roster[reply.metadata.src_node_id] = int(reply.content["info"]["partition-id"])
    return roster


class PartitionSampledFedAvg(FedAvg):
    """FedAvg whose train sampling is a seeded choice of partitions (see module doc)."""

    def __init__(self, roster: dict[int, int], clients_per_round: int, seed: int, min_replies: int = 1) -> None:
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(logging.ERROR)  # FedAvg warns that fraction_evaluate=0: centralized evaluation is ours
        try:
            super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
                             min_available_nodes=1)
        finally:
            flwr_log.setLevel(level)
        self.roster = roster
        self.node_of = {pid: node for node, pid in roster.items()}
        self.clients_per_round = clients_per_round or len(roster)
        self.seed = seed
        self.min_replies = min_replies
        self.decoded: dict[int, tuple[Any, dict[str, torch.Tensor]]] = {}  # set per round (fl.server_app)

    def sample_partitions(self, server_round: int) -> list[int]:
        pids = sorted(self.node_of)
        k = min(self.clients_per_round, len(pids))
        rng = np.random.default_rng(derive_seed(self.seed, server_round, 1))
        return sorted(int(p) for p in rng.choice(pids, size=k, replace=False))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(record, message_type=MessageType.TRAIN, dst_node_id=self.node_of[p])
                for p in self.sample_partitions(server_round)]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ordered = sorted(replies, key=lambda m: self.roster.get(m.metadata.src_node_id, 0))
        valid, _ = self._check_and_log_replies(ordered, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        arrays = self._weighted_mean(contents)
        self.decoded = {}
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def _weighted_mean(self, contents: list[RecordDict]) -> ArrayRecord:
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        total = sum(weights)
        mean: dict[str, torch.Tensor] = {}
        flat = True
        for content, weight in zip(contents, weights, strict=True):
            factor = weight / total
            for record in content.array_records.values():
                flat = flat and is_flat(record)
                hit = self.decoded.get(id(record))
                tensors = hit[1] if hit is not None and hit[0] is record else from_record(record)
                for name, value in tensors.items():
                    if name in mean:
                        mean[name] += value * factor
                    else:
                        mean[name] = value * factor
        return to_flat_record(mean) if flat else to_record(mean)
