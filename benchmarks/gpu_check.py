"""One prepared GPU check: attention kernels, a DP-SGD step, an attack and a 2-round simulation with
fractional client GPUs, checked and timed on CUDA, printed as one table. Run by benchmarks/gpu_check.sh.

Prepared for a CUDA machine; on a machine without CUDA it says so and exits 2.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


import torch  # noqa: E402

ROWS: list[tuple[str, str, str]] = []


def timed(name: str, fn, repeats: int = 5) -> None:
    try:
        fn()  # warm-up and check
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            detail = fn()
        torch.cuda.synchronize()
        ROWS.append((name, f"{(time.perf_counter() - t0) / repeats * 1e3:.2f} ms", str(detail or "ok")))
    except Exception as exc:  # report every check, do not stop at the first failure
        ROWS.append((name, "FAILED", f"{type(exc).__name__}: {exc}"[:120]))


def attention_checks() -> None:
    from models.attention import ntk_attention, sparse_topk_attention

    b, h, n, d = 4, 8, 2048, 64
    q, k, v = (torch.randn(b, h, n, d, device="cuda", requires_grad=True) for _ in range(3))
    z = torch.zeros(h, d, d, device="cuda", requires_grad=True)
    zk = torch.zeros(h, d, device="cuda", requires_grad=True)

    def sdpa():
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    def ntk():
        out = ntk_attention(q, k, v, z, zk)
        err = (out - torch.nn.functional.scaled_dot_product_attention(q, k, v)).abs().max().item()
        out.sum().backward()
        return f"max |ntk(z=0) - sdpa| = {err:.2e}"

    def sparse():
        sparse_topk_attention(q, k, v, top_k=64).sum().backward()

    timed("attention sdpa fwd+bwd n=2048", sdpa)
    timed("attention ntk fwd+bwd n=2048", ntk)
    timed("attention sparse_topk k=64 fwd+bwd n=2048", sparse)


def dp_sgd_check() -> None:
    from opacus import PrivacyEngine

    from fl.config import ModelConfig
    from models import build_model
    from models.tasks import TaskSpec

    task = TaskSpec(kind="image", num_classes=10, image_shape=(1, 8, 8))
    model = build_model(ModelConfig(family="vit"), task).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.utils.data.TensorDataset(torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,)))
    loader = torch.utils.data.DataLoader(data, batch_size=64)
    model, opt, loader = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                                      noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = next(iter(loader))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(pixel_values=x.cuda()).logits, y.cuda()).backward()
        opt.step()

    timed("DP-SGD step (Opacus, ViT tiny, batch 64)", step)


def simulation_check() -> None:
    from fl.config import load_config
    from fl.server_app import RunOptions
    from fl.simulation import simulate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("experiments/quickstart.toml", [
            "federation.num_clients=4", "federation.clients_per_round=4", "federation.rounds=2",
            "federation.client_gpus=0.25", "federation.device='cuda'", "attack.device='cuda'",
            f"tracking.output_dir='{tmp}'"])
        t0 = time.perf_counter()
        summary = simulate(cfg, RunOptions(tracking_uri=f"sqlite:///{tmp}/m.db", progress=False))
        ROWS.append(("2-round simulation, 4 clients x 0.25 GPU, DP-SGD + iDLG on cuda",
                     f"{time.perf_counter() - t0:.1f} s",
                     json.dumps({k: round(v, 3) for k, v in summary["final"].items()
                                 if k in ("accuracy", "epsilon", "attack_psnr", "attack_seconds")})))


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run this on a GPU machine", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    attention_checks()
    dp_sgd_check()
    simulation_check()
    width = max(len(r[0]) for r in ROWS)
    print(f"\n{'check':<{width}}  {'time':>10}  result")
    for name, t, detail in ROWS:
        print(f"{name:<{width}}  {t:>10}  {detail}")
    return 1 if any(t == "FAILED" for _, t, _ in ROWS) else 0


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    sys.exit(main())
