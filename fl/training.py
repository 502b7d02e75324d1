"""The client's local training round and the centralized evaluation.

Plain torch loops: the defenses' hooks are called at the points named in
``defenses/base.py``; the optimizer comes from ``optimizers.build``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from defenses.base import DEFENSES, ClientContext, Defense
from fl import model_pool
from fl.arrays import load_trainable, trainable_state
from fl.config import Config
from models.tasks import TaskSpec, first_layer_attention, logits_of, per_example_loss

ORACLE_MAX_EXAMPLES = 256


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (experiment seed, round, client)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def build_defenses(cfg: Config) -> list[Defense]:
    import defenses  # noqa: F401  (registers built-in defenses)
    import fl.faults  # noqa: F401  (registers faulty_update)

    return [DEFENSES.create(d.name, **d.params) for d in cfg.defenses]


def build_audit(cfg: Config) -> Any:
    """The configured audit (``[audit]``), bound to the run's public facts; None when there is none."""
    if cfg.audit.name in ("", "none"):
        return None
    from defenses.audit import AUDITS

    import defenses  # noqa: F401  (registers built-in audits)

    audit = AUDITS.create(cfg.audit.name, **cfg.audit.params)
    dp = next((d.params for d in cfg.defenses if d.name in ("dp_sgd", "central_dp")), {})  # the run's delta
    audit.bind(seed=cfg.experiment.seed, clients=cfg.audit.clients, delta=float(dp.get("delta", 1e-5)),
               confidence=cfg.audit.confidence, defenses=[d.model_dump(mode="json") for d in cfg.defenses],
               federation=cfg.federation.model_dump(mode="json"))
    return audit


