"""The registry of pod host kinds: the one list that config validation, the Pod and the
``delete`` action's crash cleanup all use.

Built-in kinds are named here by module (imported only when used: ``delete`` runs on
every task removal). Others plug in without editing podshim: call :func:`register`
(tests do), or publish a :class:`~podshim.host.contract.HostKind` object under the entry
point group ``podshim.hosts`` in a distribution of your own (looked up only for a name
that is not built in).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from podshim.host.contract import HostKind

#: name -> module whose ``KIND`` is the host kind
BUILTIN = {
    "none": "podshim.host.none",
    "namespaces": "podshim.host.namespaces",
    "uvm": "podshim.host.uvm",
}
ENTRY_POINT_GROUP = "podshim.hosts"

_registered: dict[str, HostKind] = {}


def register(kind: HostKind) -> None:
    """Add a host kind (a built-in name cannot be taken; re-registering replaces)."""
    if kind.name in BUILTIN:
        raise ValueError(f"host kind {kind.name!r} is built in")
    _registered[kind.name] = kind


def unregister(name: str) -> None:
    _registered.pop(name, None)


def _entry_point(name: str) -> HostKind | None:
    from importlib.metadata import entry_points  # only for names nobody registered

    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        kind: HostKind = ep.load()
        return kind
    return None


def _find(name: str) -> HostKind | None:
    found = _registered.get(name)
    if found is not None:
        return found
    module = BUILTIN.get(name)
    if module is not None:
        kind: HostKind = importlib.import_module(module).KIND
        return kind
    return _entry_point(name)


def get(name: str) -> HostKind:
    """The host kind called ``name``. InvalidArgument naming the known kinds if none."""
    found = _find(name)
    if found is None:
        # imported only here: the `delete` action looks kinds up and must start fast
        from podshim import errors as errdefs

        raise errdefs.InvalidArgument(
            f"unknown pod host kind {name!r} (known: {', '.join(names())})"
        )
    return found


def names() -> list[str]:
    """Every kind known without importing plug-ins: built in and registered."""
    return sorted({*BUILTIN, *_registered})


def known(name: str) -> bool:
    return _find(name) is not None
