"""The ``uvm`` pod host without QEMU: spec validation, the image check, the lifecycle
with a stand-in QEMU process and a fake agent, crash cleanup's pid check, QEMU stats.
(The tap and tc set-up are in ``test_uvm_host_net.py``; real VMs in
``tests/integration/test_uvm_host.py``.)"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from podshim import errors as errdefs
from podshim.api.cgroups.v2 import metrics_pb2 as v2pb
from podshim.cgroups import stats as cgstats
from podshim.host import registry
from podshim.host.uvm import KIND, agentapi, cleanup, config, qemu, state, vmops
from podshim.host.uvm.host import AgentFactory, UvmHost
from podshim.host.uvm.plan import plan_from_spec
from podshim.linux.proc import start_time
from podshim.linux.reaper import Reaper

ROOT = os.geteuid() == 0
BASE_NS = [{"type": t} for t in ("pid", "ipc", "uts", "mount")] + [{"type": "network"}]


def spec(**kw: Any) -> dict[str, Any]:
    linux = {"namespaces": [dict(n) for n in BASE_NS]}
    linux.update(kw.pop("linux", {}))
    return {"hostname": "vm-pod", "linux": linux, **kw}


def without(t: str) -> dict[str, Any]:
    s = spec()
    s["linux"]["namespaces"] = [n for n in BASE_NS if n["type"] != t]
    return s


class FakeAgent:
    """An agent that answers Ping after ``answer_after`` s (None: never)."""

    def __init__(self, answer_after: float | None = 0.0) -> None:
        self.answer_after = answer_after
        self.made = time.monotonic()
        self.files: dict[str, bytes] = {}
        self.shutdowns = 0
        self.closed = False

    async def ping(self, timeout: float | None = None) -> agentapi.AgentInfo:
        if self.answer_after is None or time.monotonic() - self.made < self.answer_after:
            raise errdefs.Unavailable("ttrpc: dial: connection refused")
        return agentapi.AgentInfo("fake", "0.0", 1)

    async def write_file(self, path: str, data: bytes, mkdirs: bool = False) -> None:
        self.files[path] = data

    async def shutdown(self) -> None:
        self.shutdowns += 1

    async def close(self) -> None:
        self.closed = True


def factory(agent: FakeAgent, paths: list[str] | None = None) -> AgentFactory:
    def make(path: str) -> agentapi.AgentApi:
        if paths is not None:
            paths.append(path)
        return cast(agentapi.AgentApi, agent)

    return make


def image(tmp: Path) -> str:
    d = tmp / "image"
    d.mkdir(exist_ok=True)
    for name in ("vmlinux", "initrd"):
        (d / name).write_bytes(b"x")
    (d / "tools-1").mkdir(exist_ok=True)
    if not (d / "tools").is_symlink():
        (d / "tools").symlink_to("tools-1")
    return str(d)


def fake_qemu(code: str) -> Callable[[qemu.VmConfig], list[str]]:
    """A stand-in QEMU: Python called qemu-system-x86_64 (a symlink next to the run
    directory), its command line naming the run directory as QEMU's does."""

    def argv(cfg: qemu.VmConfig) -> list[str]:
        link = os.path.join(os.path.dirname(os.path.dirname(cfg.console_log)), qemu.QEMU)
        if not os.path.lexists(link):
            os.symlink(os.path.realpath(sys.executable), link)
        return [link, "-S", "-c", code, cfg.console_log]

    return argv


def run(coro: Callable[[Reaper], Awaitable[None]]) -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        try:
            await asyncio.wait_for(coro(reaper), 120)
        finally:
            reaper.stop()

    asyncio.run(main())


