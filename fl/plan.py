"""What a config will do, in words: ``fedprobe run --dry-run`` and ``fedprobe check`` print it."""

from __future__ import annotations

import inspect
from typing import Any

from fl.config import Config


def _with_defaults(registry: Any, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """A plugin's parameters as it will run: the config's values over the constructor's defaults."""
    try:
        obj = registry.get(name)
        sig = inspect.signature(obj.__init__ if isinstance(obj, type) else obj)
    except (TypeError, ValueError):
        return dict(params)
    defaults = {k: p.default for k, p in sig.parameters.items()
                if k != "self" and p.default is not inspect.Parameter.empty}
    return {**defaults, **params}


def _fmt(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items()) or "defaults"


def plan(cfg: Config, tracking_uri: str) -> list[str]:
    """One line per part of the run: clients and rounds, data, model, optimizer, attack, defenses, audit,
    where it is tracked and where Ray runs."""
    from attacks.base import ATTACKS
    from defenses.audit import AUDITS
    from defenses.base import DEFENSES

    fed, atk = cfg.federation, cfg.attack
    per_round = fed.clients_per_round or fed.num_clients
    local = f"{fed.local_steps} local steps" if fed.local_steps else f"{fed.local_epochs} local epoch(s)"
    lines = [
        f"federation: {fed.num_clients} clients, {per_round} per round, {fed.rounds} rounds, {local} at batch "
        f"{fed.batch_size}; a round needs {fed.min_replies} repl{'y' if fed.min_replies == 1 else 'ies'} within "
        f"{fed.round_timeout:g} s",
        f"data: {cfg.data.dataset} ({cfg.data.partition}{f', alpha {cfg.data.alpha:g}' if cfg.data.partition == 'dirichlet' else ''}), "
        f"test share {cfg.data.test_fraction:g}, seed {cfg.experiment.seed}",
        f"model: {cfg.model.label()}, attention {cfg.model.attention}, adapter {cfg.model.adapter}"
        + ("" if cfg.model.pretrained else ", random init")
        + (f", params {cfg.model.params}" if cfg.model.params else ""),
        f"optimizer: {cfg.optimizer.name} lr {cfg.optimizer.lr:g}"
        + (f" (base {cfg.optimizer.base})" if cfg.optimizer.name not in ("sgd", "adam", "adamw") else ""),
    ]
    if atk.name in ("", "none"):
        lines.append("attack: none")
    else:
        victims = atk.victims or list(range(fed.num_clients))
        rounds = atk.rounds or list(range(1, fed.rounds + 1))
        lines.append(f"attack: {atk.name} ({_fmt(_with_defaults(ATTACKS, atk.name, atk.params))}) on victims "
                     f"{victims} in rounds {rounds}"
                     + (f", at most {atk.max_victims_per_round} per round" if atk.max_victims_per_round else "")
                     + f"; an image counts as recovered at PSNR >= {atk.recovered_psnr:g} dB")
    for d in cfg.defenses:
        lines.append(f"defense: {d.name} ({_fmt(_with_defaults(DEFENSES, d.name, d.params))})")
    if not cfg.defenses:
        lines.append("defenses: none (no formal privacy guarantee: epsilon = inf)")
    if cfg.audit.name not in ("", "none"):
        lines.append(f"audit: {cfg.audit.name} ({_fmt(_with_defaults(AUDITS, cfg.audit.name, cfg.audit.params))}) "
                     f"on clients {cfg.audit.clients}, confidence {cfg.audit.confidence:g}")
    lines.append(f"tracking: {tracking_uri}, experiment {cfg.tracking.experiment!r}; files under "
                 f"{cfg.tracking.output_dir}/")
    lines.append(f"ray: {'cluster ' + fed.ray_address if fed.ray_address else 'a private local instance'}, "
                 f"{fed.client_cpus:g} CPU(s)" + (f" and {fed.client_gpus:g} GPU" if fed.client_gpus else "")
                 + " per client")
    return lines
