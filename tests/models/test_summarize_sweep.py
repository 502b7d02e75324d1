"""experiments.summarize_sweep: grouping over seeds, mean and sample std, parameter share."""

from __future__ import annotations

import math

import pytest

from experiments.summarize_sweep import group_rows, markdown


def _run(adapter: str, seed: int, acc: float | None, trainable: int) -> dict:
    metrics = {"final_accuracy": acc} if acc is not None else {}
    return {"params": {"model.adapter": adapter, "experiment.seed": str(seed), "federation.num_clients": "10",
                       "model.trainable_parameters": str(trainable), "model.total_parameters": "1000"},
            "metrics": metrics}


def test_groups_by_swept_keys_and_aggregates_over_seeds() -> None:
    runs = [_run("ntk", 0, 0.8, 50), _run("lora", 0, 0.9, 100), _run("ntk", 1, 0.6, 50), _run("ntk", 2, None, 50)]
    rows = group_rows(runs, ["model.adapter"], "accuracy")
    assert [r["group"]["model.adapter"] for r in rows] == ["ntk", "lora"]
    ntk, lora = rows
    assert ntk["n"] == 2 and ntk["missing"] == 1 and ntk["seeds"] == ["0", "1", "2"]
    assert math.isclose(ntk["mean"], 0.7) and math.isclose(ntk["std"], math.sqrt(0.02))  # sample std, ddof 1
    assert lora["n"] == 1 and math.isnan(lora["std"]) and lora["trainable"] == 100
    table = markdown("t", rows, ["model.adapter"], "accuracy")
    assert "| ntk | 10 | 0.700 ± 0.141 | 0.600 – 0.800 | 2 (+1 no metric) | 50 | 5.0 % |" in table


def test_versus_adds_intervals_and_welch_tests_against_the_reference_row() -> None:
    from scipy import stats

    from experiments.summarize_sweep import compare

    runs = [_run(a, s, v, 10) for a, vals in (("ntk", [0.80, 0.82, 0.79]), ("lora", [0.90, 0.93, 0.91]))
            for s, v in enumerate(vals)]
    rows = group_rows(runs, ["model.adapter"], "accuracy")
    compare(rows, "model.adapter=ntk")
    ntk, lora = rows
    assert ntk.get("reference") and math.isnan(ntk["p"])
    assert math.isclose(lora["p"], stats.ttest_ind([0.90, 0.93, 0.91], [0.80, 0.82, 0.79], equal_var=False).pvalue)
    lo, hi = lora["interval"]
    assert lo < 0.9133 < hi
    table = markdown("t", rows, ["model.adapter"], "accuracy")
    assert "| reference |" in table and f"| {lora['p']:.3g} |" in table
    with pytest.raises(SystemExit, match="0 rows have model.adapter = full"):
        compare(rows, "model.adapter=full")
