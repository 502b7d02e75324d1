"""Smoke runs of the attention experiment scripts (tiny arguments, no tracking)."""

from __future__ import annotations

import pytest
import torch

from experiments import ntk_prefix_error, sketch_error, sparse_error




def test_ntk_prefix_error_runs():
    res = ntk_prefix_error.main(["--m", "4", "--steps", "20", "--n-val", "16", "--no-track"])
    assert set(res) == {4} and res[4]["mse"] > 0


def test_sparse_error_runs():
    res = sparse_error.main(["--log2n", "8", "--beta", "1.5", "--no-track"])
    assert res[(1.5, 256)]["k_nC"] == 16


def test_sketch_error_runs_and_memory_flat():
    res = sketch_error.main(["--log2n", "6", "8", "--degree", "2", "--seeds", "2", "--countsketch-log2n", "8", "14",
                             "--no-track"])
    assert res[(64, 2)]["sketch_bytes"] == res[(256, 2)]["sketch_bytes"]
    assert res[(256, 2)]["kv_cache_bytes"] == 4 * res[(64, 2)]["kv_cache_bytes"]
    assert len(res[(64, 2)]["errs"]) == 2 and res[(64, 2)]["errs"][0] != res[(64, 2)]["errs"][1]  # two seeds
    small, big = res[("countsketch", 256)], res[("countsketch", 16384)]
    assert big["bytes_without"] > 6 * small["bytes_without"] and big["bytes_with"] < big["bytes_without"]
    assert big["guarantee_ratio"] <= 1.5  # the (1 + eps1) bound, eps1 = 0.5


def test_ntk_prefix_error_protocol_tunes_on_tuning_seeds_and_records_plateaus():
    res = ntk_prefix_error.main(["--protocol", "--m", "4", "--steps", "200", "--eval-every", "20", "--n-val", "32",
                                 "--lr-grid", "0.003", "0.03", "2", "--no-track"])
    arm = res[4]
    assert set(arm.grid) == {0.003, 0.03} and arm.chosen == min(arm.grid, key=arm.grid.get)
    assert len(arm.values) == 5 and len(set(arm.values)) == 5  # five independent evaluation seeds
    assert 0 <= arm.plateaus <= 5 and all(s == 200 for s in arm.extra["steps"])  # min_steps 1000: no early stop


def test_ntk_prefix_error_stops_at_a_plateau():
    r = ntk_prefix_error.run_m(m=4, d=8, L=8, steps=3000, batch=16, lr=3e-2, n_val=32, seed=0, eval_every=20,
                               min_steps=200)
    assert r["converged"] and r["steps"] < 3000 and len(r["curve"]) == r["steps"] // 20
    # the doubling test is stricter than the 20 % window: flat at the end, but 6 % better than at half the steps
    slow = [1.0, 0.9, 0.85, 0.8, 0.78, 0.76, 0.75, 0.74, 0.735, 0.735]
    assert ntk_prefix_error.plateau(slow) and not ntk_prefix_error.converged(slow)
    assert ntk_prefix_error.converged([1.0, 0.99, 0.98, 0.975, 0.97, 0.965, 0.96, 0.955, 0.955, 0.955])
