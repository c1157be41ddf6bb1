"""The proxy plugin ``podshim install`` registers on containerd 2.x, and the systemd
service of its resident daemon (``podshim daemon``).

containerd 2.x reaches a sandbox controller through ``[proxy_plugins.<name>] type =
"sandbox" address = "<socket>"``; the CRI handler ``podshim-node`` names it with
``sandboxer = "<name>"``. Facts about containerd 2.1 this relies on (its sources:
``cmd/containerd/server/server.go``, ``internal/cri/server/restart.go``):

* a proxy plugin's client is made with ``grpc.NewClient``, which does not connect:
  containerd starts whether or not the daemon's socket is there;
* but CRI, as it starts, asks every sandbox controller for the status of each pod it
  recorded (``SandboxStatus``) and waits on the ready ones (``WaitSandbox``). A daemon
  not serving then leaves those pods in state UNKNOWN with no exit monitor. So the
  daemon's unit is ordered ``Before=containerd.service`` (and wanted by it), and nothing
  ties it to containerd's restarts: restarting the daemon ends every pod it holds (its
  next start reports them lost), restarting containerd does not. The daemon does not
  notify systemd when it serves, so the unit's ``ExecStartPost`` waits for its socket
  (``/run`` is a tmpfs: no stale socket at boot) before containerd may start.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from typing import Any

from podshim.admin.errors import AdminError

#: the proxy plugin's name (the ``sandboxer`` of the handler ``podshim-node`` on 2.x)
PLUGIN = "podshim"
#: the plugin type containerd accepts for a sandbox controller (short and long form)
SANDBOX_TYPES = ("sandbox", "io.containerd.sandbox.controller.v1")
UNIT = "podshim-daemon.service"
DEFAULT_SOCKET = "/run/podshim/sandbox.sock"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
#: what may appear in the unit's ExecStart without quoting (systemd's specifiers use
#: ``%``, its variables ``$``; a path with anything else is refused)
_SAFE = re.compile(r"^[A-Za-z0-9/._+:@=,-]+$")

_UNIT_TEXT = """\
# written by podshim install
# podshim's resident daemon: the sandbox controller of containerd's proxy plugin
# "{plugin}" (the CRI handler podshim-node). podshim uninstall removes this file.
#
# Restarting this service ends every pod on podshim-node (its next start reports them
# lost): drain the node first. Restarting containerd does not touch it.
[Unit]
Description=podshim daemon (sandbox controller of containerd's proxy plugin {plugin})
# containerd's CRI asks the controller about its pods as it starts: be serving first
Before=containerd.service
After=local-fs.target

[Service]
ExecStart={exec_start}
# started means serving (the daemon does not notify): containerd waits for this line
ExecStartPost=/bin/sh -c 'until test -S {socket}; do sleep 0.1; done'
TimeoutStartSec=120
Restart=always
RestartSec=2
# the pods' processes are children of the daemon: a stop must not kill them
KillMode=process
Delegate=yes
TasksMax=infinity
LimitNOFILE=1048576
OOMScoreAdjust=-999

[Install]
WantedBy=containerd.service
"""


def has_grpc() -> bool:
    """Whether this interpreter (the daemon's) can import grpcio."""
    return importlib.util.find_spec("grpc") is not None


def grpc_address(dumped: str) -> str:
    """containerd's gRPC socket from its ``config dump`` output (its default when the
    dump does not say)."""
    try:
        grpc = tomllib.loads(dumped).get("grpc", {})
    except tomllib.TOMLDecodeError:
        return DEFAULT_ADDRESS
    found = grpc.get("address") if isinstance(grpc, dict) else None
    return found if isinstance(found, str) and found else DEFAULT_ADDRESS


def plugin_table(socket_path: str) -> dict[str, Any]:
    """The ``proxy_plugins`` entry install adds."""
    return {PLUGIN: {"type": "sandbox", "address": socket_path}}


def check_plugin_name(files: list[tuple[str, dict[str, Any]]], socket_path: str) -> None:
    """Refuse a ``[proxy_plugins.podshim]`` of another kind or at another socket.

    Raises:
        AdminError: the name is taken in one of ``files``.
    """
    for name, table in files:
        plugins = table.get("proxy_plugins")
        spec = plugins.get(PLUGIN) if isinstance(plugins, dict) else None
        if spec is None:
            continue
        kind = spec.get("type") if isinstance(spec, dict) else None
        address = spec.get("address") if isinstance(spec, dict) else None
        if kind not in SANDBOX_TYPES or address != socket_path:
            raise AdminError(
                f"the proxy plugin name {PLUGIN!r} is taken in {name} (type {kind!r}, "
                f"address {address!r}): remove or rename it there first"
            )


def daemon_argv(address: str, socket_path: str, config: str) -> list[str]:
    """The daemon's command line: this interpreter (it has podshim and grpcio)."""
    return [sys.executable, "-m", "podshim.cli", "daemon", "--address", address,
            "--socket", socket_path, "--config", config]  # fmt: skip


def unit_text(argv: list[str]) -> str:
    """The systemd unit running ``argv``.

    Raises:
        AdminError: an argument systemd would read otherwise than as written.
    """
    for arg in argv:
        if not _SAFE.match(arg):
            raise AdminError(
                f"{arg!r} cannot go into a systemd unit as it is (spaces, %, $, quotes): "
                "choose a plainer path"
            )
    socket_path = argv[argv.index("--socket") + 1]
    return _UNIT_TEXT.format(plugin=PLUGIN, exec_start=" ".join(argv), socket=socket_path)


def exec_start(text: str) -> list[str]:
    """The ExecStart command of a unit file's text (``[]`` when it has none)."""
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            return line[len("ExecStart=") :].split()
    return []


def reachable(path: str, timeout: float = 2.0) -> str | None:
    """``None`` when something accepts a connection on the unix socket ``path``, else
    why not."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def start_hint(socket_path: str) -> str:
    """What to do when nothing serves the proxy plugin's socket."""
    return (
        f"systemctl enable --now {UNIT} (without systemd: podshim daemon --socket "
        f"{socket_path} under your service manager, started before containerd; as root)"
    )


def systemd_running() -> bool:
    """Whether systemd manages this machine (and ``systemctl`` is there)."""
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def systemctl(*args: str) -> str | None:
    """Run ``systemctl args``; ``None`` when it worked, else its error."""
    try:
        res = subprocess.run(
            ["systemctl", *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if res.returncode != 0:
        return (res.stderr or res.stdout).strip() or f"exit {res.returncode}"
    return None
