"""podshim driven by ``ctr`` against a real private containerd and runc.

``ctr run``/``ctr task ...`` with ``--runtime io.containerd.podshim.v1``: stdio, exit
codes, terminals (under a pty made by the test), exec (plain, tty, stdin, missing
binary), kill (SIGTERM, SIGKILL, --all), ps, pause/resume, metrics, delete, and the
``ctr events`` of one whole container lifecycle.
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import TYPE_CHECKING

import pytest
from google.protobuf import empty_pb2

from podshim.api.task.v2 import shim_pb2
from podshim_lab import Containerd, wait_for

if TYPE_CHECKING:
    from tests.integration import shimio as si
    from tests.integration import shimutil as su
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import shimio as si
    import shimutil as su

pytestmark = pytest.mark.timeout(300)


# the fixtures (shimutil): one lab for the whole module, per-test container cleanup
lab = su.module_lab
ids = su.ids


# -- ctr run: stdio and exit codes ---------------------------------------------------------


def test_run_captures_stdout_stderr_and_exit_0(lab: Containerd) -> None:
    res = su.run(lab, "r0", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 0")
    assert res.returncode == 0, res
    assert res.stdout == "to-stdout\n"
    assert "to-stderr\n" in res.stderr


def test_run_exit_code_1(lab: Containerd) -> None:
    res = su.run(lab, "r1", "sh", "-c", "echo before-fail; exit 1")
    assert res.returncode == 1, res
    assert res.stdout == "before-fail\n"


def test_run_exit_code_3_and_large_output_is_complete(lab: Containerd) -> None:
    """Nothing is lost between the process exiting and ctr seeing the exit."""
    res = su.run(lab, "r3", "sh", "-c", "seq 1 20000; seq 1 3000 >&2; exit 3")
    assert res.returncode == 3, res.stderr[-500:]
    assert res.stdout == "".join(f"{i}\n" for i in range(1, 20001))
    assert "".join(f"{i}\n" for i in range(1, 3001)) in res.stderr


def test_run_killed_with_sigkill_exits_137(lab: Containerd, ids: list[str]) -> None:
    """``ctr run`` (attached) reports 128+9 when its task is SIGKILLed."""
    ids.append("r137")
    argv = su.ctr_argv(
        lab, "run", "--rm", "--runtime", su.RUNTIME, su.image(lab), "r137", "sleep", "1000"
    )
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        su.wait_status(lab, "r137", "RUNNING")
        lab.ctr("task", "kill", "-s", "SIGKILL", "r137")
        out, err = proc.communicate(timeout=su.DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 137, (out, err)
    su.wait_status(lab, "r137", None)


def test_detached_task_sigkill_status_137(lab: Containerd, ids: list[str]) -> None:
    ids.append("d137")
    su.run_detached(lab, "d137", "sleep", "1000")
    lab.ctr("task", "kill", "-s", "9", "d137")
    su.wait_status(lab, "d137", "STOPPED")
    res = lab.ctr("task", "delete", "d137")
    assert su.delete_exit_code(res) == 137, res.stderr
    su.wait_status(lab, "d137", None)


# -- terminals -------------------------------------------------------------------------------


def test_run_tty_under_a_pty(lab: Containerd) -> None:
    """``ctr run -t``: the process gets a /dev/pts/N whose size is the one of ctr's pty."""
    argv = su.ctr_argv(
        lab,
        "run",
        "-t",
        "--rm",
        "--runtime",
        su.RUNTIME,
        su.image(lab),
        "tty1",
        "sh",
        "-c",
        f"tty; {si.PRINT_SIZE}; exit 5",
    )
    res = si.run_in_pty(argv, rows=37, cols=91)
    assert res.status == 5, res.output
    assert re.search(r"^/dev/pts/\d+$", res.output, re.M), res.output
    assert "size=37 91" in res.output, res.output
    su.wait_status(lab, "tty1", None)


def test_run_tty_is_interactive(lab: Containerd) -> None:
    """What the test types into its pty reaches the container's shell and back."""
    argv = su.ctr_argv(
        lab, "run", "-t", "--rm", "--runtime", su.RUNTIME, su.image(lab), "tty2", "sh"
    )
    p = si.PtyProcess(argv, rows=24, cols=80)
    try:
        p.write(b"echo $((6*7))-marker\n")
        p.wait_output("42-marker")
        p.write(b"exit 9\n")
        res = p.wait()
    finally:
        p.close()
    assert res.status == 9, res.output
    su.wait_status(lab, "tty2", None)


def test_exec_tty_under_a_pty(lab: Containerd, ids: list[str]) -> None:
    ids.append("ttyx")
    su.run_detached(lab, "ttyx", "sleep", "1000")
    argv = su.ctr_argv(
        lab, "task", "exec", "-t", "--exec-id", "et1", "ttyx", "sh", "-c",
        f"tty; {si.PRINT_SIZE}; exit 6",
    )  # fmt: skip
    res = si.run_in_pty(argv, rows=29, cols=77)
    assert res.status == 6, res.output
    assert re.search(r"^/dev/pts/\d+$", res.output, re.M), res.output
    assert "size=29 77" in res.output, res.output
    assert su.task_status(lab, "ttyx") == "RUNNING"


