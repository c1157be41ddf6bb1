"""Each exec in a ``namespaces`` pod host runs in a cgroup of its own, made by the pod.

A diagnostic process (``podshim diag exec``, :mod:`podshim.host.namespaces.nsexec`) may
start others that leave its process group and session (``setsid``, a daemonizing
shell): killing the process group misses them. So every exec gets a cgroup
``podshim-exec-<n>`` in every hierarchy, made by the host just for it, and what lives
there is what the exec made. It is killed by that cgroup (SIGKILL to every process
listed, and ``cgroup.kill`` where a cgroup2 directory has one) when the exec's first
process exits, when the call is cancelled, when the host closes, and by the crash
cleanup after the shim died.

Where: below the sandbox cgroup's directory in each hierarchy (made or adopted: the
exec stays under the pod's limits), or, for a pod without a cgroup, below this process's
own cgroup there (as runc's cgroupfs driver places a relative path). The directories are
named in the pod's state directory (:data:`EXEC_RECORD`) before they are made and taken
out of the record once removed, so a crash cleanup kills and removes only these.

Standard library only: the ``delete`` action's crash cleanup imports it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
from collections.abc import Callable, Iterable

from podshim import errors as errdefs
from podshim.host.namespaces.cgroup import (
    Hierarchy,
    hierarchies,
    hierarchy_key,
    own_cgroups,
    try_rmdir,
)

#: in the pod's state directory: the exec cgroup directories that may exist (JSON list)
EXEC_RECORD = "exec-cgroups.json"
PREFIX = "podshim-exec-"


def cgroup_pids(dirs: Iterable[str]) -> set[int]:
    """Every process listed in the ``cgroup.procs`` of ``dirs`` (missing ones skipped)."""
    pids: set[int] = set()
    for d in dirs:
        try:
            with open(os.path.join(d, "cgroup.procs"), encoding="ascii") as f:
                pids.update(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return pids


def kill_cgroups(dirs: Iterable[str]) -> set[int]:
    """One round of killing what lives in ``dirs``: ``cgroup.kill`` where there is one
    (cgroup2, kernel >= 5.14: forks racing the kill are caught too), then SIGKILL to
    every process listed. Returns the pids that were listed (none: empty)."""
    dirs = list(dirs)
    for d in dirs:
        try:  # never O_CREAT: only a cgroup2 directory has this file
            fd = os.open(os.path.join(d, "cgroup.kill"), os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.write(fd, b"1")
        except OSError:
            pass
        finally:
            os.close(fd)
    pids = cgroup_pids(dirs)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def kill_and_rmdir_once(dirs: list[str]) -> tuple[list[str], list[str]]:
    """Kill what lives in ``dirs`` and rmdir them, deepest first. Returns the
    directories still there and the problems that are not just "busy"."""
    kill_cgroups(d for d in dirs if os.path.isdir(d))
    left: list[str] = []
    problems: list[str] = []
    for d in sorted(dirs, key=lambda d: d.count("/"), reverse=True):
        exc = try_rmdir(d)
        if exc is None:
            continue
        left.append(d)
        if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.EEXIST):
            problems.append(f"rmdir {d}: {exc.strerror}")
    return left, problems


def write_record(state_dir: str, dirs: list[str]) -> None:
    """Name the exec cgroup directories that may exist (atomically; none: no file)."""
    path = os.path.join(state_dir, EXEC_RECORD)
    if not dirs:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(sorted(dirs), f)
    os.replace(tmp, path)


def recorded(state_dir: str) -> list[str]:
    """What :func:`write_record` left: only directories named like an exec's."""
    try:
        with open(os.path.join(state_dir, EXEC_RECORD), encoding="utf-8") as f:
            dirs = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(dirs, list):
        return []
    return [
        d
        for d in dirs
        if isinstance(d, str) and d.startswith("/") and os.path.basename(d).startswith(PREFIX)
    ]


def own_parents() -> list[tuple[Hierarchy, str]]:
    """This process's own cgroup in every mounted hierarchy: the parents of exec
    cgroups of a pod without a cgroup of its own."""
    own = own_cgroups()
    out = []
    for h in hierarchies():
        mine = own.get(hierarchy_key(h))
        if mine is not None:
            out.append((h, os.path.join(h.mountpoint, mine.lstrip("/"))))
    return out


