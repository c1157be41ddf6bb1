"""What a container's Create puts in and under its bundle besides the runtime's own
state, and its removal: the runtime record the ``delete`` action reads to clean up
without the shim, the rootfs mounts, and the init's pid file."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from podshim import errors as errdefs
from podshim.api.types import mount_pb2
from podshim.linux import mount
from podshim.oci import bundle as files
from podshim.oci.runtime import RuntimeConfig
from podshim.task.process import unlink


class BundleFiles:
    """The files and mounts one container's Create makes in ``bundle``."""

    def __init__(
        self,
        tid: str,
        bundle: str,
        rootfs: Sequence[mount_pb2.Mount],
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.tid, self.bundle, self.rootfs, self._log = tid, bundle, list(rootfs), log
        self._mounted = False

    @property
    def init_pid_file(self) -> str:
        return os.path.join(self.bundle, files.INIT_PID)

    def record_runtime(self, cfg: RuntimeConfig) -> None:
        """Leave what the ``delete`` action needs to clean up without us."""
        with open(os.path.join(self.bundle, files.RUNTIME_RECORD), "w") as f:
            json.dump({"binary": cfg.binary, "root": cfg.root}, f)

    def mount_rootfs(self) -> None:
        target = os.path.join(self.bundle, files.ROOTFS)
        for m in self.rootfs:
            try:
                mount.mount(m.type, m.source, target, list(m.options))
            except OSError as exc:
                raise errdefs.Unknown(f"task {self.tid}: rootfs: {exc}") from None
            self._mounted = True

    def unmount_rootfs(self) -> None:
        if self._mounted or self.rootfs:
            try:
                mount.unmount_all(os.path.join(self.bundle, files.ROOTFS))
            except OSError as exc:
                self._log.warning("task %s: %s", self.tid, exc)
            self._mounted = False

    def remove_records(self) -> None:
        """Remove the init's pid file and the runtime record (an undone Create)."""
        for name in (files.INIT_PID, files.RUNTIME_RECORD):
            unlink(os.path.join(self.bundle, name))
