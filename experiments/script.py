"""What every experiment script shares: --seed/--threads/--tracking-uri/--no-track and its MLflow run."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

import torch


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI")
    ap.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def start(args: argparse.Namespace, experiment: str, run_prefix: str) -> Any:
    """Apply --threads; open an MLflow run named ``run_prefix-<timestamp>`` with the arguments as params
    (None under --no-track)."""
    torch.set_num_threads(args.threads)
    if args.no_track:
        return None
    from fl.tracking import Tracker

    tracker = Tracker(args.tracking_uri, experiment, run_name=f"{run_prefix}-{dt.datetime.now():%Y%m%d-%H%M%S}")
    tracker.log_params({k: v for k, v in vars(args).items() if k not in ("tracking_uri", "no_track")})
    return tracker
