"""The one validated experiment schema.

A config is a TOML file with the sections below; every key has a default, so a file
only names what it changes. ``load_config(path, overrides)`` reads, applies
``--set dotted.key=value`` overrides and validates; any problem raises
:class:`ConfigError` with one line naming the key and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.config import ModelConfig  # the models library's own section (re-exported here)


class ConfigError(ValueError):
    """Invalid experiment configuration (one line, names the key)."""


class _Section(BaseModel):
    # allow_inf_nan=False: lr = 1e309 (inf in TOML), round_timeout = inf or nan fail here, before Ray starts
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ExperimentConfig(_Section):
    name: str = "fedprobe"
    seed: int = Field(0, ge=0, lt=2**32, description="global seed (numpy, torch, partitioning)")
    description: str = ""


class FederationConfig(_Section):
    num_clients: int = Field(10, ge=1, description="virtual clients (data partitions) in the simulation")
    supernodes: int = Field(0, ge=0, description="SuperNodes that simulate them; 0 means one per client; fewer: "
                            "each trains several partitions per message (fl.packing), for 1000s of clients")
    clients_per_round: int = Field(0, ge=0, description="clients sampled per round; 0 means all")
    rounds: int = Field(3, ge=1)
    local_epochs: int = Field(1, ge=1, description="local epochs when local_steps is 0")
    local_steps: int = Field(0, ge=0, description="local optimizer steps per round; 0 means use local_epochs")
    batch_size: int = Field(16, ge=1)
    client_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per simulated client")
    client_gpus: float = Field(0.0, ge=0, description="GPU share Ray reserves per simulated client")
    min_replies: int = Field(1, ge=1, description="rounds with fewer successful replies fail")
    failure_rate: float = Field(0.0, ge=0, lt=1, description="fraction of clients that crash each round (fault injection)")
    round_timeout: float = Field(3600.0, gt=0, description="seconds to wait for replies in one round")
    max_update_ratio: float = Field(1000.0, ge=0, description="reject a reply whose update norm exceeds this many times "
                                    "the median of the other clients' norms (0 = no check)")
    device: str = Field("auto", description="client torch device: auto, cpu or cuda")
    ray_address: str = Field("", description="existing Ray cluster to run clients on (e.g. 'auto' or 'ray://head:10001'); "
                                             "empty starts a local Ray instance")

    @model_validator(mode="after")
    def _check(self) -> "FederationConfig":
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({self.clients_per_round}) exceeds "
                f"federation.num_clients ({self.num_clients})"
            )
        if self.supernodes > self.num_clients:
            raise ValueError(f"federation.supernodes ({self.supernodes}) exceeds federation.num_clients "
                             f"({self.num_clients}); use at most one SuperNode per client, or 0")
        per_round = self.clients_per_round or self.num_clients
        if self.min_replies > per_round:
            raise ValueError(f"federation.min_replies ({self.min_replies}) exceeds the clients sampled per round "
                             f"({per_round}): every round would fail; lower min_replies")
        return self


# data.partition names: fedprobe's own (fl.data.partition) and Flower Datasets' (fl.data.flower_partition)
OWN_PARTITIONS = ("iid", "dirichlet")
FLOWER_PARTITIONS = {  # name -> flwr_datasets.partitioner class
    "flwr_iid": "IidPartitioner", "flwr_dirichlet": "DirichletPartitioner", "pathological": "PathologicalPartitioner",
    "shard": "ShardPartitioner", "linear": "LinearPartitioner", "square": "SquarePartitioner",
    "exponential": "ExponentialPartitioner", "inner_dirichlet": "InnerDirichletPartitioner",
    "size": "SizePartitioner",
}


class DataConfig(_Section):
    dataset: str = Field("digits", description="a registered dataset (fedprobe list)")
    partition: str = Field("iid", description="iid, dirichlet (fedprobe's), or a Flower Datasets partitioner: "
                                              "flwr_iid, flwr_dirichlet, pathological, shard, linear, square, "
                                              "exponential, inner_dirichlet, size, or 'package.module:Class'")
    partition_params: dict[str, Any] = Field(default_factory=dict, description="the Flower partitioner's arguments "
                                             "(num_partitions, partition_by and seed are filled in)")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (partition = dirichlet)")

    @model_validator(mode="after")
    def _check_partition(self) -> "DataConfig":
        if self.partition not in (*OWN_PARTITIONS, *FLOWER_PARTITIONS) and ":" not in self.partition:
            raise ValueError(f"data.partition {self.partition!r} unknown; choose one of "
                             f"{', '.join((*OWN_PARTITIONS, *FLOWER_PARTITIONS))}, or a flwr_datasets Partitioner "
                             "subclass as 'package.module:Class'")
        if self.partition_params and self.partition in OWN_PARTITIONS:
            raise ValueError(f"data.partition_params apply to Flower Datasets partitioners, not {self.partition!r} "
                             "(its one parameter is data.alpha)")
        return self
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of each client's data held out for validation")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of the dataset held out for central evaluation")
    params: dict[str, Any] = Field(default_factory=dict, description="dataset-specific options (path, ...)")


class OptimizerConfig(_Section):
    name: str = Field("sgd", description="optimizer (fedprobe list)")
    base: str = Field("adam", description="base optimizer for wrapping optimizers (rdbd, ra, rva, ...)")
    lr: float = Field(0.05, gt=0)
    params: dict[str, Any] = Field(default_factory=dict)


class AttackConfig(_Section):
    name: str = Field("none", description="attack (fedprobe list), or package.module:Class")
    params: dict[str, Any] = Field(default_factory=dict)
    rounds: list[int] = Field(default_factory=list, description="rounds to attack; empty means every round")
    victims: list[int] = Field(default_factory=list, description="client partition ids to attack; empty means all")
    max_victims_per_round: int = Field(0, ge=0, description="cap on attacked clients per round; 0 means no cap")
    labels_known: bool = Field(False, description="threat model grants the victims' labels to the attack")
    device: str = Field("cpu", description="device the server-side attack runs on")
    gpu_share: float = Field(0.0, ge=0, description="GPU share withheld from Ray's clients for the attack (the "
                                                    "ServerApp runs outside Ray, so Ray cannot reserve it itself)")
    recovered_psnr: float = Field(30.0, gt=0, le=1000, description="per-example PSNR (dB) at which an image counts "
                                                                   "as recovered (attack_recovered_fraction)")
    share_attention: bool = Field(False, description="victims share their batch's first-layer attention maps with "
                                                     "the server (split-learning-like mode; Observation.shared)")


class DefenseConfig(_Section):
    name: str = Field(..., description="defense (fedprobe list), or package.module:Class")
    params: dict[str, Any] = Field(default_factory=dict)


class AuditConfig(_Section):
    name: str = Field("none", description="privacy audit (fedprobe list): an epsilon lower bound beside the accountant's")
    params: dict[str, Any] = Field(default_factory=dict)
    clients: list[int] = Field(default_factory=lambda: [0], description="partitions that carry canaries")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence of the lower bound (Bonferroni over guess counts)")


class TrackingConfig(_Section):
    uri: str = Field("", description="MLflow tracking URI; empty means sqlite:///mlflow.db in the working directory")
    experiment: str = Field("fedprobe", description="MLflow experiment name")
    run_name: str = ""
    log_model: bool = True
    output_dir: str = Field("fedprobe-output", description="folder for summaries, checkpoints and local artifacts")


TOKENIZED_DATASETS = ("textgen", "textgen_lm", "text_csv", "text_jsonl")  # take data.params.tokenizer


class Config(_Section):
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    defenses: list[DefenseConfig] = Field(default_factory=list)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _tokenizer_matches_model(self) -> "Config":
        # a pretrained text model reads its own token ids: fedprobe's text datasets otherwise train a word-level
        # tokenizer whose ids mean nothing to it (no error would follow, only a model that cannot learn)
        if (self.model.pretrained and self.data.dataset in TOKENIZED_DATASETS
                and not self.data.params.get("tokenizer")):
            raise ValueError(f"model.pretrained = {self.model.pretrained!r} reads its own tokenizer's ids; set "
                             f"data.params.tokenizer = {self.model.pretrained!r} (data.dataset {self.data.dataset!r} "
                             "would train a word-level tokenizer)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def digest(self) -> str:
        """Stable hash of the resolved config (tracking section excluded)."""
        d = self.to_dict()
        d.pop("tracking", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    kind = e["type"]
    if kind == "extra_forbidden":
        parent = loc.rsplit(".", 1)[0] if "." in loc else ""
        allowed = _allowed_keys(parent)
        return f"unknown config key '{loc}'; allowed keys{' in [' + parent + ']' if parent else ''}: {', '.join(allowed)}"
    if kind == "literal_error":
        return f"bad value for '{loc}': {e['msg'].replace('Input should be', 'expected')} (got {e.get('input')!r})"
    if kind == "value_error":
        return f"bad config{' at ' + repr(loc) if loc else ''}: {e['msg'].removeprefix('Value error, ')}"
    return f"bad value for '{loc}': {e['msg']} (got {e.get('input')!r})"


def _allowed_keys(dotted_section: str) -> list[str]:
    model: Any = Config
    for part in [p for p in dotted_section.split(".") if p and not p.isdigit()]:
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = args[0] if args and isinstance(args[0], type) and issubclass(args[0], BaseModel) else ann
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return sorted(model.model_fields)


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as a TOML value, falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``dotted.key=value`` (value parsed as TOML) to a raw config dict in place."""
    if "\n" in assignment or "\r" in assignment:
        raise ConfigError(f"bad --set {assignment!r}: one assignment per --set (it holds a line break); "
                          "repeat --set for each key")
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad --set {assignment!r}: expected dotted.key=value, e.g. federation.rounds=5")
    set_dotted(data, key.strip(), parse_value(value))


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b]...[z] = value`` for ``key = "a.b...z"``; list entries by index (``defenses.0.name``)."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"bad key '{key}': '{'.'.join(parts[:i])}' is a list; use an index below {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if last:
            node[part] = value
            break
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"bad key '{key}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
        node = nxt


def config_from_dict(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (give the path to a .toml file, e.g. experiments/quickstart.toml)")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p} is not a UTF-8 text file") from None
    except RecursionError:
        raise ConfigError(f"{p} nests arrays or tables too deeply to be a config") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    for assignment in overrides:
        apply_override(data, assignment)
    return config_from_dict(data)
