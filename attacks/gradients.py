"""What the attacker can recompute: the client's update for a guessed batch.

FedSGD (one local step): the observed pseudo-gradient (global - client) / lr is the
gradient of the mean loss on the client's batch. FedAvg with K local SGD steps: the
observed update client - global equals the unrolled trajectory, which we replay
differentiably with ``torch.func.functional_call`` on the global parameters (as
breaching's ``local_hyperparams`` objective), with the client's SGD momentum and weight
decay (torch's rule: buf = mu buf + (g + wd p), p -= lr buf; a fresh optimizer per round, so
the first step's buffer is its gradient), or with Adam (torch's rule, bias-corrected, L2 weight
decay; the target is then the update itself, even for one step: Adam's step is not a gradient). Minibatch order [project's choice]: the n examples
a client touched are taken in order, ``batch_size`` per step, wrapping; a client that reports
``partial_batches`` (a torch ``DataLoader`` with ``drop_last=False``, as Flower's examples use)
takes them epoch by epoch instead, the last batch of each epoch smaller.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from attacks.base import Observation
from models.tasks import TaskSpec, call_args, per_example_loss


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
    if opt not in ("sgd", "", "adam"):
        raise ValueError(f"gradient inversion replays SGD (with momentum and weight decay) or Adam local steps, but the "
                         f"client used optimizer {opt!r}; set optimizer.name to 'sgd' or 'adam' for attack experiments")
    if steps == 1 and opt != "adam":
        tgt = {k: v.to(dtype) for k, v in obs.pseudo_gradient().items()}
    else:
        tgt = {k: v.to(dtype) for k, v in obs.update().items()}
    return tgt, steps, lr


def replay_facts(obs: Observation) -> dict[str, Any]:
    """The local optimizer's facts :func:`simulate` replays: ``momentum``, ``weight_decay``, ``partial_batches``."""
    md = obs.metadata
    momentum, wd = float(md.get("momentum", 0.0) or 0.0), float(md.get("weight_decay", 0.0) or 0.0)
    if not (0 <= momentum < 1) or wd < 0:
        raise ValueError(f"the client reported momentum {momentum} / weight_decay {wd}: need 0 <= momentum < 1, "
                         "weight_decay >= 0")
    if md.get("nesterov") or float(md.get("dampening", 0.0) or 0.0) != 0.0:
        raise ValueError("gradient inversion replays SGD without Nesterov or dampening; the client used them")
    out: dict[str, Any] = {"momentum": momentum, "weight_decay": wd,
                           "partial_batches": bool(md.get("partial_batches", False))}
    if str(md.get("optimizer", "sgd")).lower() == "adam":
        betas = md.get("betas", (0.9, 0.999))
        betas = tuple(float(b) for b in (betas if not isinstance(betas, str) else betas.strip("[]()").split(",")))
        if momentum:
            raise ValueError("the client reported Adam with momentum: Adam's momentum is its betas")
        out.update(optimizer="adam", betas=betas, eps=float(md.get("eps", 1e-8)))
    return out


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
    args, kwargs = call_args(inputs, task)
    out = functional_call(model, params, args=args, kwargs=kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    if labels.is_floating_point():
        if task.kind == "lm":  # position t predicts t + 1; as the client's loss: pads carry none, per-sentence means
            tok = -(torch.softmax(labels[:, 1:], -1) * F.log_softmax(logits[:, :-1], -1)).sum(-1)  # [B, L - 1]
            mask = inputs.get("attention_mask")
            if mask is None:
                return tok.mean()
            m = mask[:, 1:].to(tok.dtype)
            return ((tok * m).sum(1) / m.sum(1).clamp(min=1)).mean()
        return -(torch.softmax(labels, -1) * F.log_softmax(logits, -1)).sum(-1).mean()
    return per_example_loss(logits, labels, task).mean()


def _step_gradient(model: nn.Module, params: dict[str, torch.Tensor], names: list[str], inputs: dict[str, torch.Tensor],
                   labels: torch.Tensor, task: TaskSpec, example_clip: float,
                   create_graph: bool = True) -> list[torch.Tensor]:
    """The batch gradient of one local step; with ``example_clip`` > 0, DP-SGD's mean of
    per-example gradients clipped with Opacus's factor min(1, C / (|g_i| + 1e-6)). ``create_graph=False``
    where the gradient is only scored, never differentiated (no double-backward graph is kept)."""
    wrt = [params[k] for k in names]
    if example_clip <= 0:
        return list(torch.autograd.grad(batch_loss(model, params, inputs, labels, task), wrt,
                                        create_graph=create_graph))
    n = labels.shape[0]
    total: list[torch.Tensor] | None = None
    for i in range(n):
        one = {key: v[i : i + 1] for key, v in inputs.items()}
        g = torch.autograd.grad(batch_loss(model, params, one, labels[i : i + 1], task), wrt,
                                create_graph=create_graph)
        norm = torch.sqrt(sum((t**2).sum() for t in g))  # type: ignore[arg-type]
        factor = torch.clamp(example_clip / (norm + 1e-6), max=1.0)
        total = [factor * t for t in g] if total is None else [a + factor * t for a, t in zip(total, g)]
    assert total is not None
    return [t / n for t in total]


def batch_indices(step: int, n: int, batch_size: int, partial_batches: bool, device: Any = None) -> torch.Tensor:
    """Which of the n touched examples local step ``step`` trains on (see the module docstring)."""
    if not partial_batches:
        return torch.arange(step * batch_size, (step + 1) * batch_size, device=device) % n
    per_epoch = -(-n // batch_size)
    start = (step % per_epoch) * batch_size
    return torch.arange(start, min(start + batch_size, n), device=device)


def simulate(model: nn.Module, params: dict[str, torch.Tensor], names: list[str], inputs: dict[str, torch.Tensor],
             labels: torch.Tensor, task: TaskSpec, steps: int, lr: float, batch_size: int,
             example_clip: float = 0.0, update_clip: float = 0.0, momentum: float = 0.0, weight_decay: float = 0.0,
             partial_batches: bool = False, optimizer: str = "sgd", betas: tuple[float, float] = (0.9, 0.999),
             eps: float = 1e-8, create_graph: bool = True) -> dict[str, torch.Tensor]:
    """The differentiable counterpart of the target: gradient (steps == 1) or unrolled update (steps > 1).

    Defense-aware (``attacks.threat``): ``example_clip`` clips per-example gradients as DP-SGD
    does; ``update_clip`` scales the whole update u (= -lr g for one step) to norm <= C.
    ``momentum`` / ``weight_decay`` replay torch's SGD (see the module docstring); ``partial_batches``
    the batching of a ``DataLoader`` that keeps the last, smaller batch of each epoch. ``optimizer="adam"``
    replays torch's Adam (``betas``, ``eps``; always the unrolled update). ``create_graph=False`` for a
    recomputed update that is only scored (a candidate's distance), never optimised through: the same values,
    without the graph that a search's double backward needs.
    """
    n = labels.shape[0]
    adam = optimizer == "adam"
    if steps == 1 and not adam:
        grads = _step_gradient(model, params, names, inputs, labels, task, example_clip, create_graph)
        out = {key: g + weight_decay * params[key] if weight_decay else g for key, g in zip(names, grads)}
    else:
        cur = dict(params)
        buf: dict[str, torch.Tensor] = {}
        sq: dict[str, torch.Tensor] = {}
        b1, b2 = betas
        for k in range(steps):
            idx = batch_indices(k, n, batch_size, partial_batches, labels.device)
            sub = {key: v[idx] for key, v in inputs.items()}
            grads = _step_gradient(model, cur, names, sub, labels[idx], task, example_clip, create_graph)
            for key, g in zip(names, grads):
                if weight_decay:
                    g = g + weight_decay * cur[key]
                if adam:  # torch.optim.Adam: m, v from zero, bias-corrected (a tiny floor keeps sqrt differentiable)
                    buf[key] = b1 * buf[key] + (1 - b1) * g if key in buf else (1 - b1) * g
                    sq[key] = b2 * sq[key] + (1 - b2) * g * g if key in sq else (1 - b2) * g * g
                    m_hat, v_hat = buf[key] / (1 - b1 ** (k + 1)), sq[key] / (1 - b2 ** (k + 1))
                    cur[key] = cur[key] - lr * m_hat / ((v_hat + 1e-30).sqrt() + eps)
                    continue
                if momentum:
                    g = buf[key] = g if key not in buf else momentum * buf[key] + g
                cur[key] = cur[key] - lr * g
        out = {key: cur[key] - params[key] for key in names}
    if update_clip > 0:
        scale = lr if steps == 1 and not adam else 1.0  # the released update is -lr * g for one SGD step
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
