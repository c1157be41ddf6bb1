"""Pods through a containerd 2.x proxy plugin: ``podshim daemon`` as the sandbox controller.

containerd's config has ``[proxy_plugins.podshim] type = "sandbox"`` at the daemon's
controller socket and the CRI handler ``podshim-node`` with ``sandboxer = "podshim"``:
CRI drives each pod with the gRPC ``containerd.services.sandbox.v1.Controller`` and
creates its containers with Task v3 at the address Start returned, in the daemon itself.
No shim process is exec'd, per pod or per container: below the lab there is containerd
only, and every pod's processes are the daemon's.

Runs with ``PODSHIM_CONTAINERD=2.1`` (scripts/test.sh's 2.1 line). One lab and one daemon
per module (the daemon runs beside the lab, as a service manager would run it); every
test's pods are stopped, removed and checked to be completely gone, the daemon's records
included.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from podshim.api.services.sandbox.v1 import sandbox_pb2 as ctlpb
from podshim.service.proxystate import ProxyState, home_dir
from podshim_lab import Containerd, RuntimeHandler, wait_for
from podshim_lab.cleanup import remove_cgroup
from podshim_lab.cri.client import CriError
from podshim_lab.procfs import ProcStat, descendants, process_table, read_stat

if TYPE_CHECKING:
    from tests.integration import criprocs as cp
    from tests.integration import criutil as cu
    from tests.integration import matrix
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import criprocs as cp
    import criutil as cu
    import matrix

SELECTED = matrix.selected() or ""
pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not SELECTED.startswith("2."),
        reason="proxy sandbox plugins need containerd 2.x: run with PODSHIM_CONTAINERD=2.1",
    ),
]

#: the handler (docs and tests use this name) and the proxy plugin's name
NODE = "podshim-node"
PLUGIN = "podshim"
SYSCTLS = {"net.ipv4.ip_unprivileged_port_start": "900", "kernel.shmmni": "3000"}
SERVER = "mkdir -p /tmp/www && echo podshim-ok > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"


class Daemon:
    """``podshim daemon`` for one lab, started and stopped by the test."""

    def __init__(self, lab: Containerd, socket_path: Path, config: Path, log: Path) -> None:
        self.lab = lab
        self.socket = socket_path
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None and self.proc.poll() is None, "the daemon is not running"
        return self.proc.pid

    def start(self) -> None:
        argv = [sys.executable, "-m", "podshim.cli", "daemon", "--address", self.lab.address,
                "--socket", str(self.socket), "--config", str(self.config),
                "--log", str(self.log), "--debug"]  # fmt: skip
        try:  # the log is appended to: only this run's lines say it serves
            offset = self.log.stat().st_size
        except FileNotFoundError:
            offset = 0
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        proc = self.proc

        def serving() -> bool:
            try:
                with self.log.open("rb") as f:
                    f.seek(offset)
                    new = f.read().decode(errors="replace")
            except FileNotFoundError:
                return False
            return self.socket.is_socket() and "serving the sandbox controller" in new

        wait_for(
            serving,
            timeout=cu.DEADLINE,
            interval=0.1,
            message=lambda: f"the daemon to serve (exit {proc.poll()})\n{self.tail()}",
        )

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL (a crash); waits until it is gone."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def processes(self) -> list[ProcStat]:
        """Every process below the daemon (pods' anchors, inits and containers)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return descendants(self.proc.pid)


class ProxyLab(cu.CriLab):
    """The CRI lab, knowing that ``podshim-node`` pods live in the daemon."""

    daemon: Daemon

    @property
    def state(self) -> ProxyState:
        return ProxyState(home_dir(self.lab.address))

    def shim_pid(self, pod_id: str) -> int:
        raise AssertionError("a proxy-plugin pod has no shim: its processes are the daemon's")

    def inits(self) -> list[ProcStat]:
        return [s for s in self.daemon.processes() if s.comm == cu.INIT_COMM]

    def runtime_state(self, rec: cu.PodRecord, task_id: str) -> Path:
        if rec.handler == NODE:
            return self.podshim_runc_root / cu.CRI_NAMESPACE / task_id
        return super().runtime_state(rec, task_id)

    def leftovers(self, pod_id: str) -> list[str]:
        found = super().leftovers(pod_id)
        if self.pods[pod_id].handler == NODE:
            bundle = Path(self.state.sandbox_dir(cu.CRI_NAMESPACE, pod_id))
            if bundle.exists():
                found.append(f"daemon's pod bundle {bundle}: {sorted(os.listdir(bundle))}")
            mine = {pod_id, *self.pods[pod_id].containers}
            found += [f"task record {r.id}" for r in self.state.tasks() if r.id in mine]
        return found

    def strays(self) -> list[ProcStat]:
        return self.processes() + self.daemon.processes()


@pytest.fixture(scope="module")
def px_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyLab]:
    version = matrix.require(SELECTED)
    tmp = tmp_path_factory.mktemp("proxy")
    socket_path = Path(f"/run/podshim-test-{secrets.token_hex(4)}.sock")
    lab = Containerd(
        cri=True,
        runtimes={
            NODE: RuntimeHandler(
                cu.PODSHIM_RUNTIME, sandboxer=PLUGIN, proxy_address=str(socket_path)
            )
        },
        extra_path=[cu.BIN_DIR],
        version=version,
    )
    runtime_root = lab.state / "podshim-runc"
    config = cu.podshim_config(tmp / "podshim.toml", runtime_root)
    daemon = Daemon(lab, socket_path, config, tmp / "daemon.log")
    crilab: ProxyLab | None = None
    errors: list[str] = []
    try:
        lab.start()
        written = lab.paths.config.read_text()
        assert f'sandboxer = "{PLUGIN}"' in written and "[proxy_plugins.podshim]" in written
        daemon.start()
        lab.ensure_pause()
        crilab = ProxyLab(lab, runtime_root, lab.ensure_busybox(namespace=cu.CRI_NAMESPACE))
        crilab.daemon = daemon
        yield crilab
    finally:
        try:  # the pods, then the daemon (it holds connections to containerd), the lab
            if crilab is not None and lab.running:
                errors += crilab.cleanup()
        finally:
            daemon.stop()
            errors += cu.close_cri_lab(lab, crilab)
        home = Path(home_dir(lab.address))
        if home.exists():  # a daemon that held no pod removes its home as it exits
            errors += [f"daemon state left: {p}" for p in [home, *home.rglob("*")]]
        if os.path.lexists(socket_path):
            errors.append(f"controller socket left: {socket_path}")
        assert not errors, "proxy lab teardown left things behind:\n" + "\n".join(errors)


