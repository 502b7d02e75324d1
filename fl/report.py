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
PRIMARY = ("attack_recovered_fraction", "attack_token_accuracy")  # the attack-success axis, per series
BASELINES = {"attack_label_accuracy": "attack_label_baseline",  # score -> its data-free guess
             "attack_recovered_fraction": "attack_recovered_baseline"}
TAG_COLUMNS = ("fedprobe.dataset", "fedprobe.model", "attack", "defense", "optimizer", "attention", "adapter")
AXIS = {  # what each number is, with its unit
    "accuracy": "test accuracy (share; higher = more useful)",
    "perplexity": "test perplexity (lower = more useful)",
    "attack_recovered_fraction": "images recovered (share at PSNR ≥ {psnr:g} dB)",
    "attack_token_accuracy": "tokens recovered (share of positions)",
    "attack_label_accuracy": "labels recovered (share of the batch)",
}
SHORT = {"noise_multiplier": "σ", "max_grad_norm": "C", "clip": "C", "target_epsilon": "ε target", "fraction": "keep"}


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
    """(swept keys, one row per sweep point). A point run more than once (a killed and rerun sweep) is
    reported once: its newest FINISHED run, else its newest run."""
    swept = json.loads(parent.data.tags.get("fedprobe.swept_keys", "[]"))
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=10000,
                                  order_by=["start_time DESC"])
    by_point: dict[str, Any] = {}
    for run in children:  # newest first
        key = run.data.tags.get("fedprobe.config_digest") or run.info.run_id
        kept = by_point.get(key)
        if kept is None or (kept.info.status != "FINISHED" and run.info.status == "FINISHED"):
            by_point[key] = run
    rows = []
    for run in by_point.values():
        metrics = {k.removeprefix("final_"): v for k, v in run.data.metrics.items() if k.startswith("final_")}
        if not metrics:  # a run that never finished a round
            metrics = dict(run.data.metrics)
        name = run.info.run_name or ""
        row = {"run_id": run.info.run_id, "name": name.split(" ", 1)[0] if name[:3].isdigit() else name,
               "status": run.info.status}
        row.update({k: run.data.params.get(k, "") for k in swept})
        row.update({k: run.data.tags.get(k, "") for k in TAG_COLUMNS})
        row["recovered_psnr"] = float(run.data.params.get("attack.recovered_psnr", 30) or 30)
        row.update(metrics)
        if row.get("defense") == "none" and "epsilon" not in row:
            row["epsilon"] = math.inf  # no defense: no formal guarantee
        rows.append(row)
    rows.sort(key=lambda r: r["name"] or "")
    return swept, rows


def _series_key(row: dict[str, Any]) -> str:
    return f"{row.get('fedprobe.model', '')} on {row.get('fedprobe.dataset', '')}, attack {row.get('attack', '')}"


