"""span_text on a pretrained BERT encoder: MiniLM-L6 (d = 384) fine-tuned on textgen, one float32 FedSGD step.

For each victim sentence (and batch size) it reports token accuracy, exact sentences, the span rank beside the batch's
real token count, the float32 rounding floor the rank is cut at, and whether dropout was on (MiniLM's default 0.1,
which the attack does not model) -- the client's one SGD step (lr 0.03, the text arms' setting) is taken in train
mode, as fedprobe's clients take it.

    .venv/bin/python benchmarks/bench_span_minilm.py --victims 6 --batches 1 2 4 --dropout 0.0 0.1
"""

from __future__ import annotations

import argparse
import time

import torch

from attacks.base import Observation
from attacks.harness import attack_and_score
from attacks.span_text import SpanText
from fl.data import load_dataset
from models import build_model
from models.config import ModelConfig
from models.tasks import task_loss


def client_update(cfg: ModelConfig, data, batch: dict[str, torch.Tensor], lr: float, seed: int) -> Observation:
    model = build_model(cfg, data.task, seed=0).train()
    g0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    torch.manual_seed(seed)  # the dropout masks, where dropout is on
    task_loss(model, batch, data.task)[0].backward()
    g1 = {k: (p - lr * p.grad).detach() for k, p in model.named_parameters()}  # float32 weights, as sent
    n = len(batch["labels"])
    md = {"lr": lr, "local_steps": 1, "batch_size": n, "num_examples": n, "optimizer": "sgd", "model_mode": "train"}
    return Observation(1, 0, 0, g0, g1, md, data.task, lambda: build_model(cfg, data.task, seed=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--victims", type=int, default=6, help="disjoint batches per batch size")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--lr", type=float, default=0.03)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("textgen", {"seq_len": 32, "tokenizer": "minilm"})
    t = data.data.tensors
    print("| dropout | B | victim | real tokens | span rank | rounding floor | tokens | exact | seconds | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in args.dropout:
        cfg = ModelConfig(family="bert", pretrained="minilm",
                          params={"hidden_dropout_prob": p, "attention_probs_dropout_prob": p})
        for B in args.batches:
            for v in range(args.victims):
                batch = {k: x[v * B:(v + 1) * B] for k, x in t.items()}
                obs = client_update(cfg, data, batch, args.lr, v)
                t0 = time.perf_counter()
                try:
                    rec, s = attack_and_score(SpanText(fallback="none"), obs, batch)
                    row = (f"{int(s['span_rank'])} | {s['span_rounding_floor']:.1e} | {s['token_accuracy']:.3f} | "
                           f"{s['exact_sentences']:.2f} | {time.perf_counter() - t0:.1f} | "
                           + ("unordered (encoder, B > 1)" if s.get("span_unordered_batch") else ""))
                except ValueError as exc:
                    row = f"– | – | fallback | – | {time.perf_counter() - t0:.1f} | {str(exc)[11:90]}"
                real = int(batch["attention_mask"].sum())
                print(f"| {p:g} | {B} | {v} | {real} | {row} |", flush=True)


if __name__ == "__main__":
    main()
