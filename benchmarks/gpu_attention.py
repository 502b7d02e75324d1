"""CUDA check + timing of NTK-Attention vs SDPA vs explicit prefix attention, in one run (prepared, not run in CI).

    .venv/bin/python benchmarks/gpu_attention.py                    # checks, then n = 256 .. 4096; ~1-2 min on an H100
    .venv/bin/python benchmarks/gpu_attention.py --dtype bfloat16 --n 2048 8192

1. Checks (float64 / float32 on CUDA): attention_lse value + gradients (through lse) for the "chunked" and the
   experimental "efficient" backend against the quadratic oracle; ntk_attention gradients vs ntk_attention_reference.
   A failing backend is reported and skipped in the timing.
2. Timing: median fwd+bwd ms (CUDA events) and peak allocated MiB (torch.cuda.max_memory_allocated) per method.
Exit code 1 if any check fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from models.attention import ntk_attention, ntk_attention_reference  # noqa: E402
from models.attention.lse import attention_lse, attention_lse_reference  # noqa: E402
from bench_attention import sdpa_prefix  # noqa: E402


def check(backend: str, dev: str) -> str | None:
    """None if ``backend`` matches the oracle on ``dev``, else a one-line reason."""
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-4)):
        if backend == "efficient" and dtype == torch.float64:
            continue  # the CUDA efficient kernel has no float64
        for causal in (False, True):
            q, k, v = (torch.randn(2, 3, 70, 32, generator=g, dtype=dtype).to(dev).requires_grad_() for _ in range(3))
            z = (torch.randn(3, 32, 32, generator=g, dtype=dtype) * 0.5).to(dev).requires_grad_()
            zk = (torch.randn(3, 32, generator=g, dtype=dtype) * 0.5).to(dev).requires_grad_()
            try:
                o, l = attention_lse(q, k, v, causal, backend=backend)
                ro, rl = attention_lse_reference(q, k, v, causal)
                w1, w2 = torch.randn_like(o), torch.randn_like(l)
                ga = torch.autograd.grad((o * w1).sum() + (l * w2).sum(), (q, k, v))
                gr = torch.autograd.grad((ro * w1).sum() + (rl * w2).sum(), (q, k, v))
                errs = [(o - ro).abs().max(), (l - rl).abs().max()] + [(a - b).abs().max() for a, b in zip(ga, gr)]
                args = (q, k, v, z, zk)
                w = torch.randn_like(q)
                gn = torch.autograd.grad((ntk_attention(*args, causal=causal, backend=backend) * w).sum(), args)
                gnr = torch.autograd.grad((ntk_attention_reference(*args, causal=causal) * w).sum(), args)
                errs += [(a - b).abs().max() for a, b in zip(gn, gnr)]
            except Exception as exc:  # report, do not crash the run
                return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            err = max(float(e.detach()) for e in errs)
            if not err < tol * 10:
                return f"{dtype} causal={causal}: max error {err:.2e} > {tol * 10:.0e}"
    return None


def bench(fn, params, reps: int) -> tuple[float, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ts = []
    for i in range(reps + 2):
        for p in params:
            p.grad = None
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn().float().sum().backward()
        b.record()
        torch.cuda.synchronize()
        if i >= 2:
            ts.append(a.elapsed_time(b))
    return statistics.median(ts), (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--m-frac", type=float, nargs="+", default=[0.25, 1.0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--causal", action="store_true")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device; this script is for GPU machines")
        return 2
    dev = "cuda"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, dtype {a.dtype}")
    ok = True
    backends = []
    for be in ("chunked", "efficient"):
        why = check(be, dev)
        print(f"check backend={be}: {'OK' if why is None else 'FAIL ' + why}")
        ok &= why is None
        if why is None:
            backends.append(be)
    dtype = getattr(torch, a.dtype)
    b, h, d = a.batch, a.heads, a.dim
    print("\n| n | method | fwd+bwd ms | x SDPA | peak MiB |\n|---|---|---|---|---|")
    for n in a.n:
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        z = (torch.randn(h, d, d, device=dev, dtype=dtype) * 1e-2).requires_grad_()
        zk = (torch.randn(h, d, device=dev, dtype=dtype) * 1e-2).requires_grad_()
        cases = {"sdpa": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=a.causal), (q, k, v))}
        for be in backends:
            cases[f"ntk[{be}]"] = (lambda be=be: ntk_attention(q, k, v, z, zk, causal=a.causal, backend=be),
                                   (q, k, v, z, zk))
        for frac in a.m_frac:
            m = int(frac * n)
            pk = torch.randn(h, m, d, device=dev, dtype=dtype, requires_grad=True)
            pv = torch.randn(h, m, d, device=dev, dtype=dtype, requires_grad=True)
            cases[f"prefix m={m}"] = (lambda pk=pk, pv=pv: sdpa_prefix(q, k, v, pk, pv, a.causal),
                                      (q, k, v, pk, pv))
        base = None
        for name, (fn, params) in cases.items():
            try:
                ms, mib = bench(fn, params, a.reps)
            except torch.cuda.OutOfMemoryError:
                print(f"| {n} | {name} | OOM | | |")
                torch.cuda.empty_cache()
                continue
            base = ms if name == "sdpa" else base
            print(f"| {n} | {name} | {ms:.2f} | {ms / base:.2f} | {mib:.1f} |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
