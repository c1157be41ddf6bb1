"""The guest agent contract, as the host side of a utility-VM pod uses it.

:class:`AgentApi` is what :mod:`podshim.host.uvm` needs of the agent in the guest. Two
implementations pass the same contract tests: the ttrpc client of the real agent
(:mod:`podshim.host.uvm.agentclient`, speaking ``podshim.agent.v1.Agent`` of
``proto/podshim/api/agent/v1/agent.proto`` over the VM's virtio-serial port, or over a
unix socket when the agent runs on the host in tests), and the tests' in-process fake.

The agent is generic: it spawns processes under keys the host chooses, holds their stdio,
reaps every guest process (it is the guest's PID 1), and reads and writes files. What is
container-shaped (runc command lines, specs, cgroup paths) is composed by the host.

Errors are :mod:`podshim.errors` kinds: NotFound (unknown key, pid or path),
AlreadyExists (key in use), InvalidArgument, ResourceExhausted (stdin queue full: retry
later), Unknown (a guest system call failed), Unavailable (the channel is gone: the VM
died or is dying).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

#: ReadStream's stream numbers
STDOUT = 1
STDERR = 2
#: the argument Spawn replaces by its console socket's path (runc --console-socket)
CONSOLE_SOCKET_ARG = "{console-socket}"
#: the virtio-serial port name the agent serves on
PORT_NAME = "podshim.agent"
#: the 9p mount tag of the pod's share directory, and where the guest mounts it
SHARE_TAG = "podshim"
GUEST_SHARE = "/run/podshim/share"
#: the 9p mount tag of the guest tools (runc, its libraries, busybox: read-only, shared
#: by every VM), and where the guest mounts it (the initrd links into it)
TOOLS_TAG = "podshim-tools"
GUEST_TOOLS = "/.tools"
#: the pod's /dev/shm in the guest (a tmpfs the agent mounts at boot)
GUEST_SHM = "/run/podshim/shm"
SERVICE = "podshim.agent.v1.Agent"


@dataclass(frozen=True, slots=True)
class SpawnSpec:
    """A process for :meth:`AgentApi.spawn`."""

    key: str
    args: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = ""
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False
    #: the agent opens a pty (the process's stdio and controlling terminal)
    terminal: bool = False
    #: the agent listens on a unix socket, puts its path in place of CONSOLE_SOCKET_ARG
    #: and takes the pty master it receives as the key's terminal
    console_socket: bool = False
    width: int = 0
    height: int = 0


@dataclass(frozen=True, slots=True)
class Chunk:
    """What :meth:`AgentApi.read` returns: bytes, and whether the stream ended."""

    data: bytes
    eof: bool


@dataclass(frozen=True, slots=True)
class AgentInfo:
    version: str
    kernel: str
    uptime_ms: int


class AgentApi(Protocol):
    """The guest agent of one VM."""

    async def ping(self, timeout: float | None = None) -> AgentInfo:
        """Answer once the guest is ready (mounts, network)."""
        ...

    async def spawn(self, spec: SpawnSpec) -> int:
        """Start a process under ``spec.key`` and return its guest pid. A key in use MUST
        raise AlreadyExists; a program that cannot be executed MUST raise (NotFound or
        Unknown naming it) and leave no key behind."""
        ...

    async def wait(self, key: str) -> int:
        """Block until the key's process exited; its status (code, or 128+signal)."""
        ...

    async def wait_pid(self, pid: int) -> int:
        """Block until a guest pid that was not spawned (a container init) exited; its
        status. A pid reaped before the call MUST still be answered."""
        ...

    async def signal(self, signal: int, *, key: str = "", pid: int = 0) -> None:
        """Signal a key's process or a pid (NotFound once it is gone)."""
        ...

    async def read(self, key: str, stream: int, max_bytes: int = 0) -> Chunk:
        """Block until stdout/stderr of the key has data or ended. Data written before the
        process exited MUST stay readable after it exited."""
        ...

    async def write_stdin(self, key: str, data: bytes) -> int:
        """Queue bytes for the key's stdin; how many were taken."""
        ...

    async def close_stdin(self, key: str) -> None:
        """Close the key's stdin once queued bytes are written."""
        ...

    async def resize(self, key: str, width: int, height: int) -> None:
        """Resize the key's pty (FailedPrecondition/InvalidArgument without one)."""
        ...

    async def release(self, key: str) -> None:
        """Forget an exited key (its pending reads end with EOF)."""
        ...

    async def read_file(self, path: str, max_bytes: int = 0) -> bytes: ...

    async def write_file(self, path: str, data: bytes, mkdirs: bool = False) -> None: ...

    async def watch_file(self, path: str, timeout_ms: int) -> bool:
        """True when the file was modified before the timeout."""
        ...

    async def mount(
        self,
        source: str,
        target: str,
        fstype: str = "",
        flags: int = 0,
        data: str = "",
        mkdir: bool = False,
        pid: int = 0,
    ) -> None: ...

    async def stacks(self) -> tuple[str, str]:
        """(the agent's own state, the guest kernel's task list)."""
        ...

    async def shutdown(self) -> None:
        """Kill every guest process and power the VM off."""
        ...

    async def close(self) -> None:
        """Drop the channel (pending calls fail with Unavailable)."""
        ...
