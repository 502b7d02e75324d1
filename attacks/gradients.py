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


def attack_model(model_factory: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """The architecture in eval mode (no dropout) with attention that supports double backward.

    Torch's fused CPU SDPA kernel has no second derivative, so Hugging Face models are
    switched to the ``eager`` attention implementation (same math).
    """
    model = model_factory().to(dtype).eval()
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


def simulate(model: nn.Module, params: dict[str, torch.Tensor], names: list[str], inputs: dict[str, torch.Tensor],
             labels: torch.Tensor, task: TaskSpec, steps: int, lr: float, batch_size: int) -> dict[str, torch.Tensor]:
    """The differentiable counterpart of the target: gradient (steps == 1) or unrolled update (steps > 1)."""
    n = labels.shape[0]
    if steps == 1:
        loss = batch_loss(model, params, inputs, labels, task)
        grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=True)
        return dict(zip(names, grads))
    cur = dict(params)
    for k in range(steps):
        idx = torch.arange(k * batch_size, (k + 1) * batch_size, device=labels.device) % n
        sub = {key: v[idx] for key, v in inputs.items()}
        loss = batch_loss(model, cur, sub, labels[idx], task)
        grads = torch.autograd.grad(loss, [cur[key] for key in names], create_graph=True)
        cur.update({key: cur[key] - lr * g for key, g in zip(names, grads)})
    return {key: cur[key] - params[key] for key in names}


def gradient_distance(sim: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor], objective: str,
                      tag_scale: float = 0.1) -> torch.Tensor:
    """l2 (DLG), cosine (Inverting Gradients: 1 - cos over all parameters), tag (L2 + scale * L1)."""
    keys = list(sim)
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
