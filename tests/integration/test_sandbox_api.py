"""Pods through containerd 2.x's Sandbox API: a CRI handler ``podshim-sb`` with
``sandboxer = "shim"``, so CRI execs podshim's shim for the sandbox and drives the pod
with ``containerd.runtime.sandbox.v1.Sandbox`` (CreateSandbox with the PodSandboxConfig,
StartSandbox, SandboxStatus, StopSandbox, ShutdownSandbox, ...); the containers are Task
API Creates on the same shim.

Runs with ``PODSHIM_CONTAINERD=2.1`` (scripts/test.sh's 2.1 line): containerd 1.x has no
Sandbox API. One lab per module with the handlers ``runc``, ``podshim`` and
``podshim-sb``; every test's pods are stopped, removed and checked to be completely gone
(``criutil``'s leftover checks, plus the shim sandbox controller's bundle).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from podshim import rundir
from podshim.api.cgroups.v1 import metrics_pb2 as v1pb
from podshim.api.runtime.sandbox.v1 import sandbox_pb2
from podshim.cgroups import mode
from podshim.cgroups import stats as cgstats
from podshim_lab import Containerd, RuntimeHandler, wait_for
from podshim_lab.cleanup import remove_cgroup
from podshim_lab.cri.client import CriError
from podshim_lab.procfs import descendants, process_table

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
        reason="the Sandbox API needs containerd 2.x: run with PODSHIM_CONTAINERD=2.1",
    ),
]

#: the handler of the Sandbox API front door (docs and tests use this name)
SB = "podshim-sb"
#: where containerd's shim sandbox controller keeps the sandboxes' bundles
SB_BUNDLES = "io.containerd.sandbox.controller.v1.shim"
SYSCTLS = {"net.ipv4.ip_unprivileged_port_start": "900", "kernel.shmmni": "3000"}
SERVER = "mkdir -p /tmp/www && echo podshim-ok > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"


class SandboxLab(cu.CriLab):
    """The CRI lab, knowing that ``podshim-sb`` pods are podshim's too and where the
    shim sandbox controller puts their bundles."""

    def sandbox_bundle(self, pod_id: str) -> Path:
        return self.lab.state / SB_BUNDLES / cu.CRI_NAMESPACE / pod_id

    def runtime_state(self, rec: cu.PodRecord, task_id: str) -> Path:
        if rec.handler == SB:  # podshim's default runtime root (the handler has no config)
            return Path(rundir.runtime_root(self.lab.address)) / cu.CRI_NAMESPACE / task_id
        return super().runtime_state(rec, task_id)

    def leftovers(self, pod_id: str) -> list[str]:
        found = super().leftovers(pod_id)
        if self.pods[pod_id].handler == SB:
            if os.path.lexists(self.shim_socket(pod_id)):
                found.append(f"shim socket {self.shim_socket(pod_id)}")
            if os.path.lexists(self.sandbox_bundle(pod_id)):
                found.append(f"left {self.sandbox_bundle(pod_id)}")
        return found


@pytest.fixture(scope="module")
def sb_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxLab]:
    version = matrix.require(SELECTED)
    config = cu.podshim_config(tmp_path_factory.mktemp("sandbox-api") / "podshim.toml", Path("/"))
    options = {"ConfigPath": str(config)}
    lab = Containerd(
        cri=True,
        runtimes={
            cu.PODSHIM: RuntimeHandler(cu.PODSHIM_RUNTIME, options),
            # no options table: containerd 2.1's CRI copies a handler's runtime options
            # into runc's Options for the Task API endpoint of a shim-sandboxed pod, and
            # fails StartContainer for any other type (podshim's ConfigPath is
            # runtimeoptions.v1; containerd PRs 12986/12786). podshim's defaults apply.
            SB: RuntimeHandler(cu.PODSHIM_RUNTIME, sandboxer="shim"),
        },
        extra_path=[cu.BIN_DIR],
        version=version,
    )
    runtime_root = lab.state / "podshim-runc"
    cu.podshim_config(config, runtime_root)
    crilab: SandboxLab | None = None
    try:
        lab.start()
        assert 'sandboxer = "shim"' in lab.paths.config.read_text()
        lab.ensure_pause()
        crilab = SandboxLab(lab, runtime_root, lab.ensure_busybox(namespace=cu.CRI_NAMESPACE))
        yield crilab
    finally:
        errors = cu.close_cri_lab(lab, crilab)
        # podshim's default runtime root of this containerd: empty directories only
        root = Path(rundir.runtime_root(lab.address))
        for d in (root / cu.CRI_NAMESPACE, root):
            with contextlib.suppress(FileNotFoundError):
                try:
                    d.rmdir()
                except OSError as exc:
                    errors.append(f"runtime root {d}: {exc.strerror}: {sorted(os.listdir(d))}")
        assert not errors, "CRI lab teardown left things behind:\n" + "\n".join(errors)


@pytest.fixture
def sb(sb_lab: SandboxLab) -> Iterator[SandboxLab]:
    """The lab; the test's pods are stopped, removed and checked gone afterwards."""
    before = set(sb_lab.pods)
    try:
        yield sb_lab
    finally:
        mine = [p for p in sb_lab.pods if p not in before]
        errors = sb_lab.cleanup(mine) if sb_lab.lab.running else ["containerd is not running"]
        log = sb_lab.lab.log_tail(200) if errors else ""
        assert not errors, "test left things behind:\n" + "\n".join(errors) + "\n" + log


