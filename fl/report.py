"""``fedprobe report``: privacy-utility curves for a sweep's child runs.

Utility (accuracy, perplexity) against privacy (epsilon, and attack success: the
recovered fraction of images -- per-example PSNR >= attack.recovered_psnr -- rather than
raw PSNR, which saturates at "exact"; token accuracy for text; label accuracy beside
its data-free baseline) as one PNG, a points table as
CSV, and one self-contained HTML page (the PNG embedded), all also logged as
artifacts of the sweep's parent run under ``report/``.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from attacks.metrics import EXACT_PSNR
from fl.paths import safe_filename

UTILITY = ("accuracy", "perplexity")
ATTACK_SUCCESS = ("attack_recovered_fraction", "attack_token_accuracy", "attack_label_accuracy")
BASELINES = {"attack_label_accuracy": "attack_label_baseline"}  # score -> its data-free guess
TAG_COLUMNS = ("fedprobe.dataset", "fedprobe.model", "attack", "defense", "optimizer", "attention", "adapter")


class ReportError(ValueError):
    """No such sweep or parent run, or nothing to report."""


def _parent_run(client: Any, target: str) -> tuple[Any, str]:
    from fl.sweep import load_sweep

    if Path(target).is_file():
        sweep = load_sweep(target)
        exp = client.get_experiment_by_name(sweep.experiment)
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.`fedprobe.sweep_digest` = '{sweep.digest}'",
                                   max_results=1, order_by=["start_time DESC"]) if exp else []
        if not found:
            raise ReportError(f"no parent run for sweep {target} in experiment {sweep.experiment!r}; run "
                              f"'fedprobe sweep {target}' first")
        return found[0], sweep.name
    try:
        run = client.get_run(target)
    except Exception:
        raise ReportError(f"{target!r} is neither a sweep file nor a run id in this tracking store") from None
    return run, run.data.tags.get("fedprobe.sweep", run.info.run_name or target)


def collect_points(client: Any, parent: Any) -> tuple[list[str], list[dict[str, Any]]]:
    swept = json.loads(parent.data.tags.get("fedprobe.swept_keys", "[]"))
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=10000)
    rows = []
    for run in children:
        metrics = {k.removeprefix("final_"): v for k, v in run.data.metrics.items() if k.startswith("final_")}
        if not metrics:  # a run that never finished a round
            metrics = dict(run.data.metrics)
        name = run.info.run_name or ""
        row = {"run_id": run.info.run_id, "name": name.split(" ", 1)[0] if name[:3].isdigit() else name,
               "status": run.info.status}
        row.update({k: run.data.params.get(k, "") for k in swept})
        row.update({k: run.data.tags.get(k, "") for k in TAG_COLUMNS})
        row.update(metrics)
        rows.append(row)
    rows.sort(key=lambda r: r["name"] or "")
    return swept, rows


def _series_key(row: dict[str, Any]) -> str:
    return f"{row.get('fedprobe.model', '')} on {row.get('fedprobe.dataset', '')}, attack {row.get('attack', '')}"


def plot(rows: list[dict[str, Any]], title: str) -> bytes:
    """Per attack score present (PSNR, token accuracy, ...), one row of three panels: utility vs epsilon,
    attack success vs epsilon, utility vs attack success. Series are (model, dataset, attack). PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    utility = next((u for u in UTILITY if any(u in r for r in rows)), None)
    attacks = [a for a in ATTACK_SUCCESS if any(a in r for r in rows)] or [None]
    finite = [r["epsilon"] for r in rows if "epsilon" in r and math.isfinite(r["epsilon"])]
    eps_inf = (max(finite) * 3 if finite else 10.0)  # where "no formal guarantee" points are drawn

    def value(r: dict[str, Any], key: str | None) -> float:
        if key == "epsilon":
            e = r.get("epsilon", math.inf)
            return e if math.isfinite(e) else eps_inf
        return float(r.get(key, math.nan)) if key else math.nan

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "FINISHED":
            groups.setdefault(_series_key(r), []).append(r)
    colors = {label: f"C{i}" for i, label in enumerate(groups)}
    audited = [r for r in rows if r.get("status") == "FINISHED" and "audit_epsilon_lower" in r]
    n_rows = len(attacks) + (1 if audited else 0)
    fig, axes = plt.subplots(n_rows, 3, figsize=(16, 4.4 * n_rows), squeeze=False)
    if audited:
        _plot_bounds(axes[-1], audited, eps_inf)
    for row_axes, attack in zip(axes, attacks):
        members_with = {k: [r for r in v if attack is None or attack in r] for k, v in groups.items()}
        panels = [("epsilon", utility), ("epsilon", attack), (attack, utility)]
        for (x_key, y_key), ax in zip(panels, row_axes):
            if x_key is None or y_key is None:
                ax.text(0.5, 0.5, "no attack score in these runs", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            for label, members in members_with.items():
                pts = sorted((value(r, x_key), value(r, y_key)) for r in members)
                pts = [p for p in pts if not (math.isnan(p[0]) or math.isnan(p[1]))]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, color=colors[label])
                base = BASELINES.get(y_key or "")
                if x_key == "epsilon" and base:
                    bpts = sorted((value(r, x_key), value(r, base)) for r in members)
                    bpts = [p for p in bpts if not (math.isnan(p[0]) or math.isnan(p[1]))]
                    if bpts:
                        ax.plot([p[0] for p in bpts], [p[1] for p in bpts], ls="--", color=colors[label], alpha=0.6,
                                label=f"{label}: data-free label guess")
            if x_key == "epsilon":
                ax.set_xscale("log")
                ax.axvline(eps_inf, color="grey", lw=0.8, ls=":")
                ax.annotate("no DP (ε = ∞)", (eps_inf, 0.02), xycoords=("data", "axes fraction"), rotation=90,
                            va="bottom", ha="right", fontsize=8, color="grey")
                ax.set_xlabel("ε (client-level, max over clients; lower is more private)")
            else:
                ax.set_xlabel(f"{x_key} (attack success; lower is more private)")
            ax.set_ylabel(y_key)
            ax.grid(alpha=0.3)
    handles = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels())}
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(3, len(handles)), fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 / n_rows, 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _plot_bounds(row_axes: Any, rows: list[dict[str, Any]], eps_inf: float) -> None:
    """Audit lower bound and accountant upper bound of each point on one epsilon axis (the diagonal is tight)."""
    ax = row_axes[0]
    for other in row_axes[1:]:
        other.set_axis_off()
    def upper(r: dict[str, Any]) -> float:  # record-level (DP-SGD) or client-level (central DP) accountant
        e = float(r.get("epsilon", r.get("central_epsilon", math.inf)))
        return e if math.isfinite(e) else eps_inf

    pts = sorted((upper(r), r["audit_epsilon_lower"]) for r in rows if "epsilon" in r or "central_epsilon" in r)
    if not pts:
        ax.set_axis_off()
        return
    xs = [p[0] for p in pts]
    ax.vlines(xs, [max(p[1], 1e-3) for p in pts], xs, color="grey", lw=1, alpha=0.6)
    ax.plot(xs, xs, "v", color="C3", label="accountant ε (upper bound)")
    ax.plot(xs, [max(p[1], 1e-3) for p in pts], "^", color="C2", label="audit ε (one-run lower bound, 95 %)")
    lim = (min(min(xs), min(max(p[1], 1e-3) for p in pts)) / 2, eps_inf * 1.5)
    ax.plot(lim, lim, ls=":", color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("accountant ε of the point")
    ax.set_ylabel("ε: upper (accountant) and lower (audit)")
    ax.set_title("how tight is ε? (gap = what the audit cannot confirm)", fontsize=10)
    ax.grid(alpha=0.3)


def _fmt(v: Any, column: str = "") -> str:
    if isinstance(v, float) and "psnr" in column and v >= EXACT_PSNR:
        return f"≥ {EXACT_PSNR:.0f} (exact)"
    if isinstance(v, float):
        return "∞" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def render_html(title: str, parent_id: str, columns: list[str], rows: list[dict[str, Any]], png: bytes) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, ''), c))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    img = base64.b64encode(png).decode()
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }}
th {{ background: #f2f2f2; position: sticky; top: 0; }}
td:nth-child(-n+2) {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
.meta {{ color: #666; font-size: 0.85rem; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="meta">MLflow parent run <code>{html.escape(parent_id)}</code> · {len(rows)} points · generated {now}</p>
<h2>Privacy-utility curves</h2>
<img alt="privacy-utility curves" src="data:image/png;base64,{img}">
<h2>Points</h2>
<div style="overflow-x: auto"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>
</body></html>
"""


def build_report(target: str, out_dir: str | Path = "", tracking_uri: str = "") -> Path:
    from mlflow import MlflowClient

    from fl.tracking import check_reachable, resolve_uri

    if not tracking_uri and Path(target).is_file():
        from fl.sweep import load_sweep

        tracking_uri = load_sweep(target).tracking_uri
    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    parent, name = _parent_run(client, target)
    swept, rows = collect_points(client, parent)
    if not rows:
        raise ReportError(f"parent run {parent.info.run_id} has no child runs to report")
    out = Path(out_dir or Path("fedprobe-output") / "reports" / safe_filename(name, "report"))
    out.mkdir(parents=True, exist_ok=True)
    metric_cols = [c for c in ("accuracy", "perplexity", "test_loss", "epsilon", "epsilon_mean", "audit_epsilon_lower",
                               "central_epsilon", "cp_tau",
                               *ATTACK_SUCCESS) if any(c in r for r in rows)]
    columns = ["name", "status", *swept, *metric_cols, "run_id"]
    png = plot(rows, f"{name}: privacy vs utility")
    (out / "privacy_utility.png").write_bytes(png)
    (out / "report.html").write_text(render_html(f"fedprobe report: {name}", parent.info.run_id, columns, rows, png))
    with (out / "points.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    for f in ("privacy_utility.png", "report.html", "points.csv"):
        client.log_artifact(parent.info.run_id, str(out / f), "report")
    return out
