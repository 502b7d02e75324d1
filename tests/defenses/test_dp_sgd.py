import math

import pytest
import torch

from defenses.accounting import epsilon
from defenses.dp_sgd import DPSGD
from models.tasks import logits_of, per_example_loss
from tests.defenses.helpers import make_ctx, per_example_grads, run_round, stack, tiny

torch.set_num_threads(1)


@pytest.mark.parametrize("family", ["bert", "vit", "gpt2"])
def test_per_sample_grads_equal_per_example_loop(family):
    """Under dp_sgd's setup, Opacus's per-sample gradients of HF models equal a loop over single examples."""
    model, task, data = tiny(family)
    batch = stack(data)
    ref = per_example_grads(model, task, batch)
    ctx = make_ctx(model, task, data)
    d = DPSGD(noise_multiplier=0.0, max_grad_norm=1e6, poisson_sampling=False)
    d.setup(ctx)
    per_example_loss(logits_of(ctx.model, batch), batch["labels"], task).mean().backward()
    scale = max(r.abs().max().item() for r in ref.values())
    for n, p in model.named_parameters():
        expect = ref[n]
        assert p.grad_sample.shape == expect.shape, n  # position embeddings: [B, ...], not [1, ...] (Opacus #841)
        assert (p.grad_sample - expect).abs().max().item() <= 1e-5 * scale, n
    d.after_training(ctx)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # hooks cleaned up


def test_model_keeps_original_parameter_names_and_is_what_trains():
    model, task, data = tiny("bert")
    names = [n for n, _ in model.named_parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = make_ctx(model, task, data)
    update = run_round(ctx, [DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=0)])
    assert ctx.model is model and list(update) == names
    assert all(not n.startswith("_module.") for n in update)
    assert all(torch.allclose(before[n] + update[n], p) for n, p in model.named_parameters())
    assert any(update[n].abs().sum() > 0 for n in names)


def test_dp_update_differs_from_non_private_by_the_noise_scale():
    """One SGD step with the same batch: noisy - clean = -lr * sigma * C / B * N(0, I)."""
    sigma, C, lr, B = 0.5, 1.0, 1.0, 4
    updates = []
    for z in (0.0, sigma):
        model, task, data = tiny("bert")
        ctx = make_ctx(model, task, data, batch_size=B, lr=lr, local_steps=1)
        updates.append(run_round(ctx, [DPSGD(noise_multiplier=z, max_grad_norm=C, poisson_sampling=False, noise_seed=1)]))
        assert ctx.metrics["dp_noise_std"] == pytest.approx(z * C / B)
    diff = torch.cat([(updates[1][k] - updates[0][k]).flatten() for k in updates[0]])
    expected = lr * sigma * C / B
    assert diff.numel() > 3000  # std estimate within ~1.2% (1 s.d.)
    assert diff.std().item() == pytest.approx(expected, rel=0.05)
    assert abs(diff.mean().item()) < 0.05 * expected


def test_epsilon_composes_across_rounds_through_state():
    model, task, data = tiny("vit")
    state: dict = {}
    eps = []
    for rnd in (1, 2, 3):
        ctx = make_ctx(model, task, data, batch_size=4, state=state, server_round=rnd)
        run_round(ctx, [DPSGD(noise_multiplier=1.2, max_grad_norm=1.0, noise_seed=0)])
        state = ctx.state
        eps.append(ctx.metrics["epsilon"])
        assert ctx.metrics["dp_steps"] == 4 and 0 <= ctx.metrics["dp_clip_fraction"] <= 1
    assert eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(epsilon(1.2, 1 / 4, 12, 1e-5), rel=1e-12)  # q = 1 / len(loader)
    assert state["dp_sgd"]["ledger"]["history"] == [[1.2, 0.25, 12]]


def test_target_epsilon_is_met_after_all_rounds_and_clip_fraction():
    model, task, data = tiny("vit")
    state: dict = {}
    for rnd in (1, 2):
        ctx = make_ctx(model, task, data, state=state, server_round=rnd)
        run_round(ctx, [DPSGD(target_epsilon=5.0, rounds=2, max_grad_norm=1e-4, noise_seed=0)])
        state = ctx.state
    assert 4.5 < ctx.metrics["epsilon"] <= 5.0
    assert ctx.metrics["dp_clip_fraction"] == 1.0  # every per-example gradient exceeds C = 1e-4


