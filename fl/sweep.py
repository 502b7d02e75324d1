"""``fedprobe sweep``: a grid or list of experiments as MLflow child runs under one parent.

A sweep file::

    [sweep]
    name = "privacy_utility"
    base = "dp_sgd.toml"          # experiment config, relative to this file
    parallel = 1                  # points run at once (each its own process and Ray instance)
    set = { "federation.rounds" = 3 }              # applied to every point
    [sweep.grid]                  # cartesian product over dotted config keys
    "defenses.0.params.noise_multiplier" = [0.5, 1.0, 2.0]
    [[sweep.points]]              # and/or a list of points (crossed with the grid)
    "data.dataset" = "digits"

Each point is the base config plus its overrides, validated up front. A point is
identified by the hash of its resolved config: a rerun skips every point that
already has a FINISHED child run under the sweep's parent run, so a killed sweep
loses no finished point.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl.config import Config, ConfigError, config_from_dict, read_toml, set_dotted
from fl.paths import safe_filename
from fl.stopping import signals_handled_by

SWEEP_KEYS = {"name", "base", "parallel", "set", "grid", "points", "description"}


@dataclass
class Point:
    index: int
    overrides: dict[str, Any]
    config: Config

    @property
    def digest(self) -> str:
        return self.config.digest()

    def label(self) -> str:
        return ", ".join(f"{k.split('.')[-1] if k.count('.') > 1 else k}={v}" for k, v in self.overrides.items()) or "base"


@dataclass
class Sweep:
    name: str
    path: Path
    parallel: int
    swept_keys: list[str]
    points: list[Point]
    digest: str
    experiment: str
    tracking_uri: str


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    raw = read_toml(path)
    spec = raw.get("sweep")
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: missing [sweep] table (with name, base and grid or points)")
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"unknown sweep key 'sweep.{sorted(unknown)[0]}'; allowed keys in [sweep]: {', '.join(sorted(SWEEP_KEYS))}")
    for key, kind, example in (("base", str, 'base = "base.toml"'), ("name", str, 'name = "my_sweep"'),
                               ("set", dict, "[sweep.set] with 'dotted.key' = value"),
                               ("grid", dict, "[sweep.grid] with 'dotted.key' = [values]")):
        if key in spec and not isinstance(spec[key], kind):
            raise ConfigError(f"sweep.{key} must be a {'string' if kind is str else 'table'} ({example}), "
                              f"got {spec[key]!r}")
    if isinstance(spec.get("parallel", 1), bool) or not isinstance(spec.get("parallel", 1), int):
        raise ConfigError(f"sweep.parallel must be an integer >= 1, got {spec['parallel']!r}")
    base_data = read_toml(path.parent / spec["base"]) if spec.get("base") else {}
    base_data.update({k: v for k, v in raw.items() if k != "sweep"})  # inline config sections
    for key, value in (spec.get("set") or {}).items():
        set_dotted(base_data, key, value)
    grid = spec.get("grid") or {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid.'{key}' must be a non-empty list of values")
    listed = spec.get("points") or [{}]
    if not isinstance(listed, list) or not all(isinstance(p, dict) for p in listed):
        raise ConfigError("sweep.points must be an array of tables ([[sweep.points]])")
    parallel = int(spec.get("parallel", 1))
    if parallel < 1:
        raise ConfigError(f"sweep.parallel must be >= 1, got {parallel}")
    points: list[Point] = []
    for combo in itertools.product(*grid.values()) if grid else [()]:
        for extra in listed:
            gridded = {k: v for k, v in zip(grid.keys(), combo) if not any(k.startswith(e + ".") for e in extra)}
            overrides = {**gridded, **extra}  # a listed key replaces the grid keys under it ("defenses" = [])
            data = copy.deepcopy(base_data)
            for key, value in overrides.items():
                set_dotted(data, key, value)
            try:
                cfg = config_from_dict(data)
            except ConfigError as exc:
                raise ConfigError(f"sweep point {overrides}: {exc}") from None
            if any(p.digest == cfg.digest() for p in points):  # e.g. a "no defense" point crossed with noise levels
                continue
            points.append(Point(len(points), overrides, cfg))
    keys = list(grid) + [k for p in listed for k in p if k not in grid]
    swept = list(dict.fromkeys(keys))
    digest = hashlib.sha256(json.dumps([p.digest for p in points]).encode()).hexdigest()[:16]
    first = points[0].config
    return Sweep(name=str(spec.get("name") or path.stem), path=path, parallel=parallel, swept_keys=swept,
                 points=points, digest=digest, experiment=first.tracking.experiment, tracking_uri=first.tracking.uri)


class SweepInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM during a sweep: the running points were stopped and marked KILLED. ``code`` is the
    shell's exit status for the signal (130, 143)."""

    def __init__(self, message: str, code: int = 130) -> None:
        super().__init__(message)
        self.code = code


class _Signalled(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, frame: Any) -> None:
    """While the sweep waits on its points, SIGINT and SIGTERM raise in the main thread (a SIGTERM, a scheduler's
    stop, would otherwise kill the sweep and leave its points and parent RUNNING)."""
    raise _Signalled(signum)


