"""Ctrl-C (SIGINT) and SIGTERM during ``fedprobe run``: stop in seconds, leave nothing behind.

Flower's simulation engine runs the ServerApp in a thread and waits for it, so a bare
KeyboardInterrupt leaves the process alive with Ray's actors dying noisily, and the MLflow run
RUNNING for ever. :class:`StopOnSignal` instead, on the first signal:

1. lists every process below this one (the private Ray instance) before any is touched (Ray's
   agents outlive their raylet, re-parented to init, and would be missed);
2. marks the MLflow run ``KILLED`` (the rounds already logged stay; every completed round is
   also in the checkpoint, written before its metrics, so nothing is lost) and prints how to
   resume, while Ray still runs (``requested`` makes an ending the server thread reaches
   meanwhile say KILLED too);
3. SIGKILLs the processes listed in step 1 and exits at once with 130 (SIGINT) or 143
   (SIGTERM), the shell's codes, without waiting for them to be gone.

Nothing slow may come between the kill and the exit: once the raylet is dead, the next
``ray.wait`` of one of Flower's worker threads fails, and Ray's C++ then ends the whole process
with status 1 ("Exiting because the Raylet IPC connection failed and the local Raylet is dead").
Marking MLflow after the kill lost that race in CI (exit 1, no resume line). SIGKILL needs no
wait: the kernel ends each process within milliseconds, whether or not its parent is still there.

``ray.shutdown()`` is not called: Flower's worker threads poll ``ray.wait`` and, once the core
worker is shut down, the next poll makes Ray's C++ end the process with status 1 (seen in CI:
"The core worker has already been shutdown ... The process will exit"), losing the exit code
and the resume line. Killing the processes leaves the driver's core worker in place, and the
process ends by ``os._exit`` before any thread notices.

A second signal during the clean-up exits at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator


requested = threading.Event()  # set on the first signal: a run's own ending then records KILLED, never FAILED


@contextlib.contextmanager
def signals_handled_by(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM inside the block, the previous handlers restored after. Installed
    explicitly, so a process started as a background job of a shell without job control (which inherits SIGINT
    ignored) still answers Ctrl-C; in the main thread only, where Python's signal handlers live (elsewhere the
    block runs with nothing changed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def descendants() -> list[Any]:
    """Every live process below this one (Ray's GCS, raylet, agents, workers)."""
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def kill_tree(procs: list[Any], wait_s: float = 3.0) -> None:
    """SIGKILL each process still alive, all at once (no process gets to notice another's end and
    act on it), and wait up to ``wait_s`` for them to be gone (``0``: not at all)."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    if wait_s > 0:
        psutil.wait_procs(procs, timeout=wait_s)


class StopOnSignal:
    """Context manager around a run: ``on_start`` (give it to ``RunOptions``) learns the MLflow run id."""

    def __init__(self, tracking_uri: str, resume_hint: Callable[[str], str]) -> None:
        self.tracking_uri = tracking_uri
        self.resume_hint = resume_hint
        self.run_id = ""
        self._stopping = False
        self._handled = signals_handled_by(self._handle)

    def on_start(self, run_id: str) -> None:
        self.run_id = run_id

    def __enter__(self) -> "StopOnSignal":
        self._handled.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handled.__exit__(*exc)

    def _handle(self, signum: int, frame: Any) -> None:
        code = 128 + signum
        if self._stopping:
            os._exit(code)
        self._stopping = True
        requested.set()
        name = signal.Signals(signum).name
        print(f"\nfedprobe: {name} received: stopping Ray and marking the run KILLED ...", file=sys.stderr, flush=True)
        import logging

        logging.disable(logging.CRITICAL)  # Flower's workers log each actor Ray takes down; Ray warns of its thread
        threading.excepthook = lambda args: None  # nor may a thread that sees Ray go print over the lines below
        procs = descendants()  # listed before any dies: Ray's agents outlive their raylet, re-parented to init
        if self.run_id:  # before the kill: after it, Ray's C++ may end this process with status 1 at any moment
            try:
                from mlflow import MlflowClient

                MlflowClient(tracking_uri=self.tracking_uri).set_terminated(self.run_id, status="KILLED")
            except Exception as exc:  # noqa: BLE001
                print(f"fedprobe: could not mark run {self.run_id} KILLED: {exc}", file=sys.stderr)
            print(f"fedprobe: run {self.run_id} KILLED; completed rounds are checkpointed. Resume with:\n"
                  f"  {self.resume_hint(self.run_id)}", file=sys.stderr, flush=True)
        else:
            print("fedprobe: stopped before the MLflow run started; nothing to resume", file=sys.stderr, flush=True)
        sys.stderr.flush()
        sys.stdout.flush()
        kill_tree(procs, wait_s=0.0)  # SIGKILL all, then out at once: nothing may come between (module docstring)
        os._exit(code)
