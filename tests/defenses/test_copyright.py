import math

import pytest
import torch

from defenses.copyright import CopyrightProtection, copyright_objective, hashed_mask
from models.tasks import TaskSpec, logits_of, per_example_loss
from tests.defenses.helpers import make_ctx, run_round, stack, tiny

torch.set_num_threads(1)


def test_gamma_zero_is_plain_loss():
    """Spec 9(d)1: with gamma = 0 the objective is the plain loss (value and gradient)."""
    model, task, data = tiny("gpt2")
    ctx = make_ctx(model, task, data)
    batch = stack(data)
    batch["protected"] = torch.tensor([True, False, True, False])
    per = per_example_loss(logits_of(model, batch), batch["labels"], task)
    loss = per.mean()
    out = CopyrightProtection(gamma=0.0).loss(loss, ctx, batch, per)
    assert out is loss


def test_extra_term_gradient_is_minus_gamma_over_l2_grad_l():
    """Spec 9(d)2: d/dtheta [gamma / L_cp] = -gamma / L_cp^2 * dL_cp/dtheta, also by finite differences."""
    torch.manual_seed(0)
    gamma = 0.3
    W = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    batch = {"input_ids": torch.arange(6)[:, None], "labels": y, "protected": torch.tensor([1, 0, 1, 1, 0, 0])}
    ctx = make_ctx(torch.nn.Linear(1, 1), TaskSpec("text", num_classes=3), [])
    d = CopyrightProtection(gamma=gamma, min_loss=1e-9)

    def extra(Wt):
        per = torch.nn.functional.cross_entropy(x @ Wt.T, y, reduction="none")
        return d.loss(per.mean(), ctx, batch, per) - per.mean()

    (g_extra,) = torch.autograd.grad(extra(W), W)
    mask = batch["protected"].bool()
    l_cp = torch.nn.functional.cross_entropy((x @ W.T)[mask], y[mask])
    (g_cp,) = torch.autograd.grad(l_cp, W)
    assert torch.allclose(g_extra, -gamma / l_cp.detach() ** 2 * g_cp, atol=1e-12)
    E = torch.zeros_like(W)
    E[1, 2] = 1e-6
    fd = (extra(W + E) - extra(W - E)) / 2e-6
    assert fd.item() == pytest.approx(g_extra[1, 2].item(), rel=1e-6)


def test_protected_rows_use_a_boolean_mask():
    """Spec 9(d)4: is_cp = [0, 1, 0, 1] (a LongTensor) selects rows 1 and 3, not rows 0 and 1."""
    ctx = make_ctx(torch.nn.Linear(1, 1), TaskSpec("text", num_classes=2), [])
    per = torch.tensor([1.0, 2.0, 4.0, 8.0])
    batch = {"input_ids": torch.zeros(4, 2, dtype=torch.long), "labels": torch.zeros(4, dtype=torch.long),
             "protected": torch.tensor([0, 1, 0, 1])}
    d = CopyrightProtection(gamma=1.0)
    assert d.protected(batch).tolist() == [False, True, False, True]
    out = d.loss(per.mean(), ctx, batch, per)
    assert out.item() == pytest.approx(per.mean().item() + 1.0 / 5.0)  # L_cp = mean(2, 8) = 5
    with pytest.raises(ValueError, match="shape"):
        d.protected({**batch, "protected": torch.tensor([1, 0])})


def test_hashed_selection_is_deterministic_order_free_and_has_the_proportion():
    rows = torch.randint(0, 1000, (4000, 8), generator=torch.Generator().manual_seed(0))
    m = hashed_mask(rows, 0.1, seed=0)
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.1) < 0.015
    perm = torch.randperm(4000)
    assert torch.equal(hashed_mask(rows[perm], 0.1, seed=0), m[perm])
    assert not torch.equal(hashed_mask(rows, 0.1, seed=1), m)