def test_counting_clip_equals_opacus_clip_and_its_fraction_the_recomputed_one():
    """The flat clip that counts (issue 19: no second pass over the norms) accumulates what Opacus's own
    clip_and_accumulate does, and counts the examples whose norm exceeds C."""
    from opacus.optimizers.optimizer import DPOptimizer

    model, task, data = tiny("vit")
    batch = stack(data)
    norms = torch.cat([g.flatten(1) for g in per_example_grads(model, task, batch).values()], 1).norm(dim=1)  # [B]
    C = float(norms.sort().values[1:3].mean())  # between the 2nd and 3rd norm: two examples clipped, two not
    ctx = make_ctx(model, task, data)
    d = DPSGD(noise_multiplier=0.0, max_grad_norm=C, poisson_sampling=False)
    d.setup(ctx)
    assert type(ctx.optimizer) is DPOptimizer and d._counting
    per_example_loss(logits_of(ctx.model, batch), batch["labels"], task).mean().backward()
    ctx.optimizer.clip_and_accumulate()
    ours = [p.summed_grad.clone() for p in ctx.optimizer.params]
    for p in ctx.optimizer.params:
        p.summed_grad = None
        del p.grad_sample._processed  # Opacus's guard against using one per-sample gradient twice
    DPOptimizer.clip_and_accumulate(ctx.optimizer)  # Opacus's own, on the same per-sample gradients
    for a, p in zip(ours, ctx.optimizer.params):
        assert torch.equal(a, p.summed_grad)
    assert d._seen == 4 and d._clipped == 2.0
    d.after_training(ctx)


def test_per_layer_clipping_splits_C_over_the_layers_and_reports_no_clip_fraction():
    """per_layer: each of the L parameter tensors is clipped to C / sqrt(L) (Opacus needs one threshold per tensor;
    a single float crashed inside training), so the whole gradient's norm and the noise scale stay C."""
    from opacus.optimizers.optimizer import DPOptimizer

    C = 1e-3  # small enough that every layer of every example is clipped
    model, task, data = tiny("vit")
    batch = stack(data)
    ctx = make_ctx(model, task, data)
    d = DPSGD(noise_multiplier=0.0, max_grad_norm=C, clipping="per_layer", poisson_sampling=False)
    d.setup(ctx)
    L = len(ctx.optimizer.params)
    assert type(ctx.optimizer) is not DPOptimizer and not d._counting
    assert ctx.optimizer.max_grad_norm == pytest.approx(C)  # sqrt(L * (C / sqrt(L))^2): the noise's sensitivity
    per_example_loss(logits_of(ctx.model, batch), batch["labels"], task).mean().backward()
    ctx.optimizer.clip_and_accumulate()
    for p in ctx.optimizer.params:  # the sum of 4 clipped gradients, each of norm C / sqrt(L)
        assert p.summed_grad.norm().item() <= 4 * C / math.sqrt(L) * (1 + 1e-4)
    d.after_training(ctx)

    ctx = make_ctx(model, task, data)
    run_round(ctx, [DPSGD(noise_multiplier=1.0, clipping="per_layer", noise_seed=0)])
    assert math.isnan(ctx.metrics["dp_clip_fraction"]) and ctx.metrics["dp_steps"] == 4
    assert ctx.metrics["epsilon"] == pytest.approx(epsilon(1.0, 0.25, 4, 1e-5), rel=1e-12)


@pytest.mark.parametrize("poisson", [False, True])
def test_shuffled_drop_last_loader_trains_in_the_private_order(poisson):
    """A user's loader with shuffle and drop_last (Opacus's switch_generator fails on it) trains, and its order
    comes from the client's generator: the same noise_seed gives the same update, another seed another one."""
    from torch.utils.data import DataLoader

    updates = []
    for seed in (0, 0, 1):
        model, task, data = tiny("vit")
        ctx = make_ctx(model, task, data[:10])
        ctx.loader = DataLoader(data[:10], batch_size=3, shuffle=True, drop_last=True)
        updates.append(run_round(ctx, [DPSGD(noise_multiplier=0.0, poisson_sampling=poisson, noise_seed=seed)]))
        assert ctx.metrics["dp_steps"] == 3
    assert all(torch.equal(updates[0][k], updates[1][k]) for k in updates[0])
    assert not all(torch.equal(updates[0][k], updates[2][k]) for k in updates[0])


