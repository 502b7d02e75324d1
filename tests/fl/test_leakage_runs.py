"""Leakage numbers from real federated runs (issue 12): attention inversion end to end, identical attack
scores on repeated and loaded runs, and best_of against clip-dominated DP-SGD."""

import json
import multiprocessing as mp
import time

import pytest

from fl.cli import main


def _run(tmp_path, monkeypatch, config: str, *overrides: str, name: str = "summary.json") -> dict:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / name
    args = ["run", config, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--summary-json", str(out),
            "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    return json.loads(out.read_text())


def test_attention_inversion_runs_and_is_scored_in_a_two_client_federation(tmp_path, monkeypatch, repo_root):
    s = _run(tmp_path, monkeypatch, str(repo_root / "experiments/attack_attention_digits.toml"))
    final = s["final"]
    # the victim's shared maps are refit (the inversion converged on the attention) and scored against its layer input
    assert final["attack_attention_error"] < 1e-2
    assert 0 <= final["attack_layer_input_x_error_procrustes"] < float("inf")
    # tiny ViT: 4 heads, n = 5 tokens, d = 64: 4 * (5 - 1) < 64 map equations per token, so X is not identifiable
    assert final["attack_x_identifiable"] == 0.0 and final["attack_x_symmetry_dim"] == 0.0
    assert not any("failed" in e for e in s["events"]), s["events"]


def _burn(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        sum(i * i for i in range(1000))


@pytest.mark.slow
def test_attack_scores_are_identical_on_repeated_and_loaded_runs(tmp_path, monkeypatch, repo_root):
    cfg = str(repo_root / "experiments/attack_dlg_digits.toml")
    first = _run(tmp_path, monkeypatch, cfg, name="a.json")["final"]
    burners = [mp.Process(target=_burn, args=(120.0,)) for _ in range(2)]  # both cores busy
    for p in burners:
        p.start()
    try:
        second = _run(tmp_path, monkeypatch, cfg, name="b.json")["final"]
    finally:
        for p in burners:
            p.terminate()
    keys = sorted(k for k in first if k.startswith("attack_") and "seconds" not in k)
    assert "attack_psnr" in keys and "attack_iterations" in keys
    assert {k: first[k] for k in keys} == {k: second[k] for k in keys}
    assert first["attack_budget_limited"] == 0


@pytest.mark.slow
def test_best_of_sees_through_clip_dominated_dp_sgd(tmp_path, monkeypatch, repo_root):
    """The flagship's near-clip-only defense: L2 iDLG ~5 dB; best_of (scale-invariant and defense-aware members)
    measured 24.6 dB on this victim (issue 12's goal is 25 dB: missed by 0.4 dB, see benchmarks/RESULTS.md).
    The DP noise comes from the clients' secret (issue 14): fixed here so the draw, and the score, repeat."""
    monkeypatch.setenv("FEDPROBE_CLIENT_SECRET", "best_of-vs-dp")
    s = _run(tmp_path, monkeypatch, str(repo_root / "experiments/attack_dlg_digits.toml"), 'attack.name="best_of"',
             "attack.params={}",
             'defenses=[{name="dp_sgd", params={noise_multiplier=0.01, max_grad_norm=1.0, poisson_sampling=false}}]')
    final = s["final"]
    assert "attack_recovered_fraction" in final and "attack_label_baseline" in final
    assert final["attack_idlg/psnr"] < 10 < 20 < final["attack_psnr"]
