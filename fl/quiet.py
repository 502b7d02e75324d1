"""Quiet by default: fedprobe's own lines, the progress bar and the summary.

Third-party INFO lines and warnings a user cannot act on (MLflow's table set-up notes, Ray's
accelerator FutureWarning, SQLAlchemy's ``noload`` deprecation inside MLflow's store, Flower's
actor lifecycle lines) are kept out of the terminal; ``fedprobe run --verbose`` shows them. Applied
by the CLI before those libraries load, and by the Flower App entry (``flwr run .``) on import.
"""

from __future__ import annotations

import logging
import os
import warnings

ENV_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # silences Ray's FutureWarning about accelerator env vars
}


def environment() -> None:
    """Settings every fedprobe process needs, verbose or not (set before Ray and Flower start)."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def quiet() -> None:
    """Filter third-party noise (idempotent)."""
    environment()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating initial MLflow database tables..."
    for category, module in ((FutureWarning, "ray"), (FutureWarning, "flwr"), (DeprecationWarning, "ray"),
                             (UserWarning, "mlflow"), (FutureWarning, "mlflow")):
        warnings.filterwarnings("ignore", category=category, module=rf"{module}(\..*)?$")
    warnings.filterwarnings("ignore", message=".*noload.*")  # SQLAlchemy 2.1 deprecation inside MLflow's store
    logging.getLogger("mlflow").setLevel(logging.WARNING)
