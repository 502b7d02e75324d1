"""MLflow store set-up (fl.tracking)."""

import multiprocessing as mp


def _open(uri: str) -> str:
    from fl.tracking import Tracker

    try:
        Tracker(uri, "race").finish()
        return "ok"
    except Exception as exc:  # noqa: BLE001  (the failure is the test's finding)
        return f"{type(exc).__name__}: {str(exc)[:120]}"


def test_four_processes_opening_a_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    """Without the lock in fl.tracking.ensure_store, 3 of 4 failed ('table metrics already exists', alembic)."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    with mp.get_context("spawn").Pool(4) as pool:
        results = pool.map(_open, [uri] * 4)
    assert results == ["ok"] * 4, results


def test_a_round_is_one_mlflow_batch_with_every_victims_metrics_and_tags_are_batched(tmp_path):
    """Issue 19: the round's metrics and each attack victim's go to MLflow in one log_batch (not one per victim);
    set_tags is one batch too."""
    from types import SimpleNamespace

    from fl.recorder import RunRecorder
    from fl.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "batched")
    calls = []
    real = tracker.client.log_batch
    tracker.client.log_batch = lambda *a, **k: (calls.append(k), real(*a, **k))
    art = tmp_path / "recon.png"
    art.write_bytes(b"png")
    rec = SimpleNamespace(history=[], tracker=tracker, checkpoint=lambda *a: None)
    rows = [{"client": 0, "attack_psnr": 7.5, "artifacts": [str(art)]}, {"client": 3, "attack_psnr": 9.0}]
    RunRecorder.end_round(rec, 2, {"accuracy": 0.5}, {}, {}, rows)
    assert len(calls) == 1 and {m.key for m in calls[0]["metrics"]} == {
        "accuracy", "per_victim/attack_psnr/client_0", "per_victim/attack_psnr/client_3"}
    assert rec.history == [{"round": 2, "accuracy": 0.5}]
    assert [m.value for m in tracker.client.get_metric_history(tracker.run_id, "per_victim/attack_psnr/client_3")] \
        == [9.0]
    assert [f.path for f in tracker.client.list_artifacts(tracker.run_id, "attacks/round_2")] \
        == ["attacks/round_2/recon.png"]
    tracker.set_tags({"a": 1, "b": "x"})
    assert len(calls) == 2 and {t.key for t in calls[1]["tags"]} == {"a", "b"}
    assert tracker.client.get_run(tracker.run_id).data.tags["a"] == "1"
    tracker.finish()