def find_or_create_parent(sweep: Sweep, uri: str) -> Any:
    """The sweep's parent run (matched by sweep name and point set), created on first use."""
    from fl.tracking import Tracker

    tracker = Tracker(uri, sweep.experiment, run_name=f"sweep:{sweep.name}",
                      tags={"fedprobe.sweep": sweep.name, "fedprobe.sweep_digest": sweep.digest,
                            "fedprobe.swept_keys": json.dumps(sweep.swept_keys)},
                      reuse_tags={"fedprobe.sweep_digest": sweep.digest})
    return tracker


def finished_digests(tracker: Any) -> set[str]:
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{tracker.run_id}' and "
                                                    "attributes.status = 'FINISHED'", max_results=10000)
    return {r.data.tags.get("fedprobe.config_digest", "") for r in runs}


RUNNING: set[subprocess.Popen] = set()  # the points' processes, to pass an interrupt on to


def _interrupt_points(timeout_s: float = 15.0) -> None:
    """Ctrl-C reaches the points through the terminal's process group; a signal sent to the sweep alone does
    not. Send each running point SIGINT (it marks its run KILLED and stops its Ray) and wait for it."""
    import signal

    procs = list(RUNNING)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


def mark_stale_children(tracker: Any) -> int:
    """Child runs still RUNNING when the sweep (re)starts belong to a sweep that was killed (it runs its points
    itself): mark them KILLED so that the store and the report show each point's real state."""
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{tracker.run_id}' and "
                                                    "attributes.status = 'RUNNING'", max_results=10000)
    for r in runs:
        tracker.client.set_terminated(r.info.run_id, status="KILLED")
    return len(runs)


def _run_point(point: Point, parent_id: str, uri: str, workdir: Path) -> tuple[Point, int, str]:
    import tomli_w

    cfg_path = workdir / f"point-{point.index:03d}-{point.digest}.toml"
    cfg_path.write_text(tomli_w.dumps(point.config.to_dict()))
    summary = cfg_path.with_suffix(".summary.json")
    log = cfg_path.with_suffix(".log")
    cmd = [sys.executable, "-m", "fl.cli", "run", str(cfg_path), "--tracking-uri", uri, "--parent-run-id", parent_id,
           "--no-progress", "--summary-json", str(summary), "--run-name", f"{point.index:03d} {point.label()}"]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        RUNNING.add(proc)
        try:
            code = proc.wait()
        finally:
            RUNNING.discard(proc)
    tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
    return point, code, tail[0] if tail else ""


def run_sweep(path: str | Path, tracking_uri: str = "", parallel: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run every unfinished point; return {parent_run_id, ran, skipped, failed}."""
    from tqdm.auto import tqdm

    from fl.plugins import check_names
    from fl.tracking import check_reachable, resolve_uri

    sweep = load_sweep(path)
    for p in sweep.points:
        check_names(p.config)
    uri = resolve_uri(tracking_uri or sweep.tracking_uri)
    check_reachable(uri)
    parent = find_or_create_parent(sweep, uri)
    stale = mark_stale_children(parent)
    if stale:
        print(f"fedprobe sweep {sweep.name}: {stale} child run(s) left RUNNING by a killed sweep marked KILLED",
              file=sys.stderr)
    done = finished_digests(parent)
    todo = [p for p in sweep.points if p.digest not in done]
    workdir = Path(sweep.points[0].config.tracking.output_dir) / "sweeps" / safe_filename(
        f"{sweep.name}-{sweep.digest}")
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"fedprobe sweep {sweep.name}: {len(sweep.points)} points, {len(sweep.points) - len(todo)} already finished, "
          f"{len(todo)} to run; parent run {parent.run_id}", file=sys.stderr)
    failed: list[str] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="points", unit="point", disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=parallel or sweep.parallel)
    futures: list[Any] = []
    try:
        with signals_handled_by(_raise_signalled):
            futures = [pool.submit(_run_point, p, parent.run_id, uri, workdir) for p in todo]
            for fut in as_completed(futures):
                point, code, tail = fut.result()
                if code != 0:
                    failed.append(f"point {point.index} ({point.label()}): exit {code}: {tail}")
                    print(f"fedprobe sweep: {failed[-1]}", file=sys.stderr)
                bar.update(1)
    except KeyboardInterrupt as exc:
        code = 128 + exc.signum if isinstance(exc, _Signalled) else 130
        for fut in futures:
            fut.cancel()
        _interrupt_points()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        parent.finish("KILLED")
        raise SweepInterrupted(f"sweep {sweep.name} interrupted; parent run {parent.run_id} KILLED. Rerun "
                               f"'fedprobe sweep {path}' to continue: its finished points are skipped", code) from None
    pool.shutdown(wait=True)
    bar.close()
    parent.log_dict({"sweep": sweep.name, "points": [{"index": p.index, "digest": p.digest, "overrides": p.overrides}
                                                     for p in sweep.points]}, "sweep_points.json")
    status = "FAILED" if failed else "FINISHED"
    parent.finish(status)
    return {"parent_run_id": parent.run_id, "tracking_uri": uri, "points": len(sweep.points),
            "ran": len(todo), "skipped": len(sweep.points) - len(todo), "failed": failed,
            "seconds": time.perf_counter() - t0}
