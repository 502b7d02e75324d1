"""Issue 14's table: the audit's epsilon lower bound beside the accountants' upper bounds, per noise level.

Usage: .venv/bin/python benchmarks/bench_audit.py [--noise 0 0.6 1.2 2.4 4.8] [--secrets 3]
                                               [--config experiments/audit_dp_sgd.toml] [--json out.json]

Each row runs the real federation of ``experiments/audit_dp_sgd.toml`` (tiny ViT on digits, 16 clients,
full-batch DP-SGD, 1 local step, 4 rounds, 50 000 gradient canaries in client 0) through ``fl.simulation``
with ``dp_sgd.noise_multiplier`` set to the row's sigma (or, with ``--config experiments/audit_update_noise.toml``,
``update_noise``'s, audited by canary clients), once per client secret (``FEDPROBE_CLIENT_SECRET``
= ``bench-<i>``: the secrets decide the canaries' inclusion and the DP noise, everything else is seeded).
Beside each run: the accountants' epsilon for the same history (RDP as the run reports it, and PLD,
the tightest), and the *idealised ceiling* of the one-run bound: the same m canaries, guesses and
Bonferroni grid on a simulated Gaussian mechanism with the same sigma and rounds and no data gradients
(numpy, 20 draws, median) -- what this audit could reach if the model's own gradients added no noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from defenses.accounting import epsilon  # noqa: E402
from defenses.audit_bound import best_guess_bound, gdp_guess_bound  # noqa: E402
from defenses.randomness import SECRET_ENV  # noqa: E402
from fl.config import config_from_dict, load_config  # noqa: E402
from fl.server_app import RunOptions  # noqa: E402
from fl.simulation import simulate  # noqa: E402


AUDITED = ("dp_sgd", "update_noise")  # the defense whose noise_multiplier a row sets


def ideal_ceiling(sigma: float, rounds: int, m: int, delta: float, draws: int = 20) -> tuple[float, float]:
    """Median one-run bounds (Steinke et al., f-DP) on the pure Gaussian mechanism (canary signal 1 per round,
    noise sigma per round)."""
    steinke, gdp = [], []
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        b = rng.random(m) < 0.5
        s = b * rounds + rng.normal(0, sigma * np.sqrt(rounds), m) if sigma > 0 else b * 1.0
        steinke.append(best_guess_bound(s, b, delta)["epsilon_lower"])
        gdp.append(gdp_guess_bound(s, b, delta)["epsilon_lower_gdp"])
    return float(statistics.median(steinke)), float(statistics.median(gdp))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="experiments/audit_dp_sgd.toml")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.6, 1.2, 2.4, 4.8])
    ap.add_argument("--secrets", type=int, default=3, help="runs per noise level (client secrets bench-0..)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    base = load_config(args.config).to_dict()
    rows = []
    out_dir = Path("/tmp/fedprobe-bench-audit")
    for sigma in args.noise:
        for i in range(args.secrets):
            d = json.loads(json.dumps(base))
            dp = next(x for x in d["defenses"] if x["name"] in AUDITED)
            dp["params"]["noise_multiplier"] = sigma
            d["tracking"].update(uri=f"sqlite:///{out_dir / 'mlflow.db'}", output_dir=str(out_dir), log_model=False)
            cfg = config_from_dict(d)
            os.environ[SECRET_ENV] = f"bench-{i}"
            t0 = time.perf_counter()
            final = simulate(cfg, RunOptions(progress=False))["final"]
            rows.append({"sigma": sigma, "secret": i, "seconds": time.perf_counter() - t0,
                         **{k: final.get(k) for k in ("epsilon", "audit_epsilon_lower", "audit_guesses",
                                                      "audit_correct", "audit_canaries", "audit_epsilon_lower_gdp",
                                                      "audit_gdp_guesses", "audit_gdp_correct", "audit_epsilon_estimate",
                                                      "accuracy")}})
            print(json.dumps(rows[-1]), flush=True)
    rounds = base["federation"]["rounds"]
    audited = next(x for x in base["defenses"] if x["name"] in AUDITED)
    delta = audited["params"].get("delta", 1e-5)
    # the accounted noise multiplier per unit of sensitivity: update_noise's "replace" adjacency has sensitivity 2C
    per_unit = 2.0 if audited["name"] == "update_noise" and audited["params"].get("adjacency", "replace") == "replace" \
        else 1.0
    m = base["audit"]["params"].get("canaries", 1000)
    accountant = audited["params"].get("accountant", "rdp")
    lines = [f"| sigma | accountant eps ({accountant}, as reported) | accountant eps (PLD) | Steinke et al. bound: median "
             "[min, max] over secrets | correct / guesses | f-DP (Gaussian) bound: median [min, max] | correct / "
             "guesses | idealised ceilings (pure Gaussian, same m): Steinke, f-DP | Steinke / PLD | f-DP / PLD | "
             "Gaussian-fit estimate (not a bound): median |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for sigma in args.noise:
        rs = [r for r in rows if r["sigma"] == sigma]
        cells = []
        for key, guesses, correct in (("audit_epsilon_lower", "audit_guesses", "audit_correct"),
                                      ("audit_epsilon_lower_gdp", "audit_gdp_guesses", "audit_gdp_correct")):
            lbs = sorted(r[key] for r in rs)
            med = rs[[r[key] for r in rs].index(lbs[len(lbs) // 2])]
            cells.append((statistics.median(lbs), f"{statistics.median(lbs):.2f} [{lbs[0]:.2f}, {lbs[-1]:.2f}]",
                          f"{med[correct]:.0f} / {med[guesses]:.0f}"))
        pld = epsilon(sigma / per_unit, 1.0, rounds, delta, "pld") if sigma > 0 else float("inf")
        ceil_s, ceil_g = ideal_ceiling(sigma / per_unit, rounds, m, delta)
        ratios = [f"{c[0] / pld:.2f}" if np.isfinite(pld) else "-" for c in cells]
        lines.append(f"| {sigma:g} | {rs[0]['epsilon']:.3g} | {pld:.3g} | {cells[0][1]} | {cells[0][2]} | {cells[1][1]} "
                     f"| {cells[1][2]} | {ceil_s:.2f}, {ceil_g:.2f} | {ratios[0]} | {ratios[1]} | "
                     f"{statistics.median(r['audit_epsilon_estimate'] for r in rs):.3g} |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                                               "rows": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
