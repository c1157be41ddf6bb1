"""The sandbox pid anchor: a pid that stands for the pod and resolves to nothing.

CRI writes ``/proc/<sandbox pid>/ns/{net,ipc,uts,pid}`` into every workload spec and shows
that pid to operators, so the sandbox must report a real pid P for the pod's whole life.
podshim rewrites those paths to the pod's own namespaces (``rewrite.py``); P is chosen so
that a path that escaped the rewrite could never land in the host's namespaces:

* P is a **zombie child of the shim**, created with ``clone(CLONE_NEWPID)`` and *no exit
  signal*. A zombie has no net/ipc/uts/mnt namespace links (``/proc/P/ns/net`` is ENOENT);
  its pid namespace is a fresh one whose init (P itself) is dead, so joining it fails
  (``fork: Cannot allocate memory``). Never 1, never the shim's pid.
* Without an exit signal it is a "clone child": the shim's one reaper, which calls
  ``waitpid(-1)`` without ``__WCLONE``, never collects it, so the pid cannot be reused
  while the pod lives. :meth:`Anchor.release` reaps it explicitly.
* It costs a kernel task struct and no memory of its own (no PSS), and no CPU.

The clone runs through ``ctypes.PyDLL`` (the GIL stays held, so the child can run the
two Python steps to ``os._exit`` safely even in a threaded process).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("podshim.anchor")

CLONE_NEWPID = 0x20000000
WCLONE = 0x80000000
SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine, 56)

_py = ctypes.PyDLL(None, use_errno=True)
_py.syscall.restype = ctypes.c_long
_libc = ctypes.CDLL(None, use_errno=True)


class Anchor:
    """One zombie pid (see the module docstring)."""

    def __init__(self) -> None:
        self.pid = 0

    def create(self) -> int:
        """Create the zombie and return its pid."""
        # clone(flags, stack=NULL, ...): fork-like; the low byte of flags (the exit
        # signal) is 0, which is what makes the child a "clone child".
        pid = _py.syscall(SYS_CLONE, ctypes.c_ulong(CLONE_NEWPID), None, None, None, None)
        if pid == 0:  # child: pid 1 of a new pid namespace; die at once
            os._exit(0)
        if pid < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"clone(CLONE_NEWPID): {os.strerror(err)}")
        self.pid = int(pid)
        return self.pid

    def release(self) -> None:
        """Reap the zombie (idempotent)."""
        if not self.pid:
            return
        status = ctypes.c_int(0)
        rc = _libc.waitpid(self.pid, ctypes.byref(status), ctypes.c_int(WCLONE - (1 << 32)))
        if rc != self.pid:
            log.warning("anchor %d: waitpid: %s", self.pid, os.strerror(ctypes.get_errno()))
        self.pid = 0
