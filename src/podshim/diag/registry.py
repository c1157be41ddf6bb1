"""The registry of live podshim shims, and how ``podshim diag`` finds one by pod id.

Every shim daemon writes one entry when it starts serving and removes it when it exits
(SIGTERM included)::

    <run dir>/shims/<sha256(socket path)>.json      run dir: $PODSHIM_RUN_DIR or /run/podshim

holding the containerd address and namespace, the shim's id (its first task), the pod
id once a sandbox was created, its pid and that pid's start time, its socket and when it
started. A crashed shim leaves its entry behind: readers skip an entry whose pid is dead,
is a different process (start time) or is not a podshim shim (command line), and
:meth:`Registry.entries` prunes it. ``podshim diag`` only ever talks to sockets named
here, never to other runtimes' sockets.

Pod ids match by unique prefix, like hcsshim's shimdiag: an exact id wins, else exactly
one entry must start with the prefix. ``<namespace>/<prefix>`` narrows to a namespace.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

from podshim import rundir
from podshim.linux.proc import start_time

log = logging.getLogger("podshim.diag.registry")

VERSION = 1


def registry_dir() -> str:
    """``$PODSHIM_RUN_DIR/shims`` (read now, not at import), else /run/podshim/shims."""
    return rundir.registry_dir()


def entry_name(socket: str) -> str:
    return rundir.digest(socket) + ".json"


def is_podshim(pid: int, proc: str = "/proc") -> bool:
    """Whether ``pid`` runs podshim (console script or ``python -m podshim...``)."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            return b"podshim" in f.read()
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class Entry:
    """One serving shim."""

    address: str  # containerd's address, as the shim got it (-address)
    namespace: str
    id: str  # the shim's id: its first task (the sandbox, for a CRI pod)
    pod_id: str  # the sandbox id once a sandbox was created, else ""
    pid: int
    socket: str
    started: float  # unix time
    starttime: int = 0  # /proc start time of pid, to tell a reused pid apart

    @property
    def name(self) -> str:
        """What ``podshim diag`` shows and matches: the pod id, else the shim's id."""
        return self.pod_id or self.id

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Entry:
        """Raises ValueError for anything that is not a version-1 entry."""
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("version") != VERSION:
            raise ValueError("not a podshim shim registry entry")
        try:
            return cls(
                address=str(raw["address"]),
                namespace=str(raw["namespace"]),
                id=str(raw["id"]),
                pod_id=str(raw.get("pod_id") or ""),
                pid=int(raw["pid"]),
                socket=str(raw["socket"]),
                started=float(raw["started"]),
                starttime=int(raw.get("starttime") or 0),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad registry entry: {exc}") from None


class NoShim(LookupError):
    """No live shim matches."""


class AmbiguousShim(LookupError):
    """More than one live shim matches; ``candidates`` are they."""

    def __init__(self, message: str, candidates: list[Entry]) -> None:
        super().__init__(message)
        self.candidates = candidates


def _same_address(a: str, b: str) -> bool:
    return a.removeprefix("unix://") == b.removeprefix("unix://")


def narrow(entries: Iterable[Entry], *, address: str = "", namespace: str = "") -> list[Entry]:
    """The entries of the containerd at ``address`` and of ``namespace`` ("" = any)."""
    return [
        e
        for e in entries
        if (not address or _same_address(e.address, address))
        and (not namespace or e.namespace == namespace)
    ]


def select(
    entries: Iterable[Entry], query: str, *, address: str = "", namespace: str = ""
) -> Entry:
    """The one entry ``query`` names: an exact pod (or shim) id, else a unique prefix.

    ``query`` may be ``<namespace>/<prefix>``. ``address`` and ``namespace`` (when
    non-empty) restrict the candidates.

    Raises:
        NoShim: nothing matches.
        AmbiguousShim: several entries match and none exactly.
    """
    ns, sep, prefix = query.rpartition("/")
    if sep and namespace and ns != namespace:
        raise NoShim(f"{query!r} names namespace {ns!r}, but --namespace is {namespace!r}")
    namespace = ns if sep else namespace
    pool = narrow(entries, address=address, namespace=namespace)
    exact = [e for e in pool if prefix in (e.pod_id, e.id)]
    if len(exact) == 1:
        return exact[0]
    found = exact or [e for e in pool if e.name.startswith(prefix) or e.id.startswith(prefix)]
    if len(found) == 1:
        return found[0]
    where = f" in namespace {namespace!r}" if namespace else ""
    if not found:
        raise NoShim(f"no live podshim shim matches {prefix!r}{where}")
    names = ", ".join(f"{e.namespace}/{e.name}" for e in sorted(found, key=_order))
    raise AmbiguousShim(f"pod id {prefix!r} is ambiguous{where}: matches {names}", found)


def _order(e: Entry) -> tuple[str, str, int]:
    return e.namespace, e.name, e.pid


class Registry:
    """The entries in ``directory`` (default :func:`registry_dir`).

    ``proc`` is where pids are checked (tests point it at a fake /proc).
    """

    def __init__(self, directory: str | None = None, *, proc: str = "/proc") -> None:
        self.directory = directory or registry_dir()
        self.proc = proc

    def is_live(self, entry: Entry) -> bool:
        """The entry's pid is alive, the same process that registered, and podshim."""
        started = start_time(entry.pid, self.proc)
        if started is None or (entry.starttime and started != entry.starttime):
            return False
        return is_podshim(entry.pid, self.proc)

    def entries(self, *, prune: bool = True) -> list[Entry]:
        """Every live shim's entry, sorted by namespace and name. Stale and unreadable
        entries are skipped and, with ``prune``, removed."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        live: list[Entry] = []
        for name in names:
            if name.startswith(".") or not name.endswith(".json"):
                continue
            path = os.path.join(self.directory, name)
            try:
                with open(path, encoding="utf-8") as f:
                    entry = Entry.from_json(f.read())
            except FileNotFoundError:
                continue  # removed by its shim meanwhile
            except (OSError, ValueError) as exc:
                log.warning("registry entry %s is unreadable: %s", path, exc)
                entry = None
            if entry is not None and self.is_live(entry):
                live.append(entry)
            elif prune:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return sorted(live, key=_order)

    def find(self, query: str, *, address: str = "", namespace: str = "") -> Entry:
        """:func:`select` over the live entries (pruning stale ones)."""
        return select(self.entries(), query, address=address, namespace=namespace)


class Registration:
    """A shim's own entry: written when it starts serving, updated when its pod is
    created, removed when it exits. Failures are logged, never raised: diagnostics must
    not break a shim."""

    def __init__(self, entry: Entry, directory: str | None = None) -> None:
        self.entry = entry
        self.directory = directory or registry_dir()
        self.path = os.path.join(self.directory, entry_name(entry.socket))

    @classmethod
    def for_this_process(
        cls, address: str, namespace: str, shim_id: str, socket: str, directory: str | None = None
    ) -> Registration:
        pid = os.getpid()
        entry = Entry(address, namespace, shim_id, "", pid, socket, time.time(),
                      start_time(pid) or 0)  # fmt: skip
        return cls(entry, directory)

    def write(self) -> None:
        tmp = os.path.join(self.directory, f".{os.path.basename(self.path)}.{os.getpid()}")
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(self.entry.to_json() + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot register in %s: %s", self.directory, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def set_pod(self, pod_id: str) -> None:
        """Record the pod id (rewrites the entry only when it changed)."""
        if pod_id != self.entry.pod_id:
            self.entry = replace(self.entry, pod_id=pod_id)
            self.write()

    def remove(self) -> None:
        """Remove the entry if it is still ours (a successor may have replaced it)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                mine = Entry.from_json(f.read()).pid == self.entry.pid
            if mine:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("cannot unregister %s: %s", self.path, exc)
