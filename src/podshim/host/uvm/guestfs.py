"""A guest container's directory in the pod's share (``<share>/<cid>/``), made and
removed on the host side: the rootfs mounted at ``rootfs/`` (as runc.v2 mounts it in
the bundle), every bind mount's host source bind-mounted at ``mounts/<n>`` (read-only
when the spec's mount is), and the files the workload writes there (``config.json``,
pid files, runc's log, exec and update JSON).

Removal never recurses through a mount: each target is unmounted first and only then
removed (an empty directory or file this object made); what cannot be unmounted is left
and named in a warning.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence

from podshim import errors as errdefs
from podshim.api.types import mount_pb2
from podshim.host.uvm.guestspec import BindPlan
from podshim.linux import mount
from podshim.oci import bundle as files

log = logging.getLogger("podshim.uvm.fs")


class GuestDir:
    """``<share_dir>/<cid>``: made by :meth:`make`, undone by :meth:`remove`."""

    def __init__(self, share_dir: str, cid: str) -> None:
        self.path = os.path.join(share_dir, cid)
        self.rootfs = os.path.join(self.path, files.ROOTFS)
        self._targets: list[str] = []  # mounted, in order
        self._made = False

    def make(self) -> None:
        """Create the directory; AlreadyExists (touching nothing) when it is there."""
        try:
            os.mkdir(self.path, 0o711)
        except FileExistsError:
            raise errdefs.AlreadyExists(
                f"{self.path} exists: another container of this id is in the pod's share"
            ) from None
        self._made = True
        os.mkdir(self.rootfs, 0o755)
        os.mkdir(os.path.join(self.path, "mounts"), 0o755)

    def mount_rootfs(self, rootfs: Sequence[mount_pb2.Mount], bundle: str) -> None:
        """The rootfs mounts containerd passed, or (none: containerd mounted it in the
        bundle itself) a bind of the bundle's rootfs."""
        try:
            if not rootfs:
                self._mount("", os.path.join(bundle, files.ROOTFS), self.rootfs, ["rbind"])
            for m in rootfs:
                self._mount(m.type, m.source, self.rootfs, list(m.options))
        except OSError as exc:
            raise errdefs.Unknown(f"rootfs: {exc}") from None

    def _mount(self, fstype: str, source: str, target: str, options: list[str]) -> None:
        mount.mount(fstype, source, target, options)
        if target not in self._targets:
            self._targets.append(target)

    def bind(self, plan: BindPlan) -> None:
        """Bind ``plan.source`` at ``mounts/<n>``: a directory or a regular file (9p can
        carry nothing else); InvalidArgument naming the spec's field otherwise."""
        target = os.path.join(self.path, "mounts", str(plan.index))
        try:
            st = os.stat(plan.source)
        except OSError as exc:
            raise errdefs.InvalidArgument(
                f"{plan.field}.source: {plan.source}: {exc.strerror}"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(target, 0o755)
        elif stat.S_ISREG(st.st_mode):
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        else:
            raise errdefs.InvalidArgument(
                f"{plan.field}.source: {plan.source} is neither a directory nor a regular "
                "file (not possible in a VM pod)"
            )
        opts = ["rbind" if plan.recursive else "bind", *(["ro"] if plan.readonly else [])]
        try:
            self._mount("", plan.source, target, opts)
        except OSError as exc:
            raise errdefs.Unknown(f"{plan.field}: {exc}") from None

    def write(self, name: str, data: bytes) -> str:
        """Write ``name`` in the directory (replacing it); its host path."""
        path = os.path.join(self.path, name)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return path

    def remove(self) -> list[str]:
        """Unmount everything, remove what was made; what is left (empty when all is
        gone). Idempotent."""
        if not self._made:
            return []
        left: list[str] = []
        for target in reversed(self._targets):
            try:
                mount.unmount_all(target)
            except OSError as exc:
                log.warning("%s", exc)
                left.append(target)
        self._targets = [t for t in self._targets if t in left]
        if left:
            return left
        mounts = os.path.join(self.path, "mounts")
        for name in _listdir(mounts):
            _remove(os.path.join(mounts, name))
        for sub in (mounts, self.rootfs):
            _remove(sub)
        for name in _listdir(self.path):
            _remove(os.path.join(self.path, name))  # files only: the dirs went above
        _remove(self.path)
        if os.path.lexists(self.path):
            return [self.path]
        self._made = False
        return []


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _remove(path: str) -> None:
    """Remove a file or an empty directory (never recursively)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
