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


def self_command() -> list[str]:
    """How to run this shim again: the console script when we were started through it
    (so ``ps`` shows the shim's name), else ``python -m``."""
    me = sys.argv[0]
    if os.path.isabs(me) and os.access(me, os.X_OK) and not me.endswith(".py"):
        return [me]
    return [sys.executable, "-m", "podshim.shim.main"]


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
