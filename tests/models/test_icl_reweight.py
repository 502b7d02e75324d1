"""RICL / LARICL identities on closed-form in-context learners and a tiny transformer."""

import pytest
import torch

from models.icl.model import ICLModelConfig, ICLTransformer
from models.icl.reweight import (
    aggregate_client_weights, laricl_weights, output_jacobian, ricl_client_weights, ricl_weights, val_objective,
)
from models.icl.tasks import ICLTask, Prompt, sample_prompt, sample_queries
from models.icl.toys import LinearKernelICL, WeightedRidgeICL


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def problem(task: ICLTask, kind: str, seed: int, n_val: int = 200):
    g = gen(seed)
    p = sample_prompt(task, kind, g)
    xq, yq = sample_queries(task, p.beta, n_val, g)
    p = Prompt(p.xs.double(), p.ys.double(), p.beta.double())
    return p, (xq.double(), yq.double())


def test_balanced_prompt_keeps_weights_near_one():
    task = ICLTask(kind="regression", dim=3, n_examples=30, noise_std=0.1)
    model = WeightedRidgeICL(ridge=1e-3, intercept=False)
    for seed in range(3):
        p, val = problem(task, "balanced", seed)
        res = ricl_weights(model, p, val, lam=1.0, steps=150, lr=0.05, dtype=torch.float64)
        assert (res.weights - 1).abs().max() < 0.25
        assert res.val_loss <= res.val_loss_uniform
        assert res.val_loss_uniform - res.val_loss < 0.05 * res.val_loss_uniform  # w = 1 is near-optimal


def test_imbalanced_prompt_downweights_the_majority_class_and_lowers_val_loss():
    task = ICLTask(kind="classification", dim=2, n_examples=20, major_frac=0.85)
    model = WeightedRidgeICL(ridge=1e-2, intercept=True)  # least-squares classifier with a bias term
    for seed in range(4):
        p, val = problem(task, "imbalanced", seed)
        res = ricl_weights(model, p, val, loss="mse", lam=0.1, steps=150, lr=0.05, dtype=torch.float64)
        major, minor = res.weights[p.ys > 0], res.weights[p.ys < 0]
        assert major.mean() < 1.0
        assert major.mean() < minor.mean()
        assert res.val_loss < 0.95 * res.val_loss_uniform


def test_laricl_equals_ricl_when_the_output_is_linear_in_w():
    task = ICLTask(kind="regression", dim=4, n_examples=12, noise_std=0.3)
    model = LinearKernelICL(lr=1.0)
    p, val = problem(task, "biased", 5, n_val=200)
    lam = 50.0  # keeps the optimum positive so the softplus constraint is inactive
    la = laricl_weights(model, p, val, lam=lam, dtype=torch.float64)
    ri = ricl_weights(model, p, val, lam=lam, steps=500, optimizer="lbfgs", dtype=torch.float64)
    assert (la.weights > 0).all()
    assert torch.allclose(la.weights, ri.weights, atol=1e-5)
    assert la.val_loss == pytest.approx(ri.val_loss, rel=1e-8)
    assert la.val_loss < la.val_loss_uniform


def test_laricl_logistic_newton_matches_ricl_on_a_linear_logit():
    task = ICLTask(kind="classification", dim=3, n_examples=10, major_frac=0.8)
    model = LinearKernelICL(lr=2.0)
    p, val = problem(task, "imbalanced", 6, n_val=300)
    la = laricl_weights(model, p, val, loss="bce", lam=5.0, dtype=torch.float64)
    ri = ricl_weights(model, p, val, loss="bce", lam=5.0, steps=500, optimizer="lbfgs", dtype=torch.float64)
    assert torch.allclose(la.weights, ri.weights, atol=1e-5)


def test_laricl_is_the_spec_closed_form():
    task = ICLTask(kind="regression", dim=3, n_examples=8)
    model = WeightedRidgeICL(ridge=1e-2)
    p, (xq, yq) = problem(task, "biased", 7, n_val=50)
    one = torch.ones(8, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda w: model.predict(p, xq, w), one)  # [n, m]
    y0 = model.predict(p, xq, one)
    lam = 0.3
    expect = 1 + torch.linalg.solve(J.T @ J + lam * torch.eye(8, dtype=J.dtype), J.T @ (yq - y0))
    got = laricl_weights(model, p, (xq, yq), lam=lam, w_min=-1e9, dtype=torch.float64).weights
    assert torch.allclose(got, expect, atol=1e-10)


def tiny_transformer(dim: int = 2, m: int = 4) -> ICLTransformer:
    torch.manual_seed(0)
    return ICLTransformer(ICLModelConfig(dim=dim, n_examples=m, n_embd=16, n_layer=2, n_head=2)).double().eval()


