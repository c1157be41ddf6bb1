"""The ``namespaces`` pod host: the pod's namespaces and cgroup, without a pause process.

What :meth:`NamespacesHost.create` builds, from the sandbox's OCI spec (the config.json
CRI wrote for the pod sandbox):

* the pod's IPC and UTS namespaces (when the spec lists them), created by
  ``unshare --ipc=<pin> --uts=<pin>`` and *pinned* by the bind mounts util-linux makes
  on empty files in the host's state directory ``<state_root>/<namespace>/<pod id>``
  (not in the bundle); the spec's ``hostname`` is set in the new UTS namespace. No
  process stays behind to hold them;
* the network namespace: the one CRI made (``network`` with a ``path``, never touched
  by podshim beyond sysctls), or a new one pinned like the others (with ``lo`` up, as
  runc does) when the spec asks for a network namespace without a path;
* ``linux.sysctl``: ``net.*`` inside the pod's network namespace, the IPC ones
  (``kernel.shm*``, ``kernel.msg*``, ``kernel.sem``, ``fs.mqueue.*``) inside the pinned
  IPC namespace, ``kernel.domainname`` in the UTS one; anything else, or a sysctl of a
  namespace the pod shares with the host, is refused the way runc refuses it;
* the sandbox cgroup ``linux.cgroupsPath`` with the sandbox's CPU/memory limits
  (:mod:`podshim.host.namespaces.cgroup`).

The spec is validated completely before anything is made, and a failure half-way undoes
everything made so far.

When a workload shares the pod's PID namespace, the first :meth:`namespace_path` call for
"pid" starts ``podshim-init`` (``podshim-init.c`` next to this file, built into the
wheel): it joins the pod's network, IPC and UTS namespaces, becomes PID 1
of a new PID namespace, and is put in the sandbox cgroup with the spec's
``oomScoreAdj`` (raised only). Its exit is the host's death (:meth:`wait`). The init runs
with no capabilities at all (bounding set empty), ``no_new_privs``, not dumpable, no open
fds and an empty read-only tmpfs as its root; all it does is reap orphans and wait for
SIGTERM. The sandbox spec's seccomp profile and AppArmor/SELinux labels are **not**
applied to it; confining it with the pod's seccomp profile is future work.

Every helper process (``unshare``, ``nsenter``, ``podshim-init``) runs through the shim's
reaper; the shim never calls unshare(2)/setns(2) itself (it is multi-threaded). The init
is reparented to the shim (a child subreaper) when its launcher exits, and watched with
:meth:`Reaper.watch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import shutil
import signal
import sys
from typing import Any

from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim import rundir
from podshim.cgroups import stats as cgstats
from podshim.cgroups import v1 as cgroup_v1
from podshim.cgroups import v2 as cgroup_v2
from podshim.host.contract import Workload, WorkloadRequest
from podshim.host.control import ExecControl
from podshim.host.local import LocalWorkloads
from podshim.host.namespaces import nsexec
from podshim.host.namespaces.cgroup import (
    CGROUP_RECORD,
    SandboxCgroup,
    record_cgroup_dirs,
)
from podshim.host.namespaces.cleanup import INIT_RECORD, record_init
from podshim.host.namespaces.plan import PIN_FILES, Plan, plan_from_spec
from podshim.host.namespaces.systemd import SystemdScope
from podshim.linux import mount
from podshim.linux.reaper import Exit, Reaper
from podshim.task.contract import ShimContext
from podshim.task.states import HOST_TABLE, HostState, Lifecycle, Verb

log = logging.getLogger("podshim.host.namespaces.host")

INIT_NAME = "podshim-init"


#: how long close() waits for the killed init to be reaped, and for cgroups to empty
KILL_TIMEOUT = 10.0
CGROUP_TIMEOUT = 10.0

_PR_GET_CHILD_SUBREAPER = 37


#: where the build (setup.py) puts podshim-init: next to this module, in the package
PACKAGED_INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), INIT_NAME)


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_init_binary(explicit: str | None = None) -> str:
    """``explicit``, else the one built into the installed package, else ``podshim-init``
    on PATH, else next to ``sys.executable``."""
    if explicit:
        if _executable(explicit):
            return explicit
        raise errdefs.FailedPrecondition(f"podshim-init not found at {explicit}")
    if _executable(PACKAGED_INIT):
        return PACKAGED_INIT
    found = shutil.which(INIT_NAME)
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), INIT_NAME)
    if _executable(beside):
        return beside
    raise errdefs.FailedPrecondition(
        f"podshim-init not found (not at {PACKAGED_INIT}, nor on PATH, nor beside "
        f"{sys.executable}): install podshim from its wheel or sdist, which compile it "
        "(a C compiler is needed), or run scripts/install.sh in a checkout"
    )


def _tool(name: str, package: str = "util-linux") -> str:
    found = shutil.which(name)
    if not found:
        raise errdefs.FailedPrecondition(f"{name} not found on PATH ({package} is needed)")
    return found


def _is_child_subreaper() -> bool:
    """Whether this process is a child subreaper (a read-only prctl, thread-safe)."""
    libc = ctypes.CDLL(None, use_errno=True)
    value = ctypes.c_int(0)
    if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0) != 0:
        return False
    return value.value != 0


def _check_component(value: str, what: str) -> None:
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise errdefs.InvalidArgument(f"{what} {value!r} cannot name a directory")


def _stderr(data: bytes) -> str:
    return data.decode(errors="replace").strip() or "(no output)"


class NamespacesHost:
    """The pod's namespaces and cgroup (see the module docstring)."""

    kind = "namespaces"

    def __init__(
        self,
        pod_id: str,
        namespace: str,
        spec: dict[str, Any],
        reaper: Reaper,
        *,
        state_root: str | None = None,
        init_binary: str | None = None,
        systemd_cgroup: bool = False,
    ) -> None:
        self.pod_id = pod_id
        self.namespace = namespace
        self._spec = spec
        self._reaper = reaper
        self.state_dir = os.path.join(state_root or rundir.pods_dir(), namespace, pod_id)
        self._init_binary = init_binary
        self._systemd_cgroup = systemd_cgroup
        self._plan: Plan | None = None
        #: NEW -> CREATING -> READY -> CLOSING -> CLOSED (tables in podshim.task.states)
        self.life = Lifecycle(HOST_TABLE, HostState.NEW, f"namespaces host of pod {pod_id}")
        self._state_made = False
        self._pins: dict[str, str] = {}  # ns type -> pin file (made by us)
        self._cgroup: SandboxCgroup | SystemdScope | None = None
        self._pid_lock = asyncio.Lock()
        self._init_pid = 0
        self._init_exit: asyncio.Future[Exit] | None = None
        self._dead: asyncio.Future[int] | None = None
        self._close_task: asyncio.Task[None] | None = None
        #: set when close() begins: running execs in the host are killed then
        self.closing = asyncio.Event()
        self._workloads = LocalWorkloads(self, spec)

    # -- create --------------------------------------------------------------------

    async def create(self) -> None:
        if self.life.state is not HostState.NEW:
            raise errdefs.FailedPrecondition(f"namespaces host of pod {self.pod_id} already used")
        _check_component(self.namespace, "namespace")
        _check_component(self.pod_id, "pod id")
        plan = plan_from_spec(self._spec, self.pod_id)
        unshare = _tool("unshare") if plan.pins else ""
        nsenter = _tool("nsenter") if plan.sysctls or "network" in plan.pins else ""
        ip = _tool("ip", "iproute2") if "network" in plan.pins else ""
        sh = _tool("sh") if plan.pins or plan.sysctls else ""
        if os.path.lexists(self.state_dir):
            raise errdefs.AlreadyExists(
                f"state directory {self.state_dir} of pod {self.pod_id} already exists"
            )
        cgroup = self._make_cgroup(plan)
        self.life.fire(Verb.CREATE)
        self._plan = plan
        try:
            os.makedirs(os.path.dirname(self.state_dir), mode=0o711, exist_ok=True)
            os.mkdir(self.state_dir, 0o700)
            self._state_made = True
            if plan.pins:
                await self._pin(plan, unshare, sh)
            if "network" in plan.pins:
                await self._loopback_up(nsenter, ip)
            if plan.sysctls:
                await self._sysctls(plan, nsenter, sh)
            if cgroup is not None:
                # named before they are made: a crash cleanup removes only these
                record_cgroup_dirs(self.state_dir, cgroup.planned())
                self._cgroup = cgroup
                await cgroup.create()
                cgroup.apply(plan.resources)
        except BaseException as exc:
            log.warning("pod %s: create failed, undoing: %s", self.pod_id, exc)
            await self._teardown()
            self.life.fire(Verb.FAIL)
            raise
        self.life.fire(Verb.READY)
        log.info(
            "pod %s: namespaces host ready (pins %s, netns %s, cgroup %s)",
            self.pod_id,
            sorted(self._pins),
            plan.netns,
            plan.cgroups_path or "-",
        )

    def _make_cgroup(self, plan: Plan) -> SandboxCgroup | SystemdScope | None:
        if not plan.cgroups_path:
            return None
        if self._systemd_cgroup:
            return SystemdScope(plan.cgroups_path, pod_id=self.pod_id)
        return SandboxCgroup(plan.cgroups_path, pod_id=self.pod_id)

    async def _pin(self, plan: Plan, unshare: str, sh: str) -> None:
        argv = [unshare]
        for t in plan.pins:
            pin = os.path.join(self.state_dir, PIN_FILES[t])
            fd = os.open(pin, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
            os.close(fd)
            self._pins[t] = pin
            flag = {"network": "--net", "ipc": "--ipc", "uts": "--uts"}[t]
            argv.append(f"{flag}={pin}")
        if plan.hostname:
            argv += ["--", sh, "-c", 'printf %s "$1" > /proc/sys/kernel/hostname', "sh"]
            argv.append(plan.hostname)
        else:
            argv += ["--", sh, "-c", ":"]
        res = await self._reaper.run(argv)
        if res.status != 0:
            raise errdefs.Internal(
                f"pin namespaces {plan.pins} of pod {self.pod_id}: unshare exited "
                f"{res.status}: {_stderr(res.stderr)}"
            )

    async def _loopback_up(self, nsenter: str, ip: str) -> None:
        """Bring up ``lo`` in a network namespace we made (as runc does for a new one)."""
        pin = self._pins["network"]
        res = await self._reaper.run([nsenter, f"--net={pin}", "--", ip, "link", "set", "lo", "up"])
        if res.status != 0:
            raise errdefs.Internal(
                f"bring up lo in the network namespace of pod {self.pod_id}: {_stderr(res.stderr)}"
            )

    def _ns_file(self, ns_type: str) -> str | None:
        if ns_type == "network" and self._plan is not None and self._plan.netns:
            return self._plan.netns
        return self._pins.get(ns_type)

    async def _sysctls(self, plan: Plan, nsenter: str, sh: str) -> None:
        flags = {"network": "--net", "ipc": "--ipc", "uts": "--uts"}
        for key, value, ns_type in plan.sysctls:
            path = self._ns_file(ns_type)
            assert path is not None  # classify_sysctl checked the pod has it
            argv = [
                nsenter,
                f"{flags[ns_type]}={path}",
                "--",
                sh,
                "-c",
                'printf %s "$2" > "$1"',
                "sh",
                "/proc/sys/" + key.replace(".", "/"),
                value,
            ]
            res = await self._reaper.run(argv)
            if res.status != 0:
                raise errdefs.InvalidArgument(
                    f'sysctl "{key}"={value!r} for pod {self.pod_id}: {_stderr(res.stderr)}'
                )

    # -- namespaces ----------------------------------------------------------------

    async def namespace_path(self, ns_type: str) -> str | None:
        if not self._created or self._plan is None:
            raise errdefs.FailedPrecondition(f"namespaces host of pod {self.pod_id} not created")
        if self._closing:
            raise errdefs.FailedPrecondition(f"namespaces host of pod {self.pod_id} is closed")
        if ns_type in ("network", "ipc", "uts"):
            return self._ns_file(ns_type)
        if ns_type == "pid":
            if not self._plan.pid:
                return None
            async with self._pid_lock:
                if self._closing:
                    raise errdefs.FailedPrecondition(
                        f"namespaces host of pod {self.pod_id} is closed"
                    )
                if self._init_exit is None:
                    await self._start_init(self._plan)
                assert self._init_exit is not None
                if self._init_exit.done():
                    raise errdefs.FailedPrecondition(
                        f"the PID-namespace init of pod {self.pod_id} has exited"
                    )
                return f"/proc/{self._init_pid}/ns/pid"
        if ns_type in ("mount", "user", "cgroup", "time"):
            return None
        raise errdefs.InvalidArgument(f"unknown namespace type {ns_type!r}")

    async def _start_init(self, plan: Plan) -> None:
        binary = find_init_binary(self._init_binary)
        if not _is_child_subreaper():
            raise errdefs.FailedPrecondition(
                "the shim is not a child subreaper: it could not reap the pod's init"
            )
        argv = [binary]
        for t, flag in (("network", "--net"), ("ipc", "--ipc"), ("uts", "--uts")):
            path = self._ns_file(t)
            if path:
                argv += [flag, path]
        if plan.oom_score_adj is not None:
            argv += ["--oom-score-adj", str(plan.oom_score_adj)]
        res = await self._reaper.run(argv)
        out = res.stdout.decode(errors="replace").strip()
        if res.status != 0 or not out.isdigit():
            # a launcher that exits 0 without a pid cannot happen unless stdout broke;
            # its init (if any) then dies with the launcher's report pipe unread
            raise errdefs.Internal(
                f"start the PID-namespace init of pod {self.pod_id}: {binary} exited "
                f"{res.status}: {_stderr(res.stderr)} {out!r}"
            )
        pid = int(out)
        exited = self._reaper.watch(pid)
        try:
            if self._cgroup is not None:
                await self._cgroup.add(pid)
        except BaseException as exc:
            log.error("pod %s: init %d not put in the sandbox cgroup: %s", self.pod_id, pid, exc)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            try:
                await asyncio.wait_for(asyncio.shield(exited), KILL_TIMEOUT)
            except TimeoutError:
                log.error("pod %s: failed init %d was not reaped", self.pod_id, pid)
            raise
        self._init_pid = pid
        try:
            record_init(self.state_dir, pid)
        except OSError as exc:  # the init is still ours to kill on close
            log.warning("pod %s: init %d not recorded for crash cleanup: %s", self.pod_id, pid, exc)
        self._init_exit = exited
        exited.add_done_callback(self._on_init_exit)
        log.info("pod %s: PID-namespace init is pid %d", self.pod_id, pid)

    def _on_init_exit(self, fut: asyncio.Future[Exit]) -> None:
        if fut.cancelled():
            return
        ex = fut.result()
        log.info("pod %s: PID-namespace init %d exited %d", self.pod_id, ex.pid, ex.status)
        dead = self._dead_future()
        if not dead.done():
            dead.set_result(ex.status)

    @property
    def init_pid(self) -> int:
        if self._init_exit is None or self._init_exit.done():
            return 0
        return self._init_pid

    # -- life ----------------------------------------------------------------------

    def _dead_future(self) -> asyncio.Future[int]:
        if self._dead is None:
            self._dead = asyncio.get_running_loop().create_future()
        return self._dead

    async def wait(self) -> int:
        return await asyncio.shield(self._dead_future())

    async def close(self) -> None:
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        try:
            await asyncio.shield(self._close_task)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # _close logs and swallows; this is belt and braces
            log.error("pod %s: close failed: %s", self.pod_id, exc)

    async def _close(self) -> None:
        self.life.fire(Verb.CLOSE)
        self.closing.set()
        try:
            async with self._pid_lock:  # an init being started is started (or not) first
                await self._kill_init()
        except Exception as exc:
            log.error("pod %s: stopping the init: %s", self.pod_id, exc)
        await self._teardown()
        self.life.fire(Verb.CLOSED)
        dead = self._dead_future()
        if not dead.done():
            dead.set_result(0)

    async def _kill_init(self) -> None:
        exited = self._init_exit
        if exited is None or exited.done():
            return
        pid = self._init_pid
        # not reaped yet (the future would be done), so the pid is still the init's
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        try:
            await asyncio.wait_for(asyncio.shield(exited), KILL_TIMEOUT)
        except TimeoutError:
            log.error(
                "pod %s: init %d not reaped %.0fs after SIGKILL", self.pod_id, pid, KILL_TIMEOUT
            )

    async def _teardown(self) -> None:
        """Undo what create() made; never raises (logs instead)."""
        if self._cgroup is not None:
            try:
                left = await self._cgroup.remove(CGROUP_TIMEOUT)
                if not left:
                    self._cgroup = None
            except Exception as exc:
                log.error("pod %s: remove sandbox cgroup: %s", self.pod_id, exc)
        for t, pin in list(self._pins.items()):
            try:
                mount.unmount_all(pin)
            except OSError as exc:
                log.error("pod %s: unmount %s pin %s: %s", self.pod_id, t, pin, exc)
                continue
            try:
                os.unlink(pin)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("pod %s: remove pin %s: %s", self.pod_id, pin, exc)
                continue
            del self._pins[t]
        if self._state_made:
            records = [INIT_RECORD] + ([CGROUP_RECORD] if self._cgroup is None else [])
            for name in records:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.state_dir, name))
            try:
                os.rmdir(self.state_dir)
                self._state_made = False
            except FileNotFoundError:
                self._state_made = False
            except OSError as exc:
                level = logging.ERROR if exc.errno != errno.ENOTEMPTY else logging.WARNING
                log.log(level, "pod %s: remove %s: %s", self.pod_id, self.state_dir, exc)

    # -- the rest of the Host protocol ------------------------------------------------

    @property
    def _created(self) -> bool:
        return self.life.state is not HostState.NEW

    @property
    def _closing(self) -> bool:
        return self.life.state in (HostState.CLOSING, HostState.CLOSED)

    def exec_target(self) -> nsexec.Target:
        """Where an exec in this host runs. FailedPrecondition unless created and open."""
        if not self._created or self._plan is None:
            raise errdefs.FailedPrecondition(f"namespaces host of pod {self.pod_id} not created")
        if self._closing:
            raise errdefs.FailedPrecondition(f"namespaces host of pod {self.pod_id} is closed")
        nss = tuple((flag, p) for t, flag in nsexec.NS_FLAGS if (p := self._ns_file(t)))
        cg = self._cgroup
        procs = tuple(os.path.join(d, "cgroup.procs") for _h, d in cg.dirs) if cg else ()
        return nsexec.Target(self.pod_id, self._reaper, nss, procs, self.closing)

    async def create_workload(self, ctx: ShimContext, req: WorkloadRequest) -> Workload:
        return await self._workloads.create(ctx, req)

    async def exec_in_host(
        self,
        args: list[str],
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        control: ExecControl | None = None,
    ) -> int:
        target = self.exec_target()
        control = control or ExecControl()
        return await nsexec.exec_in_host(target, args, stdin, stdout, stderr, terminal, control)

    async def dump_stacks(self) -> str:
        return ""

    async def share(self, host_path: str, guest_path: str, read_only: bool) -> None:
        raise errdefs.FailedPrecondition(
            "the namespaces host shares the host's mount namespace view: "
            "bind the path into the pod's containers instead"
        )

    async def stats(self) -> any_pb2.Any | None:
        """Metrics of the pod's own cgroup (where it was placed, whatever the path's
        form); None when the pod has none (yet)."""
        cg = self._cgroup
        if cg is None or not cg.dirs:
            return None
        try:
            if cg.version == 2:
                return cgstats.pack(cgroup_v2.read_metrics(cg.dirs[0][1]))
            paths = {c: d for h, d in cg.dirs if h.version == 1 for c in h.controllers}
            return cgstats.pack(cgroup_v1.read_metrics(paths))
        except errdefs.NotFound:
            return None
