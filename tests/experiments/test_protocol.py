"""experiments.protocol: tuning chooses on validation (never test), seeds are independent, the statistics are scipy's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments import protocol
from experiments.protocol import Trial


def test_tuning_picks_the_best_on_validation_never_on_test():
    # validation loss is lowest at lr 0.1, test loss at lr 1.0: the choice must follow validation
    val = {0.01: 3.0, 0.1: 1.0, 1.0: 2.0}
    test = {0.01: 3.0, 0.1: 2.0, 1.0: 0.5}
    seen: list[str] = []

    def on_validation(lr: float, seed: int) -> Trial:
        seen.append("validation")
        return Trial(val[lr] + 1e-3 * (seed % 7))

    def on_test(lr: float, seed: int) -> Trial:
        seen.append("test")
        return Trial(test[lr])

    r = protocol.run_arm("a", on_validation, [0.01, 0.1, 1.0], n_tuning=3, n_eval=5, evaluate=on_test,
                         check_plateau=False)
    assert r.chosen == 0.1 and set(r.grid) == {0.01, 0.1, 1.0} and not r.at_edge
    assert seen[:9] == ["validation"] * 9 and seen[9:] == ["test"] * 5  # tuning never calls the test function
    assert r.values == [2.0] * 5
    best, _ = protocol.tune(lambda lr, s: Trial(val[lr]), [0.01, 0.1, 1.0], [1, 2], maximize=True)
    assert best == 0.01
    with pytest.raises(ValueError, match=">= 5"):
        protocol.run_arm("a", on_validation, [0.1, 1.0], n_eval=3)


def test_seeds_are_independent_and_tuning_and_evaluation_never_share_one():
    tuning, evaluation = protocol.seeds(10, "tuning"), protocol.seeds(10, "evaluation")
    assert len(set(tuning)) == 10 and len(set(evaluation)) == 10 and not set(tuning) & set(evaluation)
    assert protocol.seeds(10, "evaluation") == evaluation  # reproducible
    assert protocol.seeds(5, "evaluation") == evaluation[:5]  # more seeds extend, never reshuffle, the set
    draws = np.array([np.random.default_rng(s).standard_normal(2000) for s in evaluation])
    corr = np.corrcoef(draws)
    assert np.abs(corr[~np.eye(10, dtype=bool)]).max() < 0.1  # the streams are uncorrelated
    with pytest.raises(ValueError, match="role"):
        protocol.seeds(3, "test")


def test_interval_and_tests_are_scipys():
    from scipy import stats

    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.5, 3.5, 4.0, 6.0, 7.5]
    mean, sd, lo, hi = protocol.interval(a)
    half = stats.t.ppf(0.975, 4) * sd / math.sqrt(5)
    assert mean == 3.0 and sd == pytest.approx(1.5811388) and (lo, hi) == pytest.approx((3 - half, 3 + half))
    assert protocol.welch(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert protocol.paired(a, b) == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert protocol.welch([2.0] * 5, [2.0] * 5) == 1.0 and protocol.welch([2.0] * 5, [3.0] * 5) == 0.0


def test_plateau_and_log_grid():
    assert protocol.plateau([5, 4, 3, 2, 1.5, 1.2, 1.1, 1.05] + [1.0] * 12)
    assert not protocol.plateau([float(20 - i) for i in range(20)])  # still falling at the end
    assert protocol.log_grid(0.001, 0.1, 3) == [0.001, 0.01, 0.1]
    with pytest.raises(ValueError):
        protocol.log_grid(0.1, 0.01, 3)


def test_results_go_to_mlflow_with_the_grid_and_the_choice(tmp_path):
    from mlflow import MlflowClient

    r = protocol.run_arm("rdbd(arm)", lambda lr, s: Trial(abs(math.log10(lr) + 1) + 0.01 * (s % 3)),
                         [0.01, 0.1, 1.0], check_plateau=False)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    run_id = protocol.log_mlflow("protocol-test", [r], {"budget": 10}, uri)
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.params["rdbd_arm_.chosen_lr"] == "0.1" and run.data.params["rdbd_arm_.grid"] == "0.01,0.1,1"
    assert run.data.params["budget"] == "10" and run.data.metrics["rdbd_arm_.mean"] == pytest.approx(r.summary[0])
    assert "| rdbd(arm) | 0.1 |" in protocol.markdown_row(r)
    edge = protocol.run_arm("e", lambda lr, s: Trial(lr), [0.01, 0.1], check_plateau=False)
    assert edge.at_edge and "| e | 0.01 (grid edge) |" in protocol.markdown_row(edge)


def test_describe_is_mean_std_and_the_t_interval():
    from experiments.protocol import describe

    assert describe([1.0, 2.0, 3.0], ".2f") == "2.00 ± 1.00 [-0.48, 4.48]"  # t(0.975, 2) = 4.303
    assert describe([5.0], ".1f") == "5.0 ± 0.0 [-inf, inf]"
