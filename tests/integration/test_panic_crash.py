"""The crash report (panic.log) of a pod shim.

A pod shim crashed on purpose (the ``PODSHIM_TEST_CRASH`` test hook, set in this module's
containerd environment for containers named :data:`CRASH_NAME`) leaves panic.log in the
sandbox's bundle, which the sandbox's ``delete`` relays to containerd's log as a cleanup
warning, while a workload's ``delete`` does not. Through CRI (``criutil``: one private
containerd with the ``podshim`` and ``runc`` handlers), like kubelet.

containerd removes the sandbox's bundle as soon as CRI handles the crash, so panic.log
itself is checked on a shim daemon run directly (no containerd), whose bundles stay.

Every wait is a poll with a generous deadline, never a fixed sleep; every test cleans up.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from google.protobuf import any_pb2

from podshim.api.runtimeoptions.v1 import api_pb2 as ro_pb2
from podshim.api.task.v2 import shim_pb2 as pb
from podshim.oci.bundle import PANIC as PANIC_FILE
from podshim.ttrpc.client import call_sync
from podshim_lab import wait_for
from podshim_lab.faults import crash_env

if TYPE_CHECKING:
    from tests.integration import criutil as cu
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import criutil as cu

# the per-test fixture (stop, remove, check nothing is left) with this module's lab
cri = cu.cri

#: CRI containers with this name crash their pod's shim (the test hook)
CRASH_NAME = "podshim-crash-hook"
SHIM = str(Path(sys.executable).parent / "containerd-shim-podshim-v1")
T = "io.kubernetes.cri.container-type"
S = "io.kubernetes.cri.sandbox-id"


@pytest.fixture(scope="module")
def cri_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cu.CriLab]:
    """``criutil.cri_lab`` whose containerd (and so every shim) has the crash test hook
    armed for containers named :data:`CRASH_NAME`."""
    if not any(Path(p).is_file() for p in ("/bin/busybox", "/usr/bin/busybox")):
        pytest.skip("busybox not installed (apt-get install busybox-static)")
    armed = crash_env(CRASH_NAME)
    old = {k: os.environ.get(k) for k in armed}
    os.environ.update(armed)  # containerd's environment is taken at start
    try:
        lab, crilab = cu.open_cri_lab(tmp_path_factory.mktemp("podshim-oom-stats"))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield crilab
    finally:
        errors = cu.close_cri_lab(lab, crilab)
        assert not errors, "CRI lab teardown left things behind:\n" + "\n".join(errors)


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


# -- a crashing pod shim ------------------------------------------------------------------------


def log_lines_since(cri: cu.CriLab, offset: int) -> list[str]:
    data = cri.lab.log_path.read_bytes()[offset:]
    return data.decode(errors="replace").splitlines()


def test_crash_is_relayed_by_the_sandbox_delete_only(cri: cu.CriLab) -> None:
    pod, _ = cri.pod("crash", cu.PODSHIM, hostname=_unique("cr"))
    bystander = cri.container(pod, "bystander", ["sleep", "3600"])
    sandbox_bundle = cri.bundle(pod)
    offset = cri.lab.log_path.stat().st_size
    crasher = cri.create(pod, CRASH_NAME, ["sleep", "3600"])
    with contextlib.suppress(cu.CriError):  # the shim may die before it answers Start
        cri.cri.start_container(crasher)
    cri.wait_pod(pod, "NOTREADY")
    for cid in (bystander.id, crasher):
        cri.wait_container(cid, "EXITED")

    def relays() -> list[str]:
        return [
            line
            for line in log_lines_since(cri, offset)
            if "cleanup warnings" in line and "panic.log" in line
        ]

    (relay,) = wait_for(
        relays,
        timeout=cu.DEADLINE,
        interval=0.2,
        message=lambda: (
            "the sandbox's relayed panic.log in containerd's log:\n" + cri.lab.log_tail(40)
        ),
    )
    assert "level=warning" in relay, relay
    assert f"podshim delete {pod}: the shim serving this task crashed" in relay, relay
    assert f"{sandbox_bundle}/{PANIC_FILE}" in relay, relay  # written in the sandbox's bundle
    assert "Traceback (most recent call last):" in relay and "DeliberateCrash" in relay, relay
    assert f"after Create of task {crasher}" in relay, relay  # the workload's Create did it

    # every delete action has run (containerd's children are gone) once the pod is gone
    errors = cri.cleanup([pod])
    assert not errors, "\n".join(errors)
    lines = log_lines_since(cri, offset)
    for cid in (bystander.id, crasher):
        cleaned = [x for x in lines if "cleaning up after shim disconnected" in x and cid in x]
        assert cleaned, f"containerd ran no delete for workload {cid}"
    assert relays() == [relay], relays()  # no workload's delete relayed anything
    warnings = [x for x in lines if "cleanup warnings" in x]
    assert not [x for x in warnings if bystander.id in x.split("crashed;")[0]], warnings
    # the shim logged its crash too (logrus fatal, with the traceback)
    fatal = [x for x in lines if "level=fatal" in x and "shim daemon crashed" in x]
    assert len(fatal) == 1 and "DeliberateCrash" in fatal[0], fatal


class _FifoReader:
    """Collects what is written to a FIFO (the bundle's ``log``), as containerd does."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.data = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-fifo", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:  # no writer (yet, or any more)
                return
            self.data += chunk

    def _run(self) -> None:
        while not self._stop.is_set():
            select.select([self.fd], [], [], 0.1)
            self._read()
            time.sleep(0.01)

    def close(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=30)
        self._read()
        os.close(self.fd)
        return self.data.decode(errors="replace").splitlines()


def _spawn_daemon(argv: list[str], env: dict[str, str], listener: socket.socket,
                  stderr: int) -> int:  # fmt: skip
    """Spawn like ``start`` does: own session, listening socket on fd 3, stdio /dev/null."""
    os.set_inheritable(listener.fileno(), True)
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        return os.posix_spawn(
            argv[0],
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0),
                (os.POSIX_SPAWN_DUP2, devnull, 1),
                (os.POSIX_SPAWN_DUP2, stderr, 2),
                (os.POSIX_SPAWN_DUP2, listener.fileno(), 3),
            ],
            setsid=True,
        )
    finally:
        os.close(devnull)


