"""Malicious-server imprint attack on a ViT: crafted weights make each image's patches
land in their own MLP units, then the inputs are read off the update analytically.

Idea (Fowl et al. 2022, "Robbing the Fed", imprint module; Boenisch et al. 2021, trap
weights): for a linear layer z = W u + b followed by a ReLU-like activation, the
gradients of one unit are dL/dW_k = sum_t delta_kt u_t and dL/db_k = sum_t delta_kt.
If only one token t reaches unit k, dL/dW_k / dL/db_k = u_t exactly. Robbing the Fed
inserts a new linear layer with "bins" on a brightness measurement; here the server
may only change parameter *values* of the victim's architecture (HF
``ViTForImageClassification``, >= 2 layers), so [project's choice, derived] the whole
ViT is turned into an imprint machine:

* patch embedding (a linear map on each patch x_p, P = C ps^2 values) writes
  [x_p, -x_p] into hidden dims, position embeddings write a one-hot of the token's
  position, constant dims carry +-C; every dim has a negated twin, so the per-token
  mean is 0 and LayerNorm only divides by a per-token sigma_t (weights 1, biases 0);
* layer 0 attention: W_Q = W_K = 0, so attention is uniform over an image's tokens; the
  value reads a random projection of the patch pixels and writes the image-level
  scalar m_i (and -m_i) into every token of image i -- the "measurement";
* layer 0 MLP fc1: unit (p, k) fires iff the token sits at position p AND m_i > c_k:
  z = (1/sigma_t)[s (m_i - c_k) - S (1 - [t = p])], bias 0. The sign does not depend on
  sigma_t, so all patches of an image fall into the same bin. c_k are quantiles of m
  on calibration images (the server's public data) or, with none, on pixels drawn
  uniformly from the valid range. fc2 sums all units into one "sink" dim;
* layer 1 attention (uniform again) copies ``readout``^2 x the mean sink into the CLS
  token, which the classifier reads through a final LayerNorm of scale ``readout``^2;
  later layers are identities. A tiny ``readout`` keeps the client's SGD steps from
  moving the crafted weights, so FedAvg with several local steps still imprints every
  step's examples (the classifier and final-LN biases move, harmlessly).

Difference of neighbouring units (p, k) - (p, k + 1) isolates the tokens at position
p of the images with c_k < m_i <= c_{k+1}; with one image in the bin the ratio of
weight- to bias-gradient rows is u = h_t / sigma_t, and sigma_t = -C / u[-C dim], so
x_p = u[x dims] * sigma_t exactly (the -C dim has weight 0, so its update is not lost
to float32 rounding against large parameter values). Bins holding two or more images
give a weighted mixture; missing slots are filled by repeating such mixtures so the
score still counts every image of the batch. Works for FedSGD and, approximately (the
weights drift), for several local steps: the ratio is invariant to lr and step count.
Needs hidden >= 2P + T + 7 and intermediate >= T - 1 (T tokens); at most
intermediate // (T - 1) bins per position. Labels are not recovered.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from attacks.base import ATTACKS, Attack, Observation, Reconstruction
from attacks.gradients import examples_touched

_PATCH = "embeddings.patch_embeddings.projection.weight"


def _find(params: dict[str, torch.Tensor], suffix: str) -> str:
    hits = [k for k in params if k.endswith(suffix)]
    if len(hits) != 1:
        raise ValueError(f"imprint needs a HF ViTForImageClassification (no unique parameter *{suffix}); "
                         "use model.family = 'vit' with standard attention and no adapter")
    return hits[0]


class _Layout:
    """Hidden-dim layout and sizes read off the parameter shapes."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        w = params[_find(params, _PATCH)]  # [d, C, ps, ps]
        self.prefix = _find(params, _PATCH)[: -len(_PATCH)]
        self.d, self.C, self.ps = w.shape[0], w.shape[1], w.shape[2]
        self.P = self.C * self.ps * self.ps
        self.T = params[_find(params, "embeddings.position_embeddings")].shape[1]
        self.N = self.T - 1
        self.layers = sorted({int(k.split("layers.")[1].split(".")[0]) for k in params if "layers." in k})
        self.m = params[f"{self.prefix}layers.0.mlp.fc1.weight"].shape[0]
        if len(self.layers) < 2:
            raise ValueError("imprint needs a ViT with at least 2 layers (layer 0 imprints, layer 1 reads out)")
        self.X, self.XN = 0, self.P
        self.POS = 2 * self.P  # T dims
        self.NPOS, self.CON, self.NCON = self.POS + self.T, self.POS + self.T + 1, self.POS + self.T + 2
        self.MEA, self.NMEA, self.SINK, self.OUT = (self.POS + self.T + i for i in (3, 4, 5, 6))
        if self.OUT >= self.d:
            raise ValueError(f"imprint needs hidden_size >= {self.OUT + 1} for {self.P}-pixel patches and "
                             f"{self.T} tokens, the model has {self.d}; use a larger model or patch size")
        self.K = self.m // self.N  # bins per position
        if self.K < 2:
            raise ValueError(f"imprint needs intermediate_size >= {2 * self.N} for {self.N} patches, got {self.m}")

    def unit(self, p: int, k: int) -> int:
        """fc1 row of position p (1..N) and threshold k."""
        return (p - 1) * self.K + k


