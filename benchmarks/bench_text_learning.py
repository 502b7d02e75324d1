"""How fast textgen is learnt centrally: a random-init tiny BERT vs the pretrained MiniLM, test accuracy by step.

Batch 10 (what one FedSGD round of 10 clients with one sentence each averages), 500 held-out sentences, 1 thread.

    .venv/bin/python benchmarks/bench_text_learning.py sgd 0.1 10 300            # tiny BERT, word-level tokenizer
    .venv/bin/python benchmarks/bench_text_learning.py adam 0.003 10 300
    .venv/bin/python benchmarks/bench_text_learning.py sgd 0.03 10 30 minilm     # MiniLM and its tokenizer
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from fl.data import load_dataset
from models import build_model
from models.config import ModelConfig


def main() -> None:
    opt_name, lr, B, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    pretrained = sys.argv[5] if len(sys.argv) > 5 else ""
    torch.set_num_threads(1)
    ld = load_dataset("textgen", {"tokenizer": pretrained, "seq_len": 32} if pretrained else {})
    T = ld.data.tensors
    idx = np.random.default_rng(0).permutation(len(ld.data))
    te, tr = idx[:500], idx[500:]
    m = build_model(ModelConfig(family="bert", pretrained=pretrained), ld.task, seed=0)

    def evaluate() -> float:
        m.eval()
        with torch.no_grad():
            b = {k: v[te] for k, v in T.items()}
            return float((m(**b).logits.argmax(-1) == b["labels"]).float().mean())

    opt = torch.optim.SGD(m.parameters(), lr=lr) if opt_name == "sgd" else torch.optim.Adam(m.parameters(), lr=lr)
    torch.manual_seed(0)  # dropout masks (MiniLM keeps its 0.1): the same run twice gives the same table
    rng, t0 = np.random.default_rng(1), time.time()
    print("| optimizer | lr | batch | step | train loss | test accuracy | seconds |\n|---|---|---|---|---|---|---|")
    for s in range(1, steps + 1):
        m.train()
        b = {k: v[tr[rng.integers(len(tr), size=B)]] for k, v in T.items()}
        loss = m(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if s in (5, 10, 20, 30, 100, 300, 1000):
            print(f"| {opt_name} | {lr:g} | {B} | {s} | {loss.item():.3f} | {evaluate():.3f} | {time.time() - t0:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