@dataclass
class ClientResult:
    state: dict[str, torch.Tensor]  # trainable parameters to send (global + defended update)
    metrics: dict[str, float]
    meta: dict[str, Any]
    client_state: dict[str, Any]  # persists across rounds (defense accountants)
    oracle: dict[str, torch.Tensor] = field(default_factory=dict)  # ground truth for attack scoring only
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # what a client mode shares beyond the update


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_client(
    cfg: Config,
    partition_id: int,
    global_state: dict[str, torch.Tensor],
    server_round: int,
    client_state: dict[str, Any] | None = None,
    record_oracle: bool = False,
) -> ClientResult:
    """One client's local training for one round, defenses applied in config order."""
    from fl.data import load_federated
    from models import build_model, task_for
    from optimizers import build as build_optimizer
    from optimizers import diagnostics as optimizer_diagnostics

    fed = cfg.federation
    device = resolve_device(fed.device)
    data = load_federated(cfg.data, fed.num_clients, cfg.experiment.seed)
    task = task_for(cfg.model, data.task)  # how the model is called (a plain nn.Module: model(x))
    train_ds, _ = data.partition(partition_id)
    if len(train_ds) == 0:
        raise ValueError(f"client {partition_id} has no training data; lower federation.num_clients or raise data.alpha")

    seed = derive_seed(cfg.experiment.seed, server_round, partition_id)
    seed_everything(seed)
    pool_key = f"{cfg.model.model_dump_json()}|{task!r}|{cfg.experiment.seed}|{device}"
    model = model_pool.checkout(pool_key, lambda: build_model(cfg.model, task, seed=cfg.experiment.seed).to(device))
    load_trainable(model, global_state)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_ds, batch_size=min(fed.batch_size, len(train_ds)), shuffle=True,
                        generator=generator, collate_fn=data.collate)
    steps = fed.local_steps or fed.local_epochs * len(loader)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optimizer.name, params, base=cfg.optimizer.base, lr=cfg.optimizer.lr,
                                **cfg.optimizer.params)
    sampled_fraction = (fed.clients_per_round or fed.num_clients) / fed.num_clients
    ctx = ClientContext(
        model=model, optimizer=optimizer, loader=loader, server_round=server_round, partition_id=partition_id,
        num_examples=len(train_ds), sample_rate=min(1.0, fed.batch_size / len(train_ds)), local_steps=steps,
        epochs=fed.local_epochs, num_rounds=fed.rounds, device=device, task=task, sampled_fraction=sampled_fraction,
        state=dict(client_state or {}),
    )
    defenses = build_defenses(cfg)
    for d in defenses:
        d.setup(ctx)
        if ctx.refused:  # a spent privacy budget: no training, nothing to aggregate
            model_pool.give_back(pool_key, model)
            return _refusal(ctx, global_state, partition_id, len(train_ds))
    audit = build_audit(cfg) if partition_id in cfg.audit.clients else None  # only canary clients plant
    if audit is not None and partition_id in audit.clients:
        audit.client_setup(ctx)  # plants this round's canaries (after dp_sgd made the optimizer private)

    losses: list[float] = []
    oracle: list[dict[str, torch.Tensor]] = []
    shared: dict[str, torch.Tensor] = {}
    attention_input: torch.Tensor | None = None
    n_oracle = 0
    step = 0
    while step < steps:
        for batch in ctx.loader:
            if step >= steps:
                break
            if len(batch["labels"]) == 0:  # Poisson sampling can draw an empty batch
                step += 1
                continue
            if record_oracle and n_oracle < ORACLE_MAX_EXAMPLES:
                oracle.append({k: v.detach().clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
                n_oracle += len(batch["labels"])
            batch = _to_device(batch, device)
            if record_oracle and cfg.attack.share_attention and not shared:
                # split-learning-like mode: the victim shares its first batch's first-layer attention maps
                maps, attention_input = first_layer_attention(ctx.model, batch)
                shared["attention"] = maps.cpu()
            logits = logits_of(ctx.model, batch, task)
            per_example = per_example_loss(logits, batch["labels"], task)
            loss = per_example.mean()
            for d in defenses:
                loss = d.loss(loss, ctx, batch, per_example)
            ctx.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ctx.optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
    for d in defenses:
        d.after_training(ctx)

    new_state = {k: v.to("cpu", copy=True) for k, v in trainable_state(model).items()}  # the pool reuses the model
    model_pool.give_back(pool_key, model)
    update = {k: (new_state[k] - global_state[k]) for k in global_state}
    for d in defenses:
        update = d.transform_update(update, ctx)
    sent = _apply_update(global_state, update)

    train_loss = float(np.mean(losses)) if losses else float("nan")
    metrics: dict[str, float] = {"train_loss": train_loss, "num-examples": float(len(train_ds)),
                                 "uniform-weight": 1.0, "local_steps": float(steps)}
    base_optimizer = getattr(ctx.optimizer, "original_optimizer", ctx.optimizer)  # under Opacus' DPOptimizer
    metrics.update({f"opt_{k}": float(v) for k, v in optimizer_diagnostics(base_optimizer).items()})
    metrics.update({k: float(v) for k, v in ctx.metrics.items()})
    meta = {"partition_id": partition_id, "lr": cfg.optimizer.lr, "local_steps": steps,
            "batch_size": fed.batch_size, "num_examples": len(train_ds), "optimizer": cfg.optimizer.name,
            "model_mode": "train", **{k: float(cfg.optimizer.params[k]) for k in ("momentum", "weight_decay")
                                      if k in cfg.optimizer.params}}
    oracle_batch = {k: torch.cat([o[k] for o in oracle])[:ORACLE_MAX_EXAMPLES] for k in oracle[0]} if oracle else {}
    if attention_input is not None:
        oracle_batch["attention_input"] = attention_input.cpu()
    return ClientResult(state=sent, metrics=metrics, meta=meta, client_state=ctx.state, oracle=oracle_batch,
                        shared=shared)


def _refusal(ctx: ClientContext, global_state: dict[str, torch.Tensor], partition_id: int,
             num_examples: int) -> ClientResult:
    """The reply of a client that refused the round: the global model back, flagged so it is not aggregated."""
    metrics = {"num-examples": float(num_examples), "uniform-weight": 1.0, "local_steps": 0.0,
               "privacy_budget_exhausted": 1.0}
    metrics.update({k: float(v) for k, v in ctx.metrics.items()})
    meta = {"partition_id": partition_id, "refused": ctx.refused, "model_mode": "train"}
    return ClientResult(state=dict(global_state), metrics=metrics, meta=meta, client_state=ctx.state)


def _apply_update(global_state: dict[str, torch.Tensor], update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """global + update for well-formed entries; a malformed entry travels as it is (the server rejects it)."""
    sent = {}
    for name, u in update.items():
        g = global_state.get(name)
        ok = g is not None and u.shape == g.shape and u.dtype == g.dtype
        sent[name] = g + u if ok else u
    return sent


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, task: TaskSpec, collate: Any, batch_size: int = 256,
             device: torch.device | None = None) -> dict[str, float]:
    """Loss and accuracy (token accuracy and perplexity for language models) on a dataset."""
    device = device or next(model.parameters()).device
    model.eval()
    total_loss, correct, count, tokens = 0.0, 0, 0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        batch = _to_device(batch, device)
        logits = logits_of(model, batch, task)
        labels = batch["labels"]
        total_loss += float(per_example_loss(logits, labels, task).sum())
        count += len(labels)
        if task.kind == "lm":
            pred = logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            mask = target != -100
            correct += int(((pred == target) & mask).sum())
            tokens += int(mask.sum())
        else:
            correct += int((logits.argmax(-1) == labels).sum())
    model.train()
    loss = total_loss / max(count, 1)
    out = {"test_loss": loss, "accuracy": correct / max(tokens if task.kind == "lm" else count, 1)}
    if task.kind == "lm":
        out["perplexity"] = math.exp(min(loss, 50.0))
    return out