def _controller_metrics(lab: Containerd, pod: str) -> sandbox_pb2.SandboxMetricsResponse:
    """containerd's own ``Controller/Metrics`` (gRPC), which the shim sandbox controller
    answers with the shim's SandboxMetrics. The request is written by hand
    (``ControllerMetricsRequest{sandbox_id = 1, sandboxer = 10}``); the response has the
    shape of the shim's (``metrics = 1``)."""
    import grpc  # type: ignore[import-untyped,unused-ignore]

    def field(number: int, value: str) -> bytes:
        data = value.encode()
        return bytes([number << 3 | 2, len(data)]) + data

    request = field(1, pod) + field(10, "shim")
    with grpc.insecure_channel(f"unix://{lab.address}") as channel:
        call = channel.unary_unary("/containerd.services.sandbox.v1.Controller/Metrics")
        raw = call(request, metadata=[("containerd-namespace", cu.CRI_NAMESPACE)], timeout=30)
    return sandbox_pb2.SandboxMetricsResponse.FromString(raw)


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def _only_the_pods_shim(sb: SandboxLab, pod: str, pids: set[int]) -> list[str]:
    """Problems with "the shim, the pod's init, the containers and the anchor are the only
    processes below the lab" (no pause process anywhere)."""
    table = process_table()
    shim = sb.shim_pid(pod)
    pod_procs = {shim} | {s.pid for s in descendants(shim, table)}
    found = [
        f"process outside the pod's shim: {s}" for s in sb.processes() if s.pid not in pod_procs
    ]
    found += [f"a pause process: {s}" for s in sb.processes() if s.comm == "pause"]
    kids = {s.pid for s in cp.children(shim, table)} - {s.pid for s in sb.inits()}
    if not pids <= kids:
        found.append(f"containers {sorted(pids)} are not all children of the shim {shim}")
    return found


