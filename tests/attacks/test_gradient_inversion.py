"""DLG family on tiny HF models; seed 5 identities (spec section 5(d))."""

import os

import pytest
import torch
from sklearn.datasets import load_digits
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

from attacks.base import ATTACKS, Observation
from attacks.gradients import attack_model, infer_labels, simulate
from attacks.harness import attack_and_score, save_artifacts
from attacks.malicious import reinitialise
from attacks.softmax_regression import gradient_wrt_A, recover_input
from models.tasks import TaskSpec, task_loss

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

IMG = TaskSpec(kind="image", num_classes=10, image_shape=(1, 8, 8), mean=(0.5,), std=(0.5,))


def vit():
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, num_labels=10))


def client_round(factory, batch, task, lr=0.1, steps=1, bs=None):
    """What an honest client does: `steps` plain SGD steps over its examples, bs per step."""
    m = factory()
    g0 = {k: v.detach().clone() for k, v in m.named_parameters()}
    n = len(batch["labels"])
    bs = bs or n
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    for k in range(steps):
        idx = torch.arange(k * bs, (k + 1) * bs) % n
        opt.zero_grad()
        task_loss(m, {key: v[idx] for key, v in batch.items()}, task)[0].backward()
        opt.step()
    c = {k: v.detach().clone() for k, v in m.named_parameters()}
    md = {"lr": lr, "local_steps": steps, "batch_size": bs, "num_examples": n, "optimizer": "sgd"}
    return Observation(1, 0, 0, g0, c, md, task, factory)


def digits(n, start=0):
    d = load_digits()
    x = torch.tensor(d.images[start:start + n] / 16.0, dtype=torch.float32).unsqueeze(1)
    return {"pixel_values": (x - 0.5) / 0.5, "labels": torch.tensor(d.target[start:start + n])}


def test_softmax_regression_exact_recovery_from_noiseless_gradient():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 4, generator=g, dtype=torch.float64)
    x = torch.randn(4, generator=g, dtype=torch.float64)
    b = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    x_hat, match = recover_input(A, gradient_wrt_A(A, x, b), b)
    assert match < 1e-12
    assert (x_hat - x).norm() / x.norm() < 1e-6


def test_softmax_regression_error_grows_with_noise():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(5, 4, generator=g, dtype=torch.float64)
    x = torch.randn(4, generator=g, dtype=torch.float64)
    b = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    grad = gradient_wrt_A(A, x, b)
    errs = []
    for sigma in (0.0, 1e-3, 1e-2, 1e-1):
        e = []
        for s in range(4):
            noise = sigma * torch.randn(grad.shape, generator=torch.Generator().manual_seed(10 + s), dtype=grad.dtype)
            x_hat, _ = recover_input(A, grad + noise, b, x0=x)  # start at the truth: error is the noise's doing
            e.append(float((x_hat - x).norm() / x.norm()))
        errs.append(sum(e) / len(e))
    assert errs[0] < 1e-8
    assert errs == sorted(errs) and errs[-1] > 10 * errs[1]


def test_unrolled_simulation_reproduces_the_client_update():
    batch = digits(4)
    obs = client_round(vit, batch, IMG, lr=0.05, steps=3, bs=2)
    model = attack_model(vit, torch.float64)
    params = {k: v.double().requires_grad_(True) for k, v in obs.global_params.items()}
    sim = simulate(model, params, list(params), {"pixel_values": batch["pixel_values"].double()}, batch["labels"], IMG, 3, 0.05, 2)
    upd = obs.update()
    err = max(float((sim[k].detach() - upd[k].double()).abs().max()) for k in upd)
    assert err < 1e-5
    assert max(float(v.abs().max()) for v in upd.values()) > 1e-3  # the update is not trivially zero


