"""The record of what ``podshim install`` changed, so ``uninstall`` undoes exactly that.

One JSON file (``<state dir>/install-manifest.json``). Each entry is one change:

* ``dir``: a directory install created (uninstall removes it only when empty);
* ``file``: a file install wrote, with the SHA-256 of its bytes (every such file starts
  with :data:`podshim.admin.tomledit.MARKER`);
* ``unit``: a systemd unit install wrote (the daemon's, containerd 2.x), as ``file``;
  uninstall disables it (where systemd runs) before it removes it;
* ``symlink``: the shim binary's link, with its target;
* ``edit``: containerd's main config, where install added one ``imports`` entry: the
  SHA-256 before and after, the backup of the file as it was.

Uninstall checks each entry against the machine before it acts (:func:`verify`): a file
whose bytes are not the ones install wrote, a link that does not point at podshim's
shim, a file without the marker is left alone and reported, so a manifest edited by hand
cannot make uninstall remove what install did not add.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

from podshim.admin.ctdconfig import SHIM_BINARY
from podshim.admin.errors import AdminError
from podshim.admin.tomledit import MARKER

NAME = "install-manifest.json"
FORMAT = 1
KINDS = ("dir", "file", "unit", "symlink", "edit")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str) -> str | None:
    """The SHA-256 of a regular file's bytes (not following a link), or ``None``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        return sha256(f.read())


@dataclass
class Entry:
    kind: str
    path: str
    sha256: str = ""  # file, unit: its bytes; edit: the main config after the edit
    target: str = ""  # symlink
    backup: str = ""  # edit: the copy of the main config before
    before_sha256: str = ""  # edit
    entry: str = ""  # edit: the imports entry added


@dataclass
class Manifest:
    containerd_config: str
    containerd_version: str
    podshim_version: str
    entries: list[Entry] = field(default_factory=list)
    format: int = FORMAT

    def find(self, kind: str, path: str) -> Entry | None:
        for e in self.entries:
            if e.kind == kind and e.path == path:
                return e
        return None

    def to_json(self) -> str:
        raw = asdict(self)
        raw["entries"] = [{k: v for k, v in e.items() if v} for e in raw["entries"]]
        return json.dumps(raw, indent=2, sort_keys=True) + "\n"


def load(path: str) -> Manifest | None:
    """The manifest at ``path``; ``None`` when there is none.

    Raises:
        AdminError: unreadable, not JSON or not a manifest's shape.
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AdminError(f"install manifest {path} is unreadable: {exc}") from None
    try:
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}")
        entries = [Entry(**e) for e in raw["entries"]]
        for e in entries:
            if (
                e.kind not in KINDS
                or not all(isinstance(v, str) for v in asdict(e).values())
                or not os.path.isabs(e.path)
            ):
                raise ValueError(f"bad entry {asdict(e)}")
        return Manifest(
            str(raw["containerd_config"]),
            str(raw["containerd_version"]),
            str(raw["podshim_version"]),
            entries,
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise AdminError(f"install manifest {path} is not podshim's: {exc}") from None


def save(path: str, manifest: Manifest) -> None:
    write_atomic(path, manifest.to_json().encode(), 0o644)


def write_atomic(path: str, data: bytes, mode: int, like: str | None = None) -> None:
    """Replace ``path`` with ``data`` (a temporary file renamed over it); with ``like``,
    that file's mode and owner."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".podshim-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if like is not None:
            st = os.stat(like)
            os.chmod(tmp, st.st_mode & 0o7777)
            os.chown(tmp, st.st_uid, st.st_gid)
        else:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def verify(e: Entry) -> str | None:
    """Why uninstall must not undo ``e`` as recorded (``None``: it may).

    A missing path is fine (nothing to undo); an ``edit`` whose file changed since is
    handled by the caller (only the imports entry is taken out).
    """
    if e.kind == "symlink":
        if not os.path.islink(e.path):
            return None if not os.path.lexists(e.path) else f"{e.path} is not a link"
        now = os.readlink(e.path)
        if now != e.target or os.path.basename(e.target) != SHIM_BINARY:
            return f"{e.path} points at {now}, not at podshim's {SHIM_BINARY}"
        return None
    if e.kind in ("file", "unit"):
        got = file_sha256(e.path)
        if got is None:
            return None if not os.path.lexists(e.path) else f"{e.path} is not a regular file"
        if got != e.sha256:
            return f"{e.path} changed since podshim install wrote it (or was not written by it)"
        if not _has_marker(e.path):
            return f"{e.path} was not written by podshim install (no marker line)"
        return None
    if e.kind == "edit":
        if not e.entry or not e.backup:
            return f"{e.path}: the edit entry names no import or backup"
        backup = file_sha256(e.backup)
        if backup is not None and backup != e.before_sha256:
            return f"{e.backup} is not the backup podshim install made"
        return None
    if e.kind == "dir":
        return None
    return f"unknown change {e.kind!r}"


def _has_marker(path: str) -> bool:
    with open(path, "rb") as f:
        return f.readline().rstrip(b"\n") == MARKER.encode()
