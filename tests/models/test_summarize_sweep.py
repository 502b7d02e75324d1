"""experiments.summarize_sweep: grouping over seeds, mean and sample std, parameter share."""

from __future__ import annotations

import math

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
