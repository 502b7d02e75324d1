"""Defenses: client training-step, outgoing-update and server-aggregation hooks (see defenses.base).

Importing this package registers the built-ins: dp_sgd, update_noise, clip, prune, central_dp, copyright,
and the audit gradient_canaries (registry ``AUDITS``, see defenses.audit).
Opacus and Flower are imported lazily, when a defense is used.
"""

from defenses import canaries, central_dp, copyright, dp_sgd, update  # noqa: F401  (registration)
from defenses.audit import AUDITS, Audit
from defenses.base import DEFENSES, ClientContext, Defense

__all__ = ["AUDITS", "Audit", "DEFENSES", "ClientContext", "Defense"]
