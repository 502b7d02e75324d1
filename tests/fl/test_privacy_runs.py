"""Privacy budgets in real federated runs (issue 14): a killed and resumed DP run reports the epsilon of an
uninterrupted one, the client secret stays with the clients, and a spent budget stops the run."""

import os
import stat

import pytest

from defenses.randomness import SECRET_ENV
from fl.config import config_from_dict
from fl.server_app import RunOptions
from fl.simulation import SimulationError, simulate


def _cfg(tmp_path, rounds=4, noise_multiplier=1.0, **dp):
    return config_from_dict({
        "experiment": {"seed": 5, "name": "ledger"},
        "federation": {"num_clients": 3, "clients_per_round": 2, "rounds": rounds, "local_steps": 2, "batch_size": 8,
                       "device": "cpu"},
        "data": {"dataset": "digits"}, "model": {"family": "vit", "size": "tiny"},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "defenses": [{"name": "dp_sgd", "params": {"noise_multiplier": noise_multiplier, "max_grad_norm": 1.0, **dp}}],
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "output_dir": str(tmp_path / "out"),
                     "log_model": False},
    })


@pytest.mark.slow  # ~45 s / ~32 s here, more in CI: the default suite keeps to ~15 min
def test_a_killed_and_resumed_dp_run_reports_the_uninterrupted_epsilon(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    cfg = _cfg(tmp_path)
    whole = simulate(cfg, RunOptions(progress=False))
    # 2 of 3 clients per round: some client is left out of rounds 3-4 or of rounds 1-2, so the resumed run must
    # hand back ledgers to clients that had none in this process
    started: list[str] = []
    with pytest.raises(SimulationError, match="stopped after round 2"):
        simulate(cfg, RunOptions(progress=False, stop_after_round=2, on_start=started.append))
    key = tmp_path / "out" / "client-secrets" / f"{started[0]}.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and SECRET_ENV not in os.environ
    resumed = simulate(cfg, RunOptions(progress=False, resume_run_id=started[0]))
    assert resumed["rounds_completed"] == 4
    for k in ("epsilon", "epsilon_mean"):
        assert resumed["final"][k] == pytest.approx(whole["final"][k], rel=1e-12), k
    assert resumed["final"]["epsilon"] > 0
    # DP noise is secret per run: the two runs' models differ although config and seed are equal
    assert resumed["final"]["test_loss"] != whole["final"]["test_loss"]


def test_a_spent_budget_stops_clients_and_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "fixed for this test")
    # sigma 0.7, q = 1/54, 2 steps a round: eps 2.65 after one round, 2.82 after two: each client trains once
    cfg = _cfg(tmp_path, rounds=4, noise_multiplier=0.7, max_epsilon=2.8)
    summary = simulate(cfg, RunOptions(progress=False))
    assert summary["status"] == "FINISHED"
    assert 2.5 < summary["final"]["epsilon"] <= 2.8
    assert any("refused to train" in e and "max_epsilon=2.8" in e for e in summary["events"]), summary["events"]
    assert any("budget is spent; the run stops" in e for e in summary["events"]), summary["events"]
    again = simulate(cfg, RunOptions(progress=False))  # a user-chosen secret makes DP runs repeatable
    assert again["final"]["test_loss"] == summary["final"]["test_loss"]


def _cli_final(tmp_path, monkeypatch, config):
    """`fedprobe run CONFIG` as a user types it (fresh secret, own store); its summary's final metrics."""
    import json

    from fl.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(SECRET_ENV, raising=False)
    out = tmp_path / "s.json"
    assert main(["run", str(config), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--summary-json",
                 str(out), "--no-progress"]) == 0
    return json.loads(out.read_text())["final"]


@pytest.mark.slow  # ~45 s / ~32 s here, more in CI: the default suite keeps to ~15 min
def test_the_audit_experiment_reports_a_lower_bound_below_the_accountant(tmp_path, monkeypatch, repo_root):
    final = _cli_final(tmp_path, monkeypatch, repo_root / "experiments/audit_dp_sgd.toml")
    assert final["audit_canaries"] == 50000 and final["audit_guesses"] > 0
    # sigma 1.6, 4 full-batch steps: PLD eps 5.7; both bounds below it, the f-DP one the tighter
    assert 0.5 < final["audit_epsilon_lower"] < final["audit_epsilon_lower_gdp"] <= final["epsilon"]
    assert final["audit_correct"] <= final["audit_guesses"] and final["audit_gdp_correct"] <= final["audit_gdp_guesses"]
    assert final["audit_epsilon_lower_gdp"] < final["audit_epsilon_estimate"]  # the Gaussian fit: an estimate


@pytest.mark.slow  # ~60 s: 10 000 canary clients' releases every round (the unit tests in tests/defenses cover the maths)
def test_the_update_noise_audit_scores_canary_clients_below_the_accountant(tmp_path, monkeypatch, repo_root):
    """Client-level audit of update_noise end to end: 10 000 canary clients released through the configured
    defense every round; both bounds below the clients' (PLD) epsilon and well above 0 at sigma 4."""
    final = _cli_final(tmp_path, monkeypatch, repo_root / "experiments/audit_update_noise.toml")
    assert final["audit_canaries"] == 10000
    assert 0.8 < final["audit_epsilon_lower"] <= final["epsilon"]  # sigma 4, replace, 3 rounds: PLD eps 3.7
    assert 0.8 < final["audit_epsilon_lower_gdp"] <= final["epsilon"]