@pytest.fixture
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PODSHIM_RUN_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        (without("network"), "no network namespace (hostNetwork)"),
        (without("pid"), "no pid namespace (hostPID)"),
        (without("ipc"), "no ipc namespace (hostIPC)"),
        (without("uts"), "no uts namespace"),
        (spec(linux={"namespaces": [*BASE_NS, {"type": "user"}]}), "a user namespace"),
        (spec(linux={"namespaces": [*BASE_NS, {"type": "time"}]}), "a time namespace"),
        (
            spec(
                linux={
                    "namespaces": [
                        *BASE_NS[:4],
                        {"type": "network", "path": "x"},
                        {"type": "network"},
                    ]
                }
            ),
            "lists network twice",
        ),
        (
            spec(linux={"namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"}, *BASE_NS[1:]]}),
            "cannot join the pid namespace",
        ),
        (spec(linux={"devices": [{"path": "/dev/fuse"}]}), "linux.devices"),
        (spec(hostname="a b"), "hostname 'a b'"),
        (spec(linux={"sysctl": {"vm.swappiness": "1"}}), "not in a separate kernel namespace"),
        (spec(linux={"sysctl": {"kernel.hostname": "x"}}), "kernel.hostname"),
        (spec(linux={"sysctl": {"net.ipv4.ip_forward": "1\n2"}}), "newline"),
    ],
)
def test_spec_the_vm_cannot_honour(bad: dict[str, Any], named: str) -> None:
    with pytest.raises(
        errdefs.InvalidArgument, match=named.replace("(", r"\(").replace(")", r"\)")
    ):
        plan_from_spec(bad, "p1")


def test_plan_of_a_cri_pod() -> None:
    s = spec(linux={"sysctl": {"net.ipv4.ip_forward": "1", "kernel.shmmax": 4096}})
    s["linux"]["namespaces"][-1]["path"] = "/var/run/netns/cni-1"
    plan = plan_from_spec(s, "p1")
    assert plan.netns == "/var/run/netns/cni-1"
    assert plan.hostname == "vm-pod"
    assert plan.sysctls == [("kernel.shmmax", "4096"), ("net.ipv4.ip_forward", "1")]


@pytest.mark.parametrize(
    "bad",
    [without("network"), spec(linux={"namespaces": [*BASE_NS, {"type": "user"}]}),
     spec(linux={"namespaces": [*BASE_NS[:4], {"type": "network", "path": "/proc/self/ns/net"}]})],
)  # fmt: skip
def test_create_refuses_and_leaves_nothing(bad: dict[str, Any], run_root: Path,
                                           tmp_path: Path) -> None:  # fmt: skip
    async def go(reaper: Reaper) -> None:
        host = UvmHost("p1", "default", bad, reaper, config.Settings(image_dir=image(tmp_path)))
        with pytest.raises(errdefs.InvalidArgument):
            await host.create()

    run(go)
    assert not run_root.exists()


def test_missing_image_names_prepare(run_root: Path, tmp_path: Path) -> None:
    async def go(reaper: Reaper) -> None:
        settings = config.Settings(image_dir=str(tmp_path / "none"))
        host = UvmHost("p1", "default", spec(), reaper, settings)
        with pytest.raises(errdefs.FailedPrecondition, match="podshim uvm prepare"):
            await host.create()

    run(go)
    assert not run_root.exists()


def test_settings_from_env() -> None:
    s = config.from_env({"PODSHIM_UVM_MEMORY_MB": "128", "PODSHIM_UVM_CPUS": "2",
                         "PODSHIM_UVM_BOOT_TIMEOUT": "3"})  # fmt: skip
    assert (s.memory_mb, s.cpus, s.boot_deadline("tcg")) == (128, 2, 3.0)
    assert config.from_env({}).boot_deadline("tcg") == config.BOOT_TIMEOUT["tcg"]
    default = config.from_env({})
    assert (default.runtime, default.tb_size_mb) == ("crun", config.TCG_TB_MB["crun"])
    runc = config.from_env({"PODSHIM_UVM_RUNTIME": "runc"})
    assert (runc.runtime, runc.tb_size_mb) == ("runc", config.TCG_TB_MB["runc"])
    assert config.from_env({"PODSHIM_UVM_TCG_TB_MB": "64"}).tb_size_mb == 64
    with pytest.raises(errdefs.InvalidArgument, match="PODSHIM_UVM_TCG_TB_MB"):
        config.from_env({"PODSHIM_UVM_TCG_TB_MB": "0"}).check()
    bad = config.from_env({"PODSHIM_UVM_MEMORY_MB": "lots"})
    with pytest.raises(errdefs.InvalidArgument, match="PODSHIM_UVM_MEMORY_MB"):
        bad.check()
    with pytest.raises(errdefs.InvalidArgument, match="runtime 'kata'"):
        config.from_env({"PODSHIM_UVM_RUNTIME": "kata"}).check()


