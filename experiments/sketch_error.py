"""Experiment 4 (issue 3): streaming sketch attention, memory and error vs n and polynomial degree.

    python -m experiments.sketch_error [--log2n 6 8 10 12] [--degree 0 2 4 6] [--dim 4] [--bound 1.0]

Regime of the paper (spec 4(a)): small head dimension d = O(log n) and bounded entries. q, k entries uniform in
[-B, B], values N(0, 1), causal decoding. Compared: exact causal softmax attention (the reference), a KV cache
(exact, memory 2 n d floats) and the one-pass sketch (state (t d + t) floats, t = sum_j d^j, flat in n).
Error: mean over tokens of max-abs error. Memory: bytes held after n tokens (float32).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from models.attention import StreamingSketchAttention, sketch_attention
from models.attention.sketch import sketch_state_bytes
from experiments.script import add_common_args, start


def run(n: int, degree: int, d: int, bound: float, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed * 104729 + n)
    q, k = ((torch.rand(1, 1, n, d, generator=g, dtype=torch.float64) * 2 - 1) * bound for _ in range(2))
    v = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    approx = sketch_attention(q, k, v, degree, causal=True, chunk=256)
    err = (approx - exact).abs().amax(-1).mean().item()
    return {"err": err, "sketch_bytes": sketch_state_bytes(d, d, degree), "kv_cache_bytes": 2 * n * d * 4}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2n", type=int, nargs="+", default=[6, 8, 10, 12, 14])
    ap.add_argument("--degree", type=int, nargs="+", default=[0, 2, 4, 6])
    ap.add_argument("--dim", type=int, default=4)
    ap.add_argument("--bound", type=float, default=1.0, help="entries of q, k in [-B, B]")
    add_common_args(ap)
    a = ap.parse_args(argv)
    tracker = start(a, "sketch_error", "sketch")
    # measured (not computed) state size of the streaming object, to back the formula used below
    st = StreamingSketchAttention(degree=a.degree[-1])
    for t in range(64):
        st.update(torch.randn(a.dim), torch.randn(a.dim))
    assert st.memory_bytes() == sketch_state_bytes(a.dim, a.dim, a.degree[-1])
    t0, res = time.time(), {}
    lines = ["| n | degree | mean max-abs error | sketch state bytes | KV cache bytes |", "|---|---|---|---|---|"]
    for i, l2 in enumerate(a.log2n):
        for degree in a.degree:
            n = 2 ** l2
            r = res[(n, degree)] = run(n, degree, a.dim, a.bound, a.seed)
            lines.append(f"| {n} | {degree} | {r['err']:.2e} | {r['sketch_bytes']} | {r['kv_cache_bytes']} |")
            print(lines[-1], f"({time.time() - t0:.0f}s)", flush=True)
            if tracker:
                tracker.log_metrics({f"deg{degree}.{key}": val for key, val in r.items()} | {"log2n": l2}, step=i)
    if tracker:
        tracker.log_text("\n".join(lines), "sketch_error.md")
        tracker.finish()
    return res


if __name__ == "__main__":
    main()