def _wait_exit(pid: int, timeout: float) -> int:
    """Wait for child ``pid`` (polling); its exit code. Kills it after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"process {pid} did not exit within {timeout}s")
        time.sleep(0.05)


def _create(address: str, req: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
    return call_sync(
        address, "containerd.task.v2.Task", "Create", req, pb.CreateTaskResponse, timeout=60
    )


def _bundle(root: Path, name: str, annotations: dict[str, str]) -> Path:
    b = root / name
    b.mkdir()
    spec = {"process": {"args": ["sh"]}, "root": {"path": "rootfs"}, "annotations": annotations}
    (b / "config.json").write_text(json.dumps(spec))
    return b


def _delete_action(ns: str, tid: str, b: Path) -> subprocess.CompletedProcess[bytes]:
    argv = [SHIM, "-namespace", ns, "-address", "/nonexistent", "-id", tid, "-bundle", str(b)]
    return subprocess.run(
        [*argv, "delete"], cwd=b, capture_output=True, stdin=subprocess.DEVNULL,
        timeout=60, check=False,
    )  # fmt: skip


def test_crashed_pod_shim_leaves_panic_log_in_the_sandbox_bundle() -> None:
    """A real shim daemon, without containerd (so the bundles stay): the test hook
    crashes it after the sandbox's Create; panic.log is in the sandbox's bundle; the
    sandbox's ``delete`` relays it, a workload's neither relays nor removes it. The log
    FIFO shows the config's format (json) from the first Create on."""
    token = secrets.token_hex(3)
    ns, sid, wid = f"psh{token}", f"sb{token}", f"wl{token}"
    work = Path(tempfile.mkdtemp(prefix="psh-", dir="/tmp"))  # short: a socket lives here
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fifo: _FifoReader | None = None
    pid = 0
    try:
        sb = _bundle(work, sid, {T: "sandbox", S: sid})
        wl = _bundle(work, wid, {T: "container", S: sid})
        fifo = _FifoReader(sb / "log")
        config = work / "podshim.toml"
        config.write_text(
            f'default_host = "none"\nlog_format = "json"\nruntime_root = "{work}/runc"\n'
        )
        sock_path = str(work / "shim.sock")
        listener.bind(sock_path)
        listener.listen(16)
        env = {k: v for k, v in os.environ.items() if k != "TTRPC_ADDRESS"}
        env.update(crash_env(sid))
        # below a child subreaper, which reaps the shim's orphans (its anchor) when it dies
        argv = [sys.executable, "-m", "podshim_lab.subreaper", "--",
                SHIM, "-namespace", ns, "-id", sid, "-bundle", str(sb), "-socket", sock_path]  # fmt: skip
        with open(work / "stderr", "wb") as err:
            pid = _spawn_daemon(argv, env, listener, err.fileno())
        listener.close()
        options = any_pb2.Any(
            type_url="runtimeoptions.v1.Options",
            value=ro_pb2.Options(config_path=str(config)).SerializeToString(),
        )
        resp = _create(sock_path, pb.CreateTaskRequest(id=sid, bundle=str(sb), options=options))
        assert resp.pid > 0
        status = _wait_exit(pid, cu.DEADLINE)
        pid = 0
        assert status == 2, (work / "stderr").read_text()  # a crash, as the daemon reports it

        panic = (sb / PANIC_FILE).read_text()
        assert "crashed at " in panic and "Traceback (most recent call last):" in panic, panic
        assert f"DeliberateCrash: deliberate crash after Create of task {sid}" in panic, panic
        assert not (wl / PANIC_FILE).exists()

        lines = fifo.close()
        fifo = None
        text = [x for x in lines if x.startswith("time=")]
        json_lines = [json.loads(x) for x in lines if x.startswith("{")]
        assert any("serving on" in x for x in text), lines  # before the first Create: text
        assert not any("created task" in x for x in text), lines  # after it: json
        created = [d for d in json_lines if str(d.get("msg", "")).startswith("created task")]
        assert created and created[0]["tid"] == sid and created[0]["pod-id"] == sid, lines
        assert created[0]["level"] == "info" and created[0]["runtime"] == "io.containerd.podshim.v1"
        fatal = [d for d in json_lines if d.get("level") == "fatal"]
        assert len(fatal) == 1 and "DeliberateCrash" in fatal[0]["msg"], lines

        # the sandbox's delete relays it (containerd logs stderr as "cleanup warnings")
        res = _delete_action(ns, sid, sb)
        assert res.returncode == 0 and res.stdout, res.stderr
        relayed = res.stderr.decode()
        assert relayed.startswith(f"podshim delete {sid}: the shim serving this task crashed; "
                                  f"{sb}/{PANIC_FILE}:\n"), relayed  # fmt: skip
        assert panic in relayed
        # a workload's delete neither relays nor removes it, even with one in its bundle
        shutil.copy(sb / PANIC_FILE, wl / PANIC_FILE)
        res = _delete_action(ns, wid, wl)
        assert res.returncode == 0 and res.stdout, res.stderr
        assert b"panic" not in res.stderr and b"Traceback" not in res.stderr, res.stderr
        assert (sb / PANIC_FILE).read_text() == panic == (wl / PANIC_FILE).read_text()
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(AssertionError, ChildProcessError):
                _wait_exit(pid, cu.DEADLINE)
        if fifo is not None:
            fifo.close()
        listener.close()
        shutil.rmtree(work, ignore_errors=True)
