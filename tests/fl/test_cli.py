import json
import subprocess
import sys

import pytest

from fl.cli import main


def _run(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "fl.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)


def test_help_explains_every_run_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--set", "--tracking-uri", "--summary-json", "--resume", "--no-progress", "--verbose"):
        assert option in out


def test_list_names_every_kind(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    kinds = {line.split()[0] for line in lines}
    assert {"dataset", "model", "attention", "optimizer", "attack", "defense"} <= kinds
    assert any(line.split()[:2] == ["dataset", "digits"] for line in lines)
    assert any(line.split()[:2] == ["attack", "update_norm"] for line in lines)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--set", "federation.roundz=2"], "unknown config key 'federation.roundz'"),
        (["--set", "attack.name=no_such_attack"], "attack.name: unknown attack 'no_such_attack'"),
        (["--set", "data.dataset=nope"], "data.dataset: unknown dataset 'nope'"),
        (["--set", "optimizer.lr=-1"], "'optimizer.lr'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, extra, fragment):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[federation]\nrounds = 1\n")
    proc = _run(["run", str(cfg), *extra], tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedprobe: error:") and fragment in err[0]
    assert "Traceback" not in proc.stderr


def test_missing_config_file(tmp_path):
    proc = _run(["run", "missing.toml"], tmp_path)
    assert proc.returncode == 2 and "config file not found" in proc.stderr


def test_unreachable_tracking_server_fails_before_the_run(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    proc = _run(["run", str(cfg), "--tracking-uri", "http://127.0.0.1:9"], tmp_path)
    assert proc.returncode == 2 and "unreachable" in proc.stderr
    assert json.dumps  # summary never written
    assert not (tmp_path / "mlflow.db").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("fedprobe ") and out.split()[1][0].isdigit()


def test_missing_config_answers_without_heavy_imports(tmp_path):
    """The config is read before torch, Flower or Ray are imported: a wrong path answers at once."""
    code = ("import sys; from fl.cli import main; rc = main(['run', 'missing.toml']); "
            "heavy = [m for m in ('torch', 'flwr', 'ray', 'mlflow', 'transformers') if m in sys.modules]; "
            "print(rc, heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
    assert "config file not found" in proc.stderr


CHECK_CASES = [
    ("attack.victims=[42]", "attack.victims [42] are not partitions"),
    ("attack.params.iterationz=3", "unexpected parameters ['iterationz']"),
    ("defenses.0.params.noise_multiplier=-1", "noise_multiplier must be a finite number >= 0"),
    ("tracking.output_dir='/proc/fedprobe-no'", "tracking.output_dir '/proc/fedprobe-no' is not writable"),
    ("model.params.hidden_size=30", "not a multiple of the 4 attention heads"),
    ("model.params.hidden_sise=64", "model.params.hidden_sise is not a ViTConfig field"),
    ("model.attention='nope'", "unknown attention kernel 'nope'"),
    ("tracking.uri='ftp://host/x'", "MLflow cannot track to 'ftp'"),
    ("federation.min_replies=11", "min_replies"),
]


@pytest.mark.parametrize("override, fragment", CHECK_CASES)
def test_check_refuses_with_one_line(override, fragment, tmp_path, repo_root):
    proc = _run(["check", str(repo_root / "experiments/quickstart.toml"), "--set", override], tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and fragment in err[0], proc.stderr
    assert proc.stdout == ""


def test_check_refuses_an_unknown_resume_id(tmp_path, repo_root):
    proc = _run(["check", str(repo_root / "experiments/quickstart.toml"), "--resume", "deadbeef"], tmp_path)
    assert proc.returncode == 2 and "--resume deadbeef: no checkpoint" in proc.stderr


def test_check_passes_and_prints_the_plan(tmp_path, repo_root):
    proc = _run(["check", str(repo_root / "experiments/quickstart.toml")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "OK" in out and "10 clients, 10 per round, 3 rounds" in out
    assert "attack: idlg" in out and "victims [0] in rounds [1]" in out
    assert "defense: dp_sgd" in out and "accountant='rdp'" in out  # the defaults it will run with
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started or created


def test_dry_run_builds_the_model_prints_the_resolved_config_and_starts_nothing(tmp_path, repo_root):
    import tomllib

    proc = _run(["run", str(repo_root / "experiments/quickstart.toml"), "--dry-run", "--set", "federation.rounds=2"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    config_part, plan_part = proc.stdout.split("# plan", 1)
    resolved = tomllib.loads(config_part)
    assert resolved["federation"]["rounds"] == 2 and resolved["federation"]["batch_size"] == 16  # a default, filled in
    assert "2 rounds" in plan_part and "nothing was started" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_run_prints_only_fedprobes_own_lines(tmp_path):
    """Quiet by default: no MLflow INFO lines, Ray or SQLAlchemy warnings, Flower actor lines (--verbose has them)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[federation]\nnum_clients = 2\nrounds = 1\nlocal_steps = 1\nbatch_size = 8\n"
                   "[attack]\nname = 'update_norm'\n")
    proc = subprocess.run([sys.executable, "-m", "fl.cli", "run", str(cfg), "--tracking-uri",
                           f"sqlite:///{tmp_path / 'm.db'}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    foreign = [line for line in lines if not line.startswith(("fedprobe:", "rounds:"))]
    assert foreign == [], proc.stderr
    assert "finished after 1 rounds" in proc.stdout


def test_check_of_a_built_in_model_imports_no_transformers(tmp_path, repo_root):
    code = ("import sys; from fl.cli import main; "
            f"rc = main(['check', {str(repo_root / 'experiments/quickstart.toml')!r}]); "
            "print(rc, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "0 False", proc.stdout + proc.stderr


def test_check_model_refuses_non_square_images_without_building_anything():
    from fl.config import ModelConfig
    from models import ModelError, check_model
    from models.tasks import TaskSpec

    with pytest.raises(ModelError, match="vit needs square images, got 8x6"):
        check_model(ModelConfig(family="vit", size="tiny"), TaskSpec(kind="image", num_classes=10,
                                                                   image_shape=(1, 8, 6)))


MODEL_CASES = [  # what only the built model can tell: found by `fedprobe run` before Ray starts
    (["attack.name='april'", "attack.params.position_embeddings='vit.no_such'"],
     "april: ['vit.no_such'] not among the model's trainable parameters"),
    (["attack.name='attention_inversion'", "attack.params.num_heads=5"], "not divisible by num_heads=5"),
    (["attack.name='imprint'", "model.params.num_hidden_layers=1"], "imprint needs a ViT with at least 2 layers"),
    (["attack.name='imprint'", "attack.params.const=0"], "imprint sharpness, const, tol and readout must be finite"),
    (["attack.name='best_of'", "attack.params.members=[]"], "best_of members is empty"),
    (["attack.name='imprint'", "attack.params.calibration='textgen'"], "'textgen' has no 1-channel images"),
    (["attack.name='imprint'", "attack.params.calibration='nope'"], "unknown dataset 'nope'"),
    (['defenses=[{name="dp_sgd", params={noise_multiplier=1.0}}]', "model.params.hidden_dropout_prob=0.1"],
     "dropout p=0.1 on the ViT embeddings"),  # a defense's check_model: Opacus failed inside backward
]


@pytest.mark.parametrize("sets, fragment", MODEL_CASES)
def test_a_dry_run_checks_the_attack_against_the_built_model(sets, fragment, tmp_path, capsys):
    from fl.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[federation]\nnum_clients = 2\nrounds = 1\n[tracking]\noutput_dir = '{tmp_path / 'out'}'\n")
    args = [a for s in sets for a in ("--set", s)]
    code = main(["run", str(cfg), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    plain = main(["run", str(cfg), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                  "--set", sets[0]])  # the same attack with its defaults fits the model
    assert plain == 0, capsys.readouterr().err