def test_pod_through_the_sandbox_api(sb: SandboxLab) -> None:
    parent = f"/podshim-sb-{secrets.token_hex(3)}"  # kubelet's pod cgroup: PodSandboxStats reads it
    hostname = _unique("sb")
    errors: list[str] = []
    try:
        config = sb.pod_config(
            "sbapi", hostname=hostname, sysctls=SYSCTLS, pid_mode="POD", cgroup_parent=parent
        )
        pod = sb.run_pod(config, SB)
        status = sb.cri.pod_status(pod)
        # served by podshim's Sandbox service (its verbose info), not a sandbox task
        assert status.info.get("sandboxer") == "shim", status.info
        assert status.ready and status.ip and status.handler == SB, status.raw
        anchor = status.pid
        assert anchor > 0
        # the sandbox's bundle is the shim sandbox controller's (no task bundle), where
        # podshim wrote the pod's description for its `delete` action
        assert not os.path.lexists(sb.bundle(pod))
        described = json.loads((sb.sandbox_bundle(pod) / "config.json").read_text())
        assert described["hostname"] == hostname
        assert described["linux"]["cgroupsPath"] == f"{parent}/{pod}"

        server = sb.container(pod, "server", ["sh", "-c", SERVER])
        client = sb.container(pod, "client", ["sleep", "3600"])
        # one pod: every namespace shared, none of them the host's
        for kind in ("ipc", "uts", "net", "pid"):
            assert cp.ns_of(server.pid, kind) == cp.ns_of(client.pid, kind), kind
            assert cp.ns_of(server.pid, kind) != cp.host_ns(kind), kind
        for cid in (server.id, client.id):
            assert sb.exec_ok(cid, "hostname").strip() == hostname
            for key, value in SYSCTLS.items():
                proc = "/proc/sys/" + key.replace(".", "/")
                assert sb.exec_ok(cid, "cat", proc).strip() == value, key
        assert "httpd" in sb.exec_ok(client.id, "ps")
        # PID 1 of the pod is podshim's init, in the sandbox cgroup below the pod's parent
        assert sb.exec_ok(client.id, "cat", "/proc/1/cmdline").rstrip("\0") == "podshim-init"
        (init,) = sb.inits()
        assert cp.cgroup_of(init.pid, "memory") == f"{parent}/{pod}"

        def fetched() -> bool:  # localhost between the pod's containers
            res = sb.exec(client.id, "wget", "-O", "-", "http://127.0.0.1:8080/")
            return res.exit_code == 0 and res.stdout.strip() == "podshim-ok"

        wait_for(fetched, timeout=cu.DEADLINE, interval=0.2, message="wget on localhost")
        problems: list[str] = []

        def only_the_shim() -> bool:
            problems[:] = _only_the_pods_shim(sb, pod, {server.pid, client.pid})
            return not problems

        wait_for(only_the_shim, timeout=cu.DEADLINE, interval=0.2, message=lambda: str(problems))

        stats = sb.cri.pod_stats(pod)
        assert stats.attributes.id == pod and stats.attributes.metadata.name == config.metadata.name
        assert {s.attributes.id for s in stats.linux.containers} == {server.id, client.id}
        assert stats.linux.process.process_count.value >= 2, stats
        assert stats.linux.memory.working_set_bytes.value > 0, stats
        # the pod's metrics from the shim's SandboxMetrics, through containerd's Controller
        metric = _controller_metrics(sb.lab, pod).metrics
        assert metric.id == pod and metric.timestamp.seconds > 0, metric
        usage = cgstats.unpack(metric.data)
        if mode() != "unified":  # this machine: cgroup v1 (the v2 fields differ)
            assert isinstance(usage, v1pb.Metrics)
            assert usage.memory.usage.usage > 0 and usage.pids.current >= 3, usage

        sb.cri.stop_pod(pod)
        sb.wait_pod(pod, "NOTREADY")
        for cid in (server.id, client.id):
            assert sb.cri.container_status(cid).state == "EXITED"
        assert not os.path.lexists(sb.pins(pod))  # the pod's host is torn down
        assert not sb.inits()
        sb.cri.stop_pod(pod)  # StopPodSandbox is idempotent
        assert not sb.cri.pod_status(pod).ready
        sb.cri.remove_pod(pod)
        sb.pods[pod].removed = True
        sb.cri.remove_pod(pod)  # so is RemovePodSandbox
        sb.cri.stop_pod(pod)
        with pytest.raises(CriError):
            sb.cri.pod_status(pod)
        sb.wait_gone(pod)  # shim, socket, pins, cgroups, bundles: nothing left
    finally:  # the pods first: the parent cgroup can only go once it is empty
        errors += sb.cleanup([p for p, r in sb.pods.items() if not r.removed])
        errors += [f"cgroup parent {d}" for d in remove_cgroup(parent)]
    assert not errors, "\n".join(errors)


def _bad_pod(sb: SandboxLab, name: str, **ns: Any) -> CriError:
    config = sb.pod_config(name)
    opts = config.linux.security_context.namespace_options
    for key, value in ns.items():
        setattr(opts, key, value)
    with pytest.raises(CriError) as err:
        sb.cri.run_pod_config(config, SB)
    return err.value


def test_pod_podshim_cannot_honour_is_refused_with_nothing_left(sb: SandboxLab) -> None:
    name = _unique("bad")
    err = _bad_pod(sb, name, ipc=7)  # a namespace mode CRI passes on and podshim does not know
    assert "unknown ipc namespace mode 7" in err.details, err
    _nothing_left(sb, name)  # CRI undid the sandbox: ShutdownSandbox, shim delete


def test_user_namespace_is_refused_with_nothing_left(sb: SandboxLab) -> None:
    """A pod user namespace (CRI's userns_options, mode POD): podshim cannot honour it.
    The lab's CRI client predates the field: it is added to the request as CRI's bytes."""
    from podshim.api.cri.v1 import pod_pb2 as podcri

    name = _unique("userns")
    config = sb.pod_config(name)
    ids = [podcri.IDMapping(host_id=100000, container_id=0, length=65536)]
    userns = podcri.PodSandboxConfig(
        linux=podcri.LinuxPodSandboxConfig(
            security_context=podcri.LinuxSandboxSecurityContext(
                namespace_options=podcri.NamespaceOption(
                    userns_options=podcri.UserNamespace(mode=podcri.POD, uids=ids, gids=ids)
                )
            )
        )
    )
    config.MergeFromString(userns.SerializeToString())
    with pytest.raises(CriError) as err:
        sb.cri.run_pod_config(config, SB)
    assert "cannot give a pod a user namespace" in err.value.details, err.value
    _nothing_left(sb, name)


