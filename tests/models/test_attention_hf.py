"""Kernels inside transformers' ViT, BERT and GPT-2 (attention interface), and per-sample grads under Opacus."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import (  # noqa: E402
    BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification,
)

from fl.registry import RegistryError  # noqa: E402
from models.attention import ATTENTION, install_attention  # noqa: E402
from models.attention.ntk import NTKPrefix  # noqa: E402
from models.tasks import TaskSpec, per_example_loss  # noqa: E402

warnings.filterwarnings("ignore", message=".*token_id.*")
KERNELS = [("standard", {}), ("ntk", {"init_std": 0.3}), ("sparse_topk", {"top_k": 3}), ("sketch", {"degree": 2})]




def vit(layers=1):
    return ViTForImageClassification(ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def bert(layers=1):
    return BertForSequenceClassification(BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def gpt2(layers=1):
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=30, n_embd=16, n_layer=layers, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0))


def batch_for(family, b=3, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    if family is vit:
        return dict(pixel_values=torch.randn(b, 1, 8, 8, generator=g), labels=torch.arange(b) % 3), TaskSpec("image", num_classes=3)
    ids = torch.randint(1, 30, (b, n), generator=g)
    am = torch.ones(b, n, dtype=torch.long)
    am[1, n - 2:] = 0  # right padding on one example
    if family is bert:
        return dict(input_ids=ids, attention_mask=am, labels=torch.arange(b) % 3), TaskSpec("text", num_classes=3)
    return dict(input_ids=ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100)), TaskSpec("lm")


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def built(family, kernel, params, layers=1, seed=0):
    torch.manual_seed(seed)
    m = family(layers)
    install_attention(m, kernel, **params)
    return m.eval()


def test_registry_lists_kernels_and_rejects_unknown():
    assert {"standard", "ntk", "sparse_topk", "sketch"} <= set(ATTENTION.names())
    with pytest.raises(RegistryError, match="unknown attention kernel"):
        install_attention(vit(), "flash9")
    with pytest.raises(ValueError, match="no transformers attention modules"):
        install_attention(torch.nn.Linear(2, 2), "ntk")
    with pytest.raises(ValueError, match="init_std"):
        install_attention(vit(), "ntk", init_std=0.0)
    with pytest.raises(ValueError, match="even"):
        install_attention(vit(), "sketch", degree=3)


@pytest.mark.parametrize("family", [vit, bert, gpt2])
def test_exact_limits_equal_standard_attention(family):
    """standard == transformers' sdpa; ntk with Z = k = 0, sparse with k >= n and high-degree sketch ~ standard."""
    batch, _ = batch_for(family)
    torch.manual_seed(0)
    ref = family().eval()(**inputs(batch)).logits
    keep = batch.get("attention_mask")
    rows = (lambda x: x[keep.bool()]) if family is gpt2 else (lambda x: x)
    assert torch.allclose(built(family, "standard", {})(**inputs(batch)).logits, ref, atol=1e-6)
    m = built(family, "ntk", {"init_std": 1.0})
    assert (m(**inputs(batch)).logits - ref).abs().max() > 2e-5  # the prefix term is live
    for mod in m.modules():
        if isinstance(mod, NTKPrefix):
            mod.z.data.zero_()
            mod.zk.data.zero_()
    assert torch.allclose(rows(m(**inputs(batch)).logits), rows(ref), atol=1e-5)
    assert torch.allclose(rows(built(family, "sparse_topk", {"top_k": 64})(**inputs(batch)).logits), rows(ref), atol=1e-5)
    assert torch.allclose(rows(built(family, "sketch", {"degree": 4})(**inputs(batch)).logits), rows(ref), atol=1e-4)


