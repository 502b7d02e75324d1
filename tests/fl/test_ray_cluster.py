"""Clients on an existing Ray cluster (a local head node started with `ray start`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_run_joins_an_existing_ray_cluster(tmp_path):
    port = "6390"
    subprocess.run([str(BIN / "ray"), "start", "--head", "--port", port, "--num-cpus", "2", "--include-dashboard",
                    "false", "--disable-usage-stats"], check=True, capture_output=True, timeout=180)
    try:
        cfg = tmp_path / "c.toml"
        cfg.write_text("[federation]\nnum_clients = 2\nrounds = 1\nlocal_steps = 1\n")
        summary = tmp_path / "s.json"
        proc = subprocess.run([str(BIN / "fedprobe"), "run", str(cfg), "--no-progress", "--summary-json", str(summary),
                               "--set", f"federation.ray_address='127.0.0.1:{port}'",
                               "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(summary.read_text())["final"]["clients_replied"] == 2.0
        status = subprocess.run([str(BIN / "ray"), "status", "--address", f"127.0.0.1:{port}"], capture_output=True,
                                text=True, timeout=120)
        assert status.returncode == 0  # the cluster outlives the run: fedprobe joined it, did not start its own
        # the cluster's resources are asked before the run: a client larger than the whole cluster would hang
        proc = subprocess.run([str(BIN / "fedprobe"), "check", str(cfg), "--set", "federation.client_cpus=4",
                               "--set", f"federation.ray_address='127.0.0.1:{port}'"],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 2 and "exceeds the 2 CPUs of the Ray cluster" in proc.stderr, proc.stderr[-2000:]
        # without ray_address the run starts a private instance beside the foreign cluster (issue 16), not joins it
        proc = subprocess.run([str(BIN / "fedprobe"), "run", str(cfg), "--no-progress", "--summary-json", str(summary),
                               "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(summary.read_text())["final"]["clients_replied"] == 2.0
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=180)
