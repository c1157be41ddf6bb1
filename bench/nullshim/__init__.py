"""A do-nothing containerd runtime v2 shim: containerd's own floor, for the benchmarks.

It speaks the shim protocol like any shim (``start`` prints the address of a listening
unix socket and leaves a daemon serving ``containerd.task.v2.Task`` over ttrpc there;
``delete`` prints a ``DeleteResponse``; events go to containerd's ``Events/Forward`` at
``TTRPC_ADDRESS``), and every Task call is answered at once without running anything:

* Create and Start return the daemon's own pid; no rootfs is mounted, no process made;
* a container's stdout/stderr FIFOs are opened for writing at Create (as a real shim
  does, so containerd's log readers connect) and closed when the task exits;
* Wait returns when Kill is called (any signal ends the task with 128 + signal);
* an exec exits 0 at once when started: its FIFOs are opened and closed (EOF, no
  output), so CRI's ExecSync answers exit 0 with empty output;
* ``/tasks/create``, ``/tasks/start``, ``/tasks/exit``, ``/tasks/delete``,
  ``/tasks/exec-added`` and ``/tasks/exec-started`` are published as podshim does.

Two scopes, two binaries (containerd derives the binary from the runtime type):

* ``io.containerd.nullshim.v1`` (``containerd-shim-nullshim-v1``), **node** scope: one
  resident daemon per containerd address serves every task of every namespace; it exits
  with containerd. ``start`` only connects to it: the floor of any shim.
* ``io.containerd.nullpod.v1`` (``containerd-shim-nullpod-v1``), **pod** scope: one
  daemon per pod (tasks grouped by the CRI sandbox id, as runc.v2 groups them); it
  exits on the Shutdown that finds it holding no task.

Its costs are honest, not zero: it runs in the same Python as podshim (the wrappers
:func:`install` writes use ``sys.executable``), so its floor *includes Python's start-up*
for every ``start`` and ``delete`` containerd execs (tens of ms on a loaded machine), and
in pod scope the daemon's start-up (importing protobuf and the ttrpc server) for every
pod. A Go or C shim would start faster; the figures read against this one are the floor
of a Python shim over containerd, not of containerd alone.

Reuses podshim's ttrpc server and client and its generated ``api`` messages. Only the
standard library is imported on the ``start``/``delete`` path (:mod:`nullshim.cli`).
"""

from __future__ import annotations

import os
import sys

#: runtime type (CRI ``runtime_type``) of each scope
RUNTIME_TYPES = {"node": "io.containerd.nullshim.v1", "pod": "io.containerd.nullpod.v1"}
#: binary containerd looks for on its PATH for each scope
BINARIES = {"node": "containerd-shim-nullshim-v1", "pod": "containerd-shim-nullpod-v1"}

_WRAPPER = """#!{python}
import sys
sys.path.insert(0, {path!r})
from nullshim.cli import main
sys.exit(main({scope!r}))
"""


def bench_dir() -> str:
    """The directory holding the ``nullshim`` package (``bench/``)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install(bin_dir: str, python: str = sys.executable) -> list[str]:
    """Write both shim binaries (small scripts run by ``python``) into ``bin_dir``;
    put it on containerd's PATH. Returns their paths.

    The package is byte-compiled first (whatever ``PYTHONDONTWRITEBYTECODE`` says), as
    an installed podshim is: otherwise every ``start`` would compile it again."""
    import compileall

    compileall.compile_dir(os.path.dirname(os.path.abspath(__file__)), quiet=1)
    os.makedirs(bin_dir, exist_ok=True)
    written = []
    for scope, name in BINARIES.items():
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write(_WRAPPER.format(python=python, path=bench_dir(), scope=scope))
        os.chmod(path, 0o755)
        written.append(path)
    return written
