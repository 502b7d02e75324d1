"""dp_sgd through the project's own client loop and with PEFT adapters."""

import pytest
import torch

from defenses.accounting import epsilon
from defenses.dp_sgd import DPSGD
from models.tasks import logits_of, per_example_loss
from tests.defenses.helpers import make_ctx, per_example_grads, run_round, stack, tiny

torch.set_num_threads(1)


@pytest.mark.slow  # builds the digits federation and runs fl.training twice (~15 s on 2 busy cores)
def test_train_client_composes_epsilon_across_rounds():
    from fl.arrays import trainable_state
    from fl.config import load_config
    from fl.data import load_federated
    from fl.training import train_client
    from models import build_model

    cfg = load_config("experiments/dp_sgd.toml", ["federation.num_clients=4", "federation.clients_per_round=4", "federation.local_steps=3"])
    data = load_federated(cfg.data, cfg.federation.num_clients, cfg.experiment.seed)
    glob = {k: v.detach().clone() for k, v in trainable_state(build_model(cfg.model, data.task, seed=0)).items()}
    state, eps = {}, []
    for rnd in (1, 2):
        res = train_client(cfg, 0, glob, rnd, state)
        assert set(res.state) == set(glob)  # update keys are the original model's names
        state, glob = res.client_state, res.state
        eps.append(res.metrics["epsilon"])
    q = state["dp_sgd"]["ledger"]["history"][0][1]
    assert eps[1] == pytest.approx(epsilon(1.0, q, 6, 1e-5), rel=1e-12) and eps[0] < eps[1]


def test_lora_adapter_per_sample_grads_and_training():
    from peft import LoraConfig, get_peft_model

    base, task, data = tiny("bert")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"], lora_dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    batch = stack(data)
    ref = per_example_grads(model, task, batch)
    ctx = make_ctx(model, task, data)
    d = DPSGD(noise_multiplier=0.0, max_grad_norm=1e6, poisson_sampling=False)
    d.setup(ctx)
    per_example_loss(logits_of(model, batch), batch["labels"], task).mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad_sample, ref[n], atol=1e-6), n
    d.after_training(ctx)
    ctx = make_ctx(model, task, data)
    update = run_round(ctx, [DPSGD(noise_multiplier=1.0, noise_seed=0)])
    assert set(update) == set(trainable) and ctx.metrics["epsilon"] > 0
