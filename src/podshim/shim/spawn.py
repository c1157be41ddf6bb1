"""How the shim binary runs itself again: the serving daemon and the zygote are spawned
detached, with the listening socket on a fixed fd. Standard library only: used on the
``start`` path.
"""

from __future__ import annotations

import os
import sys

#: the fd on which a spawned daemon finds its listening socket
LISTEN_FD = 3
#: a node daemon learns containerd's pid from ``start`` here (it leaves with containerd
#: when it holds no task)
CONTAINERD_PID_ENV = "PODSHIM_CONTAINERD_PID"
#: the shim binary's name (the launcher, ``launcher.c``, where it is installed)
SHIM_NAME = "containerd-shim-podshim-v1"
#: the console script of the Python shim, which the launcher execs
PY_ENTRY = SHIM_NAME + "-py"


def self_command() -> list[str]:
    """How to run this shim again (a daemon, the zygote).

    The program we were started as when it is the shim binary or a wrapper of it (an
    absolute, executable path), so that ``ps`` shows the shim's name. Not the launcher's
    Python entry point ``containerd-shim-podshim-v1-py`` though: going through the launcher
    again would only add an exec, and a command line naming ``...-v1-py`` is found neither
    by the shim's name nor by its module. That one, like a ``python -m`` run, becomes
    ``python -Pm podshim.shim.main`` (-P: the bundle, our cwd, is not on sys.path); the
    daemon then names its process after the shim (:func:`name_process`)."""
    me = sys.argv[0]
    usable = os.path.isabs(me) and os.access(me, os.X_OK)
    if usable and not me.endswith(".py") and os.path.basename(me) != PY_ENTRY:
        return [me]
    return [sys.executable, "-Pm", "podshim.shim.main"]


def name_process(name: str = SHIM_NAME) -> None:
    """Set this process's name (``comm``, what ``ps`` and ``top`` show; cut to 15 bytes by
    the kernel) as the kernel names a process run from the shim binary's path."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def spawn_detached(
    argv: list[str], extra_fd: int | None = None, env: dict[str, str] | None = None
) -> None:
    """Start ``argv`` in its own session with stdio on /dev/null (containerd waits for
    EOF on our output pipe, so nothing long-lived may keep it) and, optionally, ``extra_fd``
    as its fd 3."""
    actions = []
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull, i) for i in (0, 1, 2)]
        if extra_fd is not None:
            os.set_inheritable(extra_fd, True)  # dup2(3, 3) would keep CLOEXEC otherwise
            actions.append((os.POSIX_SPAWN_DUP2, extra_fd, LISTEN_FD))
        os.posix_spawn(argv[0], argv, os.environ if env is None else env, file_actions=actions, setsid=True)
    finally:
        os.close(devnull)
