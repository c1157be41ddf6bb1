"""The ``proxy`` column's resident ``podshim daemon`` (containerd 2.x proxy plugin).

containerd's config names the daemon (``[proxy_plugins.<PLUGIN>] type = "sandbox"``,
``address`` = :attr:`ProxyDaemon.socket`) and the column's CRI handler picks it with
``sandboxer = "<PLUGIN>"``; nothing execs it, so the bench runs it as a service manager
would: started before containerd (it needs only containerd's address, which the lab knows
before it starts), stopped after containerd (every pod is gone by then).

What the daemon needs from the lab, beyond those two config entries: the lab's gRPC
``address`` (its home and its runtime root are keyed by it, and it publishes events to
``<address>.ttrpc``), the same ``PODSHIM_RUN_DIR`` as containerd's environment (so its
home, sockets and pod state stay in the bench's private run directory), and a podshim
config of its own (``--config``: the handler's ``ConfigPath`` is not read on this path).

It is not below the lab's subreaper: its memory is found from its pid
(:meth:`ProxyDaemon.pid`), its pods' processes (anchors, inits, containers) below it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from podshim_lab import wait_for

#: the proxy plugin's name (``sandboxer`` of the handler)
PLUGIN = "podshim"
READY_LINE = "serving the sandbox controller"
START_TIMEOUT = 120.0  # s: the machine may be loaded
STOP_TIMEOUT = 30.0


class ProxyDaemon:
    """``podshim daemon`` serving the containerd at ``address``."""

    def __init__(
        self, address: str, socket_path: Path, config: Path, log: Path, env: Mapping[str, str]
    ) -> None:
        self.address = address
        self.socket = socket_path
        self.config = config
        self.log = log
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The daemon's pid while it runs."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        return self.proc.pid

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "podshim.cli", "daemon", "--address", self.address,
                "--socket", str(self.socket), "--config", str(self.config),
                "--name", PLUGIN, "--log", str(self.log)]  # fmt: skip

    def start(self) -> None:
        """Start it; return once it serves the controller socket."""
        self.proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, env=self.env, start_new_session=True
        )
        proc = self.proc
        wait_for(
            lambda: (
                proc.poll() is not None or (self.socket.is_socket() and READY_LINE in self.tail())
            ),
            timeout=START_TIMEOUT,
            interval=0.1,
            message=lambda: f"podshim daemon to serve\n{self.tail()}",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"podshim daemon exited {proc.returncode}\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (SIGKILL if it does not leave); waits for it. An exit status other
        than 0 is told on stderr with the end of the daemon's log."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        if proc.returncode != 0:
            print(f"bench: podshim daemon exited {proc.returncode}\n{self.tail()}",
                  file=sys.stderr, flush=True)  # fmt: skip
