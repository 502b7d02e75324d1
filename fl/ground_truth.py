"""Ground truth out of band: what a victim really trained on, for scoring attacks, never in a Flower message.

In a simulation the server can score a reconstruction against the victim's real batch. That batch must not
travel with the client's reply (a message is what a real server receives) nor reach the attack's
``Observation``. So a targeted client writes it to a folder of its own run, outside every message:

    <tracking.output_dir>/ground-truth/<token>/round-<r>-client-<pid>.pt     (mode 0600, folder 0700)

and the server's scorer reads it only **after** the attack has returned, then deletes it. The token is
random per run (``new_token``): the server sends it in the train config in place of the batch. With
``attack.labels_known = true`` (a threat model that grants the labels) the labels alone are read before
the attack, as granted.

What this cannot stop: an attack plugin runs inside the server's process and could read the disk while
it runs. fedprobe keeps the ground truth out of its Observation and of every message; a plugin that goes
looking on disk is not modelling a server. Clients on other machines (a Ray cluster) need ``output_dir`` on a
shared file system for scoring; without it the attack runs and is logged unscored, with an event.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import torch

CONFIG_KEY = "ground-truth-token"  # train config: where this run's victims leave their batch


def new_token() -> str:
    return secrets.token_hex(8)


def path(output_dir: str | Path, token: str, server_round: int, pid: int) -> Path:
    if not token or not all(c in "0123456789abcdef" for c in token):
        raise ValueError(f"bad ground-truth token {token!r}")
    return Path(output_dir) / "ground-truth" / token / f"round-{int(server_round)}-client-{int(pid)}.pt"


def write(output_dir: str | Path, token: str, server_round: int, pid: int, batch: dict[str, torch.Tensor]) -> Path:
    """Client side: keep the batch for the scorer (atomic, readable by this user only)."""
    p = path(output_dir, token, server_round, pid)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        torch.save({k: v.detach().cpu() for k, v in batch.items()}, fh)
    os.replace(tmp, p)
    return p


def read(output_dir: str | Path, token: str, server_round: int, pid: int, remove: bool = True
         ) -> dict[str, torch.Tensor] | None:
    """Scorer side: the victim's batch, or None when the client left none (not targeted, no shared disk)."""
    p = path(output_dir, token, server_round, pid)
    if not p.is_file():
        return None
    batch = torch.load(p, weights_only=True)
    if remove:
        p.unlink(missing_ok=True)
    return batch


def labels(output_dir: str | Path, token: str, server_round: int, pid: int) -> torch.Tensor | None:
    """The labels alone, for a threat model that grants them to the attack (the file stays for the scorer)."""
    batch = read(output_dir, token, server_round, pid, remove=False)
    return None if batch is None else batch.get("labels")


def clear(output_dir: str | Path, token: str) -> None:
    """Remove what is left of a run's ground truth (victims whose replies were rejected)."""
    folder = Path(output_dir) / "ground-truth" / token
    if folder.is_dir():
        for f in folder.iterdir():
            f.unlink(missing_ok=True)
        folder.rmdir()