@ATTACKS.register("imprint")
class Imprint(Attack):
    """Malicious: send a crafted ViT whose MLP units imprint single images, read them off the update."""

    threat_model = "malicious"

    def __init__(self, seed: int = 0, calibration: str = "", calibration_examples: int = 256,
                 sharpness: float = 1e4, const: float = 1.0, tol: float = 1e-6, readout: float = 1e-3) -> None:
        super().__init__()
        if calibration_examples < 1:
            raise ValueError(f"imprint calibration_examples must be >= 1, got {calibration_examples!r}")
        if not all(0 < v < math.inf for v in (sharpness, const, tol, readout)):
            raise ValueError("imprint sharpness, const, tol and readout must be finite numbers > 0 (const divides the "
                             f"recovered scale, readout scales the signal), got {sharpness!r}, {const!r}, {tol!r}, "
                             f"{readout!r}")
        self.seed, self.calibration, self.n_cal = int(seed), str(calibration), int(calibration_examples)
        self.sharpness, self.const, self.tol, self.readout = float(sharpness), float(const), float(tol), float(readout)
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}

    def check_model(self, params: dict[str, torch.Tensor]) -> None:
        L = _Layout(params)  # a ViT with room for the construction, else the reason
        if self.calibration:  # the server's calibration images exist and have the model's channels
            if self.server.public_dataset is None:
                raise ValueError(f"imprint calibration = {self.calibration!r} needs the server's public data, and "
                                 "this server has none")
            data = self.server.public_dataset(self.calibration)
            first = data[0] if len(data) else {}
            if "pixel_values" not in first or first["pixel_values"].shape[0] != L.C:
                raise ValueError(f"imprint calibration dataset {self.calibration!r} has no {L.C}-channel images")

    # ---- crafting ------------------------------------------------------------------
    def _calibration_images(self, L: _Layout, H: int, W: int, gen: torch.Generator) -> torch.Tensor:
        if self.calibration:
            if self.server.public_dataset is None:
                raise ValueError(f"imprint calibration = {self.calibration!r} needs the server's public data, and this "
                                 "server has none (fedprobe run provides it; elsewhere call attack.bind(ServerContext("
                                 "public_dataset=...)))")
            data = self.server.public_dataset(self.calibration)  # the server's own data, handed in by the runtime
            idx = range(max(len(data) - self.n_cal, 0), len(data))  # the dataset's tail
            x = torch.stack([data[i]["pixel_values"] for i in idx]).double()
            if tuple(x.shape[1:]) != (L.C, H, W):
                raise ValueError(f"imprint calibration dataset {self.calibration!r} has images {tuple(x.shape[1:])}, "
                                 f"the model expects {(L.C, H, W)}")
            return x
        return torch.rand(self.n_cal, L.C, H, W, generator=gen, dtype=torch.float64) * 2 - 1

    def _measure(self, L: _Layout, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """m for images [B, C, H, W]: mean over the T tokens of w . (x_p / sigma0_p) (the CLS token adds 0)."""
        B = x.shape[0]
        patches = torch.nn.functional.unfold(x, L.ps, stride=L.ps).transpose(1, 2)  # [B, N, P]
        sig0 = ((2 * (patches**2).sum(-1) + 2 * self.const**2 + 2 * self.const**2) / L.d).sqrt()  # [B, N]
        return ((patches @ w) / sig0).sum(-1) / L.T if B else x.new_zeros(0)

    def crafted(self, global_params: dict[str, torch.Tensor], image_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        L = _Layout(global_params)
        gs = int(L.N**0.5)
        H = W = (image_hw[0] if image_hw else gs * L.ps)
        key = (L.d, L.P, L.T, L.m, H)
        if key in self._cache:
            return self._cache[key]
        gen = torch.Generator().manual_seed(self.seed)
        out = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in global_params.items()}
        pre, Cv, Qv = L.prefix, self.const, self.const
        # embeddings: [x, -x] from the patch conv, +-C from its bias, one-hot positions
        wp = out[pre + _PATCH].view(L.d, L.P)
        wp[L.X:L.X + L.P] = torch.eye(L.P, dtype=torch.float64)
        wp[L.XN:L.XN + L.P] = -torch.eye(L.P, dtype=torch.float64)
        bp = out[pre + "embeddings.patch_embeddings.projection.bias"]
        bp[L.CON], bp[L.NCON] = Cv, -Cv
        cls = out[pre + "embeddings.cls_token"].view(L.d)
        cls[L.CON], cls[L.NCON] = Cv, -Cv
        pos = out[pre + "embeddings.position_embeddings"].view(L.T, L.d)
        pos[torch.arange(L.T), L.POS + torch.arange(L.T)] = Qv
        pos[:, L.NPOS] = -Qv
        for i in L.layers:  # LayerNorms: identity affine
            for ln in ("layernorm_before", "layernorm_after"):
                out[f"{pre}layers.{i}.{ln}.weight"].fill_(1.0)
        out[pre + "layernorm.weight"].fill_(self.readout**2)  # final LN scale: damps every gradient into the network
        # layer 0 attention: uniform, value = random projection of the pixels -> m, -m
        w = torch.randn(L.P, generator=gen, dtype=torch.float64) / L.P**0.5
        out[f"{pre}layers.0.attention.v_proj.weight"][0, L.X:L.X + L.P] = w
        o0 = out[f"{pre}layers.0.attention.o_proj.weight"]
        o0[L.MEA, 0], o0[L.NMEA, 0] = 1.0, -1.0
        # thresholds: c_0 below every image, c_1.. at quantiles of m on the calibration images
        m_cal = self._measure(L, self._calibration_images(L, H, W, gen), w)
        lo, hi = float(m_cal.min()), float(m_cal.max())
        span = max(hi - lo, 1e-6)
        c = torch.quantile(m_cal, torch.linspace(0, 1, L.K + 1, dtype=torch.float64)[1:-1])
        c = torch.cat([torch.tensor([lo - 10 * span], dtype=torch.float64), c])  # [K]
        s = self.sharpness / span
        S = 4 * s * (abs(lo) + abs(hi) + 10 * span) + 100.0
        fc1 = out[f"{pre}layers.0.mlp.fc1.weight"]
        for p in range(1, L.N + 1):
            for k in range(L.K):
                u = L.unit(p, k)
                fc1[u, L.MEA] = s
                fc1[u, L.CON] = (-s * float(c[k]) - S) / Cv
                fc1[u, L.POS + p] = S / Qv
        sig_min = (2 * Cv**2 + 2 * Qv**2) ** 0.5 / L.d**0.5
        out[f"{pre}layers.0.mlp.fc2.weight"][L.SINK, : L.N * L.K] = 0.01 / (L.K * s * 11 * span / sig_min)  # sink <~ 0.01
        # layer 1 attention: uniform, copies the mean sink into the CLS token's OUT dim
        # readout << 1 (here and, squared, in the final LayerNorm's scale) keeps every loss gradient inside the
        # network tiny: the activations are ~sharpness large, so an O(1) gradient lets the client's first SGD step
        # make fc2's columns unequal and move the position embeddings the gates rely on, and neighbouring units
        # then no longer cancel (measured, 5 local steps x 1 example: readout 1 -> only the first step's example,
        # 1e-7 in layer 1 only -> 44 dB). A small sink (0.01) keeps the readout weights themselves from moving.
        out[f"{pre}layers.1.attention.v_proj.weight"][0, L.SINK] = self.readout
        out[f"{pre}layers.1.attention.o_proj.weight"][L.OUT, 0] = self.readout
        cw = out[_find(out, "classifier.weight")]
        cw[:, L.OUT] = torch.randn(cw.shape[0], generator=gen, dtype=torch.float64)
        crafted = {k: v.to(global_params[k].dtype) for k, v in out.items()}
        self._cache[key] = crafted
        self.thresholds = c
        return crafted

    def craft(self, global_params: dict[str, torch.Tensor], server_round: int, partition_id: int) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.crafted(global_params).items()}

    # ---- reading ------------------------------------------------------------------
    def attack(self, obs: Observation) -> Reconstruction:
        t0 = time.perf_counter()
        L = _Layout(obs.global_params)
        C, H, W = obs.task.image_shape
        n = examples_touched(obs)
        pre = L.prefix
        gw = (obs.global_params[f"{pre}layers.0.mlp.fc1.weight"] - obs.client_params[f"{pre}layers.0.mlp.fc1.weight"]).double()
        gb = (obs.global_params[f"{pre}layers.0.mlp.fc1.bias"] - obs.client_params[f"{pre}layers.0.mlp.fc1.bias"]).double()
        gw, gb = gw.cpu(), gb.cpu()
        found: list[tuple[float, torch.Tensor]] = []  # (|bias mass|, image [C, H, W])
        scale = float(gb.abs().max()) if gb.numel() else 0.0
        gs = H // L.ps
        for k in range(L.K):
            rows_w, rows_b = [], []
            for p in range(1, L.N + 1):
                u = L.unit(p, k)
                dw = gw[u] - (gw[u + 1] if k + 1 < L.K else 0)
                db = gb[u] - (gb[u + 1] if k + 1 < L.K else 0)
                rows_w.append(dw)
                rows_b.append(db)
            db_all = torch.stack(rows_b)
            if scale == 0 or bool((db_all.abs() <= self.tol * scale).any()):
                continue  # empty bin (an image fills every position's bin or none)
            u_all = torch.stack(rows_w) / db_all[:, None]  # [N, d] = h_t / sigma_t
            sigma = -self.const / u_all[:, L.NCON]  # [N]
            patches = u_all[:, L.X:L.X + L.P] * sigma[:, None]  # [N, P]
            img = torch.nn.functional.fold(patches.T[None], (H, W), L.ps, stride=L.ps)[0]  # [C, H, W]
            found.append((float(db_all.abs().sum()), img))
        found.sort(key=lambda t: -t[0])
        imgs = [f[1] for f in found[:n]]
        i = 0
        while imgs and len(imgs) < n:  # collided bins hold >= 2 images: repeat the mixtures
            imgs.append(imgs[i % len(found)].clone())
            i += 1
        x = torch.stack(imgs) if imgs else torch.zeros(n, C, H, W, dtype=torch.float64)
        if obs.task.mean:  # clamp to the valid pixel range (mixtures can overshoot)
            mean = torch.tensor(obs.task.mean, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(obs.task.std, dtype=x.dtype).view(1, -1, 1, 1)
            x = torch.max(torch.min(x, (1 - mean) / std), -mean / std)
        return Reconstruction(inputs=x.float(), metrics={
            "bins_occupied": float(len(found)), "bins": float(L.K), "attack_seconds": time.perf_counter() - t0})
