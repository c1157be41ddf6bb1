"""The changes install makes, applied one by one and recorded in the manifest as each
is done; undone in reverse when one fails, so a failed install leaves nothing."""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass

from podshim.admin import manifest as mf
from podshim.admin.errors import AdminError


@dataclass(frozen=True)
class Change:
    """One change: ``dir`` (create), ``file`` or ``unit`` (a systemd unit: write
    ``data``), ``symlink`` (to
    ``target``), ``edit`` (containerd's main config from ``old`` to ``data``, adding the
    imports ``entry``, backed up to ``backup``)."""

    kind: str
    path: str
    data: bytes = b""
    target: str = ""
    old: bytes = b""
    entry: str = ""
    backup: str = ""

    def describe(self, verbose: bool = False) -> str:
        """One line (``verbose``: with the file's content or the edit's diff)."""
        if self.kind == "dir":
            return f"create directory {self.path}"
        if self.kind == "symlink":
            return f"link {self.path} -> {self.target}"
        if self.kind in ("file", "unit"):
            head = f"write {'systemd unit ' if self.kind == 'unit' else ''}{self.path}"
            if not verbose:
                return head
            return head + ":\n" + _indent(self.data.decode())
        head = f"edit {self.path}: add {self.entry} to imports (backup: {self.backup})"
        if not verbose:
            return head
        diff = difflib.unified_diff(
            self.old.decode().splitlines(keepends=True),
            self.data.decode().splitlines(keepends=True),
            self.path,
            self.path,
        )
        return head + ":\n" + _indent("".join(diff))


def _indent(text: str) -> str:
    return "".join("    " + line for line in text.splitlines(keepends=True)).rstrip("\n")


def _do(change: Change) -> mf.Entry:
    if change.kind == "dir":
        os.mkdir(change.path, 0o755)
        return mf.Entry("dir", change.path)
    if change.kind == "symlink":
        tmp = os.path.join(os.path.dirname(change.path), f".podshim-link-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(change.target, tmp)
        os.replace(tmp, change.path)
        return mf.Entry("symlink", change.path, target=change.target)
    if change.kind in ("file", "unit"):
        mf.write_atomic(change.path, change.data, 0o644)
        return mf.Entry(change.kind, change.path, sha256=mf.sha256(change.data))
    if change.kind == "edit":
        mf.write_atomic(change.backup, change.old, 0o600, like=change.path)
        current = mf.file_sha256(change.path)
        if current != mf.sha256(change.old):
            raise AdminError(f"{change.path} changed while podshim install ran; run it again")
        mf.write_atomic(change.path, change.data, 0o644, like=change.path)
        return mf.Entry(
            "edit",
            change.path,
            sha256=mf.sha256(change.data),
            backup=change.backup,
            before_sha256=mf.sha256(change.old),
            entry=change.entry,
        )
    raise AssertionError(change.kind)


def _undo(change: Change, before: mf.Entry | None) -> None:
    """Best effort: put back what ``change`` replaced (``before``: its old record)."""
    if change.kind == "dir":
        os.rmdir(change.path)
    elif change.kind == "symlink":
        os.unlink(change.path)
        if before is not None:
            os.symlink(before.target, change.path)
    elif change.kind in ("file", "unit"):
        if before is not None:  # an earlier install's file, rewritten: put it back
            mf.write_atomic(change.path, change.old, 0o644)
        else:
            os.unlink(change.path)
    elif change.kind == "edit":
        mf.write_atomic(change.path, change.old, 0o644, like=change.path)
        os.unlink(change.backup)


def apply(
    changes: list[Change],
    manifest: mf.Manifest,
    manifest_path: str,
    report: Callable[[str], None],
) -> None:
    """Make ``changes`` in order, saving ``manifest`` after each; on a failure undo the
    ones made (and the manifest) and raise :class:`AdminError`."""
    original = manifest.to_json() if os.path.exists(manifest_path) else None
    done: list[tuple[Change, mf.Entry | None]] = []
    try:
        for change in changes:
            old = manifest.find(change.kind, change.path)
            entry = _do(change)
            done.append((change, old))
            if old is not None:
                manifest.entries.remove(old)
            manifest.entries.append(entry)
            if os.path.isdir(os.path.dirname(manifest_path)):
                mf.save(manifest_path, manifest)
            report(change.describe())
    except (OSError, AdminError) as exc:
        with contextlib.suppress(OSError):
            if original is None:
                os.unlink(manifest_path)
            else:
                mf.write_atomic(manifest_path, original.encode(), 0o644)
        for change, old in reversed(done):
            with contextlib.suppress(OSError):
                _undo(change, old)
        raise AdminError(f"podshim install failed ({exc}); what it had changed is undone") from None
