"""Every built-in dataset loads (local loaders from files made here), batches collate, errors are clear."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fl.config import DataConfig
from fl.data import DATASETS, DataError, load_dataset, load_federated, word_tokenizer
from fl.data.textgen import TOPICS, generate_corpus

BUILTINS = {"digits", "textgen", "textgen_lm", "image_folder", "text_csv", "text_jsonl", "hf_disk"}


def test_registry_lists_builtins_with_summaries() -> None:
    items = dict(DATASETS.items())
    assert BUILTINS <= set(items)
    assert all(items[n] for n in BUILTINS), "every dataset needs a one-line docstring for `fedprobe list`"


def test_digits_normalised_with_recorded_stats() -> None:
    d = load_dataset("digits")
    x = d.data.tensors["pixel_values"]
    assert x.shape == (1797, 1, 8, 8) and d.task.image_shape == (1, 8, 8)
    assert d.task.num_classes == 10 and sorted(set(d.labels.tolist())) == list(range(10))
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2
    raw = x * d.task.std[0] + d.task.mean[0]  # de-normalising gives back pixels in [0, 1]
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5
    from sklearn.datasets import load_digits

    ref = load_digits()  # the fast CSV read equals scikit-learn's loader
    assert torch.allclose(raw[:, 0], torch.as_tensor(ref.images / 16.0, dtype=torch.float32), atol=1e-5)
    assert np.array_equal(d.labels, ref.target)
    up = load_dataset("digits", {"image_size": 16})
    assert up.task.image_shape == (1, 16, 16)


def test_textgen_deterministic_and_well_formed() -> None:
    a, la = generate_corpus(200, 3, 3, 0.3)
    generate_corpus.cache_clear()
    b, lb = generate_corpus(200, 3, 3, 0.3)
    assert a == b and np.array_equal(la, lb)
    assert generate_corpus(200, 4, 3, 0.3)[0] != a
    d = load_dataset("textgen", {"n_samples": 300, "seq_len": 24})
    ids, mask, y = (d.data.tensors[k] for k in ("input_ids", "attention_mask", "labels"))
    assert ids.shape == mask.shape == (300, 24) and y.shape == (300,)
    assert d.task.kind == "text" and d.task.num_classes == 4 and set(y.tolist()) == {0, 1, 2, 3}
    assert int(ids.max()) < d.task.vocab_size
    assert torch.equal(ids == d.task.pad_token_id, mask == 0)
    assert bool((ids[:, 0] == d.task.extra["cls_token_id"]).all())
    assert int((ids == d.tokenizer.unk_token_id).sum()) == 0, "the tokenizer is trained on this corpus"
    # the label is the topic most content words come from
    for i in range(50):
        words = d.tokenizer.decode(ids[i], skip_special_tokens=True).split()
        counts = [sum(w in topic for w in words) for topic in TOPICS.values()]
        assert int(np.argmax(counts)) == int(y[i]) and max(counts) >= 2


def test_textgen_lm_labels_mask_padding() -> None:
    d = load_dataset("textgen_lm", {"n_samples": 50})
    ids, mask, lab = (d.data.tensors[k] for k in ("input_ids", "attention_mask", "labels"))
    assert d.task.kind == "lm" and d.task.num_classes == 0
    assert torch.equal(lab == -100, mask == 0)
    assert torch.equal(lab[mask == 1], ids[mask == 1])
    assert d.labels is not None and len(d.labels) == 50  # topics: lets Dirichlet skew an LM task


def _png(path: Path, value: int, size=(10, 12), mode="RGB") -> None:
    from PIL import Image

    arr = np.full((size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), value, dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


def test_image_folder(tmp_path: Path) -> None:
    for c, v in (("cat", 30), ("dog", 200)):
        (tmp_path / c).mkdir()
        for i in range(3):
            _png(tmp_path / c / f"{i}.png", v + i)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    d = load_dataset("image_folder", {"path": str(tmp_path), "image_size": 8})
    assert d.data.tensors["pixel_values"].shape == (6, 3, 8, 8)
    assert d.task.extra["class_names"] == ["cat", "dog"] and d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x = d.data.tensors["pixel_values"]
    assert float(x[3:].mean()) > float(x[:3].mean())  # brighter dog images stay brighter after normalising
    grey = load_dataset("image_folder", {"path": str(tmp_path), "image_size": 4, "mode": "L"})
    assert grey.task.image_shape == (1, 4, 4)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder not found"):
        load_dataset("image_folder", {"path": str(tmp_path / "nope")})
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset("image_folder", {"path": str(tmp_path)})
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_dataset("image_folder", {"path": str(tmp_path)})
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        load_dataset("image_folder", {"path": str(tmp_path)})
    with pytest.raises(DataError, match="set data.params.path"):
        load_dataset("image_folder")


ROWS = [{"review": f"good movie number {i}" if i % 2 else f"bad film {i} awful", "stars": "pos" if i % 2 else "neg"}
        for i in range(12)]


def test_text_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = tmp_path / "d.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["review", "stars"])
        w.writeheader()
        w.writerows(ROWS)
    jl_path = tmp_path / "d.jsonl"
    jl_path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    params = {"text_column": "review", "label_column": "stars", "seq_len": 10}
    a = load_dataset("text_csv", {"path": str(csv_path), **params})
    b = load_dataset("text_jsonl", {"path": str(jl_path), **params})
    for d in (a, b):
        assert d.task.extra["class_names"] == ["neg", "pos"] and d.task.num_classes == 2
        assert d.data.tensors["labels"].tolist() == [i % 2 for i in range(12)]
        assert d.data.tensors["input_ids"].shape == (12, 10)
    assert torch.equal(a.data.tensors["input_ids"], b.data.tensors["input_ids"])
    # a saved tokenizer folder is used instead of training one
    tok = word_tokenizer(["good bad"])
    tok.save_pretrained(tmp_path / "tok")
    c = load_dataset("text_csv", {"path": str(csv_path), **params, "tokenizer": str(tmp_path / "tok")})
    assert c.task.vocab_size == len(tok) == 7
    assert int((c.data.tensors["input_ids"] == tok.unk_token_id).sum()) > 0  # 'movie' is unknown to it
    lm = load_dataset("text_jsonl", {"path": str(jl_path), "text_column": "review", "kind": "lm", "seq_len": 8})
    assert lm.task.kind == "lm" and lm.data.tensors["labels"].shape == (12, 8)


def test_text_file_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{not json}\n')
    with pytest.raises(DataError, match="line 2 .* not valid JSON"):
        load_dataset("text_jsonl", {"path": str(p)})
    p.write_text('{"body": "a", "label": 1}\n')
    with pytest.raises(DataError, match="missing column.*text.*columns are body, label"):
        load_dataset("text_jsonl", {"path": str(p)})
    with pytest.raises(DataError, match="file not found"):
        load_dataset("text_csv", {"path": str(tmp_path / "missing.csv")})
    p.write_text('{"text": "a", "label": 1}\n')
    with pytest.raises(DataError, match="tokenizer folder not found"):
        load_dataset("text_jsonl", {"path": str(p), "tokenizer": str(tmp_path / "no_tok")})


def test_hf_disk_text_and_image(tmp_path: Path) -> None:
    import datasets  # a declared dependency (pyproject), needed by hf_disk
    from PIL import Image

    text = datasets.Dataset.from_dict({"text": [r["review"] for r in ROWS], "label": [i % 3 for i in range(12)]})
    datasets.DatasetDict({"train": text}).save_to_disk(str(tmp_path / "txt"))
    d = load_dataset("hf_disk", {"path": str(tmp_path / "txt"), "seq_len": 12})
    assert d.task.kind == "text" and d.task.num_classes == 3 and d.data.tensors["input_ids"].shape == (12, 12)
    with pytest.raises(DataError, match="split 'test' not in"):
        load_dataset("hf_disk", {"path": str(tmp_path / "txt"), "split": "test"})

    imgs = [Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8)) for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])})
    im = datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 2, 0, 1, 2]}, features=features)
    im.save_to_disk(str(tmp_path / "img"))
    d = load_dataset("hf_disk", {"path": str(tmp_path / "img"), "image_size": 4})
    assert d.task.kind == "image" and d.task.image_shape == (3, 4, 4)
    assert d.task.extra["class_names"] == ["x", "y", "z"] and d.labels.tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        load_dataset("hf_disk", {"path": str(tmp_path)})


def test_load_federated_splits_cover_and_collate() -> None:
    cfg = DataConfig(dataset="digits", val_fraction=0.2, test_fraction=0.25)
    fd = load_federated(cfg, num_clients=7, seed=5)
    assert fd.num_partitions == 7 and len(fd.test) == 450  # ceil(0.25 * 1797)
    test_idx = set(fd.test.indices)
    seen: list[int] = []
    for pid in range(7):
        tr_i, va_i = fd.partition_indices(pid)
        assert abs(len(va_i) - 0.2 * (len(tr_i) + len(va_i))) <= 1
        tr, va = fd.partition(pid)
        assert len(tr) == len(tr_i) and len(va) == len(va_i)
        seen += tr_i.tolist() + va_i.tolist()
    assert len(seen) == len(set(seen)) == 1797 - 450 and not (set(seen) & test_idx)
    # stratified test split keeps class shares
    test_y, all_y = fd.labels[fd.test.indices], fd.labels
    assert np.all(np.abs(np.bincount(test_y) - 0.25 * np.bincount(all_y)) <= 1)
    tr, _ = fd.partition(0)
    batch = fd.collate([tr[i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 1, 8, 8) and batch["labels"].dtype == torch.long
    loader = torch.utils.data.DataLoader(tr, batch_size=4, collate_fn=fd.collate)
    assert next(iter(loader))["pixel_values"].shape == (4, 1, 8, 8)
    # cached in-process and deterministic
    assert load_federated(cfg, 7, 5) is fd
    other = load_federated(DataConfig(dataset="digits", val_fraction=0.2, test_fraction=0.25), 7, 6)
    assert not np.array_equal(other.client_indices[0], fd.client_indices[0])
    with pytest.raises(DataError, match="out of range"):
        fd.partition(7)


def test_load_federated_text_dirichlet_batch() -> None:
    fd = load_federated(DataConfig(dataset="textgen", partition="dirichlet", alpha=0.1,
                                   params={"n_samples": 400}), num_clients=5, seed=0)
    tr, _ = fd.partition(0)
    batch = fd.collate([tr[i] for i in range(min(3, len(tr)))])
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[1] == 24
    shares = [np.bincount(fd.labels[fd.client_indices[p]], minlength=4).max() / len(fd.client_indices[p])
              for p in range(5)]
    assert np.mean(shares) > 0.6  # alpha = 0.1: clients are dominated by one topic


def test_thousands_of_clients_are_cheap() -> None:
    t = time.perf_counter()
    fd = load_federated(DataConfig(dataset="digits", test_fraction=0.1), num_clients=1500, seed=0)
    tr, va = fd.partition(1499)
    assert len(tr) == 1 and len(va) == 0  # one item each: val never takes the last training item
    assert time.perf_counter() - t < 3.0
    with pytest.raises(DataError, match="use fewer clients"):
        load_federated(DataConfig(dataset="digits"), num_clients=5000, seed=0)


def test_bad_dataset_name_and_params() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'; choose one of: digits"):
        load_federated(DataConfig(dataset="mnist"), 2, 0)
    with pytest.raises(DataError, match="bad parameters for dataset 'digits'"):
        load_federated(DataConfig(dataset="digits", params={"colour": True}), 2, 0)
    with pytest.raises(DataError, match="image_size must be an integer"):
        load_dataset("digits", {"image_size": 2})
    assert issubclass(DataError, ValueError)


def test_unlabelled_lm_file_splits_randomly_and_refuses_dirichlet(tmp_path: Path) -> None:
    p = tmp_path / "lm.jsonl"
    p.write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(40)))
    params = {"path": str(p), "kind": "lm", "seq_len": 8}
    fd = load_federated(DataConfig(dataset="text_jsonl", params=params, test_fraction=0.25), 4, 0)
    assert fd.labels is None and len(fd.test) == 10
    assert sum(len(i) for i in fd.client_indices) == 30
    with pytest.raises(DataError, match="has no labels to skew; use data.partition = 'iid'"):
        load_federated(DataConfig(dataset="text_jsonl", params=params, partition="dirichlet"), 4, 0)


def test_decode_turns_token_ids_back_into_text():
    from fl.config import DataConfig
    from fl.data import load_federated

    text = load_federated(DataConfig(dataset="textgen"), 4, 0)
    ids = text.dataset[0]["input_ids"].tolist()
    sentence = text.decode(ids)
    assert sentence and "[PAD]" not in sentence and not sentence[0].isdigit()
    assert load_federated(DataConfig(dataset="digits"), 4, 0).decode([3, 4]) == "3 4"


def test_token_prior_is_each_positions_most_frequent_test_token():
    fd = load_federated(DataConfig(dataset="textgen", params={"n_samples": 200}), 4, 0)
    ids = torch.stack([fd.test[i]["input_ids"] for i in range(len(fd.test))])
    prior = fd.token_prior()
    assert prior.shape == (ids.shape[1],)
    for p in (0, 3, ids.shape[1] - 1):
        counts = torch.bincount(ids[:, p])
        assert counts[prior[p]] == counts.max()
    assert load_federated(DataConfig(dataset="digits"), 4, 0).token_prior() is None


@pytest.mark.parametrize("dataset", ["digits", "textgen_lm"])
def test_server_data_is_the_test_split_alone_with_the_same_priors(dataset):
    """The server's view (issue 16): the same test items and data-free priors as the full view, as a copy that
    shares no storage with the whole dataset, and with nothing of the clients' partitions."""
    from fl.data import load_server_data
    from fl.data.federated import _load_federated

    cfg = DataConfig(dataset=dataset)
    full = load_federated(cfg, 4, 0)
    server = load_server_data(cfg, 4, 0)
    assert _load_federated.cache_info().currsize == 0  # what this process had cached is forgotten
    assert len(server.test) == len(full.test) < len(full.dataset)
    for i in (0, len(full.test) // 2, len(full.test) - 1):
        a, b = full.test[i], server.test[i]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert server.label_prior() == full.label_prior()
    for prior in ("image_prior", "token_prior"):
        x, y = getattr(full, prior)(), getattr(server, prior)()
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y))
    whole = {t.untyped_storage().data_ptr() for t in full.dataset.tensors.values()}
    assert not whole & {t.untyped_storage().data_ptr() for t in server.test.tensors.values()}
    assert not any(hasattr(server, name) for name in ("client_indices", "dataset", "partition"))
