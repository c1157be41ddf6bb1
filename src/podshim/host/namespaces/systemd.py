"""The pod's cgroup as a systemd scope (``systemd_cgroup = true``), as runc's systemd driver.

With the systemd cgroup driver, ``linux.cgroupsPath`` is ``slice:prefix:name``
(``kubepods-burstable-pod1.slice:cri-containerd:<id>``) and the cgroup is a transient
unit that systemd makes: runc asks systemd's manager on D-Bus to
``StartTransientUnit("<prefix>-<name>.scope", "replace", properties, [])`` with the
container's pid, waits for the job's ``JobRemoved`` signal, and on removal calls
``StopUnit``. podshim asks for the same unit with the same properties
(:func:`unit_properties`) for the pod's own process, the PID-namespace init. A pod
without a process of its own has nothing for a scope to hold (systemd refuses a scope
without pids): its containers still get their scopes from runc in the same slice.

Other v1 hierarchies that systemd does not manage (``cpuset``, ``freezer``, ...) get
the unit's directory made by us and the init put there, as runc's driver does.

There is no systemd on the development machines: the tests drive this module against a
D-Bus peer of their own (``tests/unit/test_systemd_cgroup.py``) and check a clear
FailedPrecondition when no bus answers. The D-Bus client is ``jeepney`` (pure Python,
imported only when a pod uses this driver).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from podshim import errors as errdefs
from podshim.cgroups import expand_cgroups_path
from podshim.host.namespaces.cgroup import (
    DEFAULT_ROOT,
    Hierarchy,
    Resources,
    hierarchies,
    shares_to_weight,
    try_rmdir,
)

if TYPE_CHECKING:
    from jeepney.io.asyncio import DBusRouter

log = logging.getLogger("podshim.host.namespaces.systemd")

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
#: the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` overrides it, as for every D-Bus client)
DEFAULT_BUS = "unix:path=/run/dbus/system_bus_socket"
#: how long a start or stop job may take (runc waits 30 s too)
JOB_TIMEOUT = 30.0
#: ``USEC_INFINITY`` / ``CGROUP_LIMIT_MAX``: no limit
INFINITY = 2**64 - 1
#: v1 controllers systemd manages itself (the others get our own directories)
SYSTEMD_V1 = frozenset({"cpu", "cpuacct", "memory", "blkio", "pids", "devices", "name=systemd"})

Property = tuple[str, tuple[str, Any]]


@dataclass(frozen=True, slots=True)
class Unit:
    """A ``slice:prefix:name`` cgroups path as runc's systemd driver reads it."""

    slice: str
    name: str  # the unit: ``<prefix>-<name>.scope``, or a ``.slice`` name as is
    path: str  # its cgroup below each hierarchy's root

    @property
    def is_slice(self) -> bool:
        return self.name.endswith(".slice")


def parse_unit(cgroups_path: str, pod_id: str = "") -> Unit:
    """The unit for ``slice:prefix:name``. InvalidArgument for any other shape (runc's
    systemd driver refuses it too) or a slice name systemd would not take."""
    parts = cgroups_path.split(":") if isinstance(cgroups_path, str) else []
    if len(parts) != 3 or not parts[2] or any("/" in p for p in parts):
        raise errdefs.InvalidArgument(
            f"cgroupsPath {cgroups_path!r} of pod {pod_id} is not of the form "
            '"slice:prefix:name" that systemd_cgroup = true needs'
        )
    slice_name = parts[0]
    try:
        path = expand_cgroups_path(cgroups_path)
    except ValueError as exc:
        raise errdefs.InvalidArgument(f"cgroupsPath of pod {pod_id}: {exc}") from None
    return Unit(slice_name or "system.slice", posixpath.basename(path), path)


