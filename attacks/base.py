"""The attack plugin contract (breaching-style split of attacker from case).

An attack sees only what a (possibly malicious) server saw from one client in one
round -- :class:`Observation` -- and returns a :class:`Reconstruction`. Ground truth
never enters the attack: the harness (``attacks.harness``) scores reconstructions
against the simulation's knowledge of the client's batch afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from fl.registry import Registry
from models.tasks import TaskSpec

ATTACKS: Registry[type["Attack"]] = Registry("attack", entry_point_group="fedprobe.attacks", base="attacks.base:Attack")


@dataclass
class Observation:
    """What the server saw from one client in one round.

    ``global_params`` were sent, ``client_params`` came back (after the client's own
    defenses, before any server-side defense); in ``fedprobe run`` both are the attack's
    own copies, so writing into them changes nothing else. ``metadata`` is what the client
    reported: ``num_examples``, ``local_steps``, ``lr``, ``batch_size``,
    ``optimizer``, ``model_mode`` (``train``/``eval``: the mode the client trained in).
    ``labels`` is set only when the threat model grants them. ``defenses`` is the
    public list of the client's defenses (name and params, as in the config), which
    defense-aware attacks model (``attacks.threat``).
    ``model_factory()`` builds the (architecture-only) model the server trains.
    ``device`` is where the attack should compute (see :func:`resolve_device`).
    """

    server_round: int
    node_id: int
    partition_id: int
    global_params: dict[str, torch.Tensor]
    client_params: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    task: TaskSpec
    model_factory: Callable[[], nn.Module]
    labels: torch.Tensor | None = None
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # extra tensors a client mode shares (attention maps)
    device: str = "cpu"  # where the server runs the attack (config attack.device: "cpu", "cuda", "cuda:1")
    defenses: tuple[dict[str, Any], ...] = ()  # public: the client's [[defenses]] entries (name, params)

    def to(self, device: str | torch.device) -> "Observation":
        """A copy whose tensors live on ``device`` (parameters, labels and shared tensors)."""
        dev = torch.device(device)
        move = lambda d: {k: v.to(dev) for k, v in d.items()}  # noqa: E731
        return replace(self, global_params=move(self.global_params), client_params=move(self.client_params),
                       labels=None if self.labels is None else self.labels.to(dev), shared=move(self.shared),
                       device=str(dev))

    def update(self) -> dict[str, torch.Tensor]:
        """client - global, per parameter."""
        return {k: self.client_params[k] - self.global_params[k] for k in self.client_params}

    def pseudo_gradient(self) -> dict[str, torch.Tensor]:
        """(global - client) / (lr * local_steps): the gradient for FedSGD, its average for FedAvg."""
        scale = float(self.metadata.get("lr", 1.0)) * max(int(self.metadata.get("local_steps", 1)), 1)
        return {k: (self.global_params[k] - self.client_params[k]) / scale for k in self.client_params}


def resolve_device(name: str) -> torch.device:
    """``name`` as a torch device, with a one-line error when it is unusable here."""
    try:
        dev = torch.device(name or "cpu")
    except RuntimeError:
        raise ValueError(f"attack.device {name!r} is not a torch device; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"attack.device is {name!r} but this torch has no usable CUDA device; set attack.device = 'cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"attack.device {name!r} is not supported; use 'cpu' or 'cuda'")
    return dev


@dataclass
class ServerContext:
    """What the server running an attack holds besides observations (given by the runtime, :meth:`Attack.bind`).

    ``public_dataset(name)`` returns a dataset the server has of its own (items are batch dicts of
    :mod:`models.tasks`), e.g. calibration images for a malicious model; None where the server has none.
    The library never imports the application's data code: the runtime hands this in.
    """

    public_dataset: Callable[[str], Any] | None = None


@dataclass
class Reconstruction:
    """What an attack recovered; any field may be None."""

    inputs: torch.Tensor | None = None  # images [B, C, H, W] in the task's normalised space
    tokens: torch.Tensor | None = None  # token ids [B, L]
    labels: torch.Tensor | None = None  # [B]
    metrics: dict[str, float] = field(default_factory=dict)  # attack-side numbers (loss, norms, time)
    artifacts: dict[str, Any] = field(default_factory=dict)  # anything else worth logging


class Attack:
    """Base class: subclass, set ``threat_model``, implement :meth:`attack`.

    ``threat_model`` is ``"honest"`` (honest-but-curious: reads updates) or
    ``"malicious"`` (may also change the model sent to victims via :meth:`craft`).
    ``needs_labels`` asks the harness for the victim's labels (only granted when the
    attack config says the threat model includes them). ``reconstructs = False``
    marks a measuring attack: its victims record no ground truth and nothing is scored.
    """

    threat_model: ClassVar[str] = "honest"
    needs_labels: ClassVar[bool] = False
    reconstructs: ClassVar[bool] = True  # False: the attack only measures (no ground truth recorded or scored)

    def __init__(self, **params: Any) -> None:
        if params:
            raise TypeError(f"unexpected parameters {sorted(params)}")

    server: ServerContext = ServerContext()  # replaced by bind(); the default server holds no data

    def bind(self, server: ServerContext) -> "Attack":
        """Give the attack what its server holds (the runtime calls this once, before any round)."""
        self.server = server
        return self

    def check_model(self, params: dict[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` if this attack cannot work on a model with these trainable parameters (name ->
        tensor, what a round's ``global_params`` will hold): a parameter named in the config that the model lacks,
        a model too small for a malicious construction. ``fedprobe run`` calls it once it has built the model,
        before Ray starts; the default finds nothing wrong."""

    def attack(self, obs: Observation) -> Reconstruction:
        raise NotImplementedError

    def craft(self, global_params: dict[str, torch.Tensor], server_round: int, partition_id: int) -> dict[str, torch.Tensor]:
        """Malicious servers: return the parameters to send to this victim (default: unchanged)."""
        return global_params
