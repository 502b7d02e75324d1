"""What the attacker can recompute: the client's update for a guessed batch.

FedSGD (one local step): the observed pseudo-gradient (global - client) / lr is the
gradient of the mean loss on the client's batch. FedAvg with K local SGD steps: the
observed update client - global equals the unrolled trajectory, which we replay
differentiably with ``torch.func.functional_call`` on the global parameters (as
breaching's ``local_hyperparams`` objective). Minibatch order [project's choice]: the
n examples a client touched are taken in order, ``batch_size`` per step, wrapping.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from attacks.base import Observation
from models.tasks import TaskSpec, per_example_loss


def attack_model(model_factory: Callable[[], nn.Module], dtype: torch.dtype, mode: str = "eval") -> nn.Module:
    """The architecture in the client's mode (``train`` or ``eval``, from ``obs.metadata['model_mode']``)
    with attention that supports double backward.

    The mode matters for BatchNorm (batch statistics in train mode) and dropout; fedprobe's
    transformers have neither by default, so both modes compute the same function there.
    Torch's fused CPU SDPA kernel has no second derivative, so Hugging Face models are
    switched to the ``eager`` attention implementation (same math).
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"model_mode must be 'train' or 'eval', got {mode!r}")
    model = model_factory().to(dtype).train(mode == "train")
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "_attn_implementation", None) in ("sdpa", "flash_attention_2", "flex_attention"):
        model.set_attn_implementation("eager")
    return model


def observed_target(obs: Observation, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int, float]:
    """(target, local_steps, lr): the pseudo-gradient for FedSGD, else the raw update client - global."""
    md = obs.metadata
    if "lr" not in md:
        raise ValueError("gradient inversion needs the client's learning rate in obs.metadata['lr']")
    steps, lr = max(int(md.get("local_steps", 1)), 1), float(md["lr"])
    opt = str(md.get("optimizer", "sgd")).lower()
    if opt not in ("sgd", ""):
        raise ValueError(f"gradient inversion replays plain SGD local steps, but the client used optimizer {opt!r}; "
                         "set optimizer.name='sgd' (no momentum) for attack experiments")
    if steps == 1:
        tgt = {k: v.to(dtype) for k, v in obs.pseudo_gradient().items()}
    else:
        tgt = {k: v.to(dtype) for k, v in obs.update().items()}
    return tgt, steps, lr


def examples_touched(obs: Observation) -> int:
    """How many distinct examples the client's update depends on: min(num_examples, batch_size * local_steps)."""
    md = obs.metadata
    bs = int(md.get("batch_size", 0))
    if bs <= 0:
        raise ValueError("gradient inversion needs obs.metadata['batch_size'] (the client's local batch size)")
    steps = max(int(md.get("local_steps", 1)), 1)
    n = int(md.get("num_examples", bs * steps))
    return max(1, min(n, bs * steps))


