"""Ctrl-C (SIGINT) and SIGTERM during ``fedprobe run``: stop in seconds, leave nothing behind.

Flower's simulation engine runs the ServerApp in a thread and waits for it, so a bare
KeyboardInterrupt leaves the process alive with Ray's actors dying noisily, and the MLflow run
RUNNING for ever. :class:`StopOnSignal` instead, on the first signal:

1. marks the MLflow run ``KILLED`` (the rounds already logged stay; every completed round is
   also in the checkpoint, written before its metrics, so nothing is lost);
2. stops the private Ray instance and kills what is left of this process's children (Ray's
   dashboard and runtime-env agents outlive ``ray.shutdown`` when the driver dies first);
3. prints how to resume, and exits with 130 (SIGINT) or 143 (SIGTERM), the shell's codes.

A second signal during the clean-up exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable


def descendants() -> list[Any]:
    """Every live process below this one (Ray's GCS, raylet, agents, workers)."""
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def kill_tree(procs: list[Any], grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, for each process still alive."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001
        pass


class StopOnSignal:
    """Context manager around a run: ``on_start`` (give it to ``RunOptions``) learns the MLflow run id."""

    def __init__(self, tracking_uri: str, resume_hint: Callable[[str], str]) -> None:
        self.tracking_uri = tracking_uri
        self.resume_hint = resume_hint
        self.run_id = ""
        self._stopping = False
        self._previous: dict[int, Any] = {}

    def on_start(self, run_id: str) -> None:
        self.run_id = run_id

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        code = 128 + signum
        if self._stopping:
            os._exit(code)
        self._stopping = True
        name = signal.Signals(signum).name
        print(f"\nfedprobe: {name} received: stopping Ray and marking the run KILLED ...", file=sys.stderr, flush=True)
        import logging

        logging.disable(logging.CRITICAL)  # Flower's workers log each actor Ray takes down; Ray warns of its thread
        procs = descendants()  # taken before Ray's own shutdown re-parents its agents to init
        if self.run_id:
            try:
                from mlflow import MlflowClient

                MlflowClient(tracking_uri=self.tracking_uri).set_terminated(self.run_id, status="KILLED")
            except Exception as exc:  # noqa: BLE001  (a tracking outage must not keep Ray alive)
                print(f"fedprobe: could not mark run {self.run_id} KILLED: {exc}", file=sys.stderr)
        stopper = threading.Thread(target=_shutdown_ray, daemon=True)  # it may wait on the interrupted main thread
        stopper.start()
        stopper.join(timeout=5.0)
        kill_tree([p for p in procs if p.is_running()])
        if self.run_id:
            print(f"fedprobe: run {self.run_id} KILLED; completed rounds are checkpointed. Resume with:\n"
                  f"  {self.resume_hint(self.run_id)}", file=sys.stderr, flush=True)
        else:
            print("fedprobe: stopped before the MLflow run started; nothing to resume", file=sys.stderr, flush=True)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)
