"""Process state machines as explicit tables.

Every legal move is one row below; anything else is refused with the error kind
containerd expects. Rule: code changes a process's state only through
:meth:`Machine.fire`, so this file is the whole story of which transitions exist.
"""

from __future__ import annotations

import enum

from podshim import errors as errdefs


class Status(enum.Enum):
    """Process status; ``.value`` is containerd's ``containerd.v1.types.Status`` number."""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5
    DELETED = 100  # podshim-internal: gone from the shim; reported as STOPPED

    @property
    def wire(self) -> int:
        return Status.STOPPED.value if self is Status.DELETED else self.value


C, R, S, P, D = Status.CREATED, Status.RUNNING, Status.STOPPED, Status.PAUSED, Status.DELETED

#: event -> {from: to}, for a container's init process.
INIT_TABLE: dict[str, dict[Status, Status]] = {
    "start": {C: R},
    "pause": {R: P},
    "resume": {P: R},
    "exit": {C: S, R: S, P: S},
    "delete": {C: D, S: D},
}

#: event -> {from: to}, for an exec'd process.
EXEC_TABLE: dict[str, dict[Status, Status]] = {
    "start": {C: R},
    "exit": {C: S, R: S},
    "delete": {C: D, S: D},
}

#: Operations that do not change state, and the states they are allowed in.
KILLABLE = frozenset({C, R, P})

_VERBS = {"start": "start", "pause": "pause", "resume": "resume", "delete": "delete"}


class Machine:
    """The state of one process, moved only by :meth:`fire`."""

    def __init__(self, table: dict[str, dict[Status, Status]], what: str) -> None:
        self.table = table
        self.what = what  # e.g. "task t1" or "exec e1 of task t1", for messages
        self.state = Status.CREATED

    def can(self, event: str) -> bool:
        return self.state in self.table[event]

    def check(self, event: str) -> None:
        """Raise the error containerd expects when ``event`` is illegal now.

        Raises:
            FailedPrecondition: e.g. starting a running process, deleting a running one.
            NotFound: the process was already deleted.
        """
        if self.state is Status.DELETED:
            raise errdefs.NotFound(f"{self.what}: deleted")
        if not self.can(event):
            raise errdefs.FailedPrecondition(
                f"{self.what}: cannot {_VERBS.get(event, event)} a "
                f"{self.state.name.lower()} process"
            )

    def fire(self, event: str) -> Status:
        """Apply ``event`` (after :meth:`check`) and return the new state."""
        self.check(event)
        self.state = self.table[event][self.state]
        return self.state

    def check_kill(self) -> None:
        """Kill is legal while the process may be alive.

        Raises:
            NotFound: the process has exited ("process already finished"), as containerd
                expects so that its kill paths tolerate it.
        """
        if self.state not in KILLABLE:
            raise errdefs.NotFound(f"{self.what}: process already finished")
