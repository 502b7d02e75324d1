"""Run one experiment on Flower's simulation engine (Ray backend), in-process.

``fedprobe run`` calls :func:`simulate`. It drives Flower's simulation runtime
(``flwr.simulation.run_simulation._run_simulation``, the function Flower's own
``flwr run`` -> ``flwr-simulation`` process calls) directly, not the deprecated
``run_simulation`` / ``start_simulation`` wrappers, so the ServerApp runs in a
thread of this process and the ClientApps in Ray actors with the client
resources of ``[federation]``. ``flwr run .`` works as well (pyproject's
``[tool.flwr.app]``).

The clients' secret (:mod:`defenses.randomness`, the key of every DP noise draw) reaches
the client processes through the environment Ray's workers inherit (Flower fixes Ray's
``runtime_env``): it is set in this process only while the simulation runs, and is never in
the config, a Flower message or a log; no server-side code reads it. Unless ``FEDPROBE_CLIENT_SECRET`` is set by
the user, each run gets a fresh one, kept (mode 0600) in
``<output_dir>/client-secrets/<run_id>.key`` so that ``--resume`` continues with the same.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from defenses.randomness import SECRET_ENV, new_secret
from fl.config import Config
from fl.quiet import environment
from fl.server_app import RunOptions, run_federation

environment()


class SimulationError(RuntimeError):
    """The federated run failed; the message says why (the MLflow run keeps what was logged)."""


def _secret_path(cfg: Config, run_id: str) -> Path:
    return Path(cfg.tracking.output_dir) / "client-secrets" / f"{run_id}.key"


def client_secret_for(cfg: Config, options: RunOptions) -> tuple[str, bool]:
    """(secret, chosen by the user): the user's ``FEDPROBE_CLIENT_SECRET``, the resumed run's, or a fresh one."""
    user = os.environ.get(SECRET_ENV, "")
    if user:
        return user, True
    if options.resume_run_id:
        path = _secret_path(cfg, options.resume_run_id)
        if path.is_file():
            return path.read_text().strip(), False
    return new_secret(), False


def _keep_secret(cfg: Config, secret: str) -> Any:
    def keep(run_id: str) -> None:
        path = _secret_path(cfg, run_id)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
    return keep


def local_init_args(num_cpus: int | None = None) -> dict[str, Any]:
    """``ray.init`` arguments of a private local instance: address "local" even when `ray start` left a cluster on
    this machine (or RAY_ADDRESS is set), so a simulation never attaches to, or is slowed by, somebody else's Ray."""
    return {"address": "local", "num_cpus": num_cpus or os.cpu_count() or 1, "logging_level": "ERROR",
            "log_to_driver": True}


def backend_config(cfg: Config) -> dict[str, Any]:
    fed = cfg.federation
    init_args = local_init_args()
    if fed.ray_address:  # join an existing cluster: its resources are the cluster's, not this machine's
        init_args = {"address": fed.ray_address, "logging_level": "ERROR", "log_to_driver": True}
    elif fed.client_gpus > 0:
        import torch

        # the ServerApp (and its attack) is not a Ray task: withhold its GPU share from the clients' pool
        init_args["num_gpus"] = max(0.0, torch.cuda.device_count() - cfg.attack.gpu_share)
    return {"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": fed.client_gpus}, "init_args": init_args}


class RayStartError(SimulationError):
    """Ray did not start (or join its cluster): nothing ran, nothing was logged."""


def start_ray(init_args: dict[str, Any]) -> None:
    """``ray.init`` as Flower's ``RayBackend.init_ray`` calls it (which then finds Ray running and skips its own), but
    here, where a failure becomes one :class:`RayStartError` line before any thread or MLflow run exists; left to
    Flower, the same failure printed three chained tracebacks and the process lingered on for minutes (issue 16)."""
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)  # Ray's workers inherit the environment, not this sys.path (as Flower)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    if init_args.get("address") == "local":  # this process's own Ray: ended with it, even when it is SIGKILLed
        from fl.watchdog import watch_descendants

        watch_descendants()
    try:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **{"include_dashboard": False, **init_args})
    except Exception as exc:
        ray.shutdown()  # whatever half-started
        where = f"the cluster at {init_args['address']!r}" if init_args.get("address") != "local" else "locally"
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise RayStartError(f"Ray did not start {where}: {type(exc).__name__}: {detail} (Ray's logs: "
                            f"{os.environ.get('RAY_TMPDIR', '/tmp')}/ray/session_latest/logs; `ray stop --force` "
                            "clears a stale local instance)") from exc


def run_apps(server_app: Any, client_app: Any, num_clients: int, backend: dict[str, Any], verbose: bool = False,
             run_config: dict[str, Any] | None = None) -> None:
    """Run a ServerApp (in a thread of this process) against ``num_clients`` simulated ClientApps on Ray.
    ``run_config`` is the ServerApp's ``context.run_config`` (what ``flwr run`` reads from pyproject.toml)."""
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    if not verbose:  # Flower's per-round INFO lines and MLflow's table-migration notes drown the progress bar
        from fl.quiet import quiet

        quiet()
        logging.getLogger("flwr").setLevel(logging.WARNING)
    start_ray(backend.get("init_args", {}))
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config or {}))
    _run_simulation(num_supernodes=num_clients, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    client_app=client_app, server_app=server_app, backend_name="ray", backend_config=backend,
                    server_app_context=context, verbose_logging=verbose)


def serve(main: Callable[[Any, Any], Any], client_app: Any, num_clients: int, backend: dict[str, Any],
          verbose: bool = False, run_config: dict[str, Any] | None = None) -> Any:
    """Run ``main(grid, context)`` as the ServerApp against ``num_clients`` simulated ClientApps and return its
    result. A failure inside ``main`` is raised here as :class:`SimulationError` (one line, not a thread
    traceback); so is a simulation that ended without running it to the end."""
    from flwr.serverapp import ServerApp

    holder: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Any, context: Any) -> None:
        try:
            holder["result"] = main(grid, context)
        except BaseException as exc:  # reported by the caller, not as a thread traceback
            holder["error"] = exc

    run_apps(server_app, client_app, num_clients, backend, verbose, run_config)
    if "error" in holder:
        exc = holder["error"]
        raise SimulationError(f"{type(exc).__name__}: {exc}") from exc
    if "result" not in holder:
        raise SimulationError("the simulation ended without a result (see the log above)")
    return holder["result"]


def simulate(cfg: Config, options: RunOptions | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run ``cfg`` as a Flower simulation; return the summary (see ``run_federation``)."""
    from fl.client_app import app as client_app

    options = options or RunOptions()
    secret, by_user = client_secret_for(cfg, options)
    if not by_user:
        previous = options.on_start

        def on_start(run_id: str) -> None:
            _keep_secret(cfg, secret)(run_id)
            if previous is not None:
                previous(run_id)

        options.on_start = on_start
    previous_secret = os.environ.get(SECRET_ENV)
    os.environ[SECRET_ENV] = secret  # inherited by Ray's worker processes (the clients)
    os.environ["FEDPROBE_VERBOSE"] = "1" if verbose else "0"  # the clients' log level (fl.client_app)
    try:
        return serve(lambda grid, context: run_federation(grid, cfg, options), client_app,
                     cfg.federation.supernodes or cfg.federation.num_clients, backend_config(cfg), verbose)
    finally:
        if previous_secret is None:
            os.environ.pop(SECRET_ENV, None)
        else:
            os.environ[SECRET_ENV] = previous_secret
