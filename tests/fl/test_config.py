import pytest

from fl.config import Config, ConfigError, apply_override, load_config, parse_value


def test_defaults_validate():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.federation.rounds >= 1 and cfg.attack.name == "none"


def test_quickstart_config_is_valid():
    cfg = load_config("experiments/quickstart.toml")
    assert cfg.federation.num_clients >= 10 and cfg.federation.rounds >= 3
    text = load_config("experiments/quickstart_text.toml")
    assert text.model.pretrained == text.data.params["tokenizer"] == "minilm" and text.federation.local_steps == 1


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("federation.roundz=3", "unknown config key 'federation.roundz'; allowed keys in [federation]"),
        ("federation.rounds=0", "'federation.rounds'"),
        ("federation.rounds='many'", "'federation.rounds'"),
        ("data.partition='zipf'", "data.partition 'zipf' unknown; choose one of iid, dirichlet, flwr_iid"),
        ("federation.clients_per_round=99", "exceeds federation.num_clients"),
        ("nosection.key=1", "unknown config key 'nosection'"),
        ("model.pretrained='minilm'", "set data.params.tokenizer = 'minilm'"),  # on textgen (set below)
    ],
)
def test_bad_values_name_the_key(override, fragment):
    extra = ["data.dataset='textgen'", "model.family='bert'"] if "pretrained" in override else []
    with pytest.raises(ConfigError) as info:
        load_config(None, extra + [override])
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg


def test_overrides_parse_toml_values():
    cfg = load_config(None, ["federation.rounds=7", "optimizer.lr=1e-3", "attack.victims=[1, 2]",
                             "model.family=bert", "data.params.image_size=16"])
    assert cfg.federation.rounds == 7 and cfg.optimizer.lr == 1e-3
    assert cfg.attack.victims == [1, 2] and cfg.model.family == "bert"
    assert cfg.data.params == {"image_size": 16}
    assert parse_value("true") is True and parse_value("hello") == "hello"


def test_override_into_defense_list():
    data = {"defenses": [{"name": "clip", "params": {"max_norm": 1.0}}]}
    apply_override(data, "defenses.0.params.max_norm=2.5")
    assert data["defenses"][0]["params"]["max_norm"] == 2.5
    with pytest.raises(ConfigError, match="use an index below 1"):
        apply_override(data, "defenses.3.name=x")


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 2")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_digest_ignores_tracking_and_tracks_content():
    a = load_config(None)
    b = load_config(None, ["tracking.experiment='other'"])
    c = load_config(None, ["federation.rounds=9"])
    assert a.digest() == b.digest() != c.digest()
