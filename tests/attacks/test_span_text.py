"""span_text (DAGER-style): the span test, sequence growth, fallbacks, and a 2-client federated run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from attacks.base import ATTACKS, Observation
from attacks.harness import attack_and_score
from attacks.span_text import SpanText, _distance, _span_basis
from models.tasks import TaskSpec, task_loss

V, L, D = 40, 8, 48
TASK = TaskSpec(kind="lm", seq_len=L, vocab_size=V, pad_token_id=0)


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_positions=L, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


# two hand-made sentences, right-padded with 0: lengths 6 and 4
IDS = torch.tensor([[5, 9, 12, 7, 30, 11, 0, 0], [8, 9, 21, 17, 0, 0, 0, 0]])
MASK = (IDS != 0).long()
BATCH = {"input_ids": IDS, "attention_mask": MASK, "labels": IDS.masked_fill(MASK == 0, -100)}


def observe(batch=BATCH, steps=1) -> Observation:
    model = gpt2()
    g0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        task_loss(model, batch, TASK)[0].backward()
        opt.step()
    g1 = {k: v.detach().clone() for k, v in model.named_parameters()}
    n = len(batch["input_ids"])
    md = {"lr": 0.1, "local_steps": steps, "batch_size": n, "num_examples": n, "optimizer": "sgd"}
    return Observation(1, 0, 0, g0, g1, md, TASK, gpt2)


def test_the_span_test_finds_every_token_of_the_batch_and_no_other():
    """Layer 1: exactly the (token, position) pairs that carry loss lie in the span: every real token but each
    sentence's last one (it predicts a pad); no other pair of the vocabulary."""
    obs = observe()
    model = gpt2()
    grad = {k: (obs.global_params[k] - obs.client_params[k]).double() / 0.1 for k in obs.client_params}
    basis = _span_basis(grad["transformer.h.0.attn.c_attn.weight"], 1e-5)
    t = model.transformer.double()
    with torch.no_grad():
        x = t.h[0].ln_1(t.wte.weight[None] + t.wpe.weight[:L, None])  # [L, V, d]
        found = {(p, v) for p, v in torch.nonzero(_distance(x, basis) < 1e-3).tolist()}
    expected = {(p, int(IDS[i, p])) for i in range(2) for p in range(int(MASK[i].sum()) - 1)}
    assert found == expected


def test_span_text_recovers_the_batch_exactly():
    rec, scores = attack_and_score(ATTACKS.create("span_text"), observe(), BATCH)
    assert scores["exact_sentences"] == 1.0 and scores["token_accuracy"] == 1.0 and scores["rouge1"] == 1.0
    assert rec.metrics["span_fallback"] == 0.0 and rec.metrics["span_sentences_grown"] == 2.0


def test_span_text_models_dp_sgd_clipping_of_each_sentence():
    """Per-example clipping (DP-SGD without noise) scales each sentence's gradient by its own factor: the spans stay,
    and the last tokens are chosen against clipped sentence gradients, as the public defense list says."""
    import dataclasses

    C = 0.05
    model = gpt2().double()  # float64 update: a float32 one this small would sit on the rounding floor (full rank)
    g0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    total = {k: torch.zeros_like(v) for k, v in g0.items()}
    for i in range(2):  # Opacus: mean over the batch of g_i * min(1, C / (|g_i| + 1e-6))
        model.zero_grad()
        one = {k: v[i : i + 1] for k, v in BATCH.items()}
        task_loss(model, one, TASK)[0].backward()
        g = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        norm = float(torch.sqrt(sum((v**2).sum() for v in g.values())))
        assert norm > 2 * C  # both sentences are clipped, by different factors
        for k in total:
            total[k] += g[k] * min(1.0, C / (norm + 1e-6)) / 2
    g1 = {k: g0[k] - 0.1 * total[k] for k in g0}
    md = {"lr": 0.1, "local_steps": 1, "batch_size": 2, "num_examples": 2, "optimizer": "sgd"}
    dp = ({"name": "dp_sgd", "params": {"noise_multiplier": 0.0, "max_grad_norm": C}},)
    obs = dataclasses.replace(Observation(1, 0, 0, g0, g1, md, TASK, gpt2), defenses=dp)
    rec, scores = attack_and_score(ATTACKS.create("span_text"), obs, BATCH)
    assert rec.metrics["span_fallback"] == 0.0 and scores["exact_sentences"] == 1.0


