"""A worked example of third-party fedprobe plugins (used verbatim by the README and tests).

Put a module like this anywhere on PYTHONPATH and name its classes by dotted path in a config:

    [attack]
    name = "my_plugins:PositiveFraction"

    [[defenses]]
    name = "my_plugins:QuantizeUpdate"
    params = { step = 0.01 }
"""

import torch

from attacks.base import Attack, Observation, Reconstruction
from defenses.base import ClientContext, Defense


class PositiveFraction(Attack):
    """Honest-but-curious: the share of a victim's update entries that are positive."""

    reconstructs = False  # measures only: no ground truth is recorded or scored

    def attack(self, obs: Observation) -> Reconstruction:
        update = torch.cat([u.flatten() for u in obs.update().values()])
        return Reconstruction(metrics={"positive_fraction": float((update > 0).float().mean())})


class QuantizeUpdate(Defense):
    """Round every entry of the outgoing update to a multiple of ``step``."""

    def __init__(self, step: float = 0.01) -> None:
        if step <= 0:
            raise ValueError(f"QuantizeUpdate step must be > 0, got {step}")
        self.step = step

    def transform_update(self, update: dict[str, torch.Tensor], ctx: ClientContext) -> dict[str, torch.Tensor]:
        return {name: torch.round(u / self.step) * self.step for name, u in update.items()}
