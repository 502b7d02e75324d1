"""Defenses: client training-step, outgoing-update and server-aggregation hooks (see defenses.base).

Importing this package registers the built-ins: dp_sgd, update_noise, clip, prune, central_dp, copyright.
Opacus and Flower are imported lazily, when a defense is used.
"""

from defenses import central_dp, copyright, dp_sgd, update  # noqa: F401  (registration)
from defenses.base import DEFENSES, ClientContext, Defense

__all__ = ["DEFENSES", "ClientContext", "Defense"]