@pytest.fixture
def px(px_lab: ProxyLab) -> Iterator[ProxyLab]:
    """The lab; the test's pods are stopped, removed and checked gone afterwards."""
    before = set(px_lab.pods)
    try:
        yield px_lab
    finally:
        mine = [p for p in px_lab.pods if p not in before]
        errors = px_lab.cleanup(mine) if px_lab.lab.running else ["containerd is not running"]
        log = px_lab.daemon.tail(80) if errors else ""
        assert not errors, "test left things behind:\n" + "\n".join(errors) + "\n" + log


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def _controller(lab: Containerd, method: str, request: bytes) -> bytes:
    """A call of containerd's own ``containerd.services.sandbox.v1.Controller`` (which
    passes it to the sandboxer named in the request)."""
    import grpc  # type: ignore[import-untyped,unused-ignore]

    with grpc.insecure_channel(f"unix://{lab.address}") as channel:
        call = channel.unary_unary(f"/containerd.services.sandbox.v1.Controller/{method}")
        raw: bytes = call(
            request, metadata=[("containerd-namespace", cu.CRI_NAMESPACE)], timeout=30
        )
    return raw


def _no_shim_anywhere(px: ProxyLab, pods: list[str], pids: set[int]) -> list[str]:
    """Problems with "no process below the lab but containerd; the pods' processes are
    the daemon's children"."""
    found = [f"process below the lab: {s}" for s in px.processes()]
    table = process_table()
    found += [f"a shim: {s}" for s in table.values() if s.comm.startswith("containerd-shim")
              and px.lab.address in _cmdline(s.pid)]  # fmt: skip
    found += [f"a pause process: {s}" for s in px.daemon.processes() if s.comm == "pause"]
    for pid in pids:
        stat = table.get(pid)
        if stat is None or stat.ppid != px.daemon.pid:
            found.append(f"container process {pid} is not the daemon's child: {stat}")
    for pod in pods:
        anchor = px.cri.pod_status(pod).pid
        stat = table.get(anchor)
        if stat is None or stat.ppid != px.daemon.pid:
            found.append(f"pod {pod}: sandbox pid {anchor} is not the daemon's child: {stat}")
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_pod_through_the_proxy_plugin(px: ProxyLab) -> None:
    parent = f"/podshim-px-{secrets.token_hex(3)}"  # kubelet's pod cgroup: stats read it
    hostname = _unique("px")
    errors: list[str] = []
    try:
        config = px.pod_config(
            "proxy", hostname=hostname, sysctls=SYSCTLS, pid_mode="POD", cgroup_parent=parent
        )
        pod = px.run_pod(config, NODE)
        status = px.cri.pod_status(pod)
        assert status.info.get("sandboxer") == PLUGIN, status.info  # podshim's own answer
        assert status.ready and status.ip and status.handler == NODE, status.raw
        assert status.pid > 0
        described = json.loads(
            (Path(px.state.sandbox_dir(cu.CRI_NAMESPACE, pod)) / "config.json").read_text()
        )
        assert described["hostname"] == hostname
        assert described["linux"]["cgroupsPath"] == f"{parent}/{pod}"

        server = px.container(pod, "server", ["sh", "-c", SERVER])
        client = px.container(pod, "client", ["sleep", "3600"])
        for cid in (server.id, client.id):  # containerd loaded the task from our address
            boot = json.loads((px.bundle(cid) / "bootstrap.json").read_text())
            assert boot["version"] == 3 and boot["protocol"] == "ttrpc", boot
            assert boot["address"].endswith("/task.sock"), boot
        for kind in ("ipc", "uts", "net", "pid"):
            assert cp.ns_of(server.pid, kind) == cp.ns_of(client.pid, kind), kind
            assert cp.ns_of(server.pid, kind) != cp.host_ns(kind), kind
        for cid in (server.id, client.id):
            assert px.exec_ok(cid, "hostname").strip() == hostname
            for key, value in SYSCTLS.items():
                proc = "/proc/sys/" + key.replace(".", "/")
                assert px.exec_ok(cid, "cat", proc).strip() == value, key
        assert px.exec_ok(client.id, "cat", "/proc/1/cmdline").rstrip("\0") == "podshim-init"
        (init,) = px.inits()
        assert cp.cgroup_of(init.pid, "memory") == f"{parent}/{pod}"

        def fetched() -> bool:  # localhost between the pod's containers
            res = px.exec(client.id, "wget", "-O", "-", "http://127.0.0.1:8080/")
            return res.exit_code == 0 and res.stdout.strip() == "podshim-ok"

        wait_for(fetched, timeout=cu.DEADLINE, interval=0.2, message="wget on localhost")
        problems: list[str] = []

        def no_shim() -> bool:
            problems[:] = _no_shim_anywhere(px, [pod], {server.pid, client.pid})
            return not problems

        wait_for(no_shim, timeout=cu.DEADLINE, interval=0.2, message=lambda: str(problems))

        stats = px.cri.pod_stats(pod)
        assert stats.attributes.id == pod
        assert {s.attributes.id for s in stats.linux.containers} == {server.id, client.id}
        assert stats.linux.memory.working_set_bytes.value > 0, stats
        req = ctlpb.ControllerMetricsRequest(sandbox_id=pod, sandboxer=PLUGIN)
        metric = ctlpb.ControllerMetricsResponse.FromString(
            _controller(px.lab, "Metrics", req.SerializeToString())
        ).metrics
        assert metric.id == pod and metric.timestamp.seconds > 0 and metric.data.value, metric

        px.cri.stop_pod(pod)
        px.wait_pod(pod, "NOTREADY")
        for cid in (server.id, client.id):
            assert px.cri.container_status(cid).state == "EXITED"
        assert not os.path.lexists(px.pins(pod))
        assert not px.inits()
        px.cri.stop_pod(pod)  # StopPodSandbox is idempotent
        assert not px.cri.pod_status(pod).ready
        px.cri.remove_pod(pod)
        px.pods[pod].removed = True
        px.cri.remove_pod(pod)  # so is RemovePodSandbox
        px.cri.stop_pod(pod)
        with pytest.raises(CriError):
            px.cri.pod_status(pod)
        px.wait_gone(pod)
        assert not px.daemon.processes()
    finally:
        errors += px.cleanup([p for p, r in px.pods.items() if not r.removed])
        errors += [f"cgroup parent {d}" for d in remove_cgroup(parent)]
    assert not errors, "\n".join(errors) + "\n" + px.daemon.tail()


