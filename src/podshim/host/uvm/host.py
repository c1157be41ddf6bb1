"""The ``uvm`` pod host: one QEMU utility VM per pod (hcsshim's pod UVM, on Linux).

:meth:`UvmHost.create` validates the sandbox spec (:mod:`~podshim.host.uvm.plan`), finds
the prepared image, makes the pod's run directory (:mod:`~podshim.host.uvm.state`) and
``share/``, joins a tap to CRI's ``eth0`` in the pod's network namespace
(:mod:`~podshim.host.uvm.network`), starts QEMU there as a child of the shim (through the
one reaper: ``nsenter --net=<netns> -- qemu-system-x86_64 ...``, nsenter execs QEMU in
place, so the pid is QEMU's), and returns once the guest agent answers Ping within the
boot deadline (:mod:`~podshim.host.uvm.config`) and the pod's sysctls are written in the
guest. Any failure kills QEMU and removes everything made, and the error quotes the end
of the guest console and of QEMU's stderr.

QEMU's exit is the host's death (:meth:`wait` returns; the sandbox then force-exits its
init with 1). :meth:`close` asks the agent to power the guest off, kills QEMU after
:data:`~podshim.host.uvm.config.STOP_TIMEOUT`, removes the tap and redirects, unmounts
everything under ``share/`` and removes the run directory; what cannot be removed stays
recorded there for the next call or the crash cleanup (:mod:`~podshim.host.uvm.cleanup`).

Workloads are guest containers (:mod:`~podshim.host.uvm.workload`); exec in the host,
stacks, Share and Stats reach into the VM (:mod:`~podshim.host.uvm.vmops`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, cast

from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim.host.contract import Workload, WorkloadRequest
from podshim.host.control import ExecControl
from podshim.host.uvm import network, qemu, state, vmops
from podshim.host.uvm.agentapi import AgentApi
from podshim.host.uvm.config import Settings
from podshim.host.uvm.guest import tsc
from podshim.host.uvm.plan import VmPlan, check_component, plan_from_spec
from podshim.jobs import JobGroup
from podshim.linux.proc import start_time
from podshim.linux.reaper import Child, Exit, Reaper
from podshim.oci.spec import Spec
from podshim.task.contract import ShimContext
from podshim.task.states import HOST_TABLE, HostState, Lifecycle, Verb

log = logging.getLogger("podshim.host.uvm")

#: how long a SIGKILLed QEMU may take to be reaped
KILL_TIMEOUT = 10.0
#: how often the agent is asked again while the guest boots (its socket may not exist yet)
PING_RETRY = 0.02
#: how much of the console and of QEMU's stderr a boot error quotes
TAIL_BYTES = 2000

AgentFactory = Callable[[str], AgentApi]
ArgvFactory = Callable[[qemu.VmConfig], list[str]]


def _default_agent(path: str) -> AgentApi:
    from podshim.host.uvm.agentclient import AgentClient

    return AgentClient(path)


def _retrieved(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()


def tail(path: str, limit: int = TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a file, as text ("" when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            data = f.read()
    except OSError:
        return ""
    return data.decode(errors="replace").strip()


class _LiveAgent:
    """The agent of a VM while it lives (see :attr:`UvmHost.agent`)."""

    def __init__(self, agent: AgentApi, host: UvmHost) -> None:
        self._agent, self._host = agent, host

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._agent, name)
        if name == "close" or not callable(attr):
            return attr

        async def call(*args: Any, **kw: Any) -> Any:
            if self._host.vm_gone:
                raise errdefs.Unavailable(f"the VM of pod {self._host.pod_id} is gone")
            return await attr(*args, **kw)

        return call


class UvmHost:
    """A pod's utility VM (see the module docstring)."""

    kind = "uvm"

    def __init__(
        self,
        pod_id: str,
        namespace: str,
        spec: Spec,
        reaper: Reaper,
        settings: Settings | None = None,
        *,
        agent_factory: AgentFactory = _default_agent,
        argv_factory: ArgvFactory | None = None,
        run_dir: str | None = None,
    ) -> None:
        self.pod_id, self.namespace = pod_id, namespace
        self._spec = spec
        self._reaper = reaper
        self.settings = settings or Settings()
        self._agent_factory = agent_factory
        self._argv_factory = argv_factory
        self._run_dir_arg = run_dir
        self.run_dir = ""
        self.life = Lifecycle(HOST_TABLE, HostState.NEW, f"VM host of pod {pod_id}")
        self._plan: VmPlan | None = None
        self._record = state.Record()
        self._made_dir = False
        self._alias = ""
        #: QEMU exited or the host is closing: the agent is never reached again
        self._gone = False
        self._qemu: Child | None = None
        self._agent: AgentApi | None = None
        self._dead: asyncio.Future[int] | None = None
        self._close_task: asyncio.Future[None] | None = None
        self.accel = ""
        self.boot_seconds = 0.0
        #: of create: the network set-up, and from its start to QEMU spawned (logged)
        self._net_seconds = self._spawn_seconds = 0.0
        #: set when close() begins: running execs in the VM are killed then
        self.closing = asyncio.Event()
        self.jobs = JobGroup(f"uvm host {pod_id}")
        self.ops = vmops.VmOps(self)

    # -- create --------------------------------------------------------------------

    @property
    def share_dir(self) -> str:
        return os.path.join(self.run_dir, state.SHARE)

    @property
    def agent(self) -> AgentApi:
        """The guest agent (FailedPrecondition unless the VM runs), guarded: once QEMU
        has exited every call fails with Unavailable at once, without dialling."""
        if self.life.state is not HostState.READY or self._agent is None:
            raise errdefs.FailedPrecondition(
                f"VM host of pod {self.pod_id} is {self.life.state.value}: no VM to reach"
            )
        return cast(AgentApi, _LiveAgent(self._agent, self))

    @property
    def vm_gone(self) -> bool:
        return self._gone

    def _validate(self) -> tuple[VmPlan, tuple[str, str, str], str, str]:
        self.settings.check()
        check_component(self.namespace, "namespace")
        check_component(self.pod_id, "pod id")
        plan = plan_from_spec(self._spec, self.pod_id)
        if plan.netns is not None:
            network.check_netns(plan.netns, self.pod_id)
        image = qemu.image_paths(self.settings.image_dir)
        binary = qemu.qemu_binary() if self._argv_factory is None else ""
        accel = qemu.accel(self.settings.image_dir)
        return plan, image, binary, accel

    async def create(self) -> None:
        if self.life.state is not HostState.NEW:
            raise errdefs.FailedPrecondition(f"VM host of pod {self.pod_id} already used")
        plan, image, binary, accel = self._validate()
        self.run_dir = self._run_dir_arg or state.run_dir(self.namespace, self.pod_id)
        if os.path.lexists(self.run_dir):
            raise errdefs.AlreadyExists(f"run directory {self.run_dir} of pod {self.pod_id} exists")
        self.life.fire(Verb.CREATE)
        self._plan, self.accel = plan, accel
        try:
            await self._build(plan, image, binary, accel)
        except BaseException as exc:
            log.warning("pod %s: VM create failed, undoing: %s", self.pod_id, exc)
            left = await self._teardown(graceful=False)
            if left:
                log.error("pod %s: undoing a failed VM create left: %s", self.pod_id, left)
            self._resolve_dead(0)
            self.life.fire(Verb.FAIL)
            raise
        self.life.fire(Verb.READY)
        log.info("pod %s: VM ready: accel %s, QEMU pid %d, agent answered %.3f s after start "
                 "(before it: network %.3f s, QEMU spawned %.3f s after create began)",
                 self.pod_id, accel, self.init_pid, self.boot_seconds, self._net_seconds,
                 self._spawn_seconds)  # fmt: skip

    async def _build(self, plan: VmPlan, image: tuple[str, str, str], binary: str,
                     accel: str) -> None:  # fmt: skip
        kernel, initrd, tools = image
        began = time.monotonic()
        os.makedirs(os.path.dirname(self.run_dir), mode=0o711, exist_ok=True)
        os.mkdir(self.run_dir, 0o700)
        self._made_dir = True
        os.mkdir(self.share_dir, 0o755)
        os.mkdir(os.path.join(self.share_dir, state.SHARES), 0o755)
        cmdline: list[str] = []
        tap = mac = None
        if plan.netns is not None:
            self._record = state.Record(netns=plan.netns, tap=network.TAP, ingress=True)
            state.write_record(self.run_dir, self._record)  # before anything is made there
            net_began = time.monotonic()
            got = await network.setup(self._reaper, plan.netns, self.pod_id)
            self._net_seconds = time.monotonic() - net_began
            self._record.ingress = got.ingress
            state.write_record(self.run_dir, self._record)
            if got.net is None:
                raise errdefs.FailedPrecondition(
                    f"pod {self.pod_id}: network of {plan.netns}: {got.error}"
                )
            cmdline.append(got.net.kernel_arg())
            tap, mac = network.TAP, got.net.mac
        if plan.hostname:
            cmdline.append(f"podshim.hostname={plan.hostname}")
        cmdline += tsc.kernel_args(accel, qemu.tsc_khz(self.settings.image_dir))
        cfg = qemu.VmConfig(
            kernel=kernel,
            initrd=initrd,
            agent_socket=state.AGENT_SOCKET,  # relative: QEMU runs in the run directory
            console_log=os.path.join(self.run_dir, state.CONSOLE_LOG),
            memory_mb=self.settings.memory_mb,
            cpus=self.settings.cpus,
            accel=accel,
            tb_size_mb=self.settings.tb_size_mb if accel == "tcg" else None,
            share_dir=self.share_dir,
            tools_dir=tools,
            machine=qemu.machine(self.settings.image_dir),
            tap=tap,
            mac=mac,
            cmdline=tuple(cmdline),
        )
        argv = self._argv_factory(cfg) if self._argv_factory else qemu.qemu_argv(cfg, binary)
        started = time.monotonic()
        self._start_qemu(argv, plan.netns)
        self._spawn_seconds = time.monotonic() - began
        self._agent = self._agent_factory(self._socket_path())
        await self._ping(self._agent, started, self.settings.boot_deadline(accel))
        self.boot_seconds = time.monotonic() - started
        for key, value in plan.sysctls:
            try:
                await self._agent.write_file("/proc/sys/" + key.replace(".", "/"), value.encode())
            except errdefs.ShimError as exc:
                raise errdefs.InvalidArgument(
                    f'linux.sysctl "{key}"={value!r} of pod {self.pod_id}: {exc}'
                ) from None

    def _start_qemu(self, argv: list[str], netns: str | None) -> None:
        if netns is not None:
            nsenter = shutil.which("nsenter")
            if nsenter is None:
                raise errdefs.FailedPrecondition("nsenter not found on PATH (util-linux)")
            argv = [nsenter, f"--net={netns}", "--", *argv]
        out = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        err = os.open(os.path.join(self.run_dir, state.QEMU_LOG),
                      os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)  # fmt: skip
        try:
            child = self._reaper.spawn(argv, cwd=self.run_dir, stdout=out, stderr=err)
        except OSError as exc:
            raise errdefs.FailedPrecondition(f"start QEMU for pod {self.pod_id}: {exc}") from None
        finally:
            os.close(out)
            os.close(err)
        self._qemu = child
        child.exited.add_done_callback(self._on_qemu_exit)
        self._record.pid, self._record.start = child.pid, start_time(child.pid) or 0
        state.write_record(self.run_dir, self._record)
        log.info("pod %s: QEMU is pid %d (accel %s): %s", self.pod_id, child.pid,
                 self.accel, " ".join(argv))  # fmt: skip

    def _socket_path(self) -> str:
        path = os.path.join(self.run_dir, state.AGENT_SOCKET)
        if len(path) <= state.SOCKET_PATH_MAX:
            return path
        # too long for sun_path: through the pod's short alias of the run directory
        # (never a /proc/self/fd path: once closed, its number may name another pod's)
        link = state.alias(self.namespace, self.pod_id)
        path = os.path.join(link, state.AGENT_SOCKET)
        if len(path) > state.SOCKET_PATH_MAX:
            raise errdefs.FailedPrecondition(f"agent socket path {path} is too long")
        state.make_alias(self.run_dir, link)
        self._alias = link
        return path

    async def _ping(self, agent: AgentApi, started: float, deadline_s: float) -> None:
        """Ask the agent until it answers, QEMU exits or the deadline passes."""
        qemu_child = self._qemu
        assert qemu_child is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s - (time.monotonic() - started)
        last = ""
        while True:
            left = deadline - loop.time()
            if qemu_child.exited.done() or left <= 0:
                break
            ping = asyncio.ensure_future(agent.ping(timeout=left))
            either: set[asyncio.Future[Any]] = {ping, qemu_child.exited}
            done, _ = await asyncio.wait(either, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if ping in done:
                exc = ping.exception()
                if exc is None:
                    return
                last = str(exc)
                if not isinstance(exc, errdefs.Unavailable | errdefs.DeadlineExceeded):
                    break
                await asyncio.sleep(PING_RETRY)
                continue
            ping.cancel()
            with contextlib.suppress(BaseException):
                await ping
        if qemu_child.exited.done():
            why = f"QEMU exited {qemu_child.exited.result().status} before the guest agent answered"
            error: type[errdefs.ShimError] = errdefs.Internal
        else:
            why = f"the guest agent did not answer within {deadline_s:g} s"
            error = errdefs.DeadlineExceeded
        raise error(f"pod {self.pod_id}: {why}{f' (last: {last})' if last else ''}"
                    f"{self._boot_logs()}")  # fmt: skip

    def _boot_logs(self) -> str:
        out = ""
        for what, name in (("QEMU", state.QEMU_LOG), ("guest console", state.CONSOLE_LOG)):
            text = tail(os.path.join(self.run_dir, name))
            if text:
                out += f"\n--- {what} (end) ---\n{text}"
        return out

    # -- life ----------------------------------------------------------------------

    def _dead_future(self) -> asyncio.Future[int]:
        if self._dead is None:
            self._dead = asyncio.get_running_loop().create_future()
        return self._dead

    def _resolve_dead(self, status: int) -> None:
        dead = self._dead_future()
        if not dead.done():
            dead.set_result(status)

    def _on_qemu_exit(self, fut: asyncio.Future[Exit]) -> None:
        if fut.cancelled():
            return
        ex = fut.result()
        level = logging.INFO if self.closing.is_set() else logging.WARNING
        log.log(level, "pod %s: QEMU %d exited %d", self.pod_id, ex.pid, ex.status)
        self._gone = True
        self._resolve_dead(ex.status)

    @property
    def init_pid(self) -> int:
        """QEMU's pid while it runs (the process that holds the pod), else 0."""
        child = self._qemu
        return child.pid if child is not None and not child.exited.done() else 0

    async def namespace_path(self, ns_type: str) -> str | None:
        if self.life.state is HostState.NEW:
            raise errdefs.FailedPrecondition(f"VM host of pod {self.pod_id} not created")
        return None  # the pod's namespaces are the guest's: workloads run in the VM

    async def wait(self) -> int:
        return await asyncio.shield(self._dead_future())

    async def close(self) -> None:
        """Stop the VM (gracefully, then SIGKILL) and remove what the host made.
        Concurrent calls share one attempt; Unavailable naming what is left when the
        attempt could not finish (recorded in the run directory: the next call, or the
        crash cleanup, tries again)."""
        task = self._close_task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._close_task = asyncio.ensure_future(self._close())
            task.add_done_callback(_retrieved)
        await asyncio.shield(task)

    async def _close(self) -> None:
        self.life.fire(Verb.CLOSE)
        self.closing.set()
        problems = await self._teardown(graceful=True)
        self._resolve_dead(0)
        await self.jobs.aclose()
        if problems:
            msg = (f"pod {self.pod_id}: VM teardown not finished, retry: {'; '.join(problems)}"
                   f" (recorded in {self.run_dir})")  # fmt: skip
            log.error("%s", msg)
            raise errdefs.Unavailable(msg)
        self.life.fire(Verb.CLOSED)

    async def _stop_qemu(self, graceful: bool) -> list[str]:
        child = self._qemu
        if child is None:
            return []
        if graceful and not child.exited.done() and self._agent is not None:
            stop = self.settings.stop_timeout
            with contextlib.suppress(Exception):
                async with asyncio.timeout(stop):
                    await self._agent.shutdown()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(child.exited), stop)
        if not child.exited.done():
            child.signal(9)
            try:
                await asyncio.wait_for(asyncio.shield(child.exited), KILL_TIMEOUT)
            except TimeoutError:
                return [f"QEMU {child.pid} not reaped {KILL_TIMEOUT:.0f}s after SIGKILL"]
        self._record.pid = self._record.start = 0
        return []

    async def _teardown(self, graceful: bool) -> list[str]:
        """Undo what create() made, as far as it goes; returns what is left."""
        self._gone = True
        problems = await self._stop_qemu(graceful)
        if self._agent is not None:
            with contextlib.suppress(Exception):
                await self._agent.close()
        if self._alias:
            state.remove_alias(self.run_dir, self._alias)
            self._alias = ""
        if not self._made_dir:
            return problems
        rec = self._record
        if rec.netns and not problems:  # the tap is busy while QEMU holds it
            left = await network.teardown(self._reaper, rec.netns, rec.tap, rec.ingress)
            problems += left
            if not left:
                rec.netns, rec.tap, rec.ingress = "", "", False
        left = vmops.remove_run_dir(self.run_dir, keep=bool(problems))
        if left or problems:
            with contextlib.suppress(OSError):
                state.write_record(self.run_dir, rec)
        else:
            self._made_dir = False
        return problems + left

    # -- the rest of the Host protocol ---------------------------------------------

    async def create_workload(self, ctx: ShimContext, req: WorkloadRequest) -> Workload:
        from podshim.host.uvm.workload import create_guest_container

        agent = self.agent  # fails closed unless the VM runs
        return await create_guest_container(
            ctx, req, agent, share_dir=self.share_dir, sandbox_spec=self._spec,
            runc=self.settings.runtime,
        )  # fmt: skip

    async def exec_in_host(
        self,
        args: list[str],
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        control: ExecControl | None = None,
    ) -> int:
        return await self.ops.exec(args, stdin, stdout, stderr, terminal, control or ExecControl())

    async def dump_stacks(self) -> str:
        return await self.ops.stacks()

    async def share(
        self, host_path: str, guest_path: str, read_only: bool, pid: int = 0
    ) -> None:
        await self.ops.share(host_path, guest_path, read_only, pid)

    async def stats(self) -> any_pb2.Any | None:
        return vmops.qemu_stats(self.init_pid)

    def describe(self) -> dict[str, Any]:
        """What diag can show of the VM."""
        return {"accel": self.accel, "qemu_pid": self.init_pid, "run_dir": self.run_dir,
                "boot_seconds": round(self.boot_seconds, 3),
                "runtime": self.settings.runtime}  # fmt: skip
