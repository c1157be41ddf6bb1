"""The shim registry: entries, liveness and pruning (with a fake /proc), prefix matching,
and the ``podshim diag`` errors for unknown and ambiguous pods."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from podshim.cli import build_parser, main
from podshim.diag.registry import (
    AmbiguousShim,
    Entry,
    NoShim,
    Registration,
    Registry,
    entry_name,
    registry_dir,
    select,
)
from podshim.linux.proc import start_time as proc_starttime

ADDR = "/run/lab-a/containerd.sock"


def entry(name: str, pid: int = 100, ns: str = "k8s.io", **kw: object) -> Entry:
    fields: dict[str, object] = dict(address=ADDR, namespace=ns, id=name, pod_id=name, pid=pid,
                                     socket=f"/run/podshim/s/{name}", started=1.0, starttime=500)  # fmt: skip
    fields.update(kw)
    return Entry(**fields)  # type: ignore[arg-type]


def fake_proc(root: Path, pid: int, *, starttime: int = 500, state: str = "S",
              cmdline: bytes = b"containerd-shim-podshim-v1\0-namespace\0k8s.io\0") -> None:  # fmt: skip
    d = root / str(pid)
    d.mkdir(parents=True)
    rest = " ".join([state, *["0"] * 18, str(starttime), "0"])
    (d / "stat").write_text(f"{pid} (containerd-shim) {rest}\n")
    (d / "cmdline").write_bytes(cmdline)


def put(directory: Path, e: Entry) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / entry_name(e.socket)
    path.write_text(e.to_json())
    return path


# -- entries and matching ------------------------------------------------------------------


def test_entry_round_trips_and_rejects_foreign_json() -> None:
    e = entry("pod1", pod_id="")
    assert Entry.from_json(e.to_json()) == e
    assert e.name == "pod1"  # no pod yet: the shim's id
    for bad in ('{"version": 2}', "[]", '{"version": 1, "pid": 3}', "nope"):
        with pytest.raises(ValueError):
            Entry.from_json(bad)


def test_exact_id_wins_then_unique_prefix() -> None:
    pool = [entry("abc"), entry("abcdef"), entry("abx1"), entry("zzz", ns="other")]
    assert select(pool, "abc").name == "abc"  # exact, although a prefix of abcdef
    assert select(pool, "abcd").name == "abcdef"
    assert select(pool, "z").name == "zzz"
    assert select(pool, "other/z").name == "zzz"


def test_ambiguous_prefix_names_every_candidate() -> None:
    pool = [entry("abc"), entry("abd"), entry("abe", ns="other")]
    with pytest.raises(AmbiguousShim, match="'ab' is ambiguous") as info:
        select(pool, "ab")
    assert {e.name for e in info.value.candidates} == {"abc", "abd", "abe"}
    assert "k8s.io/abc" in str(info.value) and "other/abe" in str(info.value)
    assert select(pool, "ab", namespace="other").name == "abe"
    with pytest.raises(AmbiguousShim):
        select(pool, "")  # the empty prefix matches everything


def test_unknown_pod_and_filters() -> None:
    pool = [entry("abc"), entry("abd", address="unix:///run/lab-b/containerd.sock")]
    with pytest.raises(NoShim, match="no live podshim shim matches 'q'"):
        select(pool, "q")
    assert select(pool, "ab", address="unix://" + ADDR).name == "abc"
    assert select(pool, "ab", address="/run/lab-b/containerd.sock").name == "abd"
    with pytest.raises(NoShim, match="in namespace 'nope'"):
        select(pool, "abc", namespace="nope")
    with pytest.raises(NoShim, match="--namespace"):
        select(pool, "nope/abc", namespace="k8s.io")


def test_same_pod_id_in_two_namespaces_is_ambiguous_unless_narrowed() -> None:
    pool = [entry("p1"), entry("p1", ns="other", socket="/s/2")]
    with pytest.raises(AmbiguousShim):
        select(pool, "p1")
    assert select(pool, "other/p1").socket == "/s/2"


# -- liveness and pruning -------------------------------------------------------------------


def test_stale_entries_are_skipped_and_pruned(tmp_path: Path) -> None:
    proc, reg = tmp_path / "proc", tmp_path / "shims"
    fake_proc(proc, 10)
    fake_proc(proc, 11, starttime=999)  # pid reused by another process since
    fake_proc(proc, 12, cmdline=b"/usr/bin/sleep\x00100\x00")  # not a podshim shim
    fake_proc(proc, 13, state="Z")  # zombie: the shim is dead
    live = put(reg, entry("live", 10))
    stale = [put(reg, entry("reused", 11)), put(reg, entry("other", 12)),
             put(reg, entry("zombie", 13)), put(reg, entry("dead", 14))]  # fmt: skip
    corrupt = reg / ("0" * 64 + ".json")
    corrupt.write_text("{not json")
    tmp = reg / ".partial.json.123"  # a write in progress is never read
    tmp.write_text("{}")

    registry = Registry(str(reg), proc=str(proc))
    assert [e.name for e in registry.entries(prune=False)] == ["live"]
    assert all(p.exists() for p in [*stale, corrupt])
    assert [e.name for e in registry.entries()] == ["live"]
    assert live.exists() and tmp.exists()
    assert not any(p.exists() for p in [*stale, corrupt])


def test_entry_without_starttime_needs_only_a_live_podshim_pid(tmp_path: Path) -> None:
    proc, reg = tmp_path / "proc", tmp_path / "shims"
    fake_proc(proc, 20, starttime=7)
    put(reg, entry("old", 20, starttime=0))
    assert [e.name for e in Registry(str(reg), proc=str(proc)).entries()] == ["old"]


def test_missing_directory_is_empty(tmp_path: Path) -> None:
    assert Registry(str(tmp_path / "none")).entries() == []


def test_proc_starttime_of_this_process() -> None:
    mine = proc_starttime(os.getpid())
    assert mine is not None and mine > 0
    assert proc_starttime(2**22 + 12345) is None


# -- registration -------------------------------------------------------------------------


def test_registration_writes_updates_and_removes(tmp_path: Path) -> None:
    reg = Registration.for_this_process(ADDR, "k8s.io", "sb1", "/run/podshim/s/x", str(tmp_path))
    reg.write()
    path = tmp_path / entry_name("/run/podshim/s/x")
    raw = json.loads(path.read_text())
    assert raw["pid"] == os.getpid() and raw["pod_id"] == "" and raw["id"] == "sb1"
    assert raw["starttime"] == proc_starttime(os.getpid())
    reg.set_pod("sb1")
    assert json.loads(path.read_text())["pod_id"] == "sb1"
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left
    reg.remove()
    assert not path.exists()
    reg.remove()  # idempotent


def test_remove_keeps_a_successors_entry(tmp_path: Path) -> None:
    mine = Registration(entry("p", pid=os.getpid()), str(tmp_path))
    mine.write()
    successor = Registration(entry("p", pid=os.getpid() + 1), str(tmp_path))
    successor.write()  # same socket: same file
    mine.remove()
    assert Path(successor.path).exists()


def test_unwritable_directory_is_logged_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    Registration(entry("p"), str(blocker / "shims")).write()  # a file where a dir should be


def test_directory_follows_podshim_run_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PODSHIM_RUN_DIR", "/tmp/x-run")
    assert registry_dir() == "/tmp/x-run/shims"
    monkeypatch.delenv("PODSHIM_RUN_DIR")
    assert registry_dir() == "/run/podshim/shims"


# -- the command line ---------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A registry with two entries for one live process that looks like a shim."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "podshim-fake-shim"]
    )
    try:
        monkeypatch.setenv("PODSHIM_RUN_DIR", str(tmp_path))
        for name in ("feed01", "feed02"):
            put(tmp_path / "shims", entry(name, proc.pid, starttime=0,
                                          socket=str(tmp_path / f"{name}.sock")))  # fmt: skip
        yield tmp_path
    finally:
        proc.kill()
        proc.wait()


def test_cli_parses_exec_with_and_without_double_dash() -> None:
    args = build_parser().parse_args(["diag", "exec", "-t", "ab", "--", "sh", "-c", "x -t"])
    assert (args.tty, args.pod, args.command) == (True, "ab", ["sh", "-c", "x -t"])
    args = build_parser().parse_args(["diag", "--address", "A", "exec", "ab", "ip", "addr"])
    assert (args.address, args.tty, args.command) == ("A", False, ["ip", "addr"])


def test_cli_unknown_and_ambiguous_pods_exit_2(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["diag", "tasks", "nope"]) == 2
    assert "no live podshim shim matches 'nope'" in capsys.readouterr().err
    assert main(["diag", "stacks", "feed"]) == 2
    err = capsys.readouterr().err
    assert "'feed' is ambiguous" in err and "feed01" in err and "feed02" in err
    assert main(["diag", "exec", "feed01"]) == 2  # no command
    assert "no command" in capsys.readouterr().err


def test_cli_list_json_and_an_unreachable_shim(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["diag", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["name"], e["tasks"]) for e in listed] == [("feed01", None), ("feed02", None)]
    assert main(["diag", "--namespace", "nope", "list"]) == 0
    assert capsys.readouterr().out.split() == ["NAMESPACE", "POD", "PID", "TASKS"]
    # a shim that does not answer is an error of the call, exit 1
    assert main(["diag", "pid", "feed01"]) == 1
    assert "unavailable" in capsys.readouterr().err
