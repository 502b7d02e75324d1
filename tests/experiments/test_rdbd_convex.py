"""experiments.rdbd_convex: a run is reproducible from its seed, and a run that never reaches the target says so."""

from experiments import rdbd_convex as rc


def test_a_run_is_reproducible_and_an_unreached_target_scores_twice_the_budget():
    data = rc.split()
    assert [len(v[1]) for v in data.values()] == [1078, 359, 360]
    a, b = rc.run("rdbd(adam)", 0.04, 11, data), rc.run("rdbd(adam)", 0.04, 11, data)
    assert a.value == b.value < rc.MAX_STEPS and a.curve == b.curve and a.curve[-1] <= rc.TARGET
    assert 0.8 < a.extra["test_accuracy"] <= 1.0
    assert rc.run("adam", 0.04, 12, data).curve != rc.run("adam", 0.04, 13, data).curve  # the seed matters
    slow = rc.run("momentum", 1e-5, 11, data)
    assert slow.value == 2 * rc.MAX_STEPS and slow.extra == {}
