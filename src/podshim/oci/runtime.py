"""The OCI runtime driver contract: what a container needs of runc (or crun, or a fake).

:class:`~podshim.oci.runc.Runc` drives a real binary; the tests' fake driver records the
calls and runs real child processes, so a :class:`~podshim.task.container.Container`
passes the same Task contract tests with either. A container receives its driver from
whoever makes it (see :data:`OciFactory`): it never builds one itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from podshim import rundir


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Which OCI runtime binary to run and where it keeps its state."""

    binary: str = "runc"
    root: str = field(default_factory=rundir.runtime_root)
    systemd_cgroup: bool = False
    no_pivot_root: bool = False
    no_new_keyring: bool = False


class OciRuntime(Protocol):
    """One OCI runtime bound to a containerd namespace and a bundle's log.

    Every method raises :mod:`podshim.errors` kinds: NotFound when the runtime does not
    know the container (any more), FailedPrecondition when the binary is missing,
    Unknown with the runtime's own message otherwise. Processes the runtime starts are
    children (or re-parented orphans) of the shim: their exits MUST reach the shim's one
    reaper, never be waited for by the driver.

    A call cancelled while the runtime works MUST NOT end before the runtime command
    has finished (or, for a read-only one, was killed) and been reaped: the caller
    undoes what the command did, so it must be done doing it. A driver that spawns no
    command may finish synchronously.
    """

    #: binary and root, recorded in the bundle so ``delete`` can clean up without us
    cfg: RuntimeConfig

    async def create(
        self,
        cid: str,
        bundle: str,
        pid_file: str,
        stdio: tuple[int, int, int],
        console_socket: str | None = None,
    ) -> None:
        """Create the container from ``bundle``; its init MUST exist (blocked before
        the user process) when this returns, with its pid written to ``pid_file``."""
        ...

    async def start(self, cid: str) -> None:
        """Let the created init run the user process."""
        ...

    async def exec(
        self,
        cid: str,
        process_json: str,
        pid_file: str,
        stdio: tuple[int, int, int],
        console_socket: str | None = None,
    ) -> None:
        """Start the OCI process in the file ``process_json`` inside the container; its
        pid MUST be in ``pid_file`` when this returns."""
        ...

    async def kill(self, cid: str, signal: int, all_: bool = False) -> None:
        """Signal the init (``all_``: every process of the container)."""
        ...

    async def delete(self, cid: str, force: bool = False) -> None:
        """Forget the container (``force``: kill what is left first)."""
        ...

    def exists(self, cid: str) -> bool:
        """Whether the runtime holds state for ``cid`` in this namespace, whoever made
        it. A Create MUST check this first and leave such a container alone."""
        ...

    async def pause(self, cid: str) -> None: ...

    async def resume(self, cid: str) -> None: ...

    async def ps(self, cid: str) -> list[int]:
        """Host pids of every process of the container."""
        ...

    async def update(self, cid: str, resources: dict[str, Any]) -> None:
        """Apply OCI LinuxResources."""
        ...


#: makes the driver of one container: (runtime settings, bundle) -> driver
OciFactory = Callable[[RuntimeConfig, str], OciRuntime]
