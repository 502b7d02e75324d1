import pytest

from fl.registry import Registry, RegistryError


def test_register_get_create_and_names():
    reg: Registry = Registry("widget")

    @reg.register("a")
    class A:
        """An A widget."""

        def __init__(self, x: int = 1) -> None:
            self.x = x

    assert reg.get("a") is A
    assert reg.create("a", x=3).x == 3
    assert reg.names() == ["a"]
    assert list(reg.items()) == [("a", "An A widget.")]
    assert "a" in reg and "b" not in reg


def test_unknown_name_lists_choices():
    reg: Registry = Registry("widget")
    reg.register("alpha", object)
    with pytest.raises(RegistryError, match=r"unknown widget 'beta'; choose one of: alpha"):
        reg.get("beta")


def test_dotted_path_plugin_and_errors():
    reg: Registry = Registry("widget")
    assert reg.get("fl.registry:Registry") is Registry
    with pytest.raises(RegistryError, match="cannot import"):
        reg.get("no_such_pkg.mod:Thing")
    with pytest.raises(RegistryError, match="has no attribute"):
        reg.get("fl.registry:Nope")


def test_bad_parameters_are_registry_errors():
    reg: Registry = Registry("widget")
    reg.register("f", lambda x: x)
    with pytest.raises(RegistryError, match="bad parameters for widget 'f'"):
        reg.create("f", y=1)


def test_duplicate_registration_rejected():
    reg: Registry = Registry("widget")
    reg.register("a", int)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a", float)


@pytest.mark.parametrize("path", ["os:system", "subprocess:run", "builtins:eval", "shutil:rmtree", "os.path:join"])
def test_dotted_paths_into_the_standard_library_are_refused_before_any_call(path):
    reg: Registry = Registry("dataset")
    with pytest.raises(RegistryError, match="standard library"):
        reg.create(path, command="touch /tmp/fedprobe-should-not-exist")


def test_dotted_paths_must_resolve_to_the_registry_kind():
    from attacks.base import ATTACKS
    from fl.data import DATASETS

    with pytest.raises(RegistryError, match="not a subclass of attacks.base.Attack"):
        ATTACKS.get("fl.registry:Registry")
    with pytest.raises(RegistryError, match="module, builtin"):
        DATASETS.get("numpy:random")  # a module
    with pytest.raises(RegistryError, match="must be a Python class or function"):
        DATASETS.get("fl.registry:RegistryError.__doc__")
    assert ATTACKS.get("attacks.gradient_inversion:GradientInversion").__name__ == "GradientInversion"  # still loads


def test_a_config_naming_os_system_fails_in_preflight(tmp_path):
    from fl.config import ConfigError, config_from_dict
    from fl.plugins import preflight

    marker = tmp_path / "pwned"
    cfg = config_from_dict({"data": {"dataset": "os:system", "params": {"command": f"touch {marker}"}}})
    with pytest.raises(ConfigError, match="standard library"):
        preflight(cfg)
    assert not marker.exists()


class Listed:
    """A plugin found through an entry point."""


def test_list_shows_an_entry_point_plugins_docstring_and_origin_not_its_repr(monkeypatch):
    from importlib.metadata import EntryPoint

    reg: Registry = Registry("widget", entry_point_group="fedprobe.widgets")
    eps = {"ext": EntryPoint("ext", "tests.fl.test_registry:Listed", "fedprobe.widgets"),
           "broken": EntryPoint("broken", "no_such_module_xyz:Thing", "fedprobe.widgets")}
    monkeypatch.setattr(reg, "_entry_points", lambda: eps)
    items = dict(reg.items())
    assert items["ext"] == "A plugin found through an entry point. [plugin tests.fl.test_registry:Listed from an installed package]"
    assert items["broken"].startswith("cannot be imported: ModuleNotFoundError") and "EntryPoint(" not in items["broken"]


def test_create_refuses_values_that_do_not_fit_the_constructors_annotations():
    from typing import Literal

    reg: Registry = Registry("widget")

    @reg.register("w")
    class W:
        def __init__(self, steps: int = 1, lam: float = 0.0, mode: Literal["a", "b"] = "a", name: str = "",
                     cap: float | None = None, extra: object = None) -> None:
            self.steps = steps

    assert reg.create("w", steps=3, lam=1, mode="b", cap=2.5, extra=[1]).steps == 3  # an int is a float
    for bad, fragment in [({"steps": "x"}, "steps = 'x'"), ({"steps": float("nan")}, "steps = nan"),
                          ({"steps": True}, "steps = True"), ({"lam": "0.1"}, "lam = '0.1'"),
                          ({"mode": "c"}, "mode = 'c'"), ({"cap": "big"}, "cap = 'big'"), ({"name": 3}, "name = 3")]:
        with pytest.raises(RegistryError, match="bad parameters for widget 'w': " + fragment):
            reg.create("w", **bad)


def test_a_float_parameter_takes_a_non_finite_value_only_where_its_default_is_one():
    import math

    reg: Registry = Registry("widget")

    @reg.register("w")
    class W:
        def __init__(self, lam: float = 0.0, cap: float | None = None, ceiling: float = math.inf) -> None:
            self.lam, self.cap, self.ceiling = lam, cap, ceiling

    assert reg.create("w", ceiling=math.inf).ceiling == math.inf  # inf is its default: "no ceiling"
    assert reg.create("w", lam=1e300, cap=2.0).lam == 1e300
    for bad in [{"lam": math.inf}, {"lam": -math.inf}, {"lam": math.nan}, {"cap": math.inf}]:
        (key, value), = bad.items()
        with pytest.raises(RegistryError, match=f"{key} = {value!r} is not a finite number"):
            reg.create("w", **bad)
