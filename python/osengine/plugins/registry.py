"""The plugin registry: finds strategy and architecture plugins through entry-point groups, lazily, on first use.

    osengine.strategies     -> a Strategy subclass
    osengine.architectures  -> an Architecture subclass
Duplicate names are rejected (built-in plugins first, so a third-party one cannot take a built-in name); a plugin
that fails to import is reported with its traceback and skipped, never fatal to the host.
"""
from __future__ import annotations

import inspect
import sys
import traceback
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch.nn as nn

from .api import Architecture, PluginError, Strategy

STRATEGY_GROUP = "osengine.strategies"
ARCHITECTURE_GROUP = "osengine.architectures"
PLUGIN_GUIDE = "docs/plugins.md"


def _read_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.9 / 3.10: the same parser, as the tomli package
        import tomli as tomllib
    return tomllib.loads(path.read_text())


@dataclass
class PluginInfo:
    kind: str
    name: str
    obj: type
    source: str


class Registry:
    def __init__(self, kind: str, group: str, base: type):
        self.kind, self.group, self.base = kind, group, base
        self._plugins: dict = {}
        self.errors: list = []           # (name, source, traceback text)
        self._discovered = False

    def register(self, obj: type, name: Optional[str] = None, source: str = "registered at run time") -> type:
        """Register a plugin class directly (what an entry point does, without installing a package)."""
        name = name or getattr(obj, "name", "")
        if not isinstance(obj, type) or not issubclass(obj, self.base):
            raise PluginError(f"{self.kind} plugin {name!r} ({source}) is not a subclass of "
                              f"osengine.plugin_api.{self.base.__name__}")
        if not name:
            raise PluginError(f"{self.kind} plugin {obj.__qualname__} ({source}) has no name")
        if name in self._plugins:
            raise PluginError(f"duplicate {self.kind} plugin name {name!r}: {source} clashes with "
                              f"{self._plugins[name].source}")
        obj.name = name
        self._plugins[name] = PluginInfo(self.kind, name, obj, source)
        return obj

    def _entry_points(self) -> list:
        eps = [(ep, f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution")
               for ep in metadata.entry_points(group=self.group)]
        if not any(ep.dist is not None and ep.dist.name == "osengine" for ep, _ in eps):
            eps += _source_checkout_entry_points(self.group)
        # built-in plugins first, so that a third-party plugin cannot take a built-in name
        def builtin(item):
            return item[1].startswith("osengine ") or item[1].startswith("osengine source")
        return sorted(eps, key=lambda item: not builtin(item))

    def discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for ep, dist in self._entry_points():
            source = f"{dist} (entry point {ep.value})"
            try:
                self.register(ep.load(), name=ep.name, source=source)
            except Exception:  # a broken plugin must never take the host down: report and skip it
                tb = traceback.format_exc()
                self.errors.append((ep.name, source, tb))
                warnings.warn(f"osengine: skipping broken {self.kind} plugin {ep.name!r} from {source}:\n{tb}",
                              RuntimeWarning, stacklevel=2)

    def refresh(self) -> None:
        """Forget what was discovered (plugins registered at run time included) and look again, e.g. after
        `pip install` of a plugin package in a running session."""
        self._plugins.clear()
        self.errors.clear()
        self._discovered = False

    def infos(self) -> list:
        self.discover()
        return list(self._plugins.values())

    def names(self) -> list:
        return sorted(i.name for i in self.infos())

    def get(self, name: str) -> type:
        self.discover()
        if name not in self._plugins:
            broken = [n for n, _, _ in self.errors if n == name]
            hint = " (it is installed but failed to load; see `osengine plugins`)" if broken else ""
            raise PluginError(f"unknown {self.kind} {name!r}{hint}; available: {', '.join(self.names()) or 'none'}. "
                              f"Writing your own: {PLUGIN_GUIDE}")
        return self._plugins[name].obj


def _source_checkout_entry_points(group: str) -> list:
    """Running from a source checkout (osengine not installed): read the built-in plugins' entry points from the
    checkout's pyproject.toml, so the same declarations serve both cases."""
    pyproject = Path(__file__).resolve().parents[3] / "pyproject.toml"
    if not pyproject.is_file():
        return []
    table = _read_toml(pyproject).get("project", {}).get("entry-points", {}).get(group, {})
    plugins_dir = str(pyproject.parent / "plugins")
    if table and plugins_dir not in sys.path:
        sys.path.append(plugins_dir)
    return [(metadata.EntryPoint(name=n, value=v, group=group), "osengine source checkout (pyproject.toml)")
            for n, v in table.items()]

strategies = Registry("strategy", STRATEGY_GROUP, Strategy)

architectures = Registry("architecture", ARCHITECTURE_GROUP, Architecture)


def register_strategy(cls: type) -> type:
    """Class decorator: register a strategy without an entry point (scripts, notebooks, tests)."""
    return strategies.register(cls)


def register_architecture(cls: type) -> type:
    """Class decorator: register an architecture without an entry point."""
    return architectures.register(cls)


def make_strategy(name: str, options: Optional[dict] = None) -> Strategy:
    """The strategy `name` with its options; "a+b" composes strategies in order (ComposedStrategy): an option
    "a.key" goes to part a, an unprefixed one to the single part whose constructor takes it."""
    if "+" in name:
        return _composed_strategy(name, options or {})
    cls = strategies.get(name)
    try:
        return cls(**(options or {}))
    except TypeError as e:
        raise PluginError(f"strategy {name!r} rejected its options {options or {}}: {e}") from None


def _accepts(cls: type, key: str) -> bool:
    parameters = inspect.signature(cls.__init__).parameters
    return key in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _composed_strategy(name: str, options: dict) -> "ComposedStrategy":
    names = [n.strip() for n in name.split("+")]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise PluginError(f"strategy {name!r}: a composition names distinct strategies joined by '+', e.g. "
                          "rotate+osplus")
    classes = [strategies.get(n) for n in names]
    per_part = {n: {} for n in names}
    for key, value in options.items():
        part, dot, option = key.partition(".")
        if dot and part in per_part:
            per_part[part][option] = value
            continue
        takers = [n for n, cls in zip(names, classes) if _accepts(cls, key)]
        if len(takers) != 1:
            which = "none of" if not takers else "several of"
            raise PluginError(f"strategy {name!r}: option {key!r} is taken by {which} {names}; prefix it with the "
                              f"strategy it is for, e.g. {names[-1]}.{key}")
        per_part[takers[0]][key] = value
    return ComposedStrategy([make_strategy(n, per_part[n]) for n in names])


class ComposedStrategy(Strategy):
    """Strategies applied in order: each one's whole-model transformation (prepare), then the site migrations of
    the one part that migrates (the others, e.g. rotate, only prepare)."""

    def __init__(self, parts: list):
        migrating = [p for p in parts if p.migrates]
        if len(migrating) > 1:
            raise PluginError(f"strategy {'+'.join(p.name for p in parts)}: at most one of the composed strategies "
                              f"may migrate sites ({', '.join(p.name for p in migrating)} all do)")
        self.parts = list(parts)
        self.name = "+".join(p.name for p in parts)
        self.description = " then ".join(p.name for p in parts)
        self.distributed = all(p.distributed for p in parts)
        self.migrates = bool(migrating)
        self._migrating = migrating[0] if migrating else None

    def adapt_recipe(self, recipe, model, arch):
        for part in self.parts:
            recipe = part.adapt_recipe(recipe, model, arch)
        return recipe

    def prepare(self, model, arch):
        records = {}
        for part in self.parts:
            records.update(part.prepare(model, arch) or {})
        return records or None

    def migrate(self, data):
        return None if self._migrating is None else self._migrating.migrate(data)


def resolve_architecture(model: nn.Module) -> Architecture:
    for info in architectures.infos():
        arch = info.obj()
        if arch.matches(model):
            return arch
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    supported = sorted({t for i in architectures.infos() for t in i.obj.model_types})
    raise PluginError(f"unsupported model type {model_type!r}; supported: {', '.join(supported) or 'none'}. "
                      f"Add an architecture plugin: see {PLUGIN_GUIDE}")
