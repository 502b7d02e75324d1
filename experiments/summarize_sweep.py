"""Mean ± std over seeds of a sweep's child runs, as a markdown table (issue 3, experiment 1).

    python -m experiments.summarize_sweep experiments/ntk_vs_peft.toml [experiments/ntk_vs_peft_central.toml ...]
    python -m experiments.summarize_sweep PARENT_RUN_ID --metric accuracy --out table.md

Each target is a sweep file or a sweep's parent run id (as for ``fedprobe report``). Finished child runs are
grouped by every swept key except ``experiment.seed``; each row gives n (seeds), the final metric's mean and
sample std (ddof 1), min-max, the trainable / total parameter counts (MLflow params
``model.trainable_parameters`` / ``model.total_parameters``) and the clients per run.

``--versus KEY=VALUE`` (issue 17's protocol, ``experiments.protocol``) adds each row's 95 % t-interval and a
Welch test of its values against the reference row's (the group whose KEY is VALUE).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

SEED_KEY = "experiment.seed"


def group_rows(runs: Sequence[dict[str, Any]], keys: Sequence[str], metric: str) -> list[dict[str, Any]]:
    """Group run dicts (``params``, ``metrics``) by ``keys`` and aggregate ``final_<metric>`` over the rest.

    A run dict: ``{"params": {name: str}, "metrics": {name: float}}``. Runs without the metric are counted in
    ``missing``. Returns one row per group, in first-seen order.
    """
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(tuple(run["params"].get(k, "") for k in keys), []).append(run)
    rows = []
    for key, members in groups.items():
        vals = [m["metrics"][f"final_{metric}"] for m in members if f"final_{metric}" in m["metrics"]]
        p = members[0]["params"]
        rows.append({
            "group": dict(zip(keys, key)), "n": len(vals), "missing": len(members) - len(vals),
            "mean": statistics.fmean(vals) if vals else float("nan"),
            "std": statistics.stdev(vals) if len(vals) > 1 else float("nan"),
            "min": min(vals, default=float("nan")), "max": max(vals, default=float("nan")),
            "seeds": sorted(m["params"].get(SEED_KEY, "") for m in members), "values": vals,
            "trainable": _int(p.get("model.trainable_parameters")), "total": _int(p.get("model.total_parameters")),
            "clients": p.get("federation.num_clients", ""),
        })
    return rows


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def fetch_runs(target: str, tracking_uri: str = "") -> tuple[str, str, list[str], list[dict[str, Any]]]:
    """(sweep name, parent run id, swept keys, finished child runs as dicts) for a sweep file or parent id."""
    import json

    from mlflow.tracking import MlflowClient

    from fl.report import _parent_run
    from fl.sweep import load_sweep
    from fl.tracking import resolve_uri

    if not tracking_uri and Path(target).is_file():
        tracking_uri = load_sweep(target).tracking_uri
    client = MlflowClient(resolve_uri(tracking_uri))
    parent, name = _parent_run(client, target)
    swept = json.loads(parent.data.tags.get("fedprobe.swept_keys", "[]"))
    children = client.search_runs([parent.info.experiment_id], max_results=10000,
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                                "attributes.status = 'FINISHED'")
    runs = [{"params": dict(r.data.params), "metrics": dict(r.data.metrics)} for r in children]
    return name, parent.info.run_id, swept, runs


def compare(rows: Sequence[dict[str, Any]], versus: str) -> None:
    """Add ``interval`` (95 % t-interval) and ``p`` (Welch, against the row whose group has KEY = VALUE) to rows."""
    from experiments.protocol import interval, welch

    key, _, value = versus.partition("=")
    ref = [r for r in rows if key in r["group"] and _same(r["group"][key], value)]
    if len(ref) != 1:
        raise SystemExit(f"--versus {versus}: {len(ref)} rows have {key} = {value} (swept keys: "
                         f"{', '.join(rows[0]['group']) if rows else 'none'}); name one row")
    for r in rows:
        r["interval"] = interval(r["values"])[2:] if len(r["values"]) > 1 else (math.nan, math.nan)
        r["p"] = math.nan if r is ref[0] or len(r["values"]) < 2 else welch(r["values"], ref[0]["values"])
    ref[0]["reference"] = True


def _same(a: Any, b: str) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == b


def markdown(title: str, rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str) -> str:
    head = [*(k.split(".")[-1] for k in keys), "clients", f"{metric} mean ± std", "min – max", "n", "trainable params", "% of full"]
    compared = bool(rows) and "p" in rows[0]
    if compared:
        head += ["95 % interval", "Welch p vs reference"]
    total = next((r["total"] for r in rows if r["total"]), None)
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        share = f"{100 * r['trainable'] / r['total']:.1f} %" if r["trainable"] and r["total"] else ""
        cells = [*(str(r["group"][k]) or "''" for k in keys), str(r["clients"]),
                 f"{r['mean']:.3f} ± {r['std']:.3f}", f"{r['min']:.3f} – {r['max']:.3f}",
                 str(r["n"]) + (f" (+{r['missing']} no metric)" if r["missing"] else ""),
                 f"{r['trainable']:,}" if r["trainable"] is not None else "?", share]
        if compared:
            lo, hi = r["interval"]
            cells += [f"[{lo:.4g}, {hi:.4g}]", "reference" if r.get("reference") else f"{r['p']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="+", metavar="SWEEP_OR_PARENT_RUN")
    ap.add_argument("--metric", default="accuracy", help="final metric to aggregate (default accuracy)")
    ap.add_argument("--tracking-uri", default="")
    ap.add_argument("--out", default="", help="also write the tables to this markdown file")
    ap.add_argument("--versus", default="", metavar="KEY=VALUE",
                    help="add 95 %% intervals and a Welch test against the row with this swept value")
    args = ap.parse_args(argv)
    parts = []
    for target in args.targets:
        name, parent_id, swept, runs = fetch_runs(target, args.tracking_uri)
        keys = [k for k in swept if k != SEED_KEY]
        rows = group_rows(runs, keys, args.metric)
        if args.versus:
            compare(rows, args.versus)
        parts.append(markdown(f"{name} (parent run {parent_id}, {len(runs)} finished runs)", rows, keys, args.metric))
    text = "\n".join(parts)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