class ExecCgroup:
    """One exec's cgroup: a directory in each hierarchy."""

    def __init__(self, name: str, dirs: list[tuple[Hierarchy, str]]) -> None:
        self.name = name
        self.dirs = dirs

    @property
    def paths(self) -> list[str]:
        return [d for _h, d in self.dirs]

    def procs_files(self) -> tuple[str, ...]:
        return tuple(os.path.join(d, "cgroup.procs") for d in self.paths)

    def pids(self) -> set[int]:
        return cgroup_pids(self.paths)

    def kill(self) -> set[int]:
        return kill_cgroups(self.paths)


def _copy_cpuset(parent: str, child: str) -> None:
    for name in ("cpuset.cpus", "cpuset.mems"):
        src, dst = os.path.join(parent, name), os.path.join(child, name)
        with open(dst, encoding="ascii") as f:
            if f.read().strip():
                continue
        with open(src, encoding="ascii") as f:
            value = f.read().strip()
        with open(dst, "w", encoding="ascii") as f:
            f.write(value)


class ExecCgroups:
    """The exec cgroups of one pod host: made on demand, recorded, killed, removed.

    ``parents`` gives the directory per hierarchy the exec cgroups go below (called for
    each exec: the sandbox cgroup may be made after this object)."""

    def __init__(
        self,
        pod_id: str,
        state_dir: str,
        parents: Callable[[], list[tuple[Hierarchy, str]]],
    ) -> None:
        self.pod_id = pod_id
        self.state_dir = state_dir
        self._parents = parents
        self._seq = 0
        #: name -> exec cgroup, while any of its directories may exist
        self.live: dict[str, ExecCgroup] = {}

    def _record(self) -> None:
        write_record(self.state_dir, [d for cg in self.live.values() for d in cg.paths])

    def make(self) -> ExecCgroup:
        """Record, then make, a new exec cgroup in every hierarchy of the parents.

        Raises:
            FailedPrecondition: there is no cgroup hierarchy to make it in.
            Internal: a directory could not be made (what was made is removed).
        """
        parents = self._parents()
        if not parents:
            raise errdefs.FailedPrecondition(
                f"pod {self.pod_id}: no cgroup hierarchy to track an exec's processes in"
            )
        self._seq += 1
        # the pod's id too: without a sandbox cgroup, pods of one parent share it
        name = f"{PREFIX}{self.pod_id}-{self._seq}"
        cg = ExecCgroup(name, [(h, os.path.join(p, name)) for h, p in parents])
        self.live[name] = cg
        made: list[tuple[Hierarchy, str]] = []
        try:
            self._record()  # named before it is made: a crash cleanup removes only these
            for (h, parent), d in zip(parents, cg.paths, strict=True):
                os.mkdir(d, 0o755)  # EEXIST: somebody else's, never touched
                made.append((h, d))
                if h.version == 1 and "cpuset" in h.controllers:
                    _copy_cpuset(parent, d)
        except OSError as exc:
            cg.dirs = made  # only what this call made is ours to remove
            left, _ = kill_and_rmdir_once(cg.paths)
            cg.dirs = [(h, d) for h, d in made if d in left]
            if not left:
                del self.live[name]
            with contextlib.suppress(OSError):
                self._record()
            raise errdefs.Internal(
                f"pod {self.pod_id}: make the cgroup of an exec: {exc.strerror or exc}"
            ) from exc
        return cg

    def remove_once(self, cg: ExecCgroup) -> list[str]:
        """Kill what lives in ``cg`` and remove its directories; returns problems
        (busy directories named). Forgotten (and out of the record) once gone."""
        left, problems = kill_and_rmdir_once(cg.paths)
        if left:
            cg.dirs = [(h, d) for h, d in cg.dirs if d in left]
            return problems or [f"cgroup of an exec still busy: {left}"]
        self.live.pop(cg.name, None)
        try:
            self._record()
        except OSError as exc:
            return [f"record {EXEC_RECORD} in {self.state_dir}: {exc.strerror or exc}"]
        return []

    def kill_all(self) -> None:
        for cg in list(self.live.values()):
            cg.kill()

    async def remove(self, cg: ExecCgroup, timeout: float) -> list[str]:
        """:meth:`remove_once` until it is gone or ``timeout`` passed; returns problems."""
        import asyncio  # not at the top: the `delete` action imports this module

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.01
        while True:
            problems = self.remove_once(cg)
            if not problems or loop.time() >= deadline:
                return problems
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def close(self, timeout: float) -> list[str]:
        """Kill and remove every exec cgroup; returns problems (what is still busy)."""
        self.kill_all()
        problems: list[str] = []
        for cg in list(self.live.values()):
            problems += await self.remove(cg, timeout)
        return problems
