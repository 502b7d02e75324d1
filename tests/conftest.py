"""Shared test settings: offline Hugging Face, no telemetry, one torch thread (small ops run faster that way)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import torch  # noqa: E402

torch.set_num_threads(1)


import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def repo_root() -> pathlib.Path:
    """The checkout's root (experiment configs live under experiments/)."""
    return pathlib.Path(__file__).resolve().parent.parent
