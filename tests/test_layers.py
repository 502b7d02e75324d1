"""The import rules of the design card, read from the source with ``ast`` (no module is imported).

1. ``attacks``, ``defenses``, ``models``, ``optimizers`` are libraries: from another library they import only its
   contracts (``CONTRACTS``), and from ``fl`` only the stdlib-only registry ``fl.registry``.
2. ``fl.registry`` imports the standard library only, and ``fl/__init__.py`` imports nothing, so importing the
   registry never pulls the application in.
3. ``fl`` is the application, in floors (``FL_FLOORS``): a module imports its own floor or lower ones only.
4. ``experiments`` and ``benchmarks`` are imported by nobody but tests (and themselves), and are not installed.

``test_the_rules_catch_a_violation`` breaks each rule on purpose in a copy of the tree, so a rule that silently
stopped matching anything would fail too.
"""

from __future__ import annotations

import ast
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("attacks", "defenses", "models", "optimizers")
CONTRACTS = {  # what one library may import from another
    "models": {"models.tasks", "models.config", "models.family"},
    "attacks": {"attacks.base"},
    "defenses": {"defenses.base"},
    "optimizers": {"optimizers.registry"},
}
FL_FLOORS = [  # bottom to top
    {"registry", "config", "protocol", "arrays", "paths", "quiet", "ground_truth", "faults", "tracking", "stopping",
     "replies", "model_pool", "ray_probe", "watchdog", "packing"},
    {"data"},
    {"training", "plugins", "plan"},
    {"strategy", "server_hook", "audit", "recorder"},
    {"client_app", "server_app"},
    {"simulation", "sweep", "report", "cli"},
]
SCRIPTS = ("experiments", "benchmarks")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; ``from fl import x`` counts as ``fl.x``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in ("fl", *LIBRARIES):  # from fl import ground_truth
                out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "fl" or len(parts) < 2:
        return None
    return next((i for i, floor in enumerate(FL_FLOORS) if parts[1] in floor), None)


def violations(root: Path) -> list[str]:
    found: list[str] = []
    for lib in LIBRARIES:
        for path in sorted((root / lib).rglob("*.py")):
            for line, mod in imports(path):
                top = mod.split(".")[0]
                where = f"{path.relative_to(root)}:{line}"
                if top == "fl" and mod != "fl.registry":
                    found.append(f"{where}: library imports the application module {mod}")
                elif top in LIBRARIES and top != lib and not any(mod == c or mod.startswith(c + ".")
                                                               for c in CONTRACTS[top]):
                    found.append(f"{where}: {lib} imports {mod}, not one of {top}'s contracts {sorted(CONTRACTS[top])}")
                elif top in SCRIPTS:
                    found.append(f"{where}: library imports the script package {mod}")
    for line, mod in imports(root / "fl" / "registry.py"):
        if mod.split(".")[0] not in sys.stdlib_module_names and mod != "__future__":
            found.append(f"fl/registry.py:{line}: the registry imports {mod}, not the standard library")
    if imports(root / "fl" / "__init__.py"):
        found.append("fl/__init__.py imports something: importing fl.registry would pull it in")
    for path in sorted((root / "fl").rglob("*.py")):
        rel = path.relative_to(root / "fl")
        name = rel.parts[0].removesuffix(".py")
        if name == "__init__":
            continue
        own = _floor(f"fl.{name}")
        if own is None:
            found.append(f"fl/{rel}: module {name!r} is on no floor of FL_FLOORS (add it where it belongs)")
            continue
        for line, mod in imports(path):
            other = _floor(mod)
            if other is not None and other > own:
                found.append(f"fl/{rel}:{line}: floor {own} ({name}) imports {mod} from floor {other} above it")
            if mod.split(".")[0] in SCRIPTS:
                found.append(f"fl/{rel}:{line}: the application imports the script package {mod}")
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in SCRIPTS:
        if any(pkg.startswith(pattern.rstrip("*")) for pattern in include):
            found.append(f"pyproject.toml installs {pkg}/ (packages.find include {include})")
    return found


def test_the_layers_hold():
    assert violations(ROOT) == []


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "tree"
    for part in ("fl", *LIBRARIES):
        shutil.copytree(ROOT / part, dst / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


@pytest.mark.parametrize("where, line, expected", [
    ("attacks/base.py", "from fl.data.federated import load_dataset", "library imports the application"),
    ("defenses/base.py", "from attacks.gradients import simulate", "not one of attacks's contracts"),
    ("models/tasks.py", "import experiments.ricl", "library imports the script package"),
    ("fl/registry.py", "import torch", "not the standard library"),
    ("fl/__init__.py", "import fl.config", "fl/__init__.py imports something"),
    ("fl/config.py", "from fl.server_app import RunOptions", "floor 0 (config) imports fl.server_app"),
    ("fl/training.py", "from fl import cli", "imports fl.cli from floor 5"),
    ("fl/newmodule.py", "import json", "on no floor"),
    ("fl/sweep.py", "from benchmarks import bench_scale", "the application imports the script package"),
])
def test_the_rules_catch_a_violation(tmp_path, where, line, expected):
    tree = _copy(tmp_path)
    target = tree / where
    target.write_text((target.read_text() if target.exists() else "") + f"\n{line}\n")
    found = violations(tree)
    assert any(expected in v for v in found), found


def test_installing_the_scripts_is_caught(tmp_path):
    tree = _copy(tmp_path)
    p = tree / "pyproject.toml"
    p.write_text(p.read_text().replace('include = ["fl*",', 'include = ["experiments*", "fl*",'))
    assert any("installs experiments/" in v for v in violations(tree))