def test_settings_from_the_uvm_table() -> None:
    """The handler's [uvm] table wins over the environment; its errors name the key."""
    env = {"PODSHIM_UVM_MEMORY_MB": "128", "PODSHIM_UVM_RUNTIME": "crun"}
    s = config.from_env(env, {"runtime": "runc", "cpus": 2, "boot_timeout": 7.5})
    assert (s.memory_mb, s.cpus, s.runtime, s.boot_deadline("tcg")) == (128, 2, "runc", 7.5)
    assert s.tb_size_mb == config.TCG_TB_MB["runc"]
    assert config.from_env({}, {"image_dir": "/srv/img"}).image_dir == "/srv/img"
    for table, words in (
        ({"memroy_mb": 1}, "unknown [uvm] keys ['memroy_mb']"),
        ({"memory_mb": 1}, "[uvm] memory_mb=1 is outside"),
        ({"cpus": True}, "[uvm] cpus=True is not a number"),
        ({"runtime": 3}, "[uvm] runtime=3"),
        ({"image_dir": ""}, "[uvm] image_dir=''"),
    ):
        with pytest.raises(errdefs.InvalidArgument) as err:
            config.from_env({}, table).check()
        assert words in str(err.value), (table, str(err.value))


def test_registered_and_make_does_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "uvm" in registry.names() and registry.get("uvm") is KIND

    def no_io(*a: Any, **kw: Any) -> Any:
        raise AssertionError("I/O in make")

    monkeypatch.setattr(os, "mkdir", no_io)
    monkeypatch.setattr(os, "open", no_io)
    ctx = type("Ctx", (), {"namespace": "default", "reaper": None})()
    host = KIND.make("p1", ctx, spec(), None)  # type: ignore[arg-type]
    assert host.kind == "uvm"
    host = KIND.make("p1", ctx, spec(), None, {"runtime": "runc"})  # type: ignore[arg-type]
    assert host.settings.runtime == "runc"


@pytest.mark.parametrize("kind", ["namespaces", "none"])
def test_kinds_without_options_refuse_a_table(kind: str) -> None:
    ctx = type("Ctx", (), {"namespace": "default", "reaper": None})()
    with pytest.raises(errdefs.InvalidArgument, match=rf"takes no options: \[{kind}\]"):
        registry.get(kind).make("p1", ctx, spec(), None, {"x": 1})  # type: ignore[arg-type]


# -- lifecycle with a stand-in QEMU --------------------------------------------------------


def _net_less() -> dict[str, Any]:
    return spec(linux={"sysctl": {"net.ipv4.ip_forward": "1"}})


def test_the_probed_machine_and_tsc_reach_qemu(run_root: Path, tmp_path: Path) -> None:
    """A stock kernel's image was probed on q35: its pods boot there too; the recorded TSC
    rate goes on the kernel command line (TCG)."""
    seen: list[qemu.VmConfig] = []
    inner = fake_qemu("import time; time.sleep(600)")

    def argv(cfg: qemu.VmConfig) -> list[str]:
        seen.append(cfg)
        return inner(cfg)

    async def go(reaper: Reaper) -> None:
        d = image(tmp_path)
        Path(d, "accel.json").write_text('{"accel": "tcg", "machine": "q35", "tsc_khz": 2500000}')
        settings = config.Settings(image_dir=d, stop_timeout=0.5)
        host = UvmHost("p1", "default", _net_less(), reaper, settings,
                       agent_factory=factory(FakeAgent()), argv_factory=argv)  # fmt: skip
        await host.create()
        await host.close()

    run(go)
    assert seen[0].machine == "q35" and "tsc_early_khz=2500000" in seen[0].cmdline