def test_pod_podshim_cannot_honour_is_refused_with_nothing_left(px: ProxyLab) -> None:
    name = _unique("bad")
    config = px.pod_config(name)  # an ipc mode CRI passes on and podshim does not know
    config.linux.security_context.namespace_options.ipc = 7  # type: ignore[assignment]
    with pytest.raises(CriError) as err:
        px.cri.run_pod_config(config, NODE)
    assert "unknown ipc namespace mode 7" in err.value.details, err.value
    wait_for(lambda: not px.strays(), timeout=cu.DEADLINE, interval=0.2,
             message=lambda: "processes left: " + cp.describe(px.strays()))  # fmt: skip
    assert px.state.sandboxes() == [] and px.state.tasks() == []
    assert not [p for p in px.cri.list_pods() if p.metadata.name.startswith(name)]


def test_daemon_killed_and_restarted_reports_and_cleans_its_pods(px: ProxyLab) -> None:
    """SIGKILL of the daemon with two pods up: its successor runs the delete action on
    every task and pod it recorded (the runtime's state too when containerd removed the
    task's bundle first), publishes /tasks/exit for each task (CRI: EXITED; 255 when
    CRI's Wait on the dead daemon failed first, else 137) and answers the pods' Wait as
    exited (CRI: NOTREADY); stop and remove leave nothing. The next pod runs on the new
    daemon."""
    pods = [px.pod(f"kill{i}", NODE, hostname=_unique("k"), pid_mode="POD")[0] for i in (1, 2)]
    containers = [px.container(p, f"c{i}", ["sleep", "3600"]) for p in pods for i in (1, 2)]
    for pod in pods:
        px.remember(pod)
    victims = {c.pid for c in containers} | {s.pid for s in px.inits()}
    px.daemon.kill()
    px.daemon.start()
    for c in containers:  # 255: CRI's own, when the Wait on the dead daemon failed
        info = px.wait_container(c.id, "EXITED")
        assert info.exit_code in (137, 255), info
    for pod in pods:
        px.wait_pod(pod, "NOTREADY")
        assert not os.path.lexists(px.pins(pod))
    wait_for(lambda: not [p for p in victims if read_stat(p) is not None],
             timeout=cu.DEADLINE, interval=0.2, message="the lost pods' processes to go")  # fmt: skip
    assert px.state.tasks() == []
    assert "was lost with the previous daemon" in px.daemon.tail(200)
    # a new pod on the new daemon
    pod, _ = px.pod("afterkill", NODE)
    c = px.container(pod, "c", ["sleep", "3600"])
    assert px.exec_ok(c.id, "echo", "hi").strip() == "hi"
    last: list[str] = []

    def removed(pod_id: str) -> bool:
        px.pods[pod_id].removed = False
        last[:] = px.stop_and_remove(pod_id)
        return not last

    for pod_id in [*pods, pod]:
        wait_for(lambda p=pod_id: removed(p), timeout=cu.DEADLINE, interval=0.5,  # type: ignore[misc]
                 message=lambda: f"pod removal: {last}")  # fmt: skip
        px.wait_gone(pod_id)


