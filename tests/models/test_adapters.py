"""Fine-tuning arms: which parameters train, parameter counts, heads trainable in every arm."""

from __future__ import annotations

import pytest
import torch

from models.adapters import apply_adapter, trainable_parameters
from models.attention import install_attention
from models.tasks import per_example_loss
from tests.models.test_attention_hf import batch_for, bert, gpt2, inputs, vit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
L, H, D = 1, 2, 8  # layers, heads, head dim of the tiny models


HEAD = {vit: 16 * 3 + 3, bert: 16 * 3 + 3, gpt2: 16 * 30}  # classifier / untied lm_head


def step(model, family):
    """One Adam step; returns {name: changed?}."""
    batch, task = batch_for(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    per_example_loss(model(**inputs(batch)).logits, batch["labels"], task).mean().backward()
    opt.step()
    return {n: not torch.equal(before[n], p.detach()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", [vit, bert, gpt2])
def test_ntk_adapter_trains_only_prefix_params_and_head(family):
    torch.manual_seed(0)
    _, task = batch_for(family)
    m = apply_adapter(family(), "ntk", task)
    assert trainable_parameters(m) == L * H * (D * D + D) + HEAD[family]
    changed = step(m, family)
    head = "lm_head" if family is gpt2 else "classifier"
    for n, c in changed.items():
        expect = ".ntk_prefix." in n or n.startswith(head)
        assert c == expect, n


def test_ntk_adapter_keeps_installed_kernel_and_rejects_conflicts():
    _, task = batch_for(vit)
    m = install_attention(vit(), "ntk", init_std=0.1)
    z = next(p for n, p in m.named_parameters() if n.endswith("ntk_prefix.z"))
    apply_adapter(m, "ntk", task)
    assert next(p for n, p in m.named_parameters() if n.endswith("ntk_prefix.z")) is z
    with pytest.raises(ValueError, match="replaces attention 'sketch'"):
        apply_adapter(install_attention(vit(), "sketch"), "ntk", task)


@pytest.mark.parametrize("family", [vit, bert, gpt2])
def test_lora_adapter_trains_lora_and_head(family):
    torch.manual_seed(0)
    _, task = batch_for(family)
    m = apply_adapter(family(), "lora", task, r=2)
    r, hid = 2, 16
    lora = L * 2 * r * (hid + hid) if family is not gpt2 else L * r * (hid + 3 * hid)
    assert trainable_parameters(m) == lora + HEAD[family]
    changed = step(m, family)
    assert any(c for n, c in changed.items() if "lora_" in n)
    assert any(c for n, c in changed.items() if "modules_to_save" in n)  # the head trains
    assert not any(c for n, c in changed.items() if "lora_" not in n and "modules_to_save" not in n)


@pytest.mark.parametrize("family", [vit, bert, gpt2])
def test_prefix_adapter_native(family):
    torch.manual_seed(0)
    _, task = batch_for(family)
    m = apply_adapter(family(), "prefix", task, num_virtual_tokens=3)
    assert trainable_parameters(m) == L * 2 * H * 3 * D + HEAD[family]
    changed = step(m, family)
    head = "lm_head" if family is gpt2 else "classifier"
    for n, c in changed.items():
        assert c == (".prefix_kv." in n or n.startswith(head)), n


def test_prefix_adapter_peft_gpt2_and_full():
    torch.manual_seed(0)
    _, task = batch_for(gpt2)
    m = apply_adapter(gpt2(), "prefix", task, num_virtual_tokens=3, backend="peft")
    assert trainable_parameters(m) == 3 * L * 2 * 16 + HEAD[gpt2]
    assert any(step(m, gpt2).values())
    full = apply_adapter(vit(), "full", batch_for(vit)[1])
    assert trainable_parameters(full) == sum(p.numel() for p in full.parameters())


def test_adapter_errors():
    _, task = batch_for(vit)
    with pytest.raises(ValueError, match="unknown adapter"):
        apply_adapter(vit(), "adapterx", task)
    with pytest.raises(ValueError, match="takes no adapter_params"):
        apply_adapter(vit(), "full", task, r=3)
    with pytest.raises(ValueError, match="needs model.attention = 'standard'"):
        apply_adapter(install_attention(vit(), "sparse_topk", top_k=2), "prefix", task)
