"""Every state machine of podshim, as explicit tables, in this one file.

Every legal move is one row below; anything else is refused with the error kind
containerd expects (:class:`Machine`) or, for lifecycles that are not processes, with
FailedPrecondition (:class:`Lifecycle`): one error kind per kind of refusal, everywhere.
Rule: code changes a state only through ``fire``, so this file is the whole story of
which transitions exist. Verbs are an Enum (:class:`Verb`); states are Enums.

* process status tables: a container's init (:data:`INIT_TABLE`), an exec
  (:data:`EXEC_TABLE`), the pod sandbox's fake init (:data:`SANDBOX_INIT_TABLE`);
* lifecycles: a pod host (:data:`HOST_TABLE`), the event publisher
  (:data:`PUBLISHER_TABLE`).
"""

from __future__ import annotations

import enum
from typing import Generic, TypeVar

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


class Verb(enum.StrEnum):
    """What can happen to a state machine (the rows of the tables)."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    EXIT = "exit"
    DELETE = "delete"
    # lifecycles
    CREATE = "create"
    READY = "ready"
    FAIL = "fail"
    CLOSE = "close"
    CLOSED = "closed"


C, R, S, P, D = Status.CREATED, Status.RUNNING, Status.STOPPED, Status.PAUSED, Status.DELETED

Table = dict[Verb, dict[Status, Status]]

#: a container's init process
INIT_TABLE: Table = {
    Verb.START: {C: R},
    Verb.PAUSE: {R: P},
    Verb.RESUME: {P: R},
    Verb.EXIT: {C: S, R: S, P: S},
    Verb.DELETE: {C: D, S: D},
}

#: an exec'd process
EXEC_TABLE: Table = {
    Verb.START: {C: R},
    Verb.EXIT: {C: S, R: S},
    Verb.DELETE: {C: D, S: D},
}

#: the pod sandbox's fake init (the seed's wcowPodSandboxExec)
SANDBOX_INIT_TABLE: Table = {
    Verb.START: {C: R},
    Verb.EXIT: {C: S, R: S},
    Verb.DELETE: {C: D, S: D},
}

#: Operations that do not change state, and the states they are allowed in.
KILLABLE = frozenset({C, R, P})


class Machine:
    """The state of one process, moved only by :meth:`fire`."""

    def __init__(self, table: Table, what: str) -> None:
        self.table = table
        self.what = what  # e.g. "task t1" or "exec e1 of task t1", for messages
        self.state = Status.CREATED

    def can(self, verb: Verb) -> bool:
        return self.state in self.table[verb]

    def check(self, verb: Verb) -> None:
        """Raise the error containerd expects when ``verb`` is illegal now.

        Raises:
            FailedPrecondition: e.g. starting a running process, deleting a running one.
            NotFound: the process was already deleted.
        """
        if self.state is Status.DELETED:
            raise errdefs.NotFound(f"{self.what}: deleted")
        if not self.can(verb):
            raise errdefs.FailedPrecondition(
                f"{self.what}: cannot {verb.value} a {self.state.name.lower()} process"
            )

    def fire(self, verb: Verb) -> Status:
        """Apply ``verb`` (after :meth:`check`) and return the new state."""
        self.check(verb)
        self.state = self.table[verb][self.state]
        return self.state

    def check_kill(self) -> None:
        """Kill is legal while the process may be alive.

        Raises:
            NotFound: the process has exited ("process already finished"), as containerd
                expects so that its kill paths tolerate it.
        """
        if self.state not in KILLABLE:
            raise errdefs.NotFound(f"{self.what}: process already finished")


# -- lifecycles that are not processes ---------------------------------------------------


class HostState(enum.Enum):
    NEW = "new"
    CREATING = "creating"
    READY = "ready"
    CLOSING = "closing"
    CLOSED = "closed"


#: a pod host: created once; a failed create closes it (its undo ran); closing is final
HOST_TABLE: dict[Verb, dict[HostState, HostState]] = {
    Verb.CREATE: {HostState.NEW: HostState.CREATING},
    Verb.READY: {HostState.CREATING: HostState.READY},
    Verb.FAIL: {HostState.CREATING: HostState.CLOSED},
    Verb.CLOSE: {
        HostState.NEW: HostState.CLOSING,
        HostState.READY: HostState.CLOSING,
        HostState.CLOSING: HostState.CLOSING,
        HostState.CLOSED: HostState.CLOSED,
    },
    Verb.CLOSED: {HostState.CLOSING: HostState.CLOSED, HostState.CLOSED: HostState.CLOSED},
}


class PublisherState(enum.Enum):
    IDLE = "idle"  # made, nothing sent yet (no I/O in the constructor)
    SENDING = "sending"  # its sender job runs
    CLOSED = "closed"  # flushed and stopped: later events are dropped


#: the event publisher
PUBLISHER_TABLE: dict[Verb, dict[PublisherState, PublisherState]] = {
    Verb.START: {PublisherState.IDLE: PublisherState.SENDING},
    Verb.CLOSE: {
        PublisherState.IDLE: PublisherState.CLOSED,
        PublisherState.SENDING: PublisherState.CLOSED,
        PublisherState.CLOSED: PublisherState.CLOSED,
    },
}

E = TypeVar("E", bound=enum.Enum)


class Lifecycle(Generic[E]):
    """The state of something that is not a process (a host, the publisher), moved only
    by :meth:`fire`; an illegal move is FailedPrecondition naming it."""

    def __init__(self, table: dict[Verb, dict[E, E]], initial: E, what: str) -> None:
        self.table, self.state, self.what = table, initial, what

    def can(self, verb: Verb) -> bool:
        return self.state in self.table[verb]

    def fire(self, verb: Verb) -> E:
        if not self.can(verb):
            raise errdefs.FailedPrecondition(
                f"{self.what} is {self.state.value}: cannot {verb.value}"
            )
        self.state = self.table[verb][self.state]
        return self.state
