"""A real Flower deployment: SuperLink and two SuperNodes as separate processes, fedprobe via `flwr run`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_supernodes_run_fedprobe(tmp_path):
    env = dict(os.environ, FEDPROBE_BIN=str(Path(sys.executable).parent), FEDPROBE_PORT_BASE="19300")
    proc = subprocess.run([str(ROOT / "scripts" / "local_deployment.sh"), "2", "federation.rounds=1;federation.local_steps=1"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("fedprobe summary:")]
    assert summary and "FINISHED" in summary[0] and '"clients_replied": 2.0' in summary[0]
