"""The Task and Exec contracts every kind of task in a podshim shim fulfils.

The Task service (``service.py``) only routes calls: all behaviour, and every error kind,
is stated here and implemented by :class:`~podshim.task.container.Container` (a runc
container), by the pod sandbox task, and by the fakes in the tests, which pass the same
contract tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf import any_pb2, timestamp_pb2

from podshim import errors as errdefs
from podshim.jobs import JobGroup
from podshim.linux.reaper import Reaper
from podshim.oci.runtime import OciFactory, OciRuntime, RuntimeConfig
from podshim.task.events import Publisher
from podshim.task.states import Status


def timestamp(at: float) -> timestamp_pb2.Timestamp:
    """A unix time (seconds, float) as a protobuf Timestamp, for events and replies."""
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(at * 1e9))
    return t


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """A process's end: exit code or 128+signal, and when (unix time).

    ``status`` travels as a uint32 (events, Wait, Delete): a negative one is made 255
    (an unknown failure), one above 2**32-1 is clamped there, so encoding never fails."""

    status: int
    at: float

    def __post_init__(self) -> None:
        if not 0 <= self.status <= MAX_STATUS:
            object.__setattr__(self, "status", 255 if self.status < 0 else MAX_STATUS)


MAX_STATUS = 2**32 - 1
#: the signals Kill accepts are 1..MAX_SIGNAL (Linux has no signal above 64)
MAX_SIGNAL = 64


def check_signal(signal: int, what: str) -> None:
    """InvalidArgument for a signal number no process can receive."""
    if not 1 <= signal <= MAX_SIGNAL:
        raise errdefs.InvalidArgument(f"{what}: signal {signal} is not in 1-{MAX_SIGNAL}")


@dataclass(frozen=True, slots=True)
class ProcessState:
    """What ``State`` reports for one process."""

    id: str
    exec_id: str
    bundle: str
    pid: int
    status: Status
    stdin: str
    stdout: str
    stderr: str
    terminal: bool
    exit: ExitInfo | None


@dataclass(frozen=True, slots=True)
class ExecRequest:
    exec_id: str
    terminal: bool
    stdin: str
    stdout: str
    stderr: str
    spec: any_pb2.Any


def no_oci(cfg: RuntimeConfig, bundle: str) -> OciRuntime:
    """The OCI factory of a context that runs no containers (tests of other tasks)."""
    raise errdefs.FailedPrecondition(f"no OCI runtime driver configured for {cfg.binary}")


@dataclass
class ShimContext:
    """What every task of one shim shares; built at the composition root (the daemon)."""

    namespace: str
    reaper: Reaper
    publisher: Publisher
    #: makes a container's OCI runtime driver (``podshim.oci.runc.factory`` in a shim)
    oci: OciFactory = field(default=no_oci)
    #: where tasks made with this context own their background jobs (each task a child
    #: group): the daemon's group for standalone tasks, a pod's group for its tasks
    jobs: JobGroup = field(default_factory=lambda: JobGroup("shim"))


class Task(Protocol):
    """A task of the shim: a container (init process plus execs) or a pod sandbox.

    ``exec_id == ""`` always means the init process. Unless a method says otherwise, an
    unknown exec id MUST raise NotFound.
    """

    id: str
    bundle: str

    @property
    def pid(self) -> int:
        """The init pid reported by Create/Start/State/Connect (0 before Create)."""
        ...

    async def start(self, exec_id: str) -> int:
        """Start init or an exec and return its pid. Starting a process that is not
        Created MUST raise FailedPrecondition. Publishes /tasks/start or
        /tasks/exec-started before the process's /tasks/exit."""
        ...

    def state(self, exec_id: str) -> ProcessState:
        """The process's current state. MUST NOT block."""
        ...

    async def kill(self, exec_id: str, signal: int, all_: bool) -> None:
        """Signal a process. An exited process MUST raise NotFound; ``all_`` with a
        non-empty exec id MUST raise FailedPrecondition."""
        ...

    async def exec(self, req: ExecRequest) -> None:
        """Add an exec in Created. A duplicate exec id MUST raise AlreadyExists; a task
        whose init is not running MUST raise FailedPrecondition. Publishes
        /tasks/exec-added."""
        ...

    async def delete(self, exec_id: str) -> tuple[int, ExitInfo]:
        """Delete an exited (or never started) process and return (pid, exit). A running
        process MUST raise FailedPrecondition. Deleting init releases everything the task
        holds and publishes /tasks/delete, always after its /tasks/exit."""
        ...

    async def wait(self, exec_id: str) -> ExitInfo:
        """Block until the process has exited (also before Start), then return its exit;
        any number of times."""
        ...

    async def pids(self) -> list[tuple[int, str]]:
        """Every process of the task as (pid, exec id or "")."""
        ...

    async def pause(self) -> None:
        """Freeze the task (FailedPrecondition unless running); publishes /tasks/paused."""
        ...

    async def resume(self) -> None:
        """Thaw the task (FailedPrecondition unless paused); publishes /tasks/resumed."""
        ...

    async def update(self, resources: any_pb2.Any) -> None:
        """Apply new LinuxResources (InvalidArgument for an undecodable value)."""
        ...

    async def stats(self) -> any_pb2.Any:
        """cgroups v1 or v2 Metrics. A task without live processes MUST raise NotFound."""
        ...

    def close_io(self, exec_id: str) -> None:
        """Close the process's stdin once containerd closes its end."""
        ...

    def resize(self, exec_id: str, width: int, height: int) -> None:
        """Resize the process's pty (FailedPrecondition without one)."""
        ...
