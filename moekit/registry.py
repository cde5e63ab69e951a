"""Name -> class maps for routers and experts.

A new router is one class plus one ``@register_router("name")`` line; the config validates
names against these maps and asks the class for its own rules (``check_config``) and
parameter count (``num_params``), so a registered router is usable from a config, the CLI
and ``moekit params`` at once. The built-in classes register when ``moekit`` is imported
(``moekit/__init__.py`` imports ``moekit.layers``); this module imports nothing of moekit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

ROUTERS: dict[str, type] = {}
EXPERTS: dict[str, type] = {}

C = TypeVar("C", bound=type)


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[C], C]:
    def deco(cls: C) -> C:
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} name {name!r} is already registered to {table[name].__name__}")
        table[name] = cls
        cls.registry_name = name
        return cls

    return deco


def register_router(name: str) -> Callable[[C], C]:
    """Class decorator: make a router available as ``MoEConfig(router=name)``."""
    return _register(ROUTERS, "router", name)


def register_expert(name: str) -> Callable[[C], C]:
    """Class decorator: make an expert kind available as ``MoEConfig(expert=name)``."""
    return _register(EXPERTS, "expert", name)


def router_names() -> list[str]:
    """The registered routers (the built-in ones register when ``moekit`` is imported)."""
    return sorted(ROUTERS)


def expert_names() -> list[str]:
    """The registered expert kinds."""
    return sorted(EXPERTS)
