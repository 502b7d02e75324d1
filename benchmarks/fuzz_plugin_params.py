"""Every built-in attack and defense constructor parameter x 23 odd values, through ``fedprobe check`` (issue 16).

Counts how many values are accepted (exit 0), refused in one line (exit 2) or end in a traceback, and lists the
accepted values of each parameter, to be read for any that are out of range. ``fedprobe check`` does not build the
model, so the names an attack gives of model parameters (april, attention_inversion) or of a dataset
(imprint's calibration) are checked by ``fedprobe run`` (and ``--dry-run``) only. The hypothesis test in ``tests/fl/test_config_properties.py`` samples the same space; this
script walks all of it.

    python benchmarks/fuzz_plugin_params.py
"""

from __future__ import annotations

import collections
import contextlib
import io
import tempfile
from pathlib import Path


import importlib.util

from fl.cli import main

# the parameter table the hypothesis test samples, read from its file (Opacus installs a top-level package named
# ``benchmarks``, and the tests are no installed package either, so neither is imported by name)
_spec = importlib.util.spec_from_file_location(
    "_fedprobe_fuzz_table", Path(__file__).resolve().parents[1] / "tests" / "fl" / "test_config_properties.py")
_table = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(_table)  # type: ignore[union-attr]
PLUGIN_PARAMS = _table.PLUGIN_PARAMS

VALUES = ["1", "-1", "0", "0.5", "-0.5", '"x"', '""', "true", "false", "[1, 2]", "[]", "{}", "{a = 1}", "inf",
          "-inf", "nan", "1e309", "1e-400", "3", "100000000000", "[[1]]", '"sgd"', '"l2"']


def main_() -> None:
    d = Path(tempfile.mkdtemp())
    (d / "c.toml").write_text(f"[federation]\nnum_clients = 2\nrounds = 1\n[tracking]\noutput_dir = '{d}/out'\n")
    codes: collections.Counter = collections.Counter()
    bad = []
    accepted: dict[str, list[str]] = collections.defaultdict(list)
    for section, name, param in PLUGIN_PARAMS:
        for v in VALUES:
            sets = (["--set", f"attack.name='{name}'", "--set", f"attack.params.{param}={v}"] if section == "attack"
                    else ["--set", f"defenses=[{{name='{name}'}}]", "--set", f"defenses.0.params.{param}={v}"])
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    rc: object = main(["check", str(d / "c.toml"), "--tracking-uri", f"sqlite:///{d}/m.db", *sets])
            except BaseException as exc:  # noqa: BLE001  (a traceback is what this counts)
                rc = "traceback"
                bad.append(f"{name}.{param} = {v}: {type(exc).__name__}")
            if rc == 2 and len(err.getvalue().strip().splitlines()) != 1:
                rc = "multi-line"
                bad.append(f"{name}.{param} = {v}: more than one line")
            codes[rc] += 1
            if rc == 0:
                accepted[f"{name}.{param}"].append(v)
    print(f"{len(PLUGIN_PARAMS)} parameters x {len(VALUES)} values = {len(PLUGIN_PARAMS) * len(VALUES)} checks: "
          f"accepted {codes[0]}, refused in one line {codes[2]}, tracebacks {codes['traceback']}, "
          f"multi-line {codes['multi-line']}")
    for line in bad:
        print(" ", line)
    print("accepted:")
    for key, values in accepted.items():
        print(f"  {key}: {', '.join(values)}")


if __name__ == "__main__":
    main_()