@pytest.mark.parametrize("kernel,params", KERNELS)
def test_bert_padding_tokens_do_not_change_logits(kernel, params):
    batch, _ = batch_for(bert)
    m = built(bert, kernel, params)
    out = m(**inputs(batch)).logits
    ids2 = batch["input_ids"].clone()
    ids2[1, -2:] = (ids2[1, -2:] + 7) % 30  # change the padded tokens only
    out2 = m(input_ids=ids2, attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(out[1], out2[1], atol=1e-6)
    # the padded example equals the same example without padding
    solo = m(input_ids=batch["input_ids"][1:2, :-2]).logits
    assert torch.allclose(out[1], solo[0], atol=1e-5)


@pytest.mark.parametrize("kernel,params", KERNELS)
def test_gpt2_is_causal(kernel, params):
    batch, _ = batch_for(gpt2)
    m = built(gpt2, kernel, params)
    ids = batch["input_ids"]
    out = m(input_ids=ids).logits
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 5) % 30
    out2 = m(input_ids=ids2).logits
    assert torch.allclose(out[:, :-1], out2[:, :-1], atol=1e-6)
    assert not torch.allclose(out[:, -1], out2[:, -1], atol=1e-6)


def test_ntk_gradients_reach_earlier_layers_and_match_quadratic_oracle():
    """Two-layer BERT: the fused path's gradients (through lse) equal the quadratic reference's for every parameter."""
    batch, task = batch_for(bert)
    grads = {}
    for backend in ("auto", "reference"):
        m = built(bert, "ntk", {"init_std": 0.3, "backend": backend}, layers=2)
        per_example_loss(m(**inputs(batch)).logits, batch["labels"], task).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    first_z = "bert.encoder.layer.0.attention.self.ntk_prefix.z"
    assert grads["auto"][first_z].abs().max() > 1e-6
    for n, g in grads["reference"].items():
        assert torch.allclose(grads["auto"][n], g, atol=1e-5, rtol=1e-4), n


def test_ntk_k_trains_from_first_step():
    batch, task = batch_for(vit)
    m = built(vit, "ntk", {})
    prefix = next(mod for mod in m.modules() if isinstance(mod, NTKPrefix))
    before = prefix.zk.detach().clone()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    per_example_loss(m(**inputs(batch)).logits, batch["labels"], task).mean().backward()
    assert prefix.zk.grad.abs().min() > 0
    opt.step()
    assert (prefix.zk.detach() - before).abs().min() > 1e-4


@pytest.mark.parametrize("family", [vit, bert, gpt2])
@pytest.mark.parametrize("kernel,params", KERNELS + [("prefix", {"num_virtual_tokens": 2})])
def test_opacus_per_sample_grads_match_per_example_loop(family, kernel, params):
    from opacus import GradSampleModule

    batch, task = batch_for(family)
    m = built(family, kernel, params).train()
    for n, p in m.named_parameters():  # broadcast position embeddings: Opacus issue #841, not ours
        if "embed" in n or n.startswith(("transformer.wte", "transformer.wpe")):
            p.requires_grad = False
    ref = copy.deepcopy(m)
    gsm = GradSampleModule(m, loss_reduction="sum")
    per_example_loss(gsm(**inputs(batch)).logits, batch["labels"], task).sum().backward()
    params_m = [p for p in m.parameters() if p.requires_grad]
    params_r = [p for p in ref.parameters() if p.requires_grad]
    if kernel == "ntk":
        assert any(p.shape[-2:] == (8, 8) for p in params_m)  # Z is among the checked parameters
    for i in range(batch["labels"].shape[0]):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        li = per_example_loss(ref(**inputs(one)).logits, one["labels"], task).sum()
        for p, g in zip(params_m, torch.autograd.grad(li, params_r)):
            assert torch.allclose(p.grad_sample[i], g, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kernel,params", KERNELS + [("prefix", {"num_virtual_tokens": 2})])
def test_gradient_of_gradient_through_every_kernel(kernel, params):
    """Gradient-inversion attacks need d/dx of a function of the parameter gradients (double backward)."""
    batch, task = batch_for(vit)
    m = built(vit, kernel, params)
    x = batch["pixel_values"].clone().requires_grad_()
    loss = per_example_loss(m(pixel_values=x).logits, batch["labels"], task).sum()
    grads = torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad], create_graph=True)
    (gx,) = torch.autograd.grad(sum((g ** 2).sum() for g in grads), x)
    assert torch.isfinite(gx).all() and gx.abs().max() > 0