def cpu_quota_per_sec(quota: int | None, period: int | None) -> int | None:
    """``CPUQuotaPerSecUSec`` for a CFS quota and period (microseconds), rounded up to
    whole 10 ms as runc does (systemd keeps the quota as a CPU percentage)."""
    if quota is None and period is None:
        return None
    if quota is None or quota < 0:
        return INFINITY
    per_sec = quota * 1_000_000 // (period or 100_000)
    if per_sec % 10_000:
        per_sec = (per_sec // 10_000 + 1) * 10_000
    return per_sec


def unit_properties(
    unit: Unit, pid: int, res: Resources, *, unified: bool, pod_id: str
) -> list[Property]:
    """The properties of ``StartTransientUnit`` (``a(sv)``), as runc's systemd driver
    sends them for a container: where the unit goes, its pid, accounting, limits."""
    props: list[Property] = [("Description", ("s", f"podshim pod {pod_id}"))]
    if unit.is_slice:
        props.append(("Wants", ("as", [unit.slice])))
    else:
        props += [("Slice", ("s", unit.slice)), ("Delegate", ("b", True))]
    props += [
        ("PIDs", ("au", [pid])),
        ("MemoryAccounting", ("b", True)),
        ("CPUAccounting", ("b", True)),
        ("IOAccounting" if unified else "BlockIOAccounting", ("b", True)),
        ("TasksAccounting", ("b", True)),
        ("DefaultDependencies", ("b", False)),
    ]
    if res.cpu_shares is not None:
        if unified:
            props.append(("CPUWeight", ("t", shares_to_weight(res.cpu_shares))))
        else:
            props.append(("CPUShares", ("t", res.cpu_shares)))
    if res.cpu_period is not None:
        props.append(("CPUQuotaPeriodUSec", ("t", res.cpu_period)))
    per_sec = cpu_quota_per_sec(res.cpu_quota, res.cpu_period)
    if per_sec is not None:
        props.append(("CPUQuotaPerSecUSec", ("t", per_sec)))
    if res.memory_limit is not None:
        limit = INFINITY if res.memory_limit < 0 else res.memory_limit
        props.append(("MemoryMax" if unified else "MemoryLimit", ("t", limit)))
    return props


def bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_BUS


class SystemdScope:
    """The pod's cgroup as a transient systemd unit (same methods as
    :class:`~podshim.host.namespaces.cgroup.SandboxCgroup`)."""

    def __init__(self, cgroups_path: str, *, pod_id: str = "", root: str = DEFAULT_ROOT) -> None:
        self.unit = parse_unit(cgroups_path, pod_id)
        self.path = self.unit.path
        self.pod_id = pod_id
        self._hier = hierarchies(root)
        self._res = Resources()
        self._stack: contextlib.AsyncExitStack | None = None
        self._router: DBusRouter | None = None
        self._started = False
        #: leaf directory per hierarchy, once the unit holds the init
        self.dirs: list[tuple[Hierarchy, str]] = []
        self._made: list[str] = []  # directories of hierarchies systemd does not manage
        self.adopted: list[str] = []

    @property
    def version(self) -> int:
        return 2 if len(self._hier) == 1 and self._hier[0].version == 2 else 1

    def planned(self) -> list[str]:
        return []  # systemd makes and removes the unit's directories

    async def create(self) -> None:
        """Connect to systemd (nothing is made before the pod has a process).
        FailedPrecondition naming the bus when systemd cannot be reached."""
        try:
            from jeepney.io.asyncio import DBusRouter, open_dbus_connection
        except ImportError as exc:
            raise errdefs.FailedPrecondition(
                f"systemd_cgroup = true needs the jeepney package: {exc}"
            ) from None
        address = bus_address()
        stack = contextlib.AsyncExitStack()
        try:
            conn = await asyncio.wait_for(open_dbus_connection(address), 10)
            stack.push_async_callback(conn.close)
            self._router = await stack.enter_async_context(DBusRouter(conn))
            await self._call("Subscribe", "", ())
        except (OSError, EOFError, TimeoutError, ValueError, errdefs.ShimError) as exc:
            await stack.aclose()
            self._router = None
            raise errdefs.FailedPrecondition(
                f"pod {self.pod_id}: systemd_cgroup = true but systemd is not reachable on "
                f"D-Bus at {address}: {exc or type(exc).__name__}; set systemd_cgroup = "
                "false (and SystemdCgroup = false in containerd) on hosts without systemd"
            ) from None
        self._stack = stack

    def apply(self, res: Resources) -> None:
        """Remember the limits: they go to systemd as properties of the unit."""
        self._res = res

    async def add(self, pid: int) -> None:
        """Start the unit holding ``pid`` (the first time), or move ``pid`` into it."""
        if self._started:
            for _h, d in self.dirs:
                _write_pid(d, pid)
            return
        props = unit_properties(
            self.unit, pid, self._res, unified=self.version == 2, pod_id=self.pod_id
        )
        await self._job(
            "StartTransientUnit", "ssa(sv)a(sa(sv))", (self.unit.name, "replace", props, [])
        )
        self._started = True
        for h in self._hier:
            d = posixpath.join(h.mountpoint, self.path.lstrip("/"))
            if h.version == 1 and not (h.controllers & SYSTEMD_V1) and not os.path.isdir(d):
                with contextlib.suppress(FileExistsError):
                    os.makedirs(d, 0o755)  # parents are systemd's slices, already there
                    self._made.append(d)
                _write_pid(d, pid)
            if os.path.isdir(d):
                self.dirs.append((h, d))

    async def remove(self, timeout: float = 10.0) -> list[str]:
        """Stop the unit (systemd kills what is left and removes it) and disconnect.
        Never raises; returns the directories still there."""
        left: list[str] = []
        try:
            if self._started:
                await asyncio.wait_for(
                    self._job("StopUnit", "ss", (self.unit.name, "replace")), timeout
                )
                self._started = False
            for d in reversed(self._made):
                exc = try_rmdir(d)
                if exc is not None:
                    if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                        log.warning("rmdir %s: %s", d, exc)
                    left.append(d)
            self._made = left
        except (errdefs.ShimError, TimeoutError, OSError) as exc:
            log.error("pod %s: stop unit %s: %s", self.pod_id, self.unit.name, exc)
            left = [d for _h, d in self.dirs] or [self.unit.name]
        finally:
            if self._stack is not None:
                await self._stack.aclose()
                self._stack, self._router = None, None
        if not left:
            self.dirs = []
        return left

    def exists(self) -> bool:
        return any(os.path.isdir(d) for _h, d in self.dirs)

    # -- D-Bus -------------------------------------------------------------------

    async def _call(self, method: str, signature: str, body: tuple[Any, ...]) -> tuple[Any, ...]:
        from jeepney import DBusAddress, new_method_call
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg

        assert self._router is not None
        manager = DBusAddress(MANAGER_PATH, bus_name=SYSTEMD, interface=MANAGER)
        msg = new_method_call(manager, method, signature or None, body)
        reply = await asyncio.wait_for(self._router.send_and_get_reply(msg), JOB_TIMEOUT)
        try:
            out: tuple[Any, ...] = unwrap_msg(reply)
        except DBusErrorResponse as exc:
            if exc.name == "org.freedesktop.systemd1.UnitExists":
                raise errdefs.AlreadyExists(f"systemd unit {self.unit.name}: {exc}") from None
            raise errdefs.FailedPrecondition(f"systemd {method}: {exc}") from None
        return out

    async def _job(self, method: str, signature: str, body: tuple[Any, ...]) -> None:
        """Call a manager method that queues a job and wait for the job's result."""
        from jeepney import MatchRule

        assert self._router is not None
        fields = {"type": "signal", "interface": MANAGER, "member": "JobRemoved"}
        # the bus matches systemd's well-known name; the signals we receive carry its
        # unique name as sender, so the local filter leaves the sender out
        bus_rule = MatchRule(sender=SYSTEMD, path=MANAGER_PATH, **fields)
        local_rule = MatchRule(path=MANAGER_PATH, **fields)
        with self._router.filter(local_rule, bufsize=64) as queue:
            from jeepney.bus_messages import message_bus

            await self._router.send_and_get_reply(message_bus.AddMatch(bus_rule))
            (job,) = await self._call(method, signature, body)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + JOB_TIMEOUT
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise errdefs.DeadlineExceeded(f"systemd job {job} of {method} timed out")
                signal = await asyncio.wait_for(queue.get(), remaining)
                _id, path, unit, result = signal.body
                if path != job:
                    continue
                if result != "done":
                    raise errdefs.FailedPrecondition(
                        f"systemd {method} {unit}: job ended {result!r}"
                    )
                return


def _write_pid(directory: str, pid: int) -> None:
    with open(os.path.join(directory, "cgroup.procs"), "w", encoding="ascii") as f:
        f.write(str(pid))
