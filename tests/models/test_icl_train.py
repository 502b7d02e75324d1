"""Offline training of the in-context learner: caching, shape checks, and (slow) that it learns."""

import pytest
import torch

from models.icl.model import ICLModelConfig, ICLTransformer
from models.icl.tasks import ICLTask, sample_training_batch
from models.icl.train import output_loss, train_icl_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_cfg(task: ICLTask) -> ICLModelConfig:
    return ICLModelConfig(dim=task.dim, n_examples=task.n_examples, n_embd=16, n_layer=1, n_head=2)


def test_training_is_cached_and_reproducible(tmp_path):
    task = ICLTask(dim=2, n_examples=4)
    a = train_icl_model(task, small_cfg(task), steps=3, batch=8, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("icl-regression-*.pt"))) == 1
    b = train_icl_model(task, small_cfg(task), steps=3, batch=8, cache_dir=tmp_path)  # loaded
    c = train_icl_model(task, small_cfg(task), steps=3, batch=8)  # retrained, same seed
    for (n, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb) and torch.equal(pa, pc), n
    assert not any(p.requires_grad for p in a.parameters())
    train_icl_model(task, small_cfg(task), steps=3, batch=8, seed=1, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("icl-regression-*.pt"))) == 2  # another seed, another key


def test_mismatched_model_and_prompt_lengths_are_rejected():
    task = ICLTask(dim=2, n_examples=4)
    with pytest.raises(ValueError, match="does not match"):
        train_icl_model(task, ICLModelConfig(dim=3, n_examples=4), steps=1)
    model = ICLTransformer(small_cfg(task))
    xs, ys, xq, _ = sample_training_batch(ICLTask(dim=2, n_examples=6), 2, torch.Generator())
    with pytest.raises(ValueError, match="n_examples"):
        model(xs, ys, xq)


@pytest.mark.slow
def test_trained_transformer_learns_linear_regression_in_context():
    task = ICLTask(kind="regression", dim=3, n_examples=10, noise_std=0.1)
    cfg = ICLModelConfig(dim=3, n_examples=10, n_embd=32, n_layer=2, n_head=2)
    model = train_icl_model(task, cfg, steps=2000, batch=64, lr=3e-3)
    g = torch.Generator().manual_seed(99)
    losses = {}
    for k in (1, 10):
        xs, ys, xq, yq = sample_training_batch(task, 2000, g, k)
        with torch.no_grad():
            losses[k] = output_loss(model(xs, ys, xq), yq, "mse").item()
    # Var(y) = E‖β‖² + σ² ≈ 1.01: with 10 examples the model must do far better than predicting 0
    assert losses[10] < 0.3
    assert losses[10] < 0.5 * losses[1]


@pytest.mark.slow
def test_ricl_experiment_quick_run_logs_table_and_plot(tmp_path):
    from mlflow import MlflowClient

    from experiments.ricl import METHODS, main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    text = main(["--quick", "--out", str(tmp_path / "out"), "--tracking-uri", uri])
    assert (tmp_path / "out" / "ricl_results.md").read_text() == text
    assert (tmp_path / "out" / "ricl_results.png").stat().st_size > 0
    assert all(m in text for m in METHODS)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ricl").experiment_id])
    assert run.info.status == "FINISHED"
    assert "regression.biased.ricl.loss.mean" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"ricl_results.md", "ricl_results.png"}
