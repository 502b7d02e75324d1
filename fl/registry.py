"""One registry pattern for every pluggable piece of fedprobe.

Datasets, models, attention kernels, optimizers, attacks and defenses are each a
:class:`Registry`. An entry is looked up by its registered name, by a dotted path
``"package.module:Attribute"`` (third-party plugins, nothing to edit in the core),
or by a name published under the registry's entry-point group (for example
``fedprobe.attacks``) by an installed distribution.

A dotted path names code to import and call, as Hydra's ``_target_`` does: run only configs
you trust. What it may resolve to is checked before anything is called: a subclass of the
registry's ``base`` (``Attack`` for attacks, ``Defense`` for defenses, ...), or, for registries
of factories (datasets, optimizers), a Python class or function. Modules, builtins and
anything from the standard library (``os:system``, ``subprocess:run``) are refused.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown or unloadable registry entry; the message says what is allowed."""


def _summary(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


class Registry(Generic[T]):
    """Name -> object table with dotted-path and entry-point fallbacks.

    >>> ATTACKS = Registry("attack", entry_point_group="fedprobe.attacks")
    >>> @ATTACKS.register("dlg")
    ... class DLG: ...
    >>> ATTACKS.get("dlg") is DLG
    True
    """

    def __init__(self, kind: str, entry_point_group: str | None = None, base: str = "") -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.base = base  # "module:Class" every dotted-path plugin must subclass (resolved lazily)
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as a decorator."""

        def add(o: T) -> T:
            if name in self._entries and self._entries[name] is not o:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = o
            return o

        return add(obj) if obj is not None else add

    def names(self) -> list[str]:
        return sorted(set(self._entries) | set(self._entry_points()))

    def items(self) -> Iterator[tuple[str, str]]:
        """(name, one-line summary) for every known entry, built-ins first."""
        for name in sorted(self._entries):
            yield name, _summary(self._entries[name])
        eps = self._entry_points()
        for name in sorted(set(eps) - set(self._entries)):
            ep = eps[name]
            dist = getattr(getattr(ep, "dist", None), "name", "") or "an installed package"
            try:  # a plugin's own docstring, as for built-ins; a broken plugin is listed, not fatal
                summary = _summary(ep.load())
            except Exception as exc:  # noqa: BLE001
                summary = f"cannot be imported: {type(exc).__name__}: {exc}".splitlines()[0]
            yield name, f"{summary} [plugin {ep.value} from {dist}]"

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except RegistryError:
            return False
        return True

    def get(self, name: str) -> T:
        """Resolve a registered name, a ``module:attr`` path or an entry point."""
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            return self._load_path(name)
        eps = self._entry_points()
        if name in eps:
            return eps[name].load()
        allowed = ", ".join(self.names()) or "(none registered)"
        raise RegistryError(
            f"unknown {self.kind} {name!r}; choose one of: {allowed}, "
            f"or give a plugin as 'package.module:Name'"
        )

    def create(self, name: str, /, **params: Any) -> Any:
        """Look up ``name`` and call it with ``params`` (classes and factories alike)."""
        factory = self.get(name)
        problem = check_param_types(factory, params)
        if problem:
            raise RegistryError(f"bad parameters for {self.kind} {name!r}: {problem}")
        try:
            return factory(**params)  # type: ignore[operator]
        except TypeError as exc:
            raise RegistryError(f"bad parameters for {self.kind} {name!r}: {exc}") from exc

    def _load_path(self, path: str) -> T:
        module_name, _, attr = path.partition(":")
        if _is_stdlib(module_name):
            raise RegistryError(f"{self.kind} plugin {path!r} names the standard library module {module_name!r}: "
                                f"refused (a plugin is a {self.kind} class or factory from your own package)")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise RegistryError(
                f"cannot import {self.kind} plugin module {module_name!r} ({exc}); "
                "check the dotted path and that the package is installed"
            ) from exc
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise RegistryError(f"{self.kind} plugin {path!r}: {module_name} has no attribute {attr!r}")
            obj = getattr(obj, part)
        self._check_plugin(path, obj)
        return obj

    def _check_plugin(self, path: str, obj: Any) -> None:
        """Refuse what is not a plugin of this kind (before it is ever called)."""
        where = f"{getattr(obj, '__module__', None) or ''}.{getattr(obj, '__qualname__', type(obj).__name__)}"
        if inspect.ismodule(obj) or inspect.isbuiltin(obj) or _is_stdlib(getattr(obj, "__module__", None) or ""):
            raise RegistryError(f"{self.kind} plugin {path!r} resolves to {where}, a module, builtin or standard-library "
                                f"object: refused (a plugin is a {self.kind} class or factory from your own package)")
        if self.base:
            mod, _, name = self.base.partition(":")
            base = getattr(importlib.import_module(mod), name)
            if not (inspect.isclass(obj) and issubclass(obj, base)):
                raise RegistryError(f"{self.kind} plugin {path!r} resolves to {where}, not a subclass of "
                                    f"{base.__module__}.{base.__qualname__}")
        elif not (inspect.isclass(obj) or inspect.isfunction(obj)):
            raise RegistryError(f"{self.kind} plugin {path!r} resolves to {where}: a {self.kind} plugin must be a "
                                "Python class or function")

    def _entry_points(self) -> dict[str, Any]:
        if not self.entry_point_group:
            return {}
        return {ep.name: ep for ep in entry_points(group=self.entry_point_group)}


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether a config value fits a constructor annotation: True, False, or None where the hint says too little
    to tell (Any, a class of the plugin's own, a callable)."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    if origin in (typing.Union, types.UnionType):
        verdicts = [_matches(value, h) for h in typing.get_args(hint)]
        return True if any(v is True for v in verdicts) else (None if any(v is None for v in verdicts) else False)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return None


def check_param_types(factory: Any, params: dict[str, Any]) -> str:
    """The first config parameter whose value does not fit the constructor's annotation ("" if none): a
    string for an int, NaN for a step count, and a non-finite number (``inf``, ``nan``, TOML's ``1e309``) for a
    ``float`` parameter whose default is finite (one whose default is ``inf`` takes ``inf``). Other ranges stay the
    plugin's own checks."""
    import math
    import typing

    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        hints = typing.get_type_hints(target)
        defaults = {k: p.default for k, p in inspect.signature(target).parameters.items()}
    except Exception:  # noqa: BLE001  (unresolvable annotations: leave it to the constructor)
        return ""
    for key, value in params.items():
        if key not in hints:
            continue
        fits = _matches(value, hints[key])
        if fits is False:
            shown = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
            return f"{key} = {value!r} does not fit its type ({shown})"
        default = defaults.get(key)
        if (fits and isinstance(value, float) and not math.isfinite(value)
                and not (isinstance(default, float) and not math.isfinite(default))):
            return f"{key} = {value!r} is not a finite number"
    return ""


def _is_stdlib(module_name: str) -> bool:
    top = module_name.split(".")[0]
    return top in sys.stdlib_module_names or top == "builtins"