def test_idlg_label_inference():
    obs = client_round(vit, digits(1, start=5), IMG)
    assert infer_labels(obs, 1).tolist() == [5]
    obs3 = client_round(vit, digits(3, start=1), IMG)
    assert sorted(infer_labels(obs3, 3).tolist()) == [1, 2, 3]


def test_dlg_recovers_a_digit_on_tiny_vit(tmp_path):
    batch = digits(1)
    obs = client_round(vit, batch, IMG)
    rec, scores = attack_and_score(ATTACKS.create("idlg", iterations=200), obs, batch)
    assert scores["psnr"] > 25 and scores["ssim"] > 0.9 and scores["label_accuracy"] == 1.0
    paths = save_artifacts(rec, batch, IMG, tmp_path)
    assert paths[0].suffix == ".png" and paths[0].stat().st_size > 1000


def test_attack_needs_client_metadata():
    obs = client_round(vit, digits(1), IMG)
    obs.metadata.pop("lr")
    with pytest.raises(ValueError, match="learning rate"):
        ATTACKS.create("dlg", iterations=1).attack(obs)
    with pytest.raises(Exception, match="unexpected parameters"):
        ATTACKS.create("dlg", iterationz=1)


def _text_case(kind, V=64, L=10):
    def factory():
        torch.manual_seed(0)
        if kind == "text":
            return BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                            intermediate_size=64, max_position_embeddings=32, num_labels=2))
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=32, eos_token_id=0, bos_token_id=0))
    task = TaskSpec(kind=kind, num_classes=2 if kind == "text" else 0, seq_len=L, vocab_size=V)
    ids = torch.randperm(V - 1, generator=torch.Generator().manual_seed(2))[:L].view(1, L) + 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([1]) if kind == "text" else ids.clone()}
    return factory, task, batch


def test_tag_recovers_a_sentence_on_tiny_bert(tmp_path):
    factory, task, batch = _text_case("text")
    obs = client_round(factory, batch, task)
    rec, scores = attack_and_score(ATTACKS.create("tag", iterations=20), obs, batch)
    assert scores["token_accuracy"] == 1.0 and scores["rouge2"] == 1.0 and scores["label_accuracy"] == 1.0
    p = save_artifacts(rec, batch, task, tmp_path, decode=lambda ids: "-".join(map(str, ids)))[0]
    assert "original" in p.read_text() and "recovered" in p.read_text()


def test_tag_recovers_a_sentence_on_tiny_gpt2():
    factory, task, batch = _text_case("lm")
    obs = client_round(factory, batch, task)
    scores = attack_and_score(ATTACKS.create("tag", iterations=100), obs, batch)[1]
    assert scores["token_accuracy"] >= 0.9


def test_malicious_reinit_crafts_a_fresh_model():
    obs = client_round(vit, digits(1), IMG)
    att = ATTACKS.create("malicious_reinit", base="idlg", iterations=5)
    crafted = att.craft(obs.global_params, 2, 3)
    assert crafted.keys() == obs.global_params.keys()
    assert all(crafted[k].shape == v.shape for k, v in obs.global_params.items())
    assert not torch.equal(crafted["classifier.weight"], obs.global_params["classifier.weight"])
    assert torch.equal(att.craft(obs.global_params, 2, 3)["classifier.weight"], crafted["classifier.weight"])  # seeded
    assert float(crafted["classifier.bias"].abs().sum()) == 0
    assert float(reinitialise({"vit.layernorm.weight": torch.zeros(4)}, 0)["vit.layernorm.weight"].sum()) == 4


