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
