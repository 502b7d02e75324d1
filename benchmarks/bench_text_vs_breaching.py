"""fedprobe's text attacks against breaching's TAG, as breaching ships it, on the same client updates (issue 13).

Usage (breaching and its config stack go to a folder of their own, never into the project's environment)::

    make bench-deps    # pip install --no-deps --target .bench-deps breaching==0.1.2 hydra-core omegaconf antlr4
    PYTHONPATH=.bench-deps .venv/bin/python benchmarks/bench_text_vs_breaching.py [--quick] [--out benchmarks/RESULTS.md]

Setting: fedprobe's tiny GPT-2 (d = 64, 2 blocks; ``--n-embd 256`` for the d = 256 model of
``experiments/attack_text_batch.toml``) on ``textgen_lm``, random init, FedSGD with SGD lr 0.1,
B = 1, 2, 4, 8 sentences. *Unpadded*: 8-token windows, shorter than every sentence, so no
position is padding. *Padded*: 24 tokens, right-padded, pads masked out of the client's loss
(labels -100), as fedprobe's clients train. One client update per (B, padding, seed); every
attack sees exactly that update.

breaching's side is breaching 0.1.2's own code (``breaching.attacks.prepare_attack`` with its
``attack=tag`` hydra config: joint optimisation of embeddings and soft labels, bert-adam (AdamW)
with step 0.05, 50 warm-up steps and linear decay, truncated-normal init, L2 + 0.1 x layer-weighted
L1, gradient clipping 1.0, 1000 iterations, tokens by cosine to the embedding matrix). Only the
glue is ours: the model is wrapped so it takes input embeddings (breaching's run-embedding
strategy) and the loss is breaching's ``CausalLoss``, as breaching's own GPT-2 cases use; the
gradient is the client's update / -lr. breaching does not model padding (its loss counts every
position): that is the algorithm as published. Both sides are scored by fedprobe's scorer under
the original's attention mask (a recovered pad position is never held against either).

fedprobe's side: ``span_text`` (exact span attack, falling back to padding-aware TAG where the
span test does not pin the batch) and ``tag`` alone (300 iterations + discrete refinement, joint soft labels).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import attacks  # noqa: E402,F401
from attacks.base import ATTACKS, Observation, Reconstruction  # noqa: E402
from attacks.harness import run_attack, score  # noqa: E402
from fl.data.federated import load_dataset  # noqa: E402
from models.build import build_model  # noqa: E402
from models.config import ModelConfig  # noqa: E402

from bench_attacks import observe  # noqa: E402  (run as a script, benchmarks/ is on the path)


@functools.lru_cache(maxsize=1)
def load_breaching() -> tuple[Any, Any, Any]:
    """(prepare_attack, CausalLoss, the composed ``tag`` attack config) from the breaching on PYTHONPATH.

    ``import breaching`` runs its package ``__init__``, which imports torchvision (image cases) that a
    text benchmark does not need; the attack code is loaded without it, from breaching's own files."""
    import importlib.util

    spec = importlib.util.find_spec("breaching")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("breaching is not importable: run `make bench-deps` and put PYTHONPATH=.bench-deps in front")
    root = Path(list(spec.submodule_search_locations)[0])
    for name, path in (("breaching", root), ("breaching.cases", root / "cases"),
                       ("breaching.cases.models", root / "cases" / "models")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]  # a namespace: submodules load from breaching's files, its __init__s do not run
        sys.modules[name] = mod
    from breaching.attacks import prepare_attack
    from breaching.cases.models.losses import CausalLoss
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(root / "config" / "attack"), version_base=None):
        cfg = compose(config_name="tag")
    return prepare_attack, CausalLoss, cfg


class EmbeddingInput(torch.nn.Module):
    """The HF causal LM called on input embeddings [B, L, d] -> logits [B, L, V] (breaching's run-embedding
    strategy swaps the token embedding for an identity; the model must then accept embeddings)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.lm(inputs_embeds=embeds).logits


def breaching_tag(obs: Observation, n: int, seq_len: int, vocab: int, seed: int, iterations: int) -> Reconstruction:
    """breaching's TAG on fedprobe's observation: the same update, breaching's attacker and loss."""
    from omegaconf import OmegaConf

    prepare_attack, CausalLoss, cfg = load_breaching()
    cfg = OmegaConf.merge(cfg, {"optim": {"max_iterations": iterations, "callback": 10**9}})
    wrapped = EmbeddingInput(obs.model_factory())
    names = [k.removeprefix("lm.") for k, _ in wrapped.named_parameters()]
    lr = float(obs.metadata["lr"])
    grads = [(obs.global_params[k] - obs.client_params[k]).float() / lr for k in names]  # update = -lr * g
    params = [obs.global_params[k].float() for k in names]
    meta = OmegaConf.create({"modality": "text", "task": "causal-lm", "shape": [seq_len], "vocab_size": vocab})
    payload = [{"parameters": params, "buffers": None, "metadata": meta}]
    shared = [{"gradients": grads, "buffers": None,
               "metadata": {"num_data_points": n, "labels": None, "local_hyperparams": None}}]
    attacker = prepare_attack(wrapped, CausalLoss(), cfg, {"dtype": torch.float, "device": torch.device("cpu")})
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    rec, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
    return Reconstruction(tokens=rec["data"].long(), metrics={"attack_seconds": time.perf_counter() - t0,
                                                              "iterations": float(iterations)})