def test_resize_of_an_exited_tty_process_is_not_an_error(lab: Containerd, ids: list[str]) -> None:
    """ctr resizes the pty right after Start; a process that already exited must not
    turn that into an error (containerd's runc shim accepts it). Otherwise every
    quick ``ctr run -t`` prints ``ERRO resize pty ... failed precondition``."""
    ids.append("ttyz")
    argv = su.ctr_argv(
        lab, "run", "-d", "-t", "--runtime", su.RUNTIME, su.image(lab), "ttyz", "true"
    )
    res = si.run_in_pty(argv, rows=24, cols=80)
    assert res.status == 0, res.output
    su.wait_status(lab, "ttyz", "STOPPED")
    address = su.shim_address(lab, "ttyz")
    si.shim_call(
        address,
        "ResizePty",
        shim_pb2.ResizePtyRequest(id="ttyz", width=100, height=30),
        empty_pb2.Empty,
    )


# -- exec --------------------------------------------------------------------------------


def test_exec_plain_stdin_and_missing_binary(lab: Containerd, ids: list[str]) -> None:
    ids.append("ex")
    su.run_detached(lab, "ex", "sleep", "1000")

    res = lab.ctr(
        "task", "exec", "--exec-id", "e1", "ex", "sh", "-c",
        "echo exec-out; echo exec-err >&2; exit 4",
        check=False,
    )  # fmt: skip
    assert res.returncode == 4, res
    assert res.stdout == "exec-out\n"
    assert "exec-err\n" in res.stderr

    # an exec'd shell (not pid 1 of the namespace) killing itself: 128+9
    res = lab.ctr("task", "exec", "--exec-id", "e137", "ex", "sh", "-c", "kill -9 $$", check=False)
    assert res.returncode == 137, res

    data = "".join(f"line {i} of the stdin test\n" for i in range(5000))
    res = lab.ctr("task", "exec", "--exec-id", "e2", "ex", "cat", input=data, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout == data

    res = lab.ctr("task", "exec", "--exec-id", "e3", "ex", "nosuchbinary", check=False)
    assert res.returncode != 0
    assert "nosuchbinary" in res.stderr, res.stderr
    assert "executable file not found" in res.stderr, res.stderr

    # the task is unharmed and still takes execs
    assert su.task_status(lab, "ex") == "RUNNING"
    res = lab.ctr("task", "exec", "--exec-id", "e4", "ex", "echo", "still-fine", check=False)
    assert (res.returncode, res.stdout) == (0, "still-fine\n"), res


# -- kill, ps, pause/resume, metrics, delete ---------------------------------------------


def test_kill_default_is_sigterm(lab: Containerd, ids: list[str]) -> None:
    ids.append("kt")
    su.run_detached(lab, "kt", "sh", "-c", 'trap "exit 7" TERM; sleep 1000 & wait')
    # the trap is set before the background sleep starts: wait for both processes
    wait_for(
        lambda: len(lab.ctr("task", "ps", "kt").stdout.splitlines()) == 3,
        timeout=su.DEADLINE,
        message="sh and sleep in ctr task ps",
    )
    lab.ctr("task", "kill", "kt")
    su.wait_status(lab, "kt", "STOPPED")
    assert su.delete_exit_code(lab.ctr("task", "delete", "kt")) == 7


def test_kill_all_and_sigkill(lab: Containerd, ids: list[str]) -> None:
    """``--all`` signals every process: SIGTERM ends the exec'd sleep while the init
    (pid 1 of its namespace, no handler) ignores it; then ``--all -s SIGKILL`` ends all."""
    ids.append("ka")
    init_pid = su.run_detached(lab, "ka", "sleep", "1000")
    lab.ctr("task", "exec", "-d", "--exec-id", "bg", "ka", "sleep", "500")
    exec_pids = wait_for(
        lambda: [p for p in _ps(lab, "ka") if p != init_pid],
        timeout=su.DEADLINE,
        message="the exec in ctr task ps",
    )
    lab.ctr("task", "kill", "--all", "ka")
    for pid in exec_pids:
        su.wait_gone(pid, what="exec'd sleep after kill --all SIGTERM")
    assert su.task_status(lab, "ka") == "RUNNING"

    lab.ctr("task", "kill", "--all", "-s", "SIGKILL", "ka")
    su.wait_status(lab, "ka", "STOPPED")
    su.wait_gone(init_pid, what="init after kill --all SIGKILL")
    assert su.delete_exit_code(lab.ctr("task", "delete", "ka")) == 137


def _ps(lab: Containerd, cid: str) -> list[int]:
    out = lab.ctr("task", "ps", cid).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:] if line.split()]


