"""MLflow tracking: one run per experiment, per-round metrics, artifacts, summaries.

Everything goes through :class:`mlflow.MlflowClient` with an explicit run id, so
logging is safe from the ServerApp thread and from sweep workers alike.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or written."""


def resolve_uri(uri: str) -> str:
    """Empty -> the embedded default store in the working directory (absolute path)."""
    if not uri:
        return f"sqlite:///{Path('mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                out.update(flatten(item, f"{key}.{i}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast (before a run starts) on a tracking URI MLflow cannot use, or a server that does not answer."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise TrackingError(f"tracking URI {uri!r}: MLflow cannot track to {scheme or 'a bare path'!r}; use "
                            "sqlite:///PATH.db (the default), http(s)://HOST:PORT of an MLflow server, file:///DIR, "
                            "or a database URL (postgresql://, mysql://, mssql://)")
    if scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not os.access(folder if folder.exists() else folder.parent, os.W_OK):
            raise TrackingError(f"tracking URI {uri!r}: cannot write in {folder}; pass --tracking-uri "
                                "sqlite:///A/WRITABLE/PATH/mlflow.db")
    if scheme not in ("http", "https"):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s)  # noqa: S310
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({exc}); start it or pass --tracking-uri with a reachable one"
        ) from None


# The runs table's columns when the experiment opens through the URL fedprobe prints (MLflow's shared view
# state: an experiment tag named mlflow.sharedViewState.<key>, loaded by ?viewStateShareKey=<key>).
VIEW_KEY = "fedprobe"
HEADLINE = ("final_accuracy", "final_perplexity", "final_test_loss", "final_epsilon", "final_central_epsilon",
            "final_audit_epsilon_lower", "final_audit_epsilon_lower_gdp", "final_attack_recovered_fraction",
            "final_attack_psnr_median", "final_attack_token_accuracy", "final_attack_label_accuracy",
            "final_attack_label_baseline")
PACKAGES = ("fedprobe", "flwr", "ray", "torch", "transformers", "opacus", "dp-accounting", "peft", "mlflow")


def provenance(description: str) -> tuple[dict[str, str], dict[str, str]]:
    """(run tags, run params) that say what ran: the description MLflow shows on the run page
    (``mlflow.note.content``), the git commit of fedprobe's source when it is a checkout, and versions."""
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": "fedprobe"}
    if description:
        tags["mlflow.note.content"] = description
    src = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    if len(commit) == 40:
        tags["mlflow.source.git.commit"] = commit
        tags["fedprobe.source_dirty"] = "true" if dirty else "false"
    params = {"versions.python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            params[f"versions.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            params[f"versions.{pkg}"] = "not installed"
    return tags, params


def publish_view(client: Any, experiment_id: str, metric_keys: list[str] | tuple[str, ...] = ()) -> None:
    """Make the experiment open as model training (not MLflow 3's GenAI view) and give its runs table
    the headline columns: the final metrics present, then the attack and defense tags."""
    exp = client.get_experiment(experiment_id)
    if "mlflow.experimentKind" not in exp.tags:
        client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    tag = f"mlflow.sharedViewState.{VIEW_KEY}"
    try:
        old = json.loads(exp.tags.get(tag, "{}")).get("selectedColumns", [])
    except ValueError:
        old = []
    present = set(metric_keys)
    new = [f"metrics.`{k}`" for k in HEADLINE if k in present]
    cols = [c for c in ["tags.`attack`", "tags.`defense`", *old, *new] if c]
    cols = list(dict.fromkeys(cols))
    metric_cols = sorted((c for c in cols if c.startswith("metrics.")),
                         key=lambda c: HEADLINE.index(c[9:-1]) if c[9:-1] in HEADLINE else len(HEADLINE))
    state = {"selectedColumns": [c for c in cols if not c.startswith("metrics.")] + metric_cols,
             "orderByKey": "attributes.start_time", "orderByAsc": False, "runsHiddenMode": "SHOW_ALL"}
    if exp.tags.get(tag) != json.dumps(state):
        client.set_experiment_tag(experiment_id, tag, json.dumps(state))


def experiment_url(base: str, experiment_id: str) -> str:
    """Where the experiment opens on its runs table with the headline columns (``mlflow ui`` at ``base``)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


_READY: set[str] = set()


def ensure_store(uri: str) -> None:
    """Create (or migrate) a SQLite store's tables under a file lock, once per process: MLflow's own set-up
    is not safe when several processes open a fresh store at once (a parallel sweep, two terminals), measured:
    3 of 4 processes failed with 'table metrics already exists' or an alembic error."""
    if uri in _READY or not uri.startswith("sqlite:///"):
        return
    import fcntl

    from mlflow import MlflowClient

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # builds MLflow's store: its tables
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    _READY.add(uri)


class Tracker:
    """One MLflow run: params, per-step metrics, tags, artifacts."""

    def __init__(self, uri: str, experiment: str, run_name: str = "", tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None, run_id: str | None = None,
                 reuse_tags: dict[str, str] | None = None) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        import mlflow
        from mlflow import MlflowClient

        self.uri = resolve_uri(uri)
        check_reachable(self.uri)
        ensure_store(self.uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        publish_view(self.client, self.experiment_id)
        if reuse_tags and not run_id:  # reuse the newest run carrying these tags (a sweep's parent)
            found = self.client.search_runs([self.experiment_id], filter_string=" and ".join(
                f"tags.`{k}` = '{v}'" for k, v in reuse_tags.items()), max_results=1, order_by=["start_time DESC"])
            run_id = found[0].info.run_id if found else None
        if run_id:  # resume
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(self.experiment_id, run_name=run_name or None, tags=all_tags)
            self.run_id = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k[:250], v[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        # NaN is logged as NaN (a NaN test loss is news, not noise); MLflow stores +-inf as +-float max
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def has_step(self, key: str, step: int) -> bool:
        """Whether metric ``key`` was already logged at ``step`` (resume repairs a round logged zero times)."""
        return any(m.step == step for m in self.client.get_metric_history(self.run_id, key))

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):  # one write per 100 tags, as log_params
            self.client.log_batch(self.run_id, tags=items[i:i + 100])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_torch_state(self, state: dict[str, Any], artifact_file: str) -> None:
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            torch.save(state, path)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
