"""``podshim diag`` against live podshim pods made through CRI (hcsshim's shimdiag).

Two pods on the ``podshim`` handler (bridge network, one busybox container each) serve
the whole module; the CLI runs as a subprocess with ``--address`` naming this module's
private containerd, so shims of other containerd instances on the machine never show.
``exec`` uses the host's own tools (``ip`` from iproute2, ``sh``): no container image is
involved. Every wait is a poll with a generous deadline.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from podshim.diag.registry import registry_dir
from podshim_lab import wait_for

if TYPE_CHECKING:
    from tests.integration import criprocs as cp
    from tests.integration import criutil as cu
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import criprocs as cp
    import criutil as cu

cri_lab = cu.cri_lab

PODSHIM_CLI = str(Path(cu.BIN_DIR) / "podshim")
CLI_TIMEOUT = 90.0
#: wait for a trapped SIGINT: a signal that arrives between two commands of a shell runs
#: its trap after the next command, so that command must be short (not one long sleep)
WAIT = "while :; do sleep 0.1; done"


@dataclass(frozen=True)
class LivePod:
    id: str
    ip: str
    container: str
    container_pid: int
    shim_pid: int


@dataclass(frozen=True)
class Pods:
    lab: cu.CriLab
    a: LivePod
    b: LivePod

    def diag(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """``podshim diag --address <lab> args...``, captured."""
        return subprocess.run(
            self.argv(*args),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )

    def argv(self, *args: str) -> list[str]:
        return [PODSHIM_CLI, "diag", "--address", self.lab.lab.address, *args]


def _live_pod(cri: cu.CriLab, name: str) -> LivePod:
    pod, _ = cri.pod(name, cu.PODSHIM)
    ctr = cri.container(pod, "sleeper", ["sleep", "3600"])
    status = cri.cri.pod_status(pod)
    assert status.ip, f"pod {pod} has no IP: {status.raw}"
    return LivePod(pod, status.ip, ctr.id, ctr.pid, cri.shim_pid(pod))


@pytest.fixture(scope="module")
def pods(cri_lab: cu.CriLab) -> Iterator[Pods]:
    """Two live podshim pods for the whole module; removed and checked gone after it."""
    before = set(cri_lab.pods)
    try:
        yield Pods(cri_lab, _live_pod(cri_lab, "diag-a"), _live_pod(cri_lab, "diag-b"))
    finally:
        mine = [p for p in cri_lab.pods if p not in before]
        errors = cri_lab.cleanup(mine)
        assert not errors, "diag pods left things behind:\n" + "\n".join(errors)


def _ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, f"{res.args}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _prefix(pods: Pods, pod: LivePod) -> str:
    """The shortest prefix naming ``pod`` alone (at least 8 characters)."""
    other = pods.b.id if pod is pods.a else pods.a.id
    n = next(i for i in range(1, len(pod.id) + 1) if not other.startswith(pod.id[:i]))
    return pod.id[: max(n, 8)]


# -- list / tasks / stacks / stats / pid ----------------------------------------------------


def test_list_shows_both_pods(pods: Pods) -> None:
    table = _ok(pods.diag("list"))
    lines = table.splitlines()
    assert lines[0].split() == ["NAMESPACE", "POD", "PID", "TASKS"]
    rows = {ln.split()[1]: ln.split() for ln in lines[1:]}
    for p in (pods.a, pods.b):
        assert rows[p.id] == [cu.CRI_NAMESPACE, p.id, str(p.shim_pid), "2"], table
    listed = json.loads(_ok(pods.diag("list", "--json")))
    got = {e["pod_id"]: e for e in listed}
    assert set(got) == {pods.a.id, pods.b.id}
    for p in (pods.a, pods.b):
        e = got[p.id]
        assert (e["namespace"], e["pid"], e["tasks"], e["id"]) == (
            cu.CRI_NAMESPACE,
            p.shim_pid,
            2,
            p.id,
        )
        assert e["address"] == pods.lab.lab.address
        assert e["socket"] == pods.lab.shim_socket(p.id)


def test_tasks_show_sandbox_container_and_execs(pods: Pods) -> None:
    a = pods.a
    table = _ok(pods.diag("tasks", _prefix(pods, a)))
    rows = {ln.split()[0]: ln.split() for ln in table.splitlines()[1:]}
    assert rows[a.id][1:3] == ["sandbox", "running"], table
    assert rows[a.container][1:4] == ["container", "running", str(a.container_pid)], table

    # an exec shows up with --execs while CRI runs it
    done = threading.Event()

    def exec_sync() -> None:
        with contextlib.suppress(Exception):
            pods.lab.cri.exec_sync(a.container, ["sleep", "8"], timeout=30)
        done.set()

    thread = threading.Thread(target=exec_sync, daemon=True)
    thread.start()

    def running_exec() -> dict[str, Any] | None:
        tasks = json.loads(_ok(pods.diag("tasks", "--execs", "--json", a.id)))
        ctr = next(t for t in tasks if t["id"] == a.container)
        return next((x for x in ctr["execs"] if x["state"] == "running"), None)

    x = wait_for(running_exec, timeout=cu.DEADLINE, interval=0.2, message="a running exec")
    assert x["pid"] > 0 and x["id"]
    thread.join(cu.DEADLINE)
    assert done.is_set()
    tasks = json.loads(_ok(pods.diag("tasks", "--json", a.id)))
    assert {t["id"]: t["kind"] for t in tasks} == {a.id: "sandbox", a.container: "container"}
    assert all(t["execs"] == [] for t in tasks)  # without --execs


def test_stacks_stats_and_pid(pods: Pods) -> None:
    b = pods.b
    stacks = _ok(pods.diag("stacks", b.id))
    assert re.search(r"=== \d+ asyncio tasks ===", stacks), stacks[:500]
    assert "podSandboxTask::waitHostExit" in stacks and "MainThread" in stacks

    table = _ok(pods.diag("stats", b.id)).splitlines()
    assert table[0].split() == ["TASK", "KIND", "CPU(s)", "MEMORY(MiB)", "PIDS"]
    rows = {ln.split()[0]: ln.split() for ln in table[1:]}
    assert rows[b.container][1] == "container" and int(rows[b.container][4]) >= 1
    assert rows[b.id][1] == "sandbox" and int(rows[b.id][4]) >= 1  # the whole pod's
    stats = json.loads(_ok(pods.diag("stats", "--json", b.id)))
    by_id = {t["id"]: t for t in stats["tasks"]}
    assert b.container in by_id and b.id in by_id
    assert by_id[b.container]["type"].startswith("io.containerd.cgroups.")
    assert int(by_id[b.container]["metrics"]["pids"]["current"]) >= 1
    assert stats["pod"] == {k: v for k, v in by_id[b.id].items() if k != "id"}

    assert _ok(pods.diag("pid", b.id)).strip() == str(b.shim_pid)


def test_unknown_and_ambiguous_pods_exit_2(pods: Pods) -> None:
    res = pods.diag("tasks", "zz-not-a-pod")
    assert res.returncode == 2 and "no live podshim shim matches 'zz-not-a-pod'" in res.stderr
    a, b = pods.a.id, pods.b.id
    common = next((a[:i] for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), a)
    res = pods.diag("exec", common, "--", "true")
    assert res.returncode == 2, res
    assert f"pod id {common!r} is ambiguous" in res.stderr
    assert pods.a.id in res.stderr and pods.b.id in res.stderr
    res = pods.diag("--namespace", "default", "stacks", pods.a.id)
    assert res.returncode == 2 and "in namespace 'default'" in res.stderr


def test_share_is_refused_with_the_reason(pods: Pods) -> None:
    res = pods.diag("share", "--ro", pods.a.id, "/tmp", "/mnt/tmp")
    assert res.returncode == 1
    assert "failed precondition" in res.stderr and "bind the path" in res.stderr


# -- exec ---------------------------------------------------------------------------------


def test_exec_ip_addr_sees_the_pods_network_without_an_image(pods: Pods) -> None:
    for p in (pods.a, pods.b):
        out = _ok(pods.diag("exec", _prefix(pods, p), "--", "ip", "addr"))
        assert re.search(r"\d+: eth0@", out), out
        assert f"inet {p.ip}/" in out, out
        assert "inet 127.0.0.1/8" in out

    a = pods.a
    out = _ok(pods.diag("exec", a.id, "--", "sh", "-c",
                        "readlink /proc/self/ns/net /proc/self/ns/uts; cat /proc/self/cgroup"))  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == cp.ns_of(a.container_pid, "net") != cp.host_ns("net")
    assert lines[1] == cp.ns_of(a.container_pid, "uts")
    cgroups = {ln.split(":")[1]: ln.split(":", 2)[2] for ln in lines[2:]}
    for controller in ("pids", "memory", "cpu", ""):  # its own, below the sandbox's
        parent, _, own = cgroups[controller].rpartition("/")
        assert parent == f"/{cu.CRI_NAMESPACE}/{a.id}", out
        assert own.startswith("podshim-exec-"), out


def test_exec_exit_codes_stderr_and_stdin(pods: Pods) -> None:
    a = pods.a.id
    assert pods.diag("exec", a, "--", "sh", "-c", "exit 7").returncode == 7
    res = pods.diag("exec", a, "--", "sh", "-c", "echo oops >&2; exit 3")
    assert (res.returncode, res.stdout, res.stderr) == (3, "", "oops\n")
    res = pods.diag("exec", a, "--", "sh", "-c", "kill -TERM $$")
    assert res.returncode == 128 + signal.SIGTERM
    res = pods.diag("exec", a, "--", "no-such-command-here")
    assert res.returncode == 127, res
    res = pods.diag("exec", a, "--", "cat", stdin="piped in\n")
    assert (res.returncode, res.stdout) == (0, "piped in\n")


def _read_until(fd: int, want: str, timeout: float = cu.DEADLINE) -> str:
    """Read ``fd`` until ``want`` shows up; returns everything read."""
    got = b""
    deadline = time.monotonic() + timeout
    while want.encode() not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"waiting for {want!r}; got {got!r}"
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the slave side is gone
                chunk = b""
            assert chunk, f"EOF waiting for {want!r}; got {got!r}"
            got += chunk
    return got.decode(errors="replace")


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_exec_with_a_tty_forwards_ctrl_c_as_a_byte(pods: Pods) -> None:
    master, slave = os.openpty()
    script = "tty; stty size; trap 'echo got-int; exit 0' INT; echo ready; " + WAIT
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    proc = subprocess.Popen(pods.argv("exec", "-t", pods.a.id, "--", "sh", "-c", script),
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)  # fmt: skip
    os.close(slave)
    try:
        out = _read_until(master, "ready")
        assert re.search(r"/dev/pts/\d+\r\n33 111\r\n", out), out
        os.write(master, b"\x03")  # raw mode: a byte for the remote terminal
        out += _read_until(master, "got-int")
        assert proc.wait(timeout=cu.DEADLINE) == 0, out
    finally:
        _stop(proc)
        os.close(master)


def test_exec_without_a_tty_forwards_sigint(pods: Pods) -> None:
    script = "trap 'echo got-int; exit 3' INT; echo ready; " + WAIT
    proc = subprocess.Popen(pods.argv("exec", pods.b.id, "--", "sh", "-c", script),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=cu.DEADLINE) == 3
        assert proc.stdout.read() == "got-int\n"
    finally:
        _stop(proc)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_client_that_dies_or_is_terminated_kills_the_remote_process(
    pods: Pods, sig: signal.Signals
) -> None:
    proc = subprocess.Popen(pods.argv("exec", pods.a.id, "--", "sh", "-c", "echo $$; exec sleep 300"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        remote = int(proc.stdout.readline())
        wait_for(lambda: Path(f"/proc/{remote}/cmdline").read_bytes().startswith(b"sleep\0"),
                 timeout=cu.DEADLINE, message="sh to exec sleep")  # fmt: skip
        proc.send_signal(sig)
        expected = -sig if sig == signal.SIGKILL else 128 + sig  # SIGTERM: a clean exit
        assert proc.wait(timeout=30) == expected
        wait_for(lambda: not os.path.exists(f"/proc/{remote}"), timeout=cu.DEADLINE,
                 interval=0.1, message=f"remote process {remote} to be killed")  # fmt: skip
    finally:
        _stop(proc)


# -- the registry -------------------------------------------------------------------------


def _entries_of(address: str) -> list[dict[str, Any]]:
    """The raw registry entries of one containerd, live or not."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(registry_dir()):
            with contextlib.suppress(OSError, ValueError):
                raw = json.loads(Path(registry_dir(), name).read_text())
                if raw.get("address") == address:
                    found.append(raw)
    return found


def test_a_shim_registers_names_its_pod_and_unregisters(pods: Pods) -> None:
    cri = pods.lab  # not the per-test `cri` fixture: the module's pods still run
    pod, _ = cri.pod("diag-reg", cu.PODSHIM)
    shim = cri.shim_pid(pod)
    mine = [e for e in _entries_of(cri.lab.address) if e["pid"] == shim]
    assert len(mine) == 1, mine
    assert (mine[0]["pod_id"], mine[0]["namespace"]) == (pod, cu.CRI_NAMESPACE)
    assert mine[0]["socket"] == cri.shim_socket(pod)
    assert not cri.stop_and_remove(pod)
    cri.wait_gone(pod)
    assert not [e for e in _entries_of(cri.lab.address) if e["pid"] == shim]