def test_prv_accountant_and_gpt2_train():
    model, task, data = tiny("gpt2")
    ctx = make_ctx(model, task, data)
    run_round(ctx, [DPSGD(noise_multiplier=1.0, accountant="prv", noise_seed=0)])
    assert ctx.metrics["epsilon"] == pytest.approx(epsilon(1.0, 0.25, 4, 1e-5, "prv"), rel=1e-9)


def test_functorch_mode_trains_and_accounts():
    model, task, data = tiny("vit")
    ctx = make_ctx(model, task, data)
    run_round(ctx, [DPSGD(noise_multiplier=1.0, grad_sample_mode="functorch", noise_seed=0)])
    assert ctx.metrics["epsilon"] == pytest.approx(epsilon(1.0, 0.25, 4, 1e-5), rel=1e-12)


def test_no_noise_reports_infinite_epsilon():
    model, task, data = tiny("vit")
    ctx = make_ctx(model, task, data)
    run_round(ctx, [DPSGD(noise_multiplier=0.0)])
    assert math.isinf(ctx.metrics["epsilon"])


@pytest.mark.parametrize("params,match", [
    ({}, "exactly one"),
    ({"noise_multiplier": 1.0, "target_epsilon": 1.0, "rounds": 2}, "exactly one"),
    ({"noise_multiplier": -1.0}, "noise_multiplier"),
    ({"target_epsilon": 0.0, "rounds": 2}, "target_epsilon"),
    ({"target_epsilon": 2.0}, "rounds"),
    ({"noise_multiplier": 1.0, "delta": 0.0}, "delta"),
    ({"noise_multiplier": 1.0, "delta": 1.5}, "delta"),
    ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm"),
    ({"noise_multiplier": 1.0, "accountant": "moments"}, "accountant"),
    ({"noise_multiplier": 1.0, "grad_sample_mode": "ghost"}, "grad_sample_mode"),
    ({"noise_multiplier": 1.0, "grad_sample_mode": "ew"}, "grad_sample_mode"),
])
def test_bad_values(params, match):
    with pytest.raises(ValueError, match=match):
        DPSGD(**params)


def test_batchnorm_model_is_rejected_clearly():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    from models.tasks import TaskSpec
    ctx = make_ctx(model, TaskSpec("image", num_classes=2), [{"pixel_values": torch.zeros(2), "labels": torch.tensor(0)}] * 4)
    with pytest.raises(ValueError, match="BatchNorm"):
        DPSGD(noise_multiplier=1.0).setup(ctx)


def test_vit_embeddings_sampler_equals_the_per_example_loop_without_functorch():
    """fedprobe's grad sampler for ViTEmbeddings (issue 19: Opacus re-ran the patch convolution under functorch)
    reads the cls/position gradients off the output gradient: equal to a loop over single examples, and functorch
    is never prepared for the module."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    model, task, data = tiny("vit")
    emb = next(m for m in model.modules() if isinstance(m, ViTEmbeddings))
    batch = stack(data)
    ref = per_example_grads(model, task, batch)
    ctx = make_ctx(model, task, data)
    d = DPSGD(noise_multiplier=0.0, max_grad_norm=1e6, poisson_sampling=False)
    d.setup(ctx)
    assert ViTEmbeddings in GradSampleHooks.GRAD_SAMPLERS
    per_example_loss(logits_of(ctx.model, batch), batch["labels"], task).mean().backward()
    names = {id(p): n for n, p in model.named_parameters()}
    for p in emb.parameters():
        n, expect = names[id(p)], ref[names[id(p)]]
        assert p.grad_sample.shape == expect.shape, n
        assert torch.allclose(p.grad_sample, expect, atol=1e-6, rtol=1e-5), n
    assert not hasattr(emb, "ft_compute_sample_grad")  # Opacus's functorch fallback was not used
    d.after_training(ctx)


def test_vit_embedding_dropout_is_refused_in_one_line():
    """Opacus's fallback failed here with a vmap randomness error inside backward; now setup says why and the fix."""
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    model, task, data = tiny("vit")
    next(m for m in model.modules() if isinstance(m, ViTEmbeddings)).dropout.p = 0.1
    with pytest.raises(ValueError, match="hidden_dropout_prob = 0.0"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0).setup(make_ctx(model, task, data))
