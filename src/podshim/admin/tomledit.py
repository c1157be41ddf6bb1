"""The TOML podshim install writes: the ``imports`` line of containerd's main config
(format preserving, with ``tomlkit``: comments, order and layout of the file stay), the
drop-in and podshim's own config files."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from podshim.admin.errors import AdminError

#: the first line of every file podshim install writes (uninstall removes only those)
MARKER = "# written by podshim install"


def add_import(text: str, entry: str) -> str:
    """``text`` with ``entry`` appended to its top-level ``imports`` (made if absent,
    after the top-level keys); unchanged if it is there already."""
    import tomlkit
    from tomlkit.items import Array

    doc = tomlkit.parse(text)
    if "imports" not in doc:
        doc.add("imports", [entry])
        return tomlkit.dumps(doc)
    current = doc["imports"]
    if not isinstance(current, Array):
        raise AdminError(f"imports must be an array, not {current!r}")
    if entry not in [str(v) for v in current]:
        current.append(entry)
    return tomlkit.dumps(doc)


def remove_import(text: str, entry: str) -> str:
    """``text`` without ``entry`` in ``imports`` (the key goes when it was the last)."""
    import tomlkit
    from tomlkit.items import Array

    doc = tomlkit.parse(text)
    current = doc.get("imports")
    if not isinstance(current, Array):
        return text
    keep = [i for i, v in enumerate(current) if str(v) != entry]
    if len(keep) == len(current):
        return text
    if not keep:
        del doc["imports"]
    else:
        for i in reversed(range(len(current))):
            if i not in keep:
                del current[i]
    return tomlkit.dumps(doc)


def render(header: str, table: Mapping[str, Any]) -> str:
    """A TOML file: :data:`MARKER`, a comment, then ``table``."""
    import tomlkit

    doc = tomlkit.document()
    doc.add(tomlkit.comment(MARKER[2:]))
    for line in header.splitlines():
        doc.add(tomlkit.comment(line))
    for key, value in table.items():
        doc.add(key, value)
    return tomlkit.dumps(doc)


def nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for ``("a", "b")``."""
    out: Any = value
    for key in reversed(path):
        out = {key: out}
    assert isinstance(out, dict)
    return out


def merge(into: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A deep merge of plain tables (``extra`` wins), as a new dict."""
    out = dict(into)
    for key, value in extra.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, Mapping):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out
