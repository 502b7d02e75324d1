import pytest
import torch

from models.icl.tasks import ICLTask, sample_prompt, sample_queries, sample_training_batch


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_imbalanced_prompt_has_the_declared_class_counts():
    task = ICLTask(kind="classification", dim=3, n_examples=20, major_frac=0.85)
    for s in range(5):
        p = sample_prompt(task, "imbalanced", gen(s))
        assert int((p.ys > 0).sum()) == 17
        assert torch.equal(p.ys, torch.where(p.xs @ p.beta >= 0, 1.0, -1.0))  # labels stay correct


def test_balanced_prompt_and_queries_are_class_balanced_on_average():
    task = ICLTask(kind="classification", dim=3, n_examples=20)
    g = gen(1)
    frac = torch.stack([(sample_prompt(task, "balanced", g).ys > 0).float().mean() for _ in range(200)]).mean()
    assert abs(frac.item() - 0.5) < 0.03
    _, yq = sample_queries(task, torch.randn(3), 4000, g)
    assert abs((yq > 0).float().mean().item() - 0.5) < 0.03


def test_biased_prompt_shifts_the_declared_fraction_of_inputs():
    task = ICLTask(kind="regression", dim=4, n_examples=40, bias_frac=0.5, shift=6.0, noise_std=0.0)
    p = sample_prompt(task, "biased", gen(2))
    far = (p.xs.norm(dim=1) > 4.5).sum().item()
    assert 17 <= far <= 23  # 20 shifted (‖x‖ ≈ 6), 20 from N(0, I) (‖x‖ ≈ 2)
    assert torch.allclose(p.ys, p.xs @ p.beta)


def test_sampling_is_reproducible_and_training_batch_shapes():
    task = ICLTask(dim=2, n_examples=5)
    a, b = sample_prompt(task, "biased", gen(3)), sample_prompt(task, "biased", gen(3))
    assert torch.equal(a.xs, b.xs) and torch.equal(a.ys, b.ys)
    xs, ys, xq, yq = sample_training_batch(task, 7, gen(4), n_examples=3)
    assert xs.shape == (7, 3, 2) and ys.shape == (7, 3) and xq.shape == (7, 2) and yq.shape == (7,)


def test_bad_arguments_raise_one_line_errors():
    with pytest.raises(ValueError, match="kind"):
        ICLTask(kind="ranking")
    with pytest.raises(ValueError, match="major_frac"):
        ICLTask(major_frac=1.5)
    with pytest.raises(ValueError, match="prompt kind"):
        sample_prompt(ICLTask(), "skewed", gen())
