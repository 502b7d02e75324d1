"""The ``fedprobe`` command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

EXIT_USAGE = 2
EXIT_FAILED = 1


def _err(msg: str, code: int) -> int:
    print(f"fedprobe: error: {msg}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedprobe",
        description="Federated-learning privacy and optimization testbed: simulate clients training transformers "
                    "under attacks and defenses, tracked in MLflow.",
        epilog="Examples:\n  fedprobe run experiments/quickstart.toml\n"
               "  fedprobe run experiments/quickstart.toml --set federation.rounds=5 --set optimizer.lr=0.003\n"
               "  fedprobe sweep experiments/privacy_utility.toml\n"
               "  fedprobe report experiments/privacy_utility.toml\n"
               "  fedprobe check experiments/quickstart.toml   # validate in seconds, start nothing\n"
               "  fedprobe run experiments/quickstart.toml --dry-run   # full check and the plan, start nothing\n"
               "  fedprobe list",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"fedprobe {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run one federated experiment from a TOML config",
        description="Run one federated experiment (Flower simulation on Ray) and track it in MLflow. "
                    "Shows one progress line per round and ends with a summary naming the MLflow run id.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config sections: [experiment] [federation] [data] [model] [optimizer] [attack] [[defenses]] [tracking]."
               "\nSee experiments/*.toml and the README for every key.",
    )
    run.add_argument("config", metavar="CONFIG.toml", help="experiment config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key (dotted, TOML value), e.g. --set federation.rounds=5; repeatable")
    run.add_argument("--tracking-uri", default="", metavar="URI",
                     help="MLflow tracking URI (default: tracking.uri, else sqlite:///mlflow.db in this folder)")
    run.add_argument("--summary-json", default="", metavar="PATH",
                     help="also write the summary (run_id, tracking_uri, final metrics) as JSON to PATH")
    run.add_argument("--resume", default="", metavar="RUN_ID",
                     help="continue a killed run from its last completed round, into the same MLflow run "
                          "(refused when the config differs from the run's or all its rounds are done)")
    run.add_argument("--resume-extend", action="store_true",
                     help="with --resume: allow more federation.rounds than the run had (to continue a finished run)")
    run.add_argument("--parent-run-id", default="", metavar="RUN_ID",
                     help="log as a child of this MLflow run (what fedprobe sweep does for each point)")
    run.add_argument("--run-name", default="", metavar="NAME", help="MLflow run name (default: experiment.name)")
    run.add_argument("--dry-run", action="store_true",
                     help="check everything run checks before Ray (data loaded, model built), print the resolved "
                          "config and the plan (clients, rounds, victims, defenses, accountant), then exit")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--verbose", action="store_true", help="show Flower's, Ray's and MLflow's own logs and warnings")

    check = sub.add_parser(
        "check", help="validate a config in seconds: keys, values, plugin names and parameters, paths, ids",
        description="Validate a config without starting anything: keys and values, plugin names, plugin parameters "
                    "(constructed without side effects), the data (loaded), the model (checked from its config; "
                    "run --dry-run also builds its weights), attack victims and rounds, output and tracking "
                    "writability, and a --resume id. Prints the plan; exit 0 if it would run, 2 with one line "
                    "naming the problem if not.")
    check.add_argument("config", metavar="CONFIG.toml", help="experiment config file")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, as for run")
    check.add_argument("--tracking-uri", default="", metavar="URI", help="MLflow tracking URI (default as for run)")
    check.add_argument("--resume", default="", metavar="RUN_ID", help="also check that this run can be resumed")
    check.add_argument("--resume-extend", action="store_true", help="as for run")

    sweep = sub.add_parser(
        "sweep", help="run a grid or list of experiments as MLflow child runs (resumable)",
        description="Run every point of a sweep file (a grid or list over config keys) as one MLflow child run under "
                    "a parent run. Rerunning skips points that already finished (matched by a hash of the resolved "
                    "config), so a killed sweep loses no finished point.",
        epilog="See experiments/privacy_utility.toml for the format.")
    sweep.add_argument("sweep", metavar="SWEEP.toml", help="sweep file")
    sweep.add_argument("--tracking-uri", default="", metavar="URI", help="MLflow tracking URI (default as for run)")
    sweep.add_argument("--parallel", type=int, default=0, metavar="N",
                       help="points at once (default: sweep.parallel); each point is its own process and Ray instance")
    sweep.add_argument("--no-report", action="store_true", help="do not build the report when the sweep ends")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")

    report = sub.add_parser(
        "report", help="privacy-utility curves and a table for a sweep, as PNG and one HTML page",
        description="Plot utility (accuracy, perplexity) against privacy (epsilon, attack success) for the child runs "
                    "of a sweep; write PNGs, report.html (self-contained) and points.csv, and log them as artifacts "
                    "of the sweep's parent run.")
    report.add_argument("target", metavar="SWEEP_OR_PARENT_RUN", help="a sweep file or a parent run id")
    report.add_argument("--out", default="", metavar="DIR", help="output folder (default: fedprobe-output/reports/NAME)")
    report.add_argument("--tracking-uri", default="", metavar="URI", help="MLflow tracking URI (default as for run)")

    sub.add_parser("list", help="list every registered dataset, model, attention kernel, optimizer, attack and defense",
                   description="List every registered dataset, model family, attention kernel, optimizer, attack and "
                               "defense, one line each (plugins from entry points included).")
    return p


def cmd_list() -> int:
    from fl.plugins import registries

    for kind, reg in registries().items():
        for name, summary in reg.items():
            print(f"{kind:<10} {name:<22} {summary}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedprobe")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _validate(args: argparse.Namespace, build: bool) -> tuple[object, str, object]:
    """(config, tracking uri, the --resume checkpoint or None) after every check that can run before Ray;
    raises with one line.
    Only the config schema is imported before the config has been read, so a missing file answers at once."""
    from fl.config import load_config

    cfg = load_config(args.config, args.overrides)
    from fl.plugins import preflight
    from fl.tracking import check_reachable, resolve_uri

    preflight(cfg, build=build)
    uri = resolve_uri(args.tracking_uri or cfg.tracking.uri)
    check_reachable(uri)
    ckpt = None
    if args.resume:
        from fl.server_app import check_resume

        ckpt = check_resume(cfg, args.resume, uri, args.resume_extend)  # before Ray and before its status is touched
    return cfg, uri, ckpt


def _usage_errors() -> tuple[type[BaseException], ...]:
    from fl.config import ConfigError
    from fl.registry import RegistryError
    from fl.tracking import TrackingError

    return ConfigError, RegistryError, TrackingError, ValueError


def _print_plan(cfg: object, uri: str, resolved: bool) -> None:
    from fl.plan import plan

    if resolved:
        import tomli_w

        print("# resolved config (defaults filled in; runs as it is with fedprobe run)\n"
              + tomli_w.dumps(cfg.to_dict()) + "\n# plan")
    for line in plan(cfg, uri):
        print(f"  {line}")


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg, uri, _ = _validate(args, build=False)
    except _usage_errors() as exc:
        return _err(str(exc), EXIT_USAGE)
    print(f"{args.config}: OK, it would run as follows (the model is checked from its config; "
          "'fedprobe run --dry-run' also builds it):")
    _print_plan(cfg, uri, resolved=False)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg, uri, ckpt = _validate(args, build=True)
    except _usage_errors() as exc:
        return _err(str(exc), EXIT_USAGE)
    if args.dry_run:
        _print_plan(cfg, uri, resolved=True)
        print(f"dry run: {args.config} passed every check before Ray; nothing was started", file=sys.stderr)
        return 0

    from fl.server_app import RunOptions
    from fl.simulation import RayStartError, SimulationError, simulate

    packed = 0 < cfg.federation.supernodes < cfg.federation.num_clients
    nodes = f" on {cfg.federation.supernodes} SuperNodes" if packed else ""
    print(f"fedprobe: {cfg.experiment.name}: {cfg.federation.num_clients} clients{nodes}, {cfg.federation.rounds} rounds, "
          f"{cfg.model.label()} ({cfg.model.attention} attention) on {cfg.data.dataset}; "
          f"attack={cfg.attack.name}; defenses={[d.name for d in cfg.defenses] or 'none'}", file=sys.stderr)
    from fl.stopping import StopOnSignal

    def resume_hint(run_id: str) -> str:
        sets = "".join(f" --set {shlex.quote(o)}" for o in args.overrides)
        return (f"fedprobe run {shlex.quote(args.config)}{sets} --resume {run_id}"
                + (f" --tracking-uri {shlex.quote(args.tracking_uri)}" if args.tracking_uri else ""))

    stop = StopOnSignal(uri, resume_hint)
    options = RunOptions(tracking_uri=uri, progress=not args.no_progress, resume_run_id=args.resume,
                         resume_extend=args.resume_extend, parent_run_id=args.parent_run_id, run_name=args.run_name,
                         on_start=stop.on_start, resume_checkpoint=ckpt)
    try:
        with stop:
            summary = simulate(cfg, options, verbose=args.verbose)
    except RayStartError as exc:
        return _err(f"run failed: {exc}; nothing was started or logged", EXIT_FAILED)
    except SimulationError as exc:
        cause = exc.__cause__
        code = EXIT_USAGE if isinstance(cause, (ValueError, FileNotFoundError, KeyError)) else EXIT_FAILED
        return _err(f"run failed: {exc} (metrics logged so far are kept in MLflow at {uri})", code)
    _print_summary(summary)
    if args.summary_json:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return 0


def _print_summary(summary: dict) -> None:
    from attacks.metrics import format_psnr

    final = summary["final"]
    keys = [k for k in ("accuracy", "test_loss", "train_loss", "perplexity", "epsilon") if k in final]
    keys += sorted(k for k in final if k.startswith("attack_") and "/" not in k)
    print(f"\nrun {summary['run_id']} {summary['status'].lower()} after {summary['rounds_completed']} rounds "
          f"in {summary['seconds']:.1f} s")
    for k in keys:
        v = final[k]
        shown = format_psnr(v) if "psnr" in k and v == v else f"{v:.4g}"
        print(f"  {k:<24} {shown}")
    from fl.tracking import experiment_url

    print(f"MLflow: {summary['tracking_uri']} (run id {summary['run_id']}); browse with:\n"
          f"  mlflow ui --backend-store-uri {summary['tracking_uri']}\n"
          f"  then open {experiment_url('http://127.0.0.1:5000', summary['experiment_id'])}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from fl.config import ConfigError
    from fl.registry import RegistryError
    from fl.sweep import SweepInterrupted, run_sweep
    from fl.tracking import TrackingError

    try:
        result = run_sweep(args.sweep, args.tracking_uri, args.parallel, progress=not args.no_progress)
    except (ConfigError, RegistryError, TrackingError) as exc:
        return _err(str(exc), EXIT_USAGE)
    except SweepInterrupted as exc:
        print(f"\nfedprobe: {exc}", file=sys.stderr)
        return exc.code
    print(f"sweep: {result['ran']} points run, {result['skipped']} skipped (already finished), "
          f"{len(result['failed'])} failed; parent run {result['parent_run_id']}")
    if not args.no_report:
        args.target, args.out = result["parent_run_id"], ""
        cmd_report(args)
    return EXIT_FAILED if result["failed"] else 0


def cmd_report(args: argparse.Namespace) -> int:
    from fl.config import ConfigError
    from fl.report import ReportError, build_report
    from fl.tracking import TrackingError

    try:
        out = build_report(args.target, args.out, args.tracking_uri)
    except (ConfigError, ReportError, TrackingError) as exc:
        return _err(str(exc), EXIT_USAGE)
    print(f"report: {out / 'report.html'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    import os

    from fl.quiet import environment, quiet

    environment()
    os.environ["FEDPROBE_VERBOSE"] = "1" if getattr(args, "verbose", False) else "0"  # also read by Ray's workers
    if not getattr(args, "verbose", False):
        quiet()
    commands = {"list": lambda: cmd_list(), "run": lambda: cmd_run(args), "check": lambda: cmd_check(args),
                "sweep": lambda: cmd_sweep(args), "report": lambda: cmd_report(args)}
    if args.command not in commands:
        parser.print_help()
        return EXIT_USAGE
    try:
        return commands[args.command]()
    except KeyboardInterrupt:  # before a run started (checks, imports): nothing to stop or mark
        print("\nfedprobe: interrupted before anything started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
