"""Is there a Ray cluster at ``federation.ray_address``? Asked before the run starts, answered within seconds.

Left to itself, ``ray.init(address=...)`` on a closed port, or on a port where something other than Ray listens,
retries for minutes and then ends the process from Ray's C++ side (no Python exception to catch). So the question
is asked twice, cheaply first:

1. ``host:port`` must parse, and a TCP connection must open (a closed port or an unknown host is refused in < 1 s);
2. a throw-away subprocess runs ``ray.init`` on the address with Ray's GCS timeouts cut to a few seconds and
   prints the cluster's resources (which also tells whether ``client_cpus`` / ``client_gpus`` fit on it). A
   listener that is not Ray, or a Ray that does not answer, ends that subprocess, not this process.

Only the run's own ``ray.init`` keeps Ray's default timeouts (a cluster that blips for a few seconds mid-run should
not end it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any

from fl.config import ConfigError

GCS_TIMEOUT_S = 5  # Ray's GCS connect / reconnect / request timeouts in the probe (Ray's defaults: 5 / 60 / 60 s)
PROBE_TIMEOUT_S = 90  # the whole probe, `import ray` included (slow on a busy 2-core machine)

_PROBE = r"""
import json, sys
import ray
try:
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    print("RESOURCES " + json.dumps(ray.cluster_resources()), flush=True)
    ray.shutdown()
except Exception as exc:
    print("ERROR " + (str(exc).strip().splitlines() or [type(exc).__name__])[0], flush=True)
    sys.exit(3)
"""


def _fix(address: str) -> str:
    port = address.rsplit(":", 1)[-1] if ":" in address else "6379"
    return (f"start one there (`ray start --head --port={port}`), correct the address, or leave "
            "federation.ray_address empty for a private local Ray instance")


def host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``ray://host:port``; None for ``auto`` (Ray finds the local cluster)."""
    if address == "auto":
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"federation.ray_address = {address!r} is not host:port (or ray://host:port, or auto); "
                          "e.g. '127.0.0.1:6379', or empty for a private local Ray instance")
    return host.strip("[]"), int(port)


def probe_cluster(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """The cluster's resources (``ray.cluster_resources()``), or :class:`ConfigError` naming why none answered."""
    where = host_port(address)
    if where is not None:
        try:
            socket.create_connection(where, timeout=3).close()
        except OSError as exc:
            raise ConfigError(f"federation.ray_address = {address!r}: nothing listens there "
                              f"({exc.strerror or exc}); {_fix(address)}") from None
    env = dict(os.environ, RAY_gcs_rpc_server_connect_timeout_s=str(GCS_TIMEOUT_S),
               RAY_gcs_rpc_server_reconnect_timeout_s=str(GCS_TIMEOUT_S),
               RAY_gcs_server_request_timeout_seconds=str(GCS_TIMEOUT_S))
    proc = subprocess.Popen([sys.executable, "-c", _PROBE, address], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env, text=True,
                            start_new_session=True)  # its own group: a timeout kills whatever Ray started for it
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ConfigError(f"federation.ray_address = {address!r}: no Ray answered within {timeout_s:g} s; "
                          f"{_fix(address)}") from None
    for line in out.splitlines():
        if line.startswith("RESOURCES "):
            return json.loads(line.removeprefix("RESOURCES "))
    errors = [line.removeprefix("ERROR ") for line in out.splitlines() if line.startswith("ERROR ")]
    reason = errors[0] if errors else f"Ray's GCS did not answer within {GCS_TIMEOUT_S} s: is it a Ray head node?"
    raise ConfigError(f"federation.ray_address = {address!r}: no Ray cluster there ({reason}); {_fix(address)}")


def check_cluster(address: str, client_cpus: float, client_gpus: float) -> dict[str, Any]:
    """Probe ``address`` and refuse client resources beyond the whole cluster's (Ray could never place a client and
    the run would hang waiting)."""
    resources = probe_cluster(address)
    for key, want, field in (("CPU", client_cpus, "client_cpus"), ("GPU", client_gpus, "client_gpus")):
        have = float(resources.get(key, 0.0))
        if want > have:
            raise ConfigError(f"federation.{field} = {want:g} exceeds the {have:g} {key}s of the Ray cluster at "
                              f"{address!r}: no client could be placed and the run would hang; lower it")
    return resources
