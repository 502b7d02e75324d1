"""Every registry in one place, with built-ins imported, and early config checks."""

from __future__ import annotations

import importlib
from typing import Any

from fl.config import Config, ConfigError
from fl.registry import Registry, RegistryError


def registries() -> dict[str, Registry[Any]]:
    """kind -> registry, after importing the packages that register built-ins."""
    from attacks.base import ATTACKS
    from defenses.audit import AUDITS
    from defenses.base import DEFENSES
    from fl.data import DATASETS
    from models import MODELS
    from models.attention import ATTENTION
    from models.pretrained import PRETRAINED
    from optimizers import OPTIMIZERS

    for pkg in ("attacks", "defenses", "fl.faults", "optimizers", "models", "models.attention", "fl.data"):
        importlib.import_module(pkg)
    return {"dataset": DATASETS, "model": MODELS, "attention": ATTENTION, "optimizer": OPTIMIZERS,
            "attack": ATTACKS, "defense": DEFENSES, "audit": AUDITS, "pretrained": PRETRAINED}


def check_names(cfg: Config) -> None:
    """Resolve every plugin name in the config now, so a typo fails before Ray starts."""
    regs = registries()
    checks = [("data.dataset", "dataset", cfg.data.dataset), ("model.family", "model", cfg.model.family),
              ("model.attention", "attention", cfg.model.attention), ("optimizer.name", "optimizer", cfg.optimizer.name)]
    if cfg.attack.name not in ("", "none"):
        checks.append(("attack.name", "attack", cfg.attack.name))
    checks += [(f"defenses.{i}.name", "defense", d.name) for i, d in enumerate(cfg.defenses)]
    if cfg.audit.name not in ("", "none"):
        checks.append(("audit.name", "audit", cfg.audit.name))
    from models.build import ModelError, plain_factory

    try:
        if plain_factory(cfg.model) is not None:  # a plain nn.Module factory: resolved, not a ModelFamily
            checks = [c for c in checks if c[0] != "model.family"]
    except ModelError as exc:
        raise ConfigError(f"model.family: {exc}") from None
    for key, kind, name in checks:
        try:
            regs[kind].get(name)
        except RegistryError as exc:
            raise ConfigError(f"{key}: {exc}") from None


def _public_dataset(name: str) -> Any:
    from fl.data.federated import load_dataset

    return load_dataset(name).data


def build_attack(cfg: Config) -> Any:
    """The configured attack (None for none), bound to what fedprobe's server holds: its public datasets, by name."""
    from attacks.base import ATTACKS, ServerContext

    if cfg.attack.name in ("", "none"):
        return None
    return ATTACKS.create(cfg.attack.name, **cfg.attack.params).bind(ServerContext(public_dataset=_public_dataset))


def preflight(cfg: Config, build: bool = True) -> None:
    """Load the data and build the model once, so a bad path or model option fails before Ray starts.

    ``build = False`` (``fedprobe check``) checks the model from its config alone (``models.check_model``):
    the same refusals but for what only building the weights finds, in a few seconds instead of ten."""
    from fl.arrays import trainable_state
    from fl.data import load_federated
    from models import build_model, check_model, task_for

    check_names(cfg)
    import os

    cpus = os.cpu_count() or 1
    if not cfg.federation.ray_address and cfg.federation.client_cpus > cpus:
        raise ConfigError(f"federation.client_cpus = {cfg.federation.client_cpus:g} exceeds this machine's {cpus} CPUs: "
                          "Ray could never place a client and the run would hang; lower it (e.g. 1)")
    if cfg.federation.ray_address:  # a cluster that does not answer is found now, in seconds, not by Ray in minutes
        from fl.ray_probe import check_cluster

        check_cluster(cfg.federation.ray_address, cfg.federation.client_cpus, cfg.federation.client_gpus)
    attack_obj = None
    if cfg.attack.name not in ("", "none"):
        try:  # attack constructors only validate their parameters (no side effects)
            attack_obj = build_attack(cfg)
        except (TypeError, ValueError, ArithmeticError, RegistryError) as exc:
            raise ConfigError(f"attack.params for {cfg.attack.name!r}: {exc}".replace("\n", " ")) from None
    from defenses.base import DEFENSES

    try:  # defense constructors only validate their parameters (no side effects); registries() imported them
        defense_objs = [DEFENSES.create(d.name, **d.params) for d in cfg.defenses]
    except (TypeError, ValueError, ArithmeticError, RegistryError) as exc:
        raise ConfigError(f"defenses: {exc}".replace("\n", " ")) from None
    if cfg.audit.name not in ("", "none"):
        from fl.training import build_audit

        bad = [c for c in cfg.audit.clients if not 0 <= c < cfg.federation.num_clients]
        if bad or not cfg.audit.clients:
            raise ConfigError(f"audit.clients must name partitions 0..{cfg.federation.num_clients - 1}, got "
                              f"{cfg.audit.clients}")
        try:
            build_audit(cfg)
        except (TypeError, ValueError, ArithmeticError, RegistryError) as exc:
            raise ConfigError(f"audit ({cfg.audit.name!r}): {exc}".replace("\n", " ")) from None
    fed, attack = cfg.federation, cfg.attack
    if attack.name not in ("", "none"):
        bad = [v for v in attack.victims if not 0 <= v < fed.num_clients]
        if bad:
            raise ConfigError(f"attack.victims {bad} are not partitions of this federation (0..{fed.num_clients - 1}); "
                              "the attack would never run")
        late = [r for r in attack.rounds if not 1 <= r <= fed.rounds]
        if late:
            raise ConfigError(f"attack.rounds {late} are outside 1..{fed.rounds} (federation.rounds)")
    _check_writable(cfg.tracking.output_dir)
    try:
        data = load_federated(cfg.data, cfg.federation.num_clients, cfg.experiment.seed)
    except (ValueError, TypeError, FileNotFoundError, OSError) as exc:
        raise ConfigError(f"{type(exc).__name__}: {exc}".replace("\n", " ")) from None
    try:
        if build:
            model = build_model(cfg.model, task_for(cfg.model, data.task), seed=cfg.experiment.seed)
        else:
            check_model(cfg.model, data.task)  # a plain factory: its signature only
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise ConfigError(f"{type(exc).__name__}: {exc}".replace("\n", " ")) from None
    except Exception as exc:  # transformers' config validation raises its own error types (not ValueError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model ({cfg.model.family}, params {cfg.model.params}): {type(exc).__name__}: {first}") \
            from None
    if build:  # what a defense cannot do on this model (dp_sgd: dropout on ViT embeddings)
        for spec, defense in zip(cfg.defenses, defense_objs):
            try:
                defense.check_model(model)
            except ValueError as exc:
                raise ConfigError(f"defenses ({spec.name!r}): {exc}".replace("\n", " ")) from None
    if build and attack_obj is not None:  # names and sizes the attack needs from this model
        try:
            attack_obj.check_model(trainable_state(model))
        except ValueError as exc:
            raise ConfigError(f"attack.params for {cfg.attack.name!r}: {exc}".replace("\n", " ")) from None


def _check_writable(folder: str) -> None:
    """tracking.output_dir must take checkpoints and artifacts: found now, not after round 1."""
    import tempfile
    from pathlib import Path

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"tracking.output_dir {folder!r} is not writable ({exc.strerror or exc}); "
                          "point it at a folder you can write, e.g. --set tracking.output_dir='/tmp/fedprobe-output'") \
            from None
