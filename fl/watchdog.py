"""Nothing a run started outlives it, even a SIGKILLed run.

Ray's local instance is a tree of processes under the driver (GCS, raylet, dashboard, log monitor; the raylet's
agents and workers). Ctrl-C and SIGTERM shut it down (``fl.stopping``); SIGKILL cannot be caught, and then the
raylet's dashboard and runtime-env agents were left running for good (measured: 2 processes, issue 16). So the
driver starts one small watchdog in its own session: while the driver lives, it notes the driver's descendants
every second (``psutil``, as ``fl.stopping.descendants``); once the driver is gone, it gives Ray a few seconds to
clean up after itself and then kills every noted process still alive with ``fl.stopping.kill_tree``, as Ctrl-C
does. A pid that was reused by another process meanwhile has another start time (``psutil.Process.is_running``)
and is left alone.

The watchdog is a ``python -c`` child that imports only ``psutil`` and ``fl.stopping``: it starts in ~0.1 s and
holds no model, data or Ray state.
"""

from __future__ import annotations

import os
import subprocess
import sys

POLL_S = 1.0  # how often the descendants are noted while the driver lives
GRACE_S = 3.0  # after the driver died: time Ray gets to stop its own processes before the watchdog does

_CODE = r"""
import sys, time
import psutil
from fl.stopping import kill_tree

driver, poll, grace = psutil.Process(int(sys.argv[1])), float(sys.argv[2]), float(sys.argv[3])
me = psutil.Process().pid
noted = {}  # pid -> psutil.Process, which knows its start time: is_running() is False once the pid is reused
try:
    while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
        noted.update({p.pid: p for p in driver.children(recursive=True) if p.pid != me})
        noted = {pid: p for pid, p in noted.items() if p.is_running()}
        time.sleep(poll)
except psutil.NoSuchProcess:
    pass
time.sleep(grace)
kill_tree([p for p in noted.values() if p.is_running()], wait_s=grace)
"""

_watchdog: subprocess.Popen | None = None


def watch_descendants() -> subprocess.Popen:
    """Start (once per process) the watchdog that ends this process's descendants when this process dies."""
    global _watchdog
    if _watchdog is None or _watchdog.poll() is not None:
        _watchdog = subprocess.Popen([sys.executable, "-c", _CODE, str(os.getpid()), str(POLL_S), str(GRACE_S)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, close_fds=True)
    return _watchdog
