"""The files of an OCI bundle that containerd and podshim read or write: one name each.

Standard library only and no imports: used by the ``start`` and ``delete`` actions.
"""

from __future__ import annotations

#: the OCI runtime spec (containerd writes it; the namespace rewrite replaces it)
CONFIG = "config.json"
#: the container's root filesystem mountpoint
ROOTFS = "rootfs"
#: the shim's address, written by ``start`` (read by ``delete`` to remove a dead socket)
ADDRESS = "address"
#: the FIFO containerd reads the shim's log from
LOG_FIFO = "log"
#: the OCI runtime's JSON log
RUNTIME_LOG = "log.json"
#: the init's pid, written by the OCI runtime
INIT_PID = "init.pid"
#: which runtime binary and root made the container (for ``delete`` without the shim)
RUNTIME_RECORD = "podshim-runtime.json"
#: which pod host kind a sandbox has (for ``delete`` to clean up after a crashed shim)
HOST_RECORD = "podshim-host.json"
#: the crash report a dying shim daemon writes (relayed by ``delete``)
PANIC = "panic.log"
#: written by the shim once a task's Delete left nothing behind (its runtime state,
#: rootfs mount and, for a sandbox, its pod host are gone): the ``delete`` action that
#: containerd runs next has nothing to do but answer (the launcher's fast path). Its
#: content is the task's pid and exit status, ``"<pid> <status>\n"``.
DELETED = "podshim-deleted"


def exec_pid(exec_id: str) -> str:
    """The pid file of an exec."""
    return f"{exec_id}.pid"
