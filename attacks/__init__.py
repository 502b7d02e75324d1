"""Server-side attacks: plugins that see only what the server saw (see attacks.base)."""

from attacks import (  # noqa: F401  (registration)
    april, attention_inversion, best_of, gradient_inversion, imprint, malicious, span_text, tag, update_norm,
)
from attacks.base import ATTACKS, Attack, Observation, Reconstruction

__all__ = ["ATTACKS", "Attack", "Observation", "Reconstruction"]