def _number(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def setting(row: dict[str, Any], swept: list[str]) -> str:
    """The point's defense setting in a few characters: the swept values that vary, e.g. ``noise_multiplier=0.1``."""
    if row.get("defense") == "none":
        return "no defense"
    parts = [f"{SHORT.get(k.rsplit('.', 1)[-1], k.rsplit('.', 1)[-1])}={row[k]}" for k in swept
             if row.get(k) not in ("", None) and not k.startswith(("data.", "model.", "attack.")) and k != "defenses"]
    return ", ".join(parts) or str(row.get("defense", ""))


def _order(row: dict[str, Any], swept: list[str]) -> tuple:
    """Sort key along the swept parameter (numbers as numbers), so curves join neighbouring settings."""
    key = []
    for k in swept:
        n = _number(row.get(k))
        key.append((0, n, "") if n is not None else (1, 0.0, str(row.get(k, ""))))
    return tuple(key)


def plot(rows: list[dict[str, Any]], title: str, swept: list[str] | None = None) -> bytes:
    """The figure of :func:`figure` as PNG bytes."""
    import matplotlib.pyplot as plt

    fig = figure(rows, title, swept)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def figure(rows: list[dict[str, Any]], title: str, swept: list[str] | None = None) -> Any:
    """One panel per question: utility vs epsilon, attack success vs epsilon, utility vs attack success
    (a second row for label inference and audit bounds when the runs have them). Series are (model, dataset,
    attack); points are labelled by their defense setting and joined in the order of the swept parameter;
    the no-defense point (epsilon = inf) is a separate star. Dashed lines are the data-free guess."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = swept or []
    done = [r for r in rows if r.get("status") == "FINISHED"]
    finite = [r["epsilon"] for r in done if isinstance(r.get("epsilon"), float) and math.isfinite(r["epsilon"])]
    eps_inf = max(finite) * 10 if finite else 10.0  # where the epsilon = inf points are drawn

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(done, key=lambda r: _order(r, swept)):
        groups.setdefault(_series_key(r), []).append(r)
    colors = {label: f"C{i}" for i, label in enumerate(groups)}
    labels_present = any("attack_label_accuracy" in r for r in done)
    audited = [r for r in done if "audit_epsilon_lower" in r]
    second = labels_present or bool(audited)
    fig, axes = plt.subplots(2 if second else 1, 3, figsize=(17, 5.2 * (2 if second else 1)), squeeze=False)
    psnr = next((r["recovered_psnr"] for r in done if "recovered_psnr" in r), 30.0)

    def eps(r: dict[str, Any]) -> float:
        e = _number(r.get("epsilon"))
        return eps_inf if e is None or not math.isfinite(e) else e

    def primary(members: list[dict[str, Any]]) -> str | None:
        return next((a for a in PRIMARY if any(a in r for r in members)), None)

    def utility(members: list[dict[str, Any]]) -> str | None:
        return next((u for u in UTILITY if any(u in r for r in members)), None)

    def draw(ax: Any, label: str, members: list[dict[str, Any]], fx: Any, fy: Any) -> None:
        pts = [(fx(r), fy(r), r) for r in members]
        pts = [p for p in pts if p[0] is not None and p[1] is not None and not (math.isnan(p[0]) or math.isnan(p[1]))]
        dp = [p for p in pts if p[2].get("defense") != "none"]
        nodef = [p for p in pts if p[2].get("defense") == "none"]
        if dp:
            ax.plot([p[0] for p in dp], [p[1] for p in dp], marker="o", color=colors[label], label=label)
        for x, y, _ in nodef:
            ax.plot([x], [y], marker="*", ms=14, ls="", color=colors[label], markeredgecolor="k")
        for x, y, r in pts:
            ax.annotate(setting(r, swept), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7.5,
                        color=colors[label])

    def eps_axis(ax: Any) -> None:
        ax.set_xscale("log")
        ax.axvline(eps_inf, color="grey", lw=0.8, ls=":")
        ticks = [t for t in ax.get_xticks() if t < eps_inf / 3]
        ax.set_xticks(ticks + [eps_inf], [f"$10^{{{math.log10(t):.0f}}}$" if t > 0 else "0" for t in ticks] + ["∞"])
        lo = min(finite) / 3 if finite else 1.0
        ax.set_xlim(lo, eps_inf * 2)
        ax.set_xlabel("ε (record-level, max over clients; lower = more private)")

    ax_u, ax_a, ax_ua = axes[0]
    for label, members in groups.items():
        u, a = utility(members), primary(members)
        if u:
            draw(ax_u, label, members, eps, lambda r, u=u: _number(r.get(u)))
        if a:
            draw(ax_a, label, members, eps, lambda r, a=a: _number(r.get(a)))
            base = BASELINES.get(a)
            vals = [_number(r.get(base)) for r in members if base and base in r]
            if vals:
                ax_a.axhline(max(vals), ls="--", color=colors[label], alpha=0.6, label=f"{label}: data-free guess")
        if u and a:
            draw(ax_ua, label, members, lambda r, a=a: _number(r.get(a)), lambda r, u=u: _number(r.get(u)))
    u_all, a_all = utility(done), primary(done)
    ax_u.set_title("What does the defense cost? (utility vs ε)", fontsize=11)
    ax_a.set_title("What does it buy? (attack success vs ε)", fontsize=11)
    ax_ua.set_title("The trade-off (utility vs attack success)", fontsize=11)
    for ax in (ax_u, ax_a):
        eps_axis(ax)
    ax_u.set_ylabel(AXIS.get(u_all or "", u_all or "utility"))
    kinds = {primary(m) for m in groups.values()} - {None}
    ax_a.set_ylabel(AXIS[kinds.pop()].format(psnr=psnr) if len(kinds) == 1 else
                    "attack success (share recovered:\nimages at PSNR ≥ %g dB, or tokens)" % psnr)
    ax_ua.set_xlabel(ax_a.get_ylabel())
    ax_ua.set_ylabel(ax_u.get_ylabel())
    if a_all is None:
        for ax in (ax_a, ax_ua):
            ax.cla()
            ax.text(0.5, 0.5, "no attack score in these runs", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
    if second:
        ax_l, ax_b, ax_x = axes[1]
        ax_x.set_axis_off()
        if labels_present:
            for label, members in groups.items():
                if any("attack_label_accuracy" in r for r in members):
                    draw(ax_l, label, members, eps, lambda r: _number(r.get("attack_label_accuracy")))
                    vals = [_number(r.get("attack_label_baseline")) for r in members if "attack_label_baseline" in r]
                    if vals:
                        ax_l.axhline(max(vals), ls="--", color=colors[label], alpha=0.6,
                                     label=f"{label}: data-free guess")
            eps_axis(ax_l)
            ax_l.set_ylabel(AXIS["attack_label_accuracy"])
            ax_l.set_title("Label inference vs ε (dashed: the best guess from the label prior)", fontsize=11)
        else:
            ax_l.set_axis_off()
        if audited:
            _plot_bounds(axes[1][1:], audited, eps_inf)
        else:
            ax_b.set_axis_off()
    for ax in axes.flat:
        if ax.axison:
            ax.grid(alpha=0.3)
    handles = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels())}
    if any(r.get("defense") == "none" for r in done):
        from matplotlib.lines import Line2D

        handles["no defense (ε = ∞)"] = Line2D([], [], marker="*", ms=14, ls="", color="lightgrey",
                                               markeredgecolor="k")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(3, len(handles)), fontsize=9)
    fig.suptitle(title)
    n_rows = 2 if second else 1
    fig.tight_layout(rect=(0, 0.09 / n_rows, 1, 0.96))
    return fig


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
    gdp = [(upper(r), r["audit_epsilon_lower_gdp"]) for r in rows
           if "audit_epsilon_lower_gdp" in r and ("epsilon" in r or "central_epsilon" in r)]
    if gdp:
        ax.plot([p[0] for p in gdp], [max(p[1], 1e-3) for p in gdp], "2", color="C4", ms=11,
                label="audit ε, f-DP bound (Gaussian hypothesis, 95 %)")
    lim = (min(min(xs), min(max(p[1], 1e-3) for p in pts)) / 2, eps_inf * 1.5)
    ax.plot(lim, lim, ls=":", color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("accountant ε of the point")
    ax.set_ylabel("ε: upper (accountant) and lower (audit)")
    ax.set_title("how tight is ε? (gap = what the audit cannot confirm)", fontsize=10)
    ax.grid(alpha=0.3)


HEADERS = {  # column -> (header, unit or meaning)
    "accuracy": ("accuracy", "share"), "perplexity": ("perplexity", ""), "test_loss": ("test loss", ""),
    "epsilon": ("ε", "record-level, max over clients"), "epsilon_mean": ("ε mean", "over clients"),
    "audit_epsilon_lower": ("ε audit", "lower bound"),
    "audit_epsilon_lower_gdp": ("ε audit f-DP", "lower bound if Gaussian"),
    "audit_epsilon_estimate": ("ε audit estimate", "Gaussian fit, no bound"),
    "central_epsilon": ("ε central", "client-level"),
    "attack_recovered_fraction": ("images recovered", "share ≥ PSNR threshold"),
    "attack_recovered_baseline": ("guess recovers", "data-free"),
    "attack_psnr_median": ("PSNR median", "dB"), "attack_token_accuracy": ("tokens recovered", "share"),
    "attack_label_accuracy": ("labels recovered", "share"), "attack_label_baseline": ("label guess", "data-free"),
    "run_id": ("run", "MLflow id"),
}


def _fmt(v: Any, column: str = "", row: dict[str, Any] | None = None) -> str:
    if column == "epsilon" and isinstance(v, float) and math.isinf(v):
        return "∞ (no defense)" if (row or {}).get("defense") == "none" else "∞"
    if column == "run_id" and isinstance(v, str):
        return v[:8]
    if isinstance(v, float) and "psnr" in column and v >= EXACT_PSNR:
        return f"≥ {EXACT_PSNR:.0f} (exact)"
    if isinstance(v, float):
        return "∞" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def _header(c: str) -> str:
    name, unit = HEADERS.get(c, (c.rsplit(".", 1)[-1], ""))
    title = html.escape(c)
    return f'<th title="{title}">{html.escape(name)}' + (f"<br><small>{html.escape(unit)}</small>" if unit else "") \
        + "</th>"


def render_html(title: str, parent_id: str, columns: list[str], rows: list[dict[str, Any]], png: bytes,
                notes: list[str] | None = None) -> str:
    head = "".join(_header(c) for c in columns)
    body = "".join("<tr>" + "".join(f'<td title="{html.escape(str(r.get(c, "")))}">'
                                    f"{html.escape(_fmt(r.get(c, ''), c, r))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    img = base64.b64encode(png).decode()
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes or [])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 1800px; }}
table {{ border-collapse: collapse; font-size: 0.8rem; width: 100%; table-layout: auto; }}
th, td {{ border: 1px solid #ccc; padding: 0.2rem 0.4rem; text-align: right; }}
th {{ background: #f2f2f2; position: sticky; top: 0; font-weight: 600; vertical-align: bottom; }}
th small {{ font-weight: 400; color: #666; }}
td:nth-child(-n+3) {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
.meta, ul {{ color: #555; font-size: 0.85rem; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="meta">MLflow parent run <code>{html.escape(parent_id)}</code> · {len(rows)} points · generated {now}</p>
<h2>Privacy-utility curves</h2>
<img alt="privacy-utility curves" src="data:image/png;base64,{img}">
<ul>{items}</ul>
<h2>Points</h2>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
</body></html>
"""


NOTES = [
    "Points are labelled by their defense setting and joined in the order of the swept parameter; the star is the "
    "same task with no defense (ε = ∞).",
    "Dashed lines: what a data-free guess scores (the server's mean test image for images, its label prior for "
    "labels). An attack score at or below its dashed line shows no leakage beyond the guess.",
    "An image counts as recovered at a per-example PSNR at or above the run's attack.recovered_psnr; PSNR above "
    "80 dB is shown as exact.",
    "A point run more than once (a killed and rerun sweep) is shown once: its newest finished run.",
]


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
    metric_cols = [c for c in ("accuracy", "perplexity", "test_loss", "epsilon", "audit_epsilon_lower",
                               "audit_epsilon_lower_gdp", "audit_epsilon_estimate", "central_epsilon",
                               "attack_recovered_fraction", "attack_recovered_baseline",
                               "attack_psnr_median", "attack_token_accuracy", "attack_label_accuracy",
                               "attack_label_baseline") if any(c in r for r in rows)]
    for r in rows:
        r["setting"] = setting(r, swept)
        r["series"] = _series_key(r)
    columns = ["name", "series", "setting", "status", *metric_cols, "run_id"]
    png = plot(rows, f"{name}: privacy vs utility", swept)
    (out / "privacy_utility.png").write_bytes(png)
    (out / "report.html").write_text(render_html(f"fedprobe report: {name}", parent.info.run_id, columns, rows, png,
                                                 NOTES))
    with (out / "points.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    for f in ("privacy_utility.png", "report.html", "points.csv"):
        client.log_artifact(parent.info.run_id, str(out / f), "report")
    return out
