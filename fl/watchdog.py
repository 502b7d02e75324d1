"""Nothing a run started outlives it, even a SIGKILLed run.

Ray's local instance is a tree of processes under the driver (GCS, raylet, dashboard, log monitor; the raylet's
agents and workers). Ctrl-C and SIGTERM shut it down (``fl.stopping``); SIGKILL cannot be caught, and then the
raylet's dashboard and runtime-env agents were left running for good (measured: 2 processes, issue 16). So the
driver starts one small watchdog in its own session: while the driver lives, it notes the driver's descendants
(pid and start time, read from ``/proc``) every second; once the driver is gone, it gives Ray a few seconds to
clean up after itself and then ends every noted process still alive (TERM, then KILL). A pid that was reused by
another process meanwhile has another start time and is left alone.

Linux only (``/proc``); elsewhere :func:`watch_descendants` does nothing. Standard library only: the watchdog is
a ``python -c`` child, it must start in a fraction of a second and hold no model, data or Ray state.
"""

from __future__ import annotations

import os
import subprocess
import sys

POLL_S = 1.0  # how often the descendants are noted while the driver lives
GRACE_S = 3.0  # after the driver died: time Ray gets to stop its own processes before the watchdog does

_CODE = r"""
import os, signal, sys, time

driver, poll, grace = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
me = os.getpid()


def stat(pid):
    # (ppid, start time) of a live process, None when gone; /proc/PID/stat: "pid (comm) state ppid ... starttime"
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else (int(fields[1]), fields[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root):
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            info = stat(int(name))
            if info is not None:
                children.setdefault(info[0], []).append((int(name), info[1]))
    found, todo = {}, [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


born = stat(driver)
noted = {}
while born is not None and stat(driver) is not None and stat(driver)[1] == born[1]:
    noted.update(descendants(driver))
    noted = {pid: start for pid, start in noted.items() if (stat(pid) or (0, None))[1] == start}
    time.sleep(poll)
time.sleep(grace)
for sig in (signal.SIGTERM, signal.SIGKILL):
    alive = {pid: start for pid, start in noted.items() if (stat(pid) or (0, None))[1] == start}
    for pid in alive:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    if not alive:
        break
    time.sleep(grace)
"""

_watchdog: subprocess.Popen | None = None


def watch_descendants() -> subprocess.Popen | None:
    """Start (once per process) the watchdog that ends this process's descendants when this process dies."""
    global _watchdog
    if not os.path.isdir("/proc/self"):
        return None
    if _watchdog is None or _watchdog.poll() is not None:
        _watchdog = subprocess.Popen([sys.executable, "-c", _CODE, str(os.getpid()), str(POLL_S), str(GRACE_S)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, close_fds=True)
    return _watchdog
