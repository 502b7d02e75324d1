"""Several clients per SuperNode: one message per node and round, not one per client (issue 19, point 3).

Flower's simulation costs grow with the number of SuperNodes: the partition query sends one message per
node, and the in-memory link state scans every in-flight message per node every 0.1 s, which at 1000
nodes was two thirds of the driver's time. With ``federation.supernodes = S < num_clients``, the run
starts S SuperNodes, and the server talks to them through :class:`PackedGrid`, which looks to the rest
of the server (strategy, server hook, attacks, audits) exactly like a grid of ``num_clients`` nodes, one
per partition:

- ``get_node_ids`` gives one *virtual* node id per partition (``VIRTUAL_BASE + pid``);
- the partition query is answered here, without a message (it was N messages);
- ``send_and_receive`` packs the round's per-client messages into one message per real node: partition
  ``p`` always goes to the ``p mod S``-th node in node-id order (so a partition's defense state, kept in
  its node's ``context.state``, stays where it is), each distinct model and config is sent once, and the
  reply is unpacked into one reply per partition, as if that partition's own node had sent it.

The ClientApp (:func:`fl.client_app.train`) trains a packed message's partitions one after the other on
the process's one reused model (:mod:`fl.model_pool`). Each partition's training is what it would have
been on a node of its own (same data, seed and defenses), so the global model is the same (tested); a
partition that raises fails alone, as a client of its own would.

Every per-client update still travels and is checked, attacked and aggregated as before: the saving is
Flower's per-node and per-message cost, not the update bytes. Partitions are loaded by id on whichever
node trains them (simulation data, fl.data), so packing is a simulation feature: a deployment whose
SuperNodes each hold their own data keeps ``supernodes = 0``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

PACK_KEY = "fedprobe-pack"  # the packed message's index: partitions, and which model and config each uses
ERRORS_KEY = "fedprobe-pack-errors"  # the packed reply's per-partition failures: pid -> reason
VIRTUAL_BASE = 1 << 40  # virtual node ids: VIRTUAL_BASE + partition id
ERROR_CODE = ErrorCode.CLIENT_APP_RAISED_EXCEPTION  # a partition's training raised on its node


def packed_key(name: str, index: int) -> str:
    """The key of one partition's (or one distinct model's/config's) record inside a packed message."""
    return f"{name}.{index}"