@pytest.mark.parametrize("which", ["ridge", "transformer"])
@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_gradcheck_of_the_validation_loss_in_w(which, loss):
    task = ICLTask(kind="classification" if loss == "bce" else "regression", dim=2, n_examples=4)
    model = WeightedRidgeICL(ridge=0.1) if which == "ridge" else tiny_transformer()
    p, val = problem(task, "balanced", 8, n_val=6)
    w = (0.5 + torch.rand(4, generator=gen(9), dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: val_objective(model, p, val, w, loss, lam=0.2), (w,))


def test_one_pass_jacobian_matches_autograd_on_the_transformer():
    model = tiny_transformer()
    task = ICLTask(dim=2, n_examples=4)
    p, (xq, _) = problem(task, "balanced", 10, n_val=5)
    w = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    pred, J = output_jacobian(model, p, xq, w)
    ref = torch.autograd.functional.jacobian(lambda w: model.predict(p, xq, w), w)
    assert torch.allclose(J, ref, atol=1e-10)
    assert torch.allclose(pred, model.predict(p, xq, w))


def test_transformer_weight_multiplies_the_example_embedding():
    model = tiny_transformer()
    task = ICLTask(dim=2, n_examples=4)
    p, (xq, _) = problem(task, "balanced", 11, n_val=3)
    w = torch.tensor([0.3, 1.0, 2.0, 0.0], dtype=torch.float64)
    # documented contract: tokens t_i = [x_i; y_i; 1], t_q = [x_q; 0; 0], embedding w_i W_in t_i
    t = torch.cat([p.xs, p.ys[:, None], torch.ones(4, 1, dtype=torch.float64)], 1)
    tq = torch.cat([xq, torch.zeros(3, 2, dtype=torch.float64)], 1)
    h = torch.cat([model.read_in(w[:, None] * t).expand(3, 4, -1), model.read_in(tq)[:, None]], 1)
    ref = model.read_out(model.gpt2(inputs_embeds=h).last_hidden_state[:, -1]).squeeze(-1)
    assert torch.allclose(model.predict(p, xq, w), ref, atol=1e-12)
    assert torch.allclose(model.predict(p, xq, torch.ones(4, dtype=torch.float64)), model.predict(p, xq))
    assert not torch.allclose(model.predict(p, xq, w), model.predict(p, xq))


def test_client_weights_and_server_aggregation():
    task = ICLTask(kind="classification", dim=2, n_examples=20, major_frac=0.85)
    model = WeightedRidgeICL(ridge=1e-2)
    p, _ = problem(task, "imbalanced", 12)
    replies = []
    for c, n in enumerate([100, 300]):
        xq, yq = sample_queries(task, p.beta.float(), n, gen(100 + c))
        replies.append(ricl_client_weights(model, p, (xq.double(), yq.double()), lam=0.1, steps=60,
                                           dtype=torch.float64))
    assert [r["num_examples"] for r in replies] == [100, 300]
    assert all(r["val_loss"] < r["val_loss_uniform"] for r in replies)
    agg = aggregate_client_weights(replies)
    assert torch.allclose(agg, (100 * replies[0]["weights"] + 300 * replies[1]["weights"]) / 400)
    with pytest.raises(ValueError, match="method"):
        ricl_client_weights(model, p, (xq, yq), method="sgd")


def test_bad_validation_set_is_rejected():
    p, (xq, yq) = problem(ICLTask(dim=2, n_examples=4), "balanced", 0, n_val=3)
    with pytest.raises(ValueError, match="val set"):
        ricl_weights(WeightedRidgeICL(), p, (xq, yq[:2]))
    with pytest.raises(ValueError, match="lam"):
        laricl_weights(WeightedRidgeICL(), p, (xq, yq), lam=-1.0)


def test_weights_stay_positive_and_normalisation_keeps_their_sum():
    task = ICLTask(kind="classification", dim=2, n_examples=10, major_frac=0.9)
    p, val = problem(task, "imbalanced", 13, n_val=100)
    model = WeightedRidgeICL(ridge=1e-2)
    free = ricl_weights(model, p, val, loss="mse", steps=200, lr=0.3, dtype=torch.float64)
    normed = ricl_weights(model, p, val, loss="mse", steps=200, lr=0.3, normalize=True, dtype=torch.float64)
    assert (free.weights > 0).all() and (normed.weights > 0).all()
    assert normed.weights.sum().item() == pytest.approx(10.0, rel=1e-9)
    assert normed.val_loss < normed.val_loss_uniform


def test_laricl_lambda_grid_keeps_the_best_true_validation_loss():
    task = ICLTask(kind="regression", dim=2, n_examples=4)
    model = tiny_transformer()
    p, val = problem(task, "biased", 14, n_val=40)
    grid = [1e-3, 1e-1, 10.0]
    scores = [val_objective(model, p, val, laricl_weights(model, p, val, lam=lm, dtype=torch.float64).weights)
              for lm in grid]
    res = laricl_weights(model, p, val, lam=grid, dtype=torch.float64)
    best = min(range(3), key=lambda i: scores[i].item())
    assert res.history == [grid[best]]
    assert val_objective(model, p, val, res.weights).item() == pytest.approx(scores[best].item(), rel=1e-10)
    with pytest.raises(ValueError, match="non-empty"):
        laricl_weights(model, p, val, lam=[])
