"""``podshim uninstall``: undo what ``podshim install`` recorded in its manifest.

Each change is checked first (:func:`podshim.admin.manifest.verify`); what does not match
the record is left alone, reported, and stays in the manifest (exit 1). containerd's main
config goes back to its backup byte for byte when nobody changed it since install;
otherwise only podshim's ``imports`` entry is taken out (and the backup kept).
Running it again, or without a manifest, changes nothing.

The daemon's systemd unit (containerd 2.x) is disabled and stopped before it is removed
where systemd runs (that ends the pods it still holds: stop them first); elsewhere
uninstall says to stop the daemon that was started from it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from podshim.admin import manifest as mf
from podshim.admin import service, tomledit
from podshim.admin.errors import AdminError
from podshim.admin.install import Options, require_root


def _undo_edit(e: mf.Entry, dry_run: bool, report: Callable[[str], None]) -> None:
    try:
        with open(e.path, "rb") as f:
            current = f.read()
    except OSError as exc:
        raise AdminError(f"cannot read {e.path}: {exc.strerror}") from None
    backup_ok = mf.file_sha256(e.backup) == e.before_sha256
    if mf.sha256(current) == e.sha256 and backup_ok:
        report(f"{'would restore' if dry_run else 'restore'} {e.path} from {e.backup}")
        if not dry_run:
            with open(e.backup, "rb") as f:
                mf.write_atomic(e.path, f.read(), 0o644, like=e.path)
            os.unlink(e.backup)
        return
    new = tomledit.remove_import(current.decode(), e.entry).encode()
    if new != current:
        report(
            f"{'would take' if dry_run else 'take'} {e.entry} out of the imports of {e.path} "
            f"(the file changed since install; its backup stays at {e.backup})"
        )
        if not dry_run:
            mf.write_atomic(e.path, new, 0o644, like=e.path)


def _undo_unit(e: mf.Entry, dry_run: bool, report: Callable[[str], None]) -> None:
    name = os.path.basename(e.path)
    if not service.systemd_running():
        report(
            f"{'would remove' if dry_run else 'remove'} systemd unit {e.path} (no systemd "
            "here: stop the podshim daemon you started from it)"
        )
        if not dry_run:
            os.unlink(e.path)
        return
    report(f"{'would run' if dry_run else 'run'}: systemctl disable --now {name}")
    if dry_run:
        report(f"would remove systemd unit {e.path}, then systemctl daemon-reload")
        return
    failed = service.systemctl("disable", "--now", name)
    if failed is not None:
        raise AdminError(f"systemctl disable --now {name}: {failed}")
    report(f"remove systemd unit {e.path}")
    os.unlink(e.path)
    failed = service.systemctl("daemon-reload")
    if failed is not None:
        report(f"note: systemctl daemon-reload: {failed}")


def _undo(e: mf.Entry, dry_run: bool, report: Callable[[str], None]) -> None:
    verb = "would remove" if dry_run else "remove"
    if e.kind == "unit":
        if os.path.lexists(e.path):
            _undo_unit(e, dry_run, report)
    elif e.kind == "edit":
        _undo_edit(e, dry_run, report)
    elif e.kind == "dir":
        if not os.path.isdir(e.path):
            return
        if os.listdir(e.path):
            report(f"keep {e.path} (not empty)")
            return
        report(f"{verb} directory {e.path}")
        if not dry_run:
            os.rmdir(e.path)
    elif os.path.lexists(e.path):
        report(f"{verb} {e.path}")
        if not dry_run:
            os.unlink(e.path)


def run(opts: Options, *, dry_run: bool, report: Callable[[str], None]) -> int:
    """Undo the manifest's changes; 0, or 1 when something was refused."""
    require_root(dry_run, "uninstall")
    manifest = mf.load(opts.manifest)
    if manifest is None:
        report(f"no podshim install recorded at {opts.manifest}: nothing to undo")
        return 0
    refused: list[str] = []
    kept: list[mf.Entry] = []
    state_dir = os.path.dirname(opts.manifest)
    for e in reversed(manifest.entries):
        why = mf.verify(e)
        if why is not None:
            refused.append(why)
            kept.append(e)
            continue
        if e.kind == "dir" and e.path == state_dir:
            if refused:  # the manifest stays in it
                kept.append(e)
                continue
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(opts.manifest)
        try:
            _undo(e, dry_run, report)
        except (OSError, AdminError) as exc:
            refused.append(f"{e.path}: {exc}")
            kept.append(e)
    for why in refused:
        report(f"refused: {why}")
    if dry_run:
        return 1 if refused else 0
    if refused:
        manifest.entries = list(reversed(kept))
        if os.path.isdir(state_dir):
            mf.save(opts.manifest, manifest)
        report(f"left in {opts.manifest}: what podshim uninstall did not undo")
        return 1
    with contextlib.suppress(FileNotFoundError):
        os.unlink(opts.manifest)
    return 0
