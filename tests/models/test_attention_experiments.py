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