def _nothing_left(sb: SandboxLab, name: str) -> None:
    """After a refused RunPodSandbox: no shim, no sandbox bundle, no pod state."""
    bundles = sb.lab.state / SB_BUNDLES / cu.CRI_NAMESPACE
    wait_for(lambda: not sb.strays(), timeout=cu.DEADLINE, interval=0.2,
             message=lambda: "processes left: " + cp.describe(sb.strays()))  # fmt: skip
    wait_for(
        lambda: not (bundles.is_dir() and os.listdir(bundles)),
        timeout=cu.DEADLINE,
        interval=0.2,
        message=lambda: f"sandbox bundles left: {sorted(os.listdir(bundles))}",
    )
    pods = Path(rundir.pods_dir(sb.lab.address)) / cu.CRI_NAMESPACE
    with contextlib.suppress(FileNotFoundError):
        assert os.listdir(pods) == []
    assert not [p for p in sb.cri.list_pods() if p.metadata.name.startswith(name)]


def test_host_death_makes_the_pod_notready_with_exit_1(sb: SandboxLab) -> None:
    """The pod's PID init dies: every container is killed, WaitSandbox answers 1 and CRI
    marks the pod NOTREADY; stop and remove then leave nothing."""
    pod, _ = sb.pod("hostdeath", SB, hostname=_unique("hd"), pid_mode="POD")
    c = sb.container(pod, "c", ["sleep", "3600"])
    (init,) = sb.inits()
    os.kill(init.pid, 9)
    sb.wait_pod(pod, "NOTREADY")
    sb.wait_container(c.id, "EXITED")
    assert sb.cri.pod_status(pod).info.get("exitStatus") == 1
    errs = sb.stop_and_remove(pod)
    assert errs == [], str(errs) + "\n" + sb.lab.log_tail(200)
    sb.wait_gone(pod)


def test_shim_killed_pod_is_cleaned_up(sb: SandboxLab) -> None:
    """SIGKILL of the pod's shim: CRI sees the pod NOTREADY; containerd's cleanup runs
    podshim's `delete` on the sandbox bundle, whose config.json (written by
    CreateSandbox) names the pod's host: pins, cgroups and init go; stop and remove
    (retried as kubelet does) leave nothing."""
    pod, _ = sb.pod("shimkill", SB, hostname=_unique("sk"), pid_mode="POD")
    sb.container(pod, "one", ["sleep", "3600"])
    sb.container(pod, "two", ["sleep", "3600"])
    sb.remember(pod)
    os.kill(sb.shim_pid(pod), 9)
    seen: list[str] = []

    def not_ready() -> bool:  # until containerd has run the cleanup: "ttrpc: closed"
        try:
            seen[:] = [sb.cri.pod_status(pod).state]
        except CriError as exc:
            seen[:] = [str(exc)]
        return seen == ["NOTREADY"]

    wait_for(not_ready, timeout=cu.DEADLINE, interval=0.2, message=lambda: f"NOTREADY: {seen}")
    last: list[str] = []

    def removed() -> bool:
        sb.pods[pod].removed = False
        last[:] = sb.stop_and_remove(pod)
        return not last

    wait_for(removed, timeout=cu.DEADLINE, interval=0.5, message=lambda: f"pod removal: {last}")
    sb.wait_gone(pod)


def test_pod_survives_containerd_restart(sb: SandboxLab) -> None:
    """containerd reloads the sandbox's shim from the shim sandbox controller's state
    (bootstrap.json) and CRI asks it for the pod's status again."""
    pod, _ = sb.pod("restart", SB, hostname=_unique("rs"))
    c = sb.container(pod, "c", ["sleep", "3600"])
    sb.remember(pod)
    sb.restart_containerd()
    assert sb.cri.pod_status(pod).ready
    assert sb.cri.container_status(c.id).state == "RUNNING"
    assert sb.exec_ok(c.id, "echo", "hello").strip() == "hello"
    two = sb.container(pod, "two", ["sleep", "3600"])
    assert cp.ns_of(two.pid, "net") == cp.ns_of(c.pid, "net")
    errs = sb.stop_and_remove(pod)
    assert errs == [], str(errs) + "\n" + sb.lab.log_tail(200)
    sb.wait_gone(pod)
