"""The ``namespaces`` pod host: the pod's namespaces and cgroup, without a pause process.

What :meth:`NamespacesHost.create` builds, from the sandbox's OCI spec (the config.json
CRI wrote for the pod sandbox):

* the pod's IPC and UTS namespaces (when the spec lists them), created by unshare(2)
  in a forked child of the shim (:mod:`podshim.host.namespaces.pin`: no program is
  executed per pod) and *pinned* by bind mounts of the child's ``/proc/self/ns/*`` on
  empty files in the host's state directory ``<state_root>/<namespace>/<pod id>``
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
applied to it; confining it with the pod's seccomp profile is future work. The host
names the init by a pidfd and watches its exit from a reaper mark taken before it was
started (:mod:`podshim.host.namespaces.pidinit`): a reused pid is never signalled, nor
an earlier holder's exit taken for the init's.

Every helper process (the forked namespace maker, ``nsenter`` of a diagnostic exec,
``podshim-init``) is reaped by the shim's reaper; the shim never calls
unshare(2)/setns(2) itself, only a forked child that exits right after does. The init
is reparented to the shim (a child subreaper) when its launcher exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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
from podshim.host.namespaces import nsexec, pin
from podshim.host.namespaces.cgroup import (
    CGROUP_RECORD,
    Hierarchy,
    SandboxCgroup,
    record_cgroup_dirs,
)
from podshim.host.namespaces.cleanup import INIT_RECORD, record_init, remove_state_dir
from podshim.host.namespaces.execcg import ExecCgroups, own_parents
from podshim.host.namespaces.initbin import find_init_binary, is_child_subreaper
from podshim.host.namespaces.pidinit import InitProcess, launch
from podshim.host.namespaces.plan import PIN_FILES, Plan, plan_from_spec
from podshim.host.namespaces.systemd import SystemdScope
from podshim.linux import mount
from podshim.linux.reaper import Exit, Reaper
from podshim.task.contract import ShimContext
from podshim.task.states import HOST_TABLE, HostState, Lifecycle, Verb

log = logging.getLogger("podshim.host.namespaces.host")

#: how long close() waits for the killed init to be reaped, and for cgroups to empty
KILL_TIMEOUT = 10.0
CGROUP_TIMEOUT = 10.0
#: how long a later close() (a retried Delete) waits for busy cgroups
RETRY_TIMEOUT = 2.0


def _check_component(value: str, what: str) -> None:
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise errdefs.InvalidArgument(f"{what} {value!r} cannot name a directory")


def _retrieved(task: asyncio.Future[None]) -> None:
    """Mark a close attempt's outcome as seen (its callers may all have been cancelled)."""
    if not task.cancelled():
        task.exception()


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
        self._init: InitProcess | None = None
        self._dead: asyncio.Future[int] | None = None
        self._close_task: asyncio.Future[None] | None = None
        self._attempts = 0  # close attempts so far
        #: set when close() begins: running execs in the host are killed then
        self.closing = asyncio.Event()
        self._workloads = LocalWorkloads(self, spec)
        #: each exec in the host gets a cgroup of its own (killed and removed by it)
        self._execs = ExecCgroups(pod_id, self.state_dir, self._exec_parents)

    # -- create --------------------------------------------------------------------

    async def create(self) -> None:
        if self.life.state is not HostState.NEW:
            raise errdefs.FailedPrecondition(f"namespaces host of pod {self.pod_id} already used")
        _check_component(self.namespace, "namespace")
        _check_component(self.pod_id, "pod id")
        plan = plan_from_spec(self._spec, self.pod_id)
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
            await self._make_namespaces(plan)
            if cgroup is not None:
                # named before they are made: a crash cleanup removes only these
                record_cgroup_dirs(self.state_dir, cgroup.planned())
                self._cgroup = cgroup
                await cgroup.create()
                cgroup.apply(plan.resources)
        except BaseException as exc:
            log.warning("pod %s: create failed, undoing: %s", self.pod_id, exc)
            left = await self._teardown()
            if left:  # recorded: close() or the crash cleanup tries again
                log.error("pod %s: undoing a failed create left: %s", self.pod_id, left)
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

    async def _make_namespaces(self, plan: Plan) -> None:
        """Pin the pod's own namespaces (hostname set, ``lo`` up) and write its sysctls,
        in a forked child (:mod:`~podshim.host.namespaces.pin`): no program is run."""
        for t in plan.pins:
            path = os.path.join(self.state_dir, PIN_FILES[t])
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
            os.close(fd)
            self._pins[t] = path  # recorded before it is mounted: teardown undoes it
        want = pin.Namespaces(
            self.pod_id, dict(self._pins), plan.hostname, plan.netns, list(plan.sysctls)
        )
        await pin.make(self._reaper, want)

    def _ns_file(self, ns_type: str) -> str | None:
        if ns_type == "network" and self._plan is not None and self._plan.netns:
            return self._plan.netns
        return self._pins.get(ns_type)

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
                if self._init is None:
                    self._init = await self._start_init(self._plan)
                if not self._init.running:
                    raise errdefs.FailedPrecondition(
                        f"the PID-namespace init of pod {self.pod_id} has exited"
                    )
                # not reaped (the reaper runs on this loop): the pid is still the init's
                return f"/proc/{self._init.pid}/ns/pid"
        if ns_type in ("mount", "user", "cgroup", "time"):
            return None
        raise errdefs.InvalidArgument(f"unknown namespace type {ns_type!r}")

    async def _start_init(self, plan: Plan) -> InitProcess:
        binary = find_init_binary(self._init_binary)
        if not is_child_subreaper():
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
        init = await launch(self._reaper, argv, self.pod_id)
        try:
            if self._cgroup is not None:
                await self._cgroup.add(init.pid)
        except BaseException as exc:
            log.error("pod %s: init %d not put in the sandbox cgroup: %s", self.pod_id,
                      init.pid, exc)  # fmt: skip
            if not await init.kill(KILL_TIMEOUT):
                log.error("pod %s: failed init %d was not reaped", self.pod_id, init.pid)
            init.close()
            raise
        try:
            record_init(self.state_dir, init.pid)
        except OSError as exc:  # the init is still ours to kill on close
            log.warning("pod %s: init %d not recorded for crash cleanup: %s", self.pod_id,
                        init.pid, exc)  # fmt: skip
        init.exited.add_done_callback(self._on_init_exit)
        log.info("pod %s: PID-namespace init is pid %d", self.pod_id, init.pid)
        return init

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
        init = self._init
        return init.pid if init is not None and init.running else 0

    # -- life ----------------------------------------------------------------------

    def _dead_future(self) -> asyncio.Future[int]:
        if self._dead is None:
            self._dead = asyncio.get_running_loop().create_future()
        return self._dead

    async def wait(self) -> int:
        return await asyncio.shield(self._dead_future())

    async def close(self) -> None:
        """Tear the host down: kill the init and every exec in the host, then remove the
        exec cgroups, the sandbox cgroup (only directories this host made), the pins and
        the state directory. Concurrent calls share one attempt.

        Raises:
            Unavailable: the attempt could not finish (a cgroup still busy, a pin that
                cannot be unmounted, a state directory holding what podshim did not
                put there, an init not reaped); the message names what is left. It
                stays recorded in the state directory: the next call tries again, and
                so does the kind's crash cleanup if the shim dies first. Once an
                attempt has succeeded, later calls return at once.
        """
        task = self._close_task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._close_task = asyncio.ensure_future(self._close())
            task.add_done_callback(_retrieved)
        await asyncio.shield(task)

    async def _close(self) -> None:
        self.life.fire(Verb.CLOSE)
        self.closing.set()
        first = self._attempts == 0
        self._attempts += 1
        problems: list[str] = []
        try:
            async with self._pid_lock:  # an init being started is started (or not) first
                problems += await self._kill_init()
        except Exception as exc:
            problems.append(f"stopping the init: {exc}")
        problems += await self._teardown(CGROUP_TIMEOUT if first else RETRY_TIMEOUT)
        dead = self._dead_future()
        if not dead.done():  # the host is dead whatever is left to remove
            dead.set_result(0)
        if problems:
            msg = (
                f"pod {self.pod_id}: teardown not finished, retry: {'; '.join(problems)} "
                f"(recorded in {self.state_dir})"
            )
            log.error("%s", msg)
            raise errdefs.Unavailable(msg)
        if self._init is not None:
            self._init.close()
        self.life.fire(Verb.CLOSED)

    async def _kill_init(self) -> list[str]:
        init = self._init
        if init is None or not init.running:
            return []
        if not await init.kill(KILL_TIMEOUT):  # through its pidfd: never a reused pid
            return [f"init {init.pid} not reaped {KILL_TIMEOUT:.0f}s after SIGKILL"]
        return []

    async def _teardown(self, timeout: float = CGROUP_TIMEOUT) -> list[str]:
        """Undo what create() made, as far as it goes; returns what is left (problems).
        The records of what is left stay in the state directory."""
        # the exec cgroups first: they are below the sandbox cgroup
        problems = await self._execs.close(timeout)
        if self._cgroup is not None:
            try:
                left = await self._cgroup.remove(timeout)
            except Exception as exc:
                problems.append(f"remove the sandbox cgroup: {exc}")
            else:
                if left:
                    problems.append(f"sandbox cgroup still busy: {', '.join(left)}")
                else:
                    self._cgroup = None
        for t, pin_file in list(self._pins.items()):
            try:
                mount.unmount_all(pin_file)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(pin_file)
            except OSError as exc:
                problems.append(f"{t} pin {pin_file}: {exc.strerror or exc}")
                continue
            del self._pins[t]
        if self._state_made:
            init_gone = self._init is None or not self._init.running
            done = [INIT_RECORD] if init_gone else []
            done += [CGROUP_RECORD] if self._cgroup is None else []
            left = remove_state_dir(self.state_dir, done, keep=bool(problems))
            problems += left
            self._state_made = bool(problems)
        return problems

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
        return nsexec.Target(self.pod_id, self._reaper, nss, self._execs, self.closing)

    def _exec_parents(self) -> list[tuple[Hierarchy, str]]:
        """Where exec cgroups go: below the sandbox cgroup in each of its hierarchies,
        else below this process's own cgroup in every hierarchy."""
        cg = self._cgroup
        return list(cg.dirs) if cg is not None and cg.dirs else own_parents()

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

    async def share(
        self, host_path: str, guest_path: str, read_only: bool, pid: int = 0
    ) -> None:
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