def test_lifecycle_record_wait_close(run_root: Path, tmp_path: Path) -> None:
    agent = FakeAgent(answer_after=0.1)

    async def go(reaper: Reaper) -> None:
        settings = config.Settings(image_dir=image(tmp_path), stop_timeout=0.5)
        host = UvmHost("p1", "default", _net_less(), reaper, settings,
                       agent_factory=factory(agent),
                       argv_factory=fake_qemu("import time; time.sleep(600)"))  # fmt: skip
        await host.create()
        pid = host.init_pid
        rec = state.read_record(host.run_dir)
        assert rec is not None and (rec.pid, rec.start) == (pid, start_time(pid))
        assert state.is_our_qemu(pid, rec.start, host.run_dir)
        assert agent.files == {"/proc/sys/net/ipv4/ip_forward": b"1"}
        assert await host.namespace_path("network") is None
        got = await host.stats()
        assert got is not None and isinstance(cgstats.unpack(got), v2pb.Metrics)
        waiter = asyncio.ensure_future(host.wait())
        await asyncio.sleep(0.05)
        assert not waiter.done()
        os.kill(pid, signal.SIGKILL)  # host death
        assert await asyncio.wait_for(waiter, 30) == 137
        assert host.init_pid == 0
        with pytest.raises(errdefs.Unavailable, match="VM of pod p1 is gone"):
            await host.agent.write_file("/x", b"")  # never dialled again
        await host.close()
        await host.close()  # idempotent
        assert not os.path.exists(host.run_dir) and agent.closed
        with pytest.raises(errdefs.FailedPrecondition):
            await host.exec_in_host(["true"], "", "", "", False)

    run(go)


def test_close_stops_then_kills(run_root: Path, tmp_path: Path) -> None:
    agent = FakeAgent()

    async def go(reaper: Reaper) -> None:
        settings = config.Settings(image_dir=image(tmp_path), stop_timeout=0.2)
        host = UvmHost("p1", "default", _net_less(), reaper, settings,
                       agent_factory=factory(agent),
                       argv_factory=fake_qemu("import time; time.sleep(600)"))  # fmt: skip
        await host.create()
        pid = host.init_pid
        await host.close()
        assert agent.shutdowns == 1  # asked first; it did not power off: killed
        assert start_time(pid) is None
        assert await host.wait() == 137
        assert not os.path.exists(host.run_dir)

    run(go)


def test_agent_never_answers(run_root: Path, tmp_path: Path) -> None:
    async def go(reaper: Reaper) -> None:
        settings = config.Settings(image_dir=image(tmp_path), boot_timeout=1.0)
        code = "import sys, time; open(sys.argv[1], 'w').write('guest says hello'); time.sleep(600)"
        host = UvmHost("p1", "default", _net_less(), reaper, settings,
                       agent_factory=factory(FakeAgent(None)),
                       argv_factory=fake_qemu(code))  # fmt: skip
        t = time.monotonic()
        with pytest.raises(errdefs.DeadlineExceeded, match=r"(?s)within 1 s.*guest says hello"):
            await host.create()
        assert time.monotonic() - t < 10
        assert not os.path.exists(host.run_dir)
        assert reaper.owned == frozenset()  # QEMU killed and reaped

    run(go)


def test_qemu_exits_before_the_agent(run_root: Path, tmp_path: Path) -> None:
    async def go(reaper: Reaper) -> None:
        settings = config.Settings(image_dir=image(tmp_path))
        code = "import sys; sys.stderr.write('qemu: cannot open tap0'); sys.exit(3)"
        host = UvmHost("p1", "default", _net_less(), reaper, settings,
                       agent_factory=factory(FakeAgent(None)),
                       argv_factory=fake_qemu(code))  # fmt: skip
        with pytest.raises(errdefs.Internal, match=r"(?s)QEMU exited 3.*cannot open tap0"):
            await host.create()
        assert not os.path.exists(host.run_dir)

    run(go)


