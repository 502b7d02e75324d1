"""Malicious-server variant: send victims a freshly initialised model, then invert.

Gradient inversion is far easier on an untrained network than on a trained one
(breaching's ``model_state: untrained`` vs ``trained``; its issue #5): a trained
model's loss on a well-classified example is small, so its gradient is small and
nearly flat in the input. A malicious server can therefore send chosen victims a
random-init model instead of the global one [project's choice of the simplest
credible "model modification"; imprint / trap-weight modules change the architecture
and are not done here]. The reinitialisation follows Hugging Face's ``_init_weights``
convention from names and shapes alone: normal(0, ``std``) matrices and embeddings,
zero biases, unit LayerNorm scales, so no model code is needed at craft time.

The server must put the crafted parameters into ``Observation.global_params`` for that
victim (they are what the victim started from).

Measured (benchmarks/RESULTS.md): on the tiny ViT this did NOT raise leakage over the
honest attack on a trained model; the malicious variant that does is ``imprint``
(attacks/imprint.py).
"""

from __future__ import annotations

from typing import Any

import torch

from attacks.base import ATTACKS, Attack, Observation, Reconstruction


def reinitialise(params: dict[str, torch.Tensor], seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random-init parameters with the same names, shapes and dtypes."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        low = name.lower()
        if low.endswith("bias"):
            out[name] = torch.zeros_like(p)
        elif ("norm" in low or low.split(".")[-2:-1] in (["ln_1"], ["ln_2"], ["ln_f"])) and p.dim() == 1:
            out[name] = torch.ones_like(p)
        else:
            out[name] = (std * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype)
    return out


@ATTACKS.register("malicious_reinit")
class MaliciousReinit(Attack):
    """Malicious: send victims a fresh random-init model, then run ``base`` (default idlg) on their update."""

    threat_model = "malicious"

    def __init__(self, base: str = "idlg", seed: int = 0, std: float = 0.02, **base_params: Any) -> None:
        super().__init__()
        if base == "malicious_reinit":
            raise ValueError("malicious_reinit cannot wrap itself; set base to dlg, idlg, inverting_gradients or tag")
        if seed < 0 or not (0.0 < std < float("inf")):
            raise ValueError(f"malicious_reinit needs seed >= 0 and a finite std > 0, got seed {seed}, std {std!r}")
        self.inner: Attack = ATTACKS.create(base, **base_params)
        self.seed, self.std = seed, std

    @property
    def needs_labels(self) -> bool:  # type: ignore[override]
        return self.inner.needs_labels

    def craft(self, global_params: dict[str, torch.Tensor], server_round: int, partition_id: int) -> dict[str, torch.Tensor]:
        return reinitialise(global_params, self.seed + 7919 * server_round + partition_id, self.std)

    def attack(self, obs: Observation) -> Reconstruction:
        return self.inner.attack(obs)