def victims(seq_len: int, B: int, seed: int) -> tuple[dict[str, torch.Tensor], Any]:
    data = load_dataset("textgen_lm", {"seq_len": seq_len})
    idx = [seed * 8 + i for i in range(B)]  # disjoint sentences per seed, the same first B at every B
    items = [data.data[i] for i in idx]
    return {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "attention_mask", "labels")}, data.task


def data_free_guess(seq_len: int, B: int) -> Reconstruction:
    """What a server with the public corpus but no update guesses: every position's most frequent token (the
    corpus includes the victims, which flatters the guess), the same row for all B sentences."""
    ids = load_dataset("textgen_lm", {"seq_len": seq_len}).data.tensors["input_ids"]  # [N, L]
    return Reconstruction(tokens=torch.mode(ids, dim=0).values.expand(B, seq_len).clone())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="B = 1, 2 and one seed")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--breaching-iterations", type=int, default=1000, help="breaching's tag.yaml: 1000")
    ap.add_argument("--text", default="both", choices=("both", "unpadded", "padded"))
    ap.add_argument("--ours", default="span_text,tag", help="fedprobe's attacks to run (comma-separated)")
    ap.add_argument("--out", default="", help="append the table to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_breaching()  # fail before any work when breaching is missing
    batches = [1, 2] if args.quick else [int(b) for b in args.batches.split(",")]
    seeds = 1 if args.quick else args.seeds
    ours = {name: make for name, make in (("span_text", lambda: ATTACKS.create("span_text")),
                                          ("tag", lambda: ATTACKS.create("tag", iterations=300)))
            if name in args.ours.split(",")}
    keys = ("token_accuracy", "exact_sentences", "rouge1", "rouge2")
    rows: list[str] = []
    t_start = time.perf_counter()
    settings = [(False, 8), (True, 24)]  # (padded, seq_len): 8-token windows are shorter than every sentence
    for padded, seq_len in [(p, n) for p, n in settings if args.text in ("both", ("unpadded", "padded")[p])]:
        for B in batches:
            res: dict[str, list[dict[str, float]]] = {}
            for s in range(seeds):
                batch, task = victims(seq_len, B, s)
                cfg = ModelConfig(family="gpt2", size="tiny", params={"n_embd": args.n_embd})
                factory = (lambda cfg=cfg, task=task: build_model(cfg, task, seed=0))
                obs = observe(factory, None, batch, task)  # one FedSGD step, SGD lr 0.1
                for name, make in ours.items():
                    torch.manual_seed(s)
                    res.setdefault(name, []).append(run_attack(make(), obs, batch))
                rec = breaching_tag(obs, B, seq_len, task.vocab_size, s, args.breaching_iterations)
                out = score(rec, batch, task)
                out["attack_seconds"] = rec.metrics["attack_seconds"]
                res.setdefault("breaching tag", []).append(out)
                guess = score(data_free_guess(seq_len, B), batch, task)
                guess["attack_seconds"] = 0.0
                res.setdefault("data-free guess", []).append(guess)
                print(f"padded={padded} B={B} seed={s}: " + "; ".join(
                    f"{k} {v[-1]['token_accuracy']:.3f}/{v[-1]['exact_sentences']:.2f}" for k, v in res.items()),
                    flush=True)
            for name, runs in res.items():
                mean = {k: sum(r[k] for r in runs) / len(runs) for k in (*keys, "attack_seconds")}
                per = " ".join(f"{r['token_accuracy']:.2f}" for r in runs)
                fb = sum(r.get("span_fallback", 0.0) for r in runs)
                rows.append(f"| {'padded 24' if padded else 'unpadded 8'} | {B} | {name} | "
                            + " | ".join(f"{mean[k]:.3f}" for k in keys)
                            + f" | {per} | {mean['attack_seconds']:.1f} | "
                            + (f"{fb:.0f}/{len(runs)} |" if name == "span_text" else "- |"))
                print(rows[-1], flush=True)
    total = time.perf_counter() - t_start
    head = (f"\n## fedprobe's text attacks vs breaching's TAG on the same updates ({datetime.date.today()}, "
            f"{platform.machine()}, {os.cpu_count()} cores shared, torch {torch.__version__}, 1 thread, "
            f"total {total:.0f} s)\n\nCommand: `PYTHONPATH=.bench-deps .venv/bin/python "
            f"benchmarks/bench_text_vs_breaching.py{' --quick' if args.quick else ''} --seeds {seeds} "
            f"--batches {','.join(map(str, batches))} --text {args.text} --ours {args.ours} --n-embd {args.n_embd} --breaching-iterations "
            f"{args.breaching_iterations}` (GPT-2, d = {args.n_embd}, 2 blocks, textgen_lm, FedSGD, {seeds} seeds)\n\n"
            "| text | B | attack | token acc | exact sentences | ROUGE-1 | ROUGE-2 | token acc per seed | attack s "
            "| span fallbacks |\n|---|---|---|---|---|---|---|---|---|---|\n")
    print(head + "\n".join(rows))
    if args.out:
        with open(args.out, "a") as f:
            f.write(head + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