def _padded_case(kind, side="right", real=7, L=10):
    """A batch of one sentence of ``real`` tokens padded (pad id 0) to L, as the client's collate makes it."""
    factory, task, batch = _text_case(kind, L=L)
    mask = torch.zeros(1, L, dtype=torch.long)
    if side == "right":
        mask[:, :real] = 1
    else:
        mask[:, L - real:] = 1
    ids = batch["input_ids"].masked_fill(mask == 0, 0)
    labels = batch["labels"] if kind == "text" else ids.masked_fill(mask == 0, -100)
    return factory, task, {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind, side", [("lm", "right"), ("text", "right")])
def test_tag_reads_the_padding_and_recomputes_the_padded_update(kind, side):
    """The padding is read off the position-embedding update, and TAG's recomputation with the true tokens under
    that mask is the client's real padded update (every parameter but the embedding, which inputs_embeds bypass);
    ignoring the mask is not."""
    base, task, batch = _padded_case(kind, side)

    def factory():  # no dropout, eager attention on both sides: the recomputation must equal the update exactly
        m = base().eval()
        m.set_attn_implementation("eager")  # fedprobe's default; SDPA treats fully masked (left-pad) rows otherwise
        return m

    obs = client_round(factory, batch, task)
    tag = ATTACKS.create("tag", iterations=1)
    model = attack_model(factory, torch.float32)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in obs.global_params.items()}
    tag._init_inputs(obs, 1, params, torch.Generator().manual_seed(0), torch.float32)
    assert torch.equal(tag._mask, batch["attention_mask"][0])
    x = (params[tag._emb].detach()[batch["input_ids"]] / tag._scale).requires_grad_(True)
    names = [k for k in params if k != tag._emb]
    target = obs.pseudo_gradient()
    labels = batch["labels"] if kind == "text" else tag._lm_labels(batch["input_ids"])

    def err(inputs, labels=labels):
        sim = simulate(model, params, names, inputs, labels, task, 1, 0.1, 1)
        return max(float((sim[k] - target[k]).abs().max()) for k in names) / max(float(target[k].abs().max()) for k in names)

    masked = err(tag._model_inputs(x))
    assert masked < 1e-5
    # the padding-blind recomputation TAG did before: no attention mask and, for an LM, pads scored as tokens
    blind = {"inputs_embeds": x * tag._scale, "attention_mask": torch.ones_like(batch["attention_mask"])}
    assert err(blind, batch["input_ids"] if kind == "lm" else labels) > max(100 * masked, 1e-4)


def test_tag_recovers_a_right_padded_sentence_on_tiny_gpt2():
    factory, task, batch = _padded_case("lm", "right")
    scores = attack_and_score(ATTACKS.create("tag", iterations=100), client_round(factory, batch, task), batch)[1]
    assert scores["token_accuracy"] >= 0.9


def test_soft_lm_labels_follow_the_clients_padded_loss():
    """TAG's joint soft labels (``lm_labels="soft"``, the default) are scored as the client's loss is: pads carry no
    loss and each sentence is averaged over its own tokens, so near-one-hot soft labels give the client's padded
    update; the padding-blind soft loss (every position, one mean over the batch) does not."""
    base, task, _ = _text_case("lm", L=10)
    factory = lambda: base().eval()  # noqa: E731
    ids = torch.randint(5, task.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0  # two lengths: 6 and 10 tokens
    ids = ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    obs = client_round(factory, batch, task)
    model = attack_model(factory, torch.float64)
    params = {k: v.detach().double().clone().requires_grad_(True) for k, v in obs.global_params.items()}
    names = list(params)
    target = {k: v.double() for k, v in obs.pseudo_gradient().items()}
    soft = 60.0 * torch.nn.functional.one_hot(ids, task.vocab_size).double()  # softmax is one-hot to ~1e-20

    def err(inputs):
        sim = simulate(model, params, names, inputs, soft, task, 1, 0.1, 2)
        return max(float((sim[k] - target[k]).abs().max()) for k in names) / max(float(target[k].abs().max()) for k in names)

    assert err({"input_ids": ids, "attention_mask": mask}) < 1e-5
    assert err({"input_ids": ids}) > 1e-3  # no mask: every position scored, as breaching's CausalLoss does
    with pytest.raises(ValueError, match="lm_labels"):
        ATTACKS.create("tag", lm_labels="hard")