def test_long_run_dir_reaches_the_socket_through_a_short_alias(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = tempfile.mkdtemp(prefix="psu-", dir="/tmp")  # the aliases' base: short
    monkeypatch.setenv("PODSHIM_RUN_DIR", short)
    try:
        _long_run_dir(tmp_path)
    finally:
        shutil.rmtree(short)


def _long_run_dir(tmp_path: Path) -> None:
    paths: list[str] = []

    async def go(reaper: Reaper) -> None:
        settings = config.Settings(image_dir=image(tmp_path))
        long_dir = str(tmp_path / ("d" * 100) / "pod")
        host = UvmHost("p1", "default", _net_less(), reaper, settings, run_dir=long_dir,
                       agent_factory=factory(FakeAgent(), paths),
                       argv_factory=fake_qemu("import time; time.sleep(600)"))  # fmt: skip
        await host.create()
        link = state.alias("default", "p1")
        assert paths == [os.path.join(link, state.AGENT_SOCKET)]
        assert len(paths[0]) <= state.SOCKET_PATH_MAX and os.readlink(link) == long_dir
        await host.close()
        assert not os.path.lexists(link) and not os.path.exists(long_dir)

    run(go)


# -- crash cleanup -------------------------------------------------------------------------


@pytest.fixture
def lookalike(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A process that looks like the pod's QEMU (name, command line with the run dir)."""
    d = tmp_path / "run" / "uvm" / "default" / "p1"
    d.mkdir(parents=True)
    p = subprocess.Popen(["qemu-system-x86_64", "-c", "import time; time.sleep(600)",
                          f"{d}/console.log"], executable=sys.executable)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "qemu-system-x86_64" not in " ".join(state.cmdline(p.pid)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield p, str(d)
    finally:
        p.kill()
        p.wait()


def test_cleanup_refuses_a_pid_with_another_start_time(
    lookalike: tuple[subprocess.Popen[bytes], str],
) -> None:
    p, d = lookalike
    start = start_time(p.pid)
    assert start is not None
    state.write_record(d, state.Record(pid=p.pid, start=start - 1))
    assert cleanup.cleanup_vm("default", "p1", d) == []
    assert p.poll() is None  # not killed: another process's pid as far as the record goes
    assert not os.path.exists(d)


def test_cleanup_kills_the_recorded_qemu(lookalike: tuple[subprocess.Popen[bytes], str],
                                         monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:  # fmt: skip
    p, d = lookalike
    state.write_record(d, state.Record(pid=p.pid, start=start_time(p.pid) or 0))
    assert state.is_our_qemu(p.pid, start_time(p.pid) or 0, d)
    assert not state.is_our_qemu(p.pid, start_time(p.pid) or 0, d + "x")  # another pod's
    os.makedirs(os.path.join(d, "share", "shares"))
    monkeypatch.setenv("PODSHIM_RUN_DIR", str(tmp_path / "run"))
    assert KIND.cleanup("default", "p1", {}) == []
    assert p.wait(10) == -signal.SIGKILL
    assert not os.path.exists(d)
    assert KIND.cleanup("default", "p1", {}) == []  # nothing left: nothing to do


@pytest.mark.skipif(not ROOT, reason="bind mounts need root")
def test_cleanup_unmounts_under_share_and_never_empties_a_mount(tmp_path: Path) -> None:
    d = tmp_path / "pod"
    target = d / "share" / "shares" / "1"
    target.mkdir(parents=True)
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep").write_text("mine")
    subprocess.run(["mount", "--bind", str(src), str(target)], check=True)
    try:
        assert vmops.mounts_under(str(d)) == [str(target)]
        assert cleanup.cleanup_vm("default", "p1", str(d)) == []
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)
    assert not d.exists()
    assert (src / "keep").read_text() == "mine"


def test_qemu_metrics_of_a_process() -> None:
    m = vmops.qemu_metrics(os.getpid())
    assert m.memory.usage > 0 and m.memory.anon > 0 and m.memory.shmem > 0
    assert m.cpu.usage_usec == m.cpu.user_usec + m.cpu.system_usec
    with pytest.raises(errdefs.NotFound):
        vmops.qemu_metrics(2**22 + 1)
