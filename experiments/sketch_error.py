"""Experiment 4 (issue 3): streaming sketch attention, memory and error vs n and polynomial degree.

    python -m experiments.sketch_error [--log2n 6 8 10 12 14] [--degree 0 2 4 6] [--seeds 5]
        [--countsketch-log2n 6 8 ... 18] [--countsketch-k 32] [--eps1 0.5]

Regime of the paper (spec 4(a)): small head dimension d = O(log n) and bounded entries. q, k entries uniform in
[-B, B], values N(0, 1), causal decoding. Compared: exact causal softmax attention (the reference), a KV cache
(exact, memory 2 n d floats) and the one-pass sketch (state (t d + t) floats, t = sum_j d^j, flat in n).
Error: mean over tokens of max-abs error. Memory: bytes held after n tokens (float32).
Protocol (issue 17, ``experiments/protocol.py``): nothing is tuned (no learning rate: the degree and the sketch size
are the arms); every cell is measured on ``--seeds`` independent evaluation seeds (fresh q, k, v and a fresh hash
seed each) and reported as mean ± std [95 % t-interval].

Second table, the CountSketch output layer (spec 4(a) step 3, causal): every output row T_j goes into a CountSketch
of the d output columns (width, rows from ``sketch_size(k, eps1, n)``) and is dropped; decoding gives a k-sparse y_i
per column. Reported per n: bytes held with the layer (state + sketch) and without (state + the n x d outputs),
the guarantee ratio max_i ||T_i - y_i|| / ||T_i - H_k(T_i)|| (the paper's bound is 1 + eps1), and the share of the
output's energy a k-sparse column keeps, ||y - T|| / ||T|| (attention outputs are dense: this is the price).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from models.attention import CountSketch, StreamingSketchAttention, sketch_attention, sketch_size
from models.attention import sketched_causal_attention
from models.attention.countsketch import best_k_sparse_error
from models.attention.sketch import sketch_state_bytes
from experiments.protocol import describe, seeds
from experiments.script import add_common_args, start


def run(n: int, degree: int, d: int, bound: float, seed: int) -> dict[str, float]:
    q, k, v = _inputs(n, d, bound, seed)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    approx = sketch_attention(q, k, v, degree, causal=True, chunk=256)
    err = (approx - exact).abs().amax(-1).mean().item()
    return {"err": err, "sketch_bytes": sketch_state_bytes(d, d, degree), "kv_cache_bytes": 2 * n * d * 4}


def _inputs(n: int, d: int, bound: float, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed * 104729 + n)
    q, k = ((torch.rand(1, 1, n, d, generator=g, dtype=torch.float64) * 2 - 1) * bound for _ in range(2))
    return q, k, torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)


def run_countsketch(n: int, degree: int, d: int, bound: float, seed: int, k: int, eps1: float) -> dict[str, float]:
    """The CountSketch layer on the same inputs as ``run``: memory with / without, guarantee ratio, energy kept."""
    q, kk, v = _inputs(n, d, bound, seed)
    width, rows = sketch_size(k, eps1, n)
    cs = sketched_causal_attention(q, kk, v, CountSketch(width, rows, shape=(1, 1, d), seed=seed,
                                                         dtype=torch.float32), degree=degree, chunk=256)
    T = sketch_attention(q, kk, v, degree, causal=True, chunk=256)[0, 0].float()  # [n, d], scoring only
    y = cs.dense(n, k)[:, 0, 0]  # [n, d]
    ratio = ((T - y).norm(dim=0) / best_k_sparse_error(T, k)).max().item()
    state = sketch_state_bytes(d, d, degree)
    return {"width": width, "rows": rows, "bytes_with": state + cs.memory_bytes(), "bytes_without": state + n * d * 4,
            "guarantee_ratio": ratio, "rel_err": ((T - y).norm() / T.norm()).item(),
            "best_k_rel_err": (best_k_sparse_error(T, k).norm() / T.norm()).item()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2n", type=int, nargs="+", default=[6, 8, 10, 12, 14])
    ap.add_argument("--degree", type=int, nargs="+", default=[0, 2, 4, 6])
    ap.add_argument("--dim", type=int, default=4)
    ap.add_argument("--bound", type=float, default=1.0, help="entries of q, k in [-B, B]")
    ap.add_argument("--seeds", type=int, default=5,
                    help="evaluation seeds per cell (experiments.protocol.seeds); 1 runs --seed alone")
    ap.add_argument("--countsketch-k", type=int, default=32, help="CountSketch layer: k-sparse columns (0: skip)")
    ap.add_argument("--countsketch-log2n", type=int, nargs="+", default=None,
                    help="n for the CountSketch table (default: --log2n; it needs no exact reference, so n can be "
                         "larger)")
    ap.add_argument("--eps1", type=float, default=0.5, help="CountSketch layer: l2/l2 slack eps1")
    ap.add_argument("--countsketch-degree", type=int, default=4, help="polynomial degree under the CountSketch")
    add_common_args(ap)
    a = ap.parse_args(argv)
    tracker = start(a, "sketch_error", "sketch")
    # measured (not computed) state size of the streaming object, to back the formula used below
    st = StreamingSketchAttention(degree=a.degree[-1])
    for t in range(64):
        st.update(torch.randn(a.dim), torch.randn(a.dim))
    assert st.memory_bytes() == sketch_state_bytes(a.dim, a.dim, a.degree[-1])
    t0, res = time.time(), {}
    eval_seeds = [a.seed] if a.seeds == 1 else seeds(a.seeds)
    lines = [f"{len(eval_seeds)} seeds: mean ± std [95 % interval]", "",
             "| n | degree | mean max-abs error | sketch state bytes | KV cache bytes |", "|---|---|---|---|---|"]
    for i, l2 in enumerate(a.log2n):
        for degree in a.degree:
            n = 2 ** l2
            runs = [run(n, degree, a.dim, a.bound, s) for s in eval_seeds]
            r = res[(n, degree)] = runs[0] | {"err": statistics.fmean(x["err"] for x in runs),
                                              "errs": [x["err"] for x in runs]}
            lines.append(f"| {n} | {degree} | {describe(r['errs'], '.2e')} | {r['sketch_bytes']} | "
                         f"{r['kv_cache_bytes']} |")
            print(lines[-1], f"({time.time() - t0:.0f}s)", flush=True)
            if tracker:
                tracker.log_metrics({f"deg{degree}.{key}": val for key, val in r.items() if key != "errs"}
                                    | {"log2n": l2}, step=i)
    if a.countsketch_k:
        lines += ["", f"CountSketch layer (k = {a.countsketch_k}, eps1 = {a.eps1}, degree {a.countsketch_degree}):", "",
                  "| n | width x rows | bytes with | bytes without | max_i ||T_i - y_i|| / ||T_i - H_k T_i|| "
                  "(worst seed) | ||y - T|| / ||T|| | best k-sparse ||H_k T - T|| / ||T|| |",
                  "|---|---|---|---|---|---|---|"]
        for i, l2 in enumerate(a.countsketch_log2n or a.log2n):
            n = 2 ** l2
            runs = [run_countsketch(n, a.countsketch_degree, a.dim, a.bound, s, a.countsketch_k, a.eps1)
                    for s in eval_seeds]
            r = res[("countsketch", n)] = runs[0] | {
                "guarantee_ratio": max(x["guarantee_ratio"] for x in runs),
                "rel_err": statistics.fmean(x["rel_err"] for x in runs),
                "best_k_rel_err": statistics.fmean(x["best_k_rel_err"] for x in runs)}
            lines.append(f"| {n} | {r['width']} x {r['rows']} | {r['bytes_with']} | {r['bytes_without']} | "
                         f"{r['guarantee_ratio']:.3f} | {describe([x['rel_err'] for x in runs], '.3f')} | "
                         f"{describe([x['best_k_rel_err'] for x in runs], '.3f')} |")
            print(lines[-1], f"({time.time() - t0:.0f}s)", flush=True)
            if tracker:
                tracker.log_metrics({f"countsketch.{key}": val for key, val in r.items()} | {"log2n": l2}, step=i)
    if tracker:
        tracker.log_text("\n".join(lines), "sketch_error.md")
        tracker.finish()
    return res


if __name__ == "__main__":
    main()
