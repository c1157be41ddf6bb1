"""The pre-warmed parent ("zygote") that forks shim daemons: what ``start`` asks of it
(this module, standard library only) and how it works (the zygote itself is
:mod:`podshim.shim.zygote_server`).

Every pod starts a shim. Spawned fresh, each daemon pays Python's start-up and ~130 ms of
imports, and keeps ~14 MB of private memory. Forked from one parent that has already
imported everything (and frozen its objects with ``gc.freeze()``), a daemon starts at
once and shares those pages copy-on-write.

* **One per containerd instance**: its socket is ``/run/podshim/z/<sha256(address)>``.
  ``start`` spawns it on first use (detached, its own session, stdio on /dev/null, the
  environment containerd gave the shim) and asks it to fork a daemon, passing the
  listening socket with SCM_RIGHTS. Any failure falls back to spawning the daemon.
* **Lifetime**: it exits when it has had no live child for ``IDLE_SECONDS``, or as soon as
  the containerd that first used it exits. Forked daemons do not depend on it: they are
  full shims in their own sessions and outlive it.
* It is single-threaded (forking is safe), reaps its children, and counts as a shim
  process in every leak check and memory figure (comm ``podshim-zygote``).
* Opt-in: ``zygote = true`` in the podshim config, or ``PODSHIM_ZYGOTE=1`` in
  containerd's environment.
"""

from __future__ import annotations

import _socket
import hashlib
import json
import os
import socket
import time

from podshim import rundir
from podshim.shim.flags import Flags
from podshim.shim.spawn import self_command, spawn_detached


def zygote_path(address: str) -> str:
    return os.path.join(rundir.zygote_dir(), hashlib.sha256(address.encode()).hexdigest()[:40])


# -- client side (runs in `start`) ------------------------------------------------------
def _ask(path: str, request: dict[str, object], fd: int, timeout: float) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        socket.send_fds(s, [json.dumps(request).encode()], [fd])
        reply = json.loads(s.recv(4096) or b"{}")
    finally:
        s.close()
    pid = int(reply.get("pid", 0))
    if pid <= 0:
        raise OSError(f"zygote: {reply.get('error', 'no pid')}")
    return pid


def _spawn_zygote(flags: Flags) -> None:
    cmd = ["-address", flags.address, "-namespace", flags.namespace, "zygote"]
    spawn_detached(self_command() + cmd)


def request_fork(flags: Flags, bundle: str, sock: _socket.socket, socket_path: str) -> int:
    """Have this containerd's zygote fork a daemon serving ``sock``; returns its pid.

    Raises:
        OSError: no zygote could be reached (the caller spawns the daemon itself).
    """
    path = zygote_path(flags.address)
    request = {
        "namespace": flags.namespace,
        "id": flags.id,
        "address": flags.address,
        "bundle": bundle,
        "socket": socket_path,
        "debug": flags.debug,
        "containerd_pid": os.getppid(),
    }
    try:
        return _ask(path, request, sock.fileno(), 10.0)
    except (OSError, ValueError):
        pass
    _spawn_zygote(flags)
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return _ask(path, request, sock.fileno(), 10.0)
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