def batch_loss(model: nn.Module, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
               labels: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """Mean task loss; float ``labels`` of shape [B, C] (or [B, L, V]) are soft labels (DLG's joint optimisation)."""
    out = functional_call(model, params, args=(), kwargs=inputs)
    logits = out.logits if hasattr(out, "logits") else out
    if labels.is_floating_point():
        if task.kind == "lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        return -(torch.softmax(labels, -1) * F.log_softmax(logits, -1)).sum(-1).mean()
    return per_example_loss(logits, labels, task).mean()


def _step_gradient(model: nn.Module, params: dict[str, torch.Tensor], names: list[str], inputs: dict[str, torch.Tensor],
                   labels: torch.Tensor, task: TaskSpec, example_clip: float) -> list[torch.Tensor]:
    """The batch gradient of one local step; with ``example_clip`` > 0, DP-SGD's mean of
    per-example gradients clipped with Opacus's factor min(1, C / (|g_i| + 1e-6))."""
    wrt = [params[k] for k in names]
    if example_clip <= 0:
        return list(torch.autograd.grad(batch_loss(model, params, inputs, labels, task), wrt, create_graph=True))
    n = labels.shape[0]
    total: list[torch.Tensor] | None = None
    for i in range(n):
        one = {key: v[i : i + 1] for key, v in inputs.items()}
        g = torch.autograd.grad(batch_loss(model, params, one, labels[i : i + 1], task), wrt, create_graph=True)
        norm = torch.sqrt(sum((t**2).sum() for t in g))  # type: ignore[arg-type]
        factor = torch.clamp(example_clip / (norm + 1e-6), max=1.0)
        total = [factor * t for t in g] if total is None else [a + factor * t for a, t in zip(total, g)]
    assert total is not None
    return [t / n for t in total]


def simulate(model: nn.Module, params: dict[str, torch.Tensor], names: list[str], inputs: dict[str, torch.Tensor],
             labels: torch.Tensor, task: TaskSpec, steps: int, lr: float, batch_size: int,
             example_clip: float = 0.0, update_clip: float = 0.0) -> dict[str, torch.Tensor]:
    """The differentiable counterpart of the target: gradient (steps == 1) or unrolled update (steps > 1).

    Defense-aware (``attacks.threat``): ``example_clip`` clips per-example gradients as DP-SGD
    does; ``update_clip`` scales the whole update u (= -lr g for one step) to norm <= C.
    """
    n = labels.shape[0]
    if steps == 1:
        out = dict(zip(names, _step_gradient(model, params, names, inputs, labels, task, example_clip)))
    else:
        cur = dict(params)
        for k in range(steps):
            idx = torch.arange(k * batch_size, (k + 1) * batch_size, device=labels.device) % n
            sub = {key: v[idx] for key, v in inputs.items()}
            grads = _step_gradient(model, cur, names, sub, labels[idx], task, example_clip)
            cur.update({key: cur[key] - lr * g for key, g in zip(names, grads)})
        out = {key: cur[key] - params[key] for key in names}
    if update_clip > 0:
        scale = lr if steps == 1 else 1.0  # the released update is -lr * g for one step
        norm = scale * torch.sqrt(sum((v**2).sum() for v in out.values()))  # type: ignore[arg-type]
        factor = torch.clamp(update_clip / (norm + 1e-12), max=1.0)
        out = {k: factor * v for k, v in out.items()}
    return out


OBJECTIVES = ("l2", "cosine", "tag")


def gradient_distance(sim: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor], objective: str,
                      tag_scale: float = 0.1, weight: dict[str, torch.Tensor | float] | None = None) -> torch.Tensor:
    """l2 (DLG), cosine (Inverting Gradients: 1 - cos over all parameters; invariant to the scale
    of either side, so clipping cannot hide from it), tag (L2 + scale * L1). ``weight`` (>= 0 per
    entry or per tensor) reweights both sides: 0/1 masks skip pruned entries, noise-aware weights
    favour the tensors whose signal stands above the DP noise (``noise_weights``)."""
    keys = list(sim)
    if weight is not None:
        root = {k: (weight[k] ** 0.5 if isinstance(weight[k], torch.Tensor) else float(weight[k]) ** 0.5)
                for k in keys if k in weight}
        sim = {k: sim[k] * root[k] if k in root else sim[k] for k in keys}
        tgt = {k: tgt[k] * root[k] if k in root else tgt[k] for k in keys}
    if objective == "l2":
        return sum(((sim[k] - tgt[k]) ** 2).sum() for k in keys)  # type: ignore[return-value]
    if objective == "tag":
        return sum(((sim[k] - tgt[k]) ** 2).sum() + tag_scale * (sim[k] - tgt[k]).abs().sum() for k in keys)  # type: ignore[return-value]
    if objective == "cosine":
        dot = sum((sim[k] * tgt[k]).sum() for k in keys)
        ns = sum((sim[k] ** 2).sum() for k in keys)
        nt = sum((tgt[k] ** 2).sum() for k in keys)
        return 1 - dot / (ns.sqrt() * nt.sqrt() + 1e-30)  # type: ignore[union-attr]
    raise ValueError(f"unknown objective {objective!r}; use l2, cosine or tag")


def noise_weights(tgt: dict[str, torch.Tensor], noise_std: float) -> dict[str, float]:
    """Per-tensor Wiener weights snr / (1 + snr) against known i.i.d. noise of std ``noise_std`` per entry,
    with snr = max(|t|^2 / (n noise_std^2) - 1, 0) estimated from the observed tensor t itself."""
    out = {}
    for k, t in tgt.items():
        noise = t.numel() * noise_std**2
        snr = max(float((t.double() ** 2).sum()) / noise - 1.0, 0.0) if noise > 0 else float("inf")
        out[k] = 1.0 if snr == float("inf") else snr / (1.0 + snr)
    return out


def last_bias_name(obs: Observation) -> str | None:
    """The output layer's bias: the last parameter of shape [num_classes] named *bias."""
    names = [k for k, v in obs.global_params.items() if k.endswith("bias") and tuple(v.shape) == (obs.task.num_classes,)]
    return names[-1] if names else None


def infer_labels(obs: Observation, n: int, probs: torch.Tensor | None = None) -> torch.Tensor | None:
    """iDLG label inference from the output-bias gradient g_b = mean_i (p_i - y_i).

    n = 1: the one negative entry is the label (Zhao et al. 2020, exact). n > 1
    [project's choice, in the spirit of breaching's 'bias-corrected']: the count of
    class c is about n (p_c - g_c) with p the model's mean prediction (``probs``,
    default uniform); counts are rounded greedily by largest remainder.
    """
    name = last_bias_name(obs)
    if name is None:
        return None
    g = obs.pseudo_gradient()[name].double()  # the mean gradient over the K steps
    if n == 1:
        return g.argmin().view(1)
    p = torch.full_like(g, 1.0 / g.numel()) if probs is None else probs.double()
    est = (n * (p - g)).clamp(min=0)
    counts = est.floor().long()
    while int(counts.sum()) < n:
        counts[torch.argmax(est - counts)] += 1
    while int(counts.sum()) > n:
        counts[torch.argmax(counts)] -= 1
    return torch.repeat_interleave(torch.arange(g.numel(), device=g.device), counts)


def embedding_name(obs: Observation, params: dict[str, Any]) -> str:
    """The input token embedding matrix [vocab, d] (word_embeddings / wte / embed_tokens / first [V, d])."""
    cands = [k for k, v in params.items() if v.dim() == 2 and v.shape[0] == obs.task.vocab_size]
    for hint in ("word_embeddings", "wte", "embed_tokens"):
        for k in cands:
            if hint in k:
                return k
    if not cands:
        raise ValueError(f"no [vocab_size={obs.task.vocab_size}, d] embedding among the parameters; check task.vocab_size")
    return cands[0]