def test_ps_lists_init_and_exec(lab: Containerd, ids: list[str]) -> None:
    ids.append("ps1")
    init_pid = su.run_detached(lab, "ps1", "sleep", "1000")
    lab.ctr("task", "exec", "-d", "--exec-id", "psexec", "ps1", "sleep", "600")

    def rows() -> dict[int, str] | None:
        out = lab.ctr("task", "ps", "ps1").stdout.splitlines()
        assert out and out[0].split()[:2] == ["PID", "INFO"], out
        table = {int(r.split()[0]): r.split(None, 1)[1] for r in out[1:] if r.split()}
        return table if len(table) >= 2 else None

    table = wait_for(rows, timeout=su.DEADLINE, message="two processes in ctr task ps")
    assert table.get(init_pid) == "-", table
    execs = [pid for pid, info in table.items() if "psexec" in info]
    assert len(execs) == 1 and execs[0] != init_pid, table


def test_pause_and_resume(lab: Containerd, ids: list[str]) -> None:
    ids.append("pr")
    su.run_detached(lab, "pr", "sleep", "1000")
    lab.ctr("task", "pause", "pr")
    su.wait_status(lab, "pr", "PAUSED")
    lab.ctr("task", "resume", "pr")
    su.wait_status(lab, "pr", "RUNNING")
    res = lab.ctr("task", "exec", "--exec-id", "after", "pr", "echo", "thawed", check=False)
    assert (res.returncode, res.stdout) == (0, "thawed\n"), res


def test_metrics(lab: Containerd, ids: list[str]) -> None:
    ids.append("mt")
    su.run_detached(lab, "mt", "sleep", "1000")
    table = lab.ctr("task", "metrics", "mt").stdout
    assert "memory.usage_in_bytes" in table or "memory.current" in table, table
    assert "pids.current" in table, table
    metrics = json.loads(lab.ctr("task", "metrics", "--format", "json", "mt").stdout)
    if "memory" in metrics and "usage" in metrics["memory"]:  # cgroup v1
        assert int(metrics["memory"]["usage"]["usage"]) > 0, metrics
    else:  # cgroup v2
        assert int(metrics["memory"]["usage"]) > 0, metrics
    assert int(metrics["pids"]["current"]) >= 1, metrics


def test_delete_removes_task_runc_state_and_rootfs_mount(lab: Containerd, ids: list[str]) -> None:
    ids.append("del")
    pid = su.run_detached(lab, "del", "sleep", "1000")
    rootfs = str(su.bundle_dir(lab, "del") / "rootfs")
    assert rootfs in su.lab_mounts(lab)
    assert "del" in su.runc_ids(lab)
    lab.ctr("task", "kill", "-s", "SIGKILL", "del")
    su.wait_status(lab, "del", "STOPPED")
    lab.ctr("task", "delete", "del")
    su.wait_status(lab, "del", None)
    su.wait_gone(pid, what="container init")
    assert "del" not in su.runc_ids(lab)
    assert rootfs not in su.lab_mounts(lab)
    wait_for(
        lambda: not su.bundle_dir(lab, "del").exists(),
        timeout=su.DEADLINE,
        message="bundle dir removed",
    )
    assert not any(d.endswith("/del") for d in su.lab_cgroups(lab)), (
        "cgroups of the deleted task left behind"
    )


# -- events ------------------------------------------------------------------------------


def test_events_of_one_lifecycle_in_order(lab: Containerd, ids: list[str]) -> None:
    with si.event_stream(lab) as events:
        ids.append("ev")
        init_pid = su.run_detached(lab, "ev", "sleep", "1000")
        res = lab.ctr("task", "exec", "--exec-id", "evx", "ev", "sh", "-c", "exit 3", check=False)
        assert res.returncode == 3, res
        lab.ctr("task", "pause", "ev")
        su.wait_status(lab, "ev", "PAUSED")
        lab.ctr("task", "resume", "ev")
        su.wait_status(lab, "ev", "RUNNING")
        lab.ctr("task", "kill", "-s", "SIGKILL", "ev")
        su.wait_status(lab, "ev", "STOPPED")
        lab.ctr("task", "delete", "ev")
        wait_for(
            lambda: any(e.topic == "/tasks/delete" for e in events.task_events("ev")),
            timeout=su.DEADLINE,
            message=lambda: f"/tasks/delete of ev in {events.lines[-10:]}",
        )
        seen = events.task_events("ev")
    topics = [e.topic for e in seen]
    assert topics == [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/delete",
    ], topics
    create, start, added, started, exec_exit, _, _, init_exit, delete = (e.payload for e in seen)
    assert create["pid"] == init_pid and start["pid"] == init_pid
    assert added["exec_id"] == "evx" and started["exec_id"] == "evx"
    assert exec_exit["id"] == "evx" and exec_exit.get("exit_status") == 3
    assert exec_exit["pid"] == started["pid"]
    assert init_exit["id"] == "ev" and init_exit.get("exit_status") == 137
    assert init_exit["pid"] == init_pid
    assert delete.get("exit_status") == 137 and delete["pid"] == init_pid
