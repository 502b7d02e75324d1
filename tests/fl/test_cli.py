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