_PROBE = r"""
import os, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(path)
except PermissionError:
    sys.exit(3)
s.settimeout(10)
try:
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    data = s.recv(64)
except (BrokenPipeError, ConnectionResetError):  # closed by the server
    data = b""
sys.exit(0 if data else 4)
"""


def _probe(path: Path, uid: int | None) -> int:
    """Connect to ``path`` (as ``uid``, in a forked child that setuid()s) and speak
    HTTP/2's preface: 0 when the gRPC server answered, 4 when the connection was closed
    unanswered, 3 when the connect itself was refused."""
    kwargs: dict[str, Any] = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    res = subprocess.run(["/usr/bin/python3", "-I", "-c", _PROBE, str(path)], timeout=60,
                         check=False, cwd="/", **kwargs)  # fmt: skip
    return res.returncode


def test_a_client_that_is_not_root_is_refused(px: ProxyLab) -> None:
    nobody = 65534
    assert _probe(px.daemon.socket, None) == 0  # root: served
    assert _probe(px.daemon.socket, nobody) == 3  # the socket is root's, mode 0600
    os.chmod(px.daemon.socket, 0o666)  # even when its mode lets anyone connect...
    try:
        assert _probe(px.daemon.socket, nobody) == 4  # ...the peer check closes it
        assert f"uid {nobody} gid {nobody} is not root" in px.daemon.tail(200)
        assert _probe(px.daemon.socket, None) == 0
    finally:
        os.chmod(px.daemon.socket, 0o600)
    pod, _ = px.pod("afterprobe", NODE)  # containerd's own connection still works
    assert px.cri.pod_status(pod).ready


def test_pod_survives_a_containerd_restart(px: ProxyLab) -> None:
    """containerd reloads the pod's tasks from their bundles (bootstrap.json: our Task v3
    address) and CRI asks the controller for the pod's status again; the daemon never
    noticed."""
    pod, _ = px.pod("restart", NODE, hostname=_unique("rs"))
    c = px.container(pod, "c", ["sleep", "3600"])
    px.remember(pod)
    daemon = px.daemon.pid
    px.restart_containerd()
    assert px.cri.pod_status(pod).ready
    assert px.cri.container_status(c.id).state == "RUNNING"
    assert px.exec_ok(c.id, "echo", "hello").strip() == "hello"
    two = px.container(pod, "two", ["sleep", "3600"])
    assert cp.ns_of(two.pid, "net") == cp.ns_of(c.pid, "net")
    assert px.daemon.pid == daemon and not px.processes()
    errs = px.stop_and_remove(pod)
    assert errs == [], str(errs) + "\n" + px.lab.log_tail(100)
    px.wait_gone(pod)