def _toy_softmax_regression(gammas, starts=4):
    """argmin_x L_2(x) + gamma / L_1(x) + lam ||x||^2, L_j = sum_i 1/2 ||softmax(A_i x) - b_i||^2 (spec 9(a)).

    The objective is not convex: L-BFGS from several starts, keeping the lowest objective
    (a single start lands in a local minimum for some gamma and breaks monotonicity).
    Returns [(margin L_1/n_1 - L_2/n_2, L_1)] per gamma.
    """
    g = torch.Generator().manual_seed(0)
    n1, n2, n, dim, lam = 4, 12, 5, 6, 1e-3
    A = torch.randn(n1 + n2, n, dim, dtype=torch.float64, generator=g)
    x_star = torch.randn(dim, dtype=torch.float64, generator=g)
    b = torch.softmax(A @ x_star + 0.3 * torch.randn(n1 + n2, n, dtype=torch.float64, generator=g), -1)

    def parts(x):
        per = 0.5 * (torch.softmax(A @ x, -1) - b).pow(2).sum(-1)  # [n1 + n2]
        l1, l2 = per[:n1].sum(), per[n1:].sum()
        return l1, l2

    out = []
    for gamma in gammas:
        best = None
        for s in range(starts):
            x = (torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) * (s > 0)).requires_grad_()
            opt = torch.optim.LBFGS([x], max_iter=300, tolerance_grad=1e-12, tolerance_change=1e-14,
                                    line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                l1, l2 = parts(x)
                obj = copyright_objective(l2, l1, gamma) + lam * x.pow(2).sum()
                obj.backward()
                return obj

            opt.step(closure)
            with torch.no_grad():
                l1, l2 = parts(x)
                obj = float(copyright_objective(l2, l1, gamma) + lam * x.pow(2).sum())
            if best is None or obj < best[0]:
                best = (obj, float(l1 / n1 - l2 / n2), float(l1))
        out.append(best[1:])
    return out


def test_toy_softmax_regression_margin_increases_with_gamma():
    """Spec 9(d)3: the tau margin L_1/n_1 - L_2/n_2 grows monotonically with gamma (the spec's grid, plus 0)."""
    results = _toy_softmax_regression((0.0, 0.1, 0.2, 0.3, 0.4, 0.5))
    margins = [m for m, _ in results]
    l1 = [v for _, v in results]
    assert margins == sorted(margins) and margins[-1] > margins[0] + 0.1
    assert l1 == sorted(l1)  # at exact minimisers L_1 is provably non-decreasing in gamma


def test_lm_training_reports_tau_and_perplexity_from_plain_ce():
    model, task, data = tiny("gpt2")
    for i, d in enumerate(data):
        d["protected"] = torch.tensor(i % 4 == 0)
    ctx = make_ctx(model, task, data)
    d = CopyrightProtection(gamma=0.5)
    run_round(ctx, [d])
    m = ctx.metrics
    # recompute plain CE on the same data
    batch = {k: torch.stack([e[k] for e in data]) for k in data[0]}
    with torch.no_grad():
        per = per_example_loss(logits_of(model, batch), batch["labels"], task)
    mask = batch["protected"]
    assert m["cp_tau"] == pytest.approx((per[mask].mean() - per[~mask].mean()).item(), abs=1e-5)
    assert m["cp_ppl_unprotected"] == pytest.approx(math.exp(per[~mask].mean().item()), rel=1e-5)  # equal token counts
    assert m["cp_protected_fraction"] == 0.25


def test_detach_body_sends_the_extra_gradient_to_the_head_only():
    model, task, data = tiny("gpt2")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie, as in the authors' code
    batch = {k: torch.stack([e[k] for e in data[:4]]) for k in data[0]}
    batch["protected"] = torch.tensor([True, True, False, False])
    ctx = make_ctx(model, task, data)
    d = CopyrightProtection(gamma=1.0, detach_body=True)
    per = per_example_loss(logits_of(model, batch), batch["labels"], task)
    extra = d.loss(per.mean(), ctx, batch, per) - per.mean()
    extra.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in model.named_parameters() if n.startswith("transformer."))


def test_bad_values():
    for params, match in [({"gamma": -1.0}, "gamma"), ({"proportion": 1.5}, "proportion"), ({"min_loss": 0.0}, "min_loss")]:
        with pytest.raises(ValueError, match=match):
            CopyrightProtection(**params)
