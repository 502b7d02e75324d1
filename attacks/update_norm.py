"""Built-in passive attack: record the size of each client's update."""

from __future__ import annotations

import torch

from attacks.base import ATTACKS, Attack, Observation, Reconstruction


@ATTACKS.register("update_norm")
class UpdateNorm(Attack):
    """Honest-but-curious: log the L2 norm and max-abs entry of each victim's update."""

    reconstructs = False

    def attack(self, obs: Observation) -> Reconstruction:
        update = obs.update()
        flat = torch.cat([u.flatten().double() for u in update.values()]) if update else torch.zeros(1)
        return Reconstruction(metrics={"update_norm": float(flat.norm()), "update_max_abs": float(flat.abs().max())})