def test_span_text_falls_back_where_the_structure_does_not_pin_the_batch():
    quick = {"fallback_params": {"iterations": 5, "refine_sweeps": 0}}
    rec = ATTACKS.create("span_text", **quick).attack(observe(steps=2))  # FedAvg: the spans of 2 models mix
    assert rec.metrics["span_fallback"] == 1.0 and "FedAvg" in rec.artifacts["span_fallback_reason"]
    wide = {k: v.repeat(8, 1) for k, v in BATCH.items()}  # 16 random sentences x 8 tokens: 112 > d = 48
    wide["input_ids"] = torch.randint(1, V, wide["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    wide["attention_mask"] = torch.ones_like(wide["input_ids"])
    wide["labels"] = wide["input_ids"].clone()
    rec = SpanText(**quick).attack(observe(wide))
    assert rec.metrics["span_fallback"] == 1.0 and "does not pin" in rec.artifacts["span_fallback_reason"]
    with pytest.raises(ValueError, match="tol"):
        SpanText(tol=2.0)
    with pytest.raises(ValueError, match="FedAvg.*fallback = 'none'"):  # best_of's member: raises, TAG runs once
        SpanText(fallback="none").attack(observe(steps=2))


def test_span_text_in_a_two_client_run(tmp_path, monkeypatch):
    from fl.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "span.toml"
    cfg.write_text(open(__file__.replace("tests/attacks/test_span_text.py", "experiments/attack_text_batch.toml"))
                   .read().replace("num_clients = 4", "num_clients = 2").replace("batch_size = 8", "batch_size = 2"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(cfg), "--tracking-uri", uri, "--summary-json", "s.json", "--no-progress"]) == 0
    final = json.loads((tmp_path / "s.json").read_text())["final"]
    assert final["attack_exact_sentences"] == 1.0 and final["attack_rouge1"] == 1.0 and final["attack_span_fallback"] == 0


def test_the_rounding_floor_bounds_what_float32_weights_add_to_the_recovered_gradient():
    """(global - float32(global - lr G)) / lr = G + rounding error: the error's singular values stay under the floor,
    a rank-3 G's stay above it, so the basis has rank 3 (a rank_tol of 1e-6 alone would keep the error's too)."""
    from attacks.span_text import _rounding_floor

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 64, generator=gen, dtype=torch.float64) * 0.05).float()
    g = torch.randn(96, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 64, generator=gen, dtype=torch.float64)
    lr = 1e-3
    sent = (w.double() - lr * g * 1e-3).float()  # a small update: its rounding error is 1e-4 of it
    recovered = (w.double() - sent.double()) / lr
    floor = _rounding_floor(sent, lr)
    S = torch.linalg.svdvals(recovered)
    assert (S[:3] > floor).all() and (S[3:] < floor).all() and float(S[3] / S[0]) > 1e-6
    assert _span_basis(recovered, 1e-6, floor).shape[1] == 3 and _span_basis(recovered, 1e-6).shape[1] > 3


def test_span_text_reads_a_minilm_sentence_exactly_and_a_tiny_bert_at_init_falls_back():
    """BERT, batch of one, float32 FedSGD update: on the pretrained MiniLM (d = 384) the sentence's 16 positions are
    16 span directions above the rounding floor, read off exactly; a randomly initialised tiny BERT's update has 2
    directions above it, so the attack says it cannot read the sentence instead of guessing."""
    from fl.data import load_dataset
    from models import build_model
    from models.config import ModelConfig

    for pretrained, lr, exact in (("minilm", 0.03, True), ("", 0.1, False)):
        data = load_dataset("textgen", {"seq_len": 32, "tokenizer": pretrained} if pretrained else {})
        batch = {k: v[:1] for k, v in data.data.tensors.items()}
        cfg = ModelConfig(family="bert", pretrained=pretrained)
        model = build_model(cfg, data.task, seed=0)
        g0 = {k: v.detach().clone() for k, v in model.named_parameters()}
        task_loss(model, batch, data.task)[0].backward()
        g1 = {k: (v - lr * v.grad).detach() for k, v in model.named_parameters()}  # one float32 SGD step, as sent
        md = {"lr": lr, "local_steps": 1, "batch_size": 1, "num_examples": 1, "optimizer": "sgd"}
        obs = Observation(1, 0, 0, g0, g1, md, data.task, lambda: build_model(cfg, data.task, seed=0))
        if exact:
            rec, scores = attack_and_score(SpanText(fallback="none"), obs, batch)
            assert scores["exact_sentences"] == 1.0 and rec.metrics["span_rank"] == int(batch["attention_mask"].sum())
        else:
            with pytest.raises(ValueError, match="rounding floor"):
                SpanText(fallback="none").attack(obs)