class PackedGrid:
    """A Grid of ``num_clients`` virtual nodes over the real grid's SuperNodes (module docstring)."""

    def __init__(self, grid: Any, num_clients: int, supernodes: int, wait_s: float = 600.0) -> None:
        self.grid = grid
        self.num_clients = num_clients
        self.supernodes = supernodes
        self.wait_s = wait_s
        self._real: list[int] = []

    @property
    def real(self) -> list[int]:
        """The real SuperNodes' ids, in order, once all ``supernodes`` have registered (a simulation's nodes
        register while the ServerApp starts; Flower's own strategies wait for them the same way)."""
        if not self._real:
            deadline = time.monotonic() + self.wait_s
            while len(ids := sorted(self.grid.get_node_ids())) < self.supernodes:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(ids)} of federation.supernodes = {self.supernodes} SuperNodes "
                                       f"registered within {self.wait_s:g} s")
                time.sleep(0.05)
            self._real = ids
        return self._real

    # the Grid interface the server uses ------------------------------------------------
    def get_node_ids(self) -> list[int]:
        return [VIRTUAL_BASE + p for p in range(self.num_clients)]

    def node_of(self, pid: int) -> int:
        """The real SuperNode that trains partition ``pid``."""
        return self.real[pid % len(self.real)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies: list[Message] = []
        groups: dict[tuple[int, str], list[tuple[int, Message]]] = {}
        for msg in messages:
            pid = msg.metadata.dst_node_id - VIRTUAL_BASE
            if not 0 <= pid < self.num_clients:
                raise ValueError(f"message to node {msg.metadata.dst_node_id}, which is not one of this grid's "
                                 f"{self.num_clients} virtual nodes")
            if msg.metadata.message_type == MessageType.QUERY:  # the partition query: known here
                replies.append(Message(RecordDict({"info": ConfigRecord({"partition-id": pid})}), reply_to=msg))
                continue
            groups.setdefault((self.node_of(pid), msg.metadata.message_type), []).append((pid, msg))
        if not groups:
            return replies
        outs = [pack([(pid, m.content) for pid, m in members], node, kind) for (node, kind), members in groups.items()]
        by_node = {node: members for (node, _), members in groups.items()}
        for reply in self.grid.send_and_receive(outs, timeout=timeout):
            members = by_node.pop(reply.metadata.src_node_id, None)
            if members is not None:
                replies.extend(unpack(reply, members))
        return replies  # the members of a node that did not answer in time have no reply, as a silent client


def pack(members: list[tuple[int, RecordDict]], node: int, kind: str) -> Message:
    """One message to ``node`` carrying the contents of each partition's message; a record several members
    share (the round's global model, its config) is sent once."""
    content = RecordDict()
    index: dict[str, list[int]] = {"partitions": []}
    slots: dict[int, int] = {}  # id(record) -> its slot in the packed message
    for pid, member in members:
        index["partitions"].append(pid)
        for name, record in member.items():
            slot = slots.setdefault(id(record), len(slots))
            content[packed_key("record", slot)] = record
            index.setdefault(name, []).append(slot)
    if any(len(v) != len(members) for v in index.values()):
        raise ValueError("the packed partitions' messages do not hold the same records")
    content[PACK_KEY] = ConfigRecord({k: list(v) for k, v in index.items()})
    return Message(content, dst_node_id=node, message_type=kind)


def members_of(content: RecordDict) -> list[tuple[int, RecordDict]]:
    """The ClientApp's side of :func:`pack`: (partition id, the content its own message would have had)."""
    index = content[PACK_KEY]
    pids = [int(p) for p in index["partitions"]]
    names = [k for k in index if k != "partitions"]
    return [(pid, RecordDict({name: content[packed_key("record", int(index[name][i]))] for name in names}))
            for i, pid in enumerate(pids)]


def reply_content(results: list[tuple[int, RecordDict | str]]) -> RecordDict:
    """The packed reply: each partition's reply content under its id, or its failure reason."""
    content = RecordDict()
    errors: dict[str, str] = {}
    for pid, result in results:
        if isinstance(result, str):
            errors[str(pid)] = result
            continue
        for name, record in result.items():
            content[f"{name}@{pid}"] = record
    content[ERRORS_KEY] = ConfigRecord(errors)
    return content


def unpack(reply: Message, members: list[tuple[int, Message]]) -> list[Message]:
    """One reply per member, as that partition's own node would have sent it: its content, or its error."""
    if reply.has_error():  # the whole node failed: each of its partitions failed with it
        return [Message(Error(reply.error.code, reply.error.reason), reply_to=m) for _, m in members]
    content = reply.content
    errors = content[ERRORS_KEY] if ERRORS_KEY in content else ConfigRecord({})
    own: dict[str, dict[str, Any]] = {}  # pid -> that partition's records
    for key, record in content.items():
        name, sep, pid = key.rpartition("@")
        if sep:
            own.setdefault(pid, {})[name] = record
    out = []
    for pid, m in members:
        if str(pid) in errors:
            out.append(Message(Error(ERROR_CODE, str(errors[str(pid)])), reply_to=m))
        elif str(pid) not in own:
            out.append(Message(Error(ERROR_CODE, f"the packed reply holds nothing for partition {pid}"), reply_to=m))
        else:
            out.append(Message(RecordDict(own[str(pid)]), reply_to=m))
    return out


def wrap(grid: Any, num_clients: int, supernodes: int) -> Any:
    """``grid`` itself with one SuperNode per client, else a :class:`PackedGrid` over its SuperNodes."""
    if not supernodes or supernodes >= num_clients:
        return grid
    return PackedGrid(grid, num_clients, supernodes)
