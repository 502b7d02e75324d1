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
