"""Server-side attacks: plugins that see only what the server saw (see attacks.base)."""

from attacks import april, attention_inversion, best_of, gradient_inversion, imprint, malicious, update_norm  # noqa: F401  (registration)
from attacks.base import ATTACKS, Attack, Observation, Reconstruction

__all__ = ["ATTACKS", "Attack", "Observation", "Reconstruction"]
