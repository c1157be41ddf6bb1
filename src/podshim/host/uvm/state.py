"""A VM pod's run directory and the record that names what it made.

``<run>/uvm/<containerd instance>/<namespace>/<pod id>/`` (``<run>`` is
:func:`podshim.rundir.run_dir`; the instance key keeps two containerds' pods apart, as
:func:`podshim.rundir.pods_dir` does) holds:

* ``vm.json``: the record (:class:`Record`): the pod's network namespace and tap, once
  they are about to be made, and QEMU's pid with its start time (``/proc/<pid>/stat``
  field 22) once it runs. A crash cleanup (:mod:`podshim.host.uvm.cleanup`) kills only
  that very process (pid, start time and a command line naming this directory all
  match: a reused pid is never killed) and removes only what the record names;
* ``agent.sock`` (QEMU's end of the agent's virtio-serial port; QEMU runs in this
  directory and is given the relative name; the host connects through the full path,
  or through ``<uvm root>/s/<digest of namespace/pod id>``, a symlink to the run
  directory, when that path is too long for a unix socket), ``console.log`` (the guest's console), ``qemu.log`` (QEMU's own
  stderr);
* ``share/``: the 9p root shared into the guest, with the host's bind mounts below it.

Standard library only: the ``delete`` action imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass

from podshim import rundir
from podshim.linux.proc import start_time

RECORD = "vm.json"
AGENT_SOCKET = "agent.sock"
CONSOLE_LOG = "console.log"
QEMU_LOG = "qemu.log"
SHARE = "share"
#: the directory of Share's bind mounts, below SHARE
SHARES = "shares"
#: a unix socket path's room (sun_path is 108 bytes with its NUL)
SOCKET_PATH_MAX = 107
#: below the uvm root: short aliases (symlinks) of run directories whose agent socket
#: path would not fit in sun_path (a containerd instance key, a namespace and a 64-hex
#: pod id make it ~117 bytes)
ALIASES = "s"


def uvm_root() -> str:
    """``<run>/uvm[/<instance>]``: keyed like :func:`podshim.rundir.pods_dir`."""
    key = os.path.relpath(rundir.pods_dir(), os.path.join(rundir.run_dir(), "pods"))
    root = os.path.join(rundir.run_dir(), "uvm")
    return root if key == "." else os.path.join(root, key)


def run_dir(namespace: str, pod_id: str) -> str:
    return os.path.join(uvm_root(), namespace, pod_id)


def alias(namespace: str, pod_id: str) -> str:
    """The pod's short alias of its run directory (a symlink while the VM runs)."""
    return os.path.join(uvm_root(), ALIASES, rundir.digest(f"{namespace}/{pod_id}")[:24])


def make_alias(directory: str, link: str) -> None:
    os.makedirs(os.path.dirname(link), mode=0o711, exist_ok=True)
    remove_alias(directory, link)
    os.symlink(directory, link)


def remove_alias(directory: str, link: str) -> None:
    """Remove ``link`` if it is this run directory's alias (never another's)."""
    with contextlib.suppress(OSError):
        if os.readlink(link) == directory:
            os.unlink(link)


@dataclass(slots=True)
class Record:
    """What a VM pod's host made, for a cleanup without the shim."""

    #: the pod's network namespace and the tap made there ("" for none)
    netns: str = ""
    tap: str = ""
    #: whether the ingress qdisc on the pod's eth0 is ours (the tc redirect)
    ingress: bool = False
    #: QEMU (0: not started, or reaped)
    pid: int = 0
    start: int = 0


def write_record(directory: str, rec: Record) -> None:
    tmp = os.path.join(directory, RECORD + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(asdict(rec), f)
    os.replace(tmp, os.path.join(directory, RECORD))


def read_record(directory: str) -> Record | None:
    """The record, None when there is none or it cannot be read (then it names nothing)."""
    try:
        with open(os.path.join(directory, RECORD), encoding="utf-8") as f:
            raw = json.load(f)
        return Record(
            netns=str(raw.get("netns", "")),
            tap=str(raw.get("tap", "")),
            ingress=bool(raw.get("ingress", False)),
            pid=int(raw.get("pid", 0)),
            start=int(raw.get("start", 0)),
        )
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_our_qemu(pid: int, start: int, directory: str) -> bool:
    """Whether ``pid`` is still the QEMU this pod's host started: same start time (a
    reused pid starts later), a qemu binary, a command line naming ``directory``."""
    if pid <= 1 or not start or start_time(pid) != start:
        return False
    argv = cmdline(pid)
    if not argv or "qemu" not in os.path.basename(argv[0]):
        return False
    return any(directory + "/" in a for a in argv)


def remove_record(directory: str) -> None:
    for name in (RECORD, RECORD + ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
