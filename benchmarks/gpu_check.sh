#!/usr/bin/env bash
# One prepared GPU check (issue 9): on a machine with CUDA, checks and times the attention kernels, a DP-SGD step,
# and a two-round simulation with fractional client GPUs whose server runs the iDLG attack on cuda; prints one table.
#   make setup && benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1
exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py "$@"
