"""Model families build from config, train one step, load from a local pretrained folder, fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl.config import ModelConfig
from fl.registry import RegistryError
from models import MODELS, ModelError, build_model, count_parameters
from models.families import patch_size_for
from models.tasks import TaskSpec, task_loss

IMAGE = TaskSpec(kind="image", num_classes=10, image_shape=(1, 8, 8), mean=(0.3,), std=(0.4,))
TEXT = TaskSpec(kind="text", num_classes=4, seq_len=12, vocab_size=50, pad_token_id=0,
                extra={"cls_token_id": 2, "sep_token_id": 3})
LM = TaskSpec(kind="lm", seq_len=12, vocab_size=50, pad_token_id=0, extra={"cls_token_id": 2, "sep_token_id": 3})


def batch_for(task: TaskSpec, b: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if task.kind == "image":
        return {"pixel_values": torch.randn(b, *task.image_shape, generator=g),
                "labels": torch.randint(task.num_classes, (b,), generator=g)}
    ids = torch.randint(5, task.vocab_size, (b, task.seq_len), generator=g)
    mask = torch.ones_like(ids)
    ids[:, -3:], mask[:, -3:] = task.pad_token_id, 0  # right padding
    labels = ids.masked_fill(mask == 0, -100) if task.kind == "lm" else torch.randint(task.num_classes, (b,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


CASES = [("vit", IMAGE, "ViTForImageClassification"), ("bert", TEXT, "BertForSequenceClassification"),
         ("gpt2", LM, "GPT2LMHeadModel"), ("gpt2", TEXT, "GPT2ForSequenceClassification")]


@pytest.mark.parametrize("family, task, cls", CASES)
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_family_builds_and_trains_one_step(family: str, task: TaskSpec, cls: str, size: str) -> None:
    model = build_model(ModelConfig(family=family, size=size), task, seed=0)
    assert type(model).__name__ == cls
    assert model.config._attn_implementation == "eager"
    batch = batch_for(task)
    loss, logits = task_loss(model, batch, task)
    want = (3, task.seq_len, task.vocab_size) if task.kind == "lm" else (3, task.num_classes)
    assert tuple(logits.shape) == want and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:-1]) and sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    trainable, total = count_parameters(model)
    assert trainable == total > 10_000
    assert total < (200_000 if size == "tiny" else 2_000_000)


def test_gpt2_classifier_pools_last_real_token() -> None:
    model = build_model(ModelConfig(family="gpt2"), TEXT, seed=0).eval()
    batch = batch_for(TEXT)
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ids = batch["input_ids"].clone()
        ids[:, -3:] = TEXT.pad_token_id  # changing only padding ...
        b = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    assert model.config.pad_token_id == TEXT.pad_token_id
    assert torch.allclose(a, b)  # ... leaves the pooled logits unchanged


def test_vit_patch_size_fits_image() -> None:
    assert patch_size_for(8, 8, 4) == 4 and patch_size_for(8, 8, 16) == 2 and patch_size_for(32, 32, 16) == 8
    assert patch_size_for(7, 7, 4) == 7  # prime side: one patch
    m = build_model(ModelConfig(family="vit"), TaskSpec(kind="image", num_classes=3, image_shape=(3, 32, 32)))
    assert m.config.patch_size == 16 and m.config.num_channels == 3
    m = build_model(ModelConfig(family="vit", params={"patch_size": 2}), IMAGE)
    assert m.config.patch_size == 2
    assert m(pixel_values=torch.randn(1, 1, 8, 8)).logits.shape == (1, 10)


def test_seed_determinism_and_rng_isolation() -> None:
    cfg = ModelConfig(family="bert")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(cfg, TEXT, seed=7)
    assert torch.equal(torch.rand(1), before), "build_model must not consume the caller's RNG stream"
    b = build_model(cfg, TEXT, seed=7)
    c = build_model(cfg, TEXT, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_params_override_and_attn_implementation() -> None:
    m = build_model(ModelConfig(family="bert", params={"hidden_act": "relu", "attn_implementation": "sdpa"}), TEXT)
    assert m.config.hidden_act == "relu" and m.config._attn_implementation == "sdpa"
    with pytest.raises(ModelError, match=r"model.params.hiden_size is not a BertConfig field .*valid keys: .*hidden_size"):
        build_model(ModelConfig(family="bert", params={"hiden_size": 32}), TEXT)
    with pytest.raises(ModelError, match="hidden size 64 is not a multiple of the 5 attention heads"):
        build_model(ModelConfig(family="vit", params={"num_attention_heads": 5}), IMAGE)


def test_eager_default_supports_double_backward() -> None:
    """Gradient-inversion attacks differentiate a gradient; the default attention must allow it."""
    model = build_model(ModelConfig(family="vit"), IMAGE)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    loss, _ = task_loss(model, {"pixel_values": x, "labels": torch.tensor([1, 2])}, IMAGE)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()], create_graph=True)
    sum((g**2).sum() for g in grads).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_family_task_mismatch_and_unknown_family() -> None:
    with pytest.raises(ModelError, match="'vit' cannot do a 'text' task; set model.family to one of: bert, gpt2"):
        build_model(ModelConfig(family="vit"), TEXT)
    with pytest.raises(ModelError, match="'bert' cannot do a 'lm' task; set model.family to one of: gpt2"):
        build_model(ModelConfig(family="bert"), LM)
    with pytest.raises(RegistryError, match="unknown model family 'resnet'; choose one of: bert, gpt2, vit"):
        build_model(ModelConfig(family="resnet"), IMAGE)
    assert {"vit", "bert", "gpt2"} <= set(MODELS.names())
    assert all(summary for _, summary in MODELS.items())


@pytest.mark.parametrize("family, task", [("vit", IMAGE), ("bert", TEXT), ("gpt2", LM)])
def test_pretrained_round_trip(tmp_path: Path, family: str, task: TaskSpec) -> None:
    src = build_model(ModelConfig(family=family), task, seed=3).eval()
    src.save_pretrained(tmp_path / "m")
    loaded = build_model(ModelConfig(family=family, pretrained=str(tmp_path / "m")), task, seed=99).eval()
    batch = batch_for(task)
    with torch.no_grad():
        ref = task_loss(src, batch, task)[1]
        got = task_loss(loaded, batch, task)[1]
    assert torch.allclose(ref, got, atol=1e-6)
    assert loaded.config._attn_implementation == "eager"


def test_pretrained_new_head_keeps_body(tmp_path: Path) -> None:
    src = build_model(ModelConfig(family="bert"), TEXT, seed=3)
    src.save_pretrained(tmp_path / "m")
    two = TaskSpec(kind="text", num_classes=2, seq_len=12, vocab_size=50, pad_token_id=0)
    m = build_model(ModelConfig(family="bert", pretrained=str(tmp_path / "m")), two)
    assert m.classifier.out_features == 2
    assert torch.equal(m.bert.embeddings.word_embeddings.weight, src.bert.embeddings.word_embeddings.weight)


def test_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model.pretrained folder not found"):
        build_model(ModelConfig(family="vit", pretrained=str(tmp_path / "nope")), IMAGE)
    with pytest.raises(ModelError, match="has no config.json"):
        build_model(ModelConfig(family="vit", pretrained=str(tmp_path)), IMAGE)
    build_model(ModelConfig(family="bert"), TEXT).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match="holds a 'bert' model, not 'vit'; set model.family"):
        build_model(ModelConfig(family="vit", pretrained=str(tmp_path / "bert")), IMAGE)
    big = TaskSpec(kind="text", num_classes=4, seq_len=12, vocab_size=80, pad_token_id=0)
    with pytest.raises(ModelError, match="vocab_size 50 < the tokenizer's 80"):
        build_model(ModelConfig(family="bert", pretrained=str(tmp_path / "bert")), big)
    build_model(ModelConfig(family="vit"), IMAGE).save_pretrained(tmp_path / "vit")
    rgb = TaskSpec(kind="image", num_classes=10, image_shape=(3, 8, 8))
    with pytest.raises(ModelError, match="takes 1x8px images, the data has 3x8px"):
        build_model(ModelConfig(family="vit", pretrained=str(tmp_path / "vit")), rgb)


def test_adapter_and_attention_hooks_are_applied() -> None:
    lora = build_model(ModelConfig(family="bert", adapter="lora"), TEXT, seed=0)
    trainable, total = count_parameters(lora)
    assert 0 < trainable < total / 2
    loss, _ = task_loss(lora, batch_for(TEXT), TEXT)
    loss.backward()
    from models.attention import ATTENTION

    other = next(n for n in ATTENTION.names() if n not in ("standard", "prefix"))
    m = build_model(ModelConfig(family="vit", attention=other), IMAGE, seed=0)
    assert m.config._attn_implementation != "eager"
    assert torch.isfinite(task_loss(m, batch_for(IMAGE), IMAGE)[0])


def test_count_parameters_counts_frozen() -> None:
    m = build_model(ModelConfig(family="vit"), IMAGE)
    _, total = count_parameters(m)
    for p in m.vit.parameters():
        p.requires_grad = False
    trainable, total2 = count_parameters(m)
    assert total2 == total and trainable == sum(p.numel() for p in m.classifier.parameters())
