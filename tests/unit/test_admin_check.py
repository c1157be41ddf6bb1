"""podshim check: the cgroup mode and controllers from mountinfo, podshim-init's run
test, the exit code (fail only for what stops pods), --json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from podshim import cli
from podshim.admin import check

_V1 = "{n} 20 0:{n} / /sys/fs/cgroup/{name} rw - cgroup cgroup rw,{ctl}\n"


def _mountinfo(tmp_path: Path, lines: str) -> str:
    path = tmp_path / "mountinfo"
    path.write_text(lines)
    return str(path)


def test_cgroup_hybrid_with_every_controller(tmp_path: Path) -> None:
    text = "".join(
        _V1.format(n=30 + i, name=name, ctl=name)
        for i, name in enumerate(("cpu", "memory", "pids"))
    )
    text += "40 20 0:40 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    results = check.check_cgroups(_mountinfo(tmp_path, text))
    assert [(r.name, r.status) for r in results] == [
        ("cgroup mode", "ok"),
        ("cgroup controllers", "ok"),
    ]
    assert results[0].detail.startswith("hybrid")


def test_cgroup_v1_without_memory_fails(tmp_path: Path) -> None:
    text = "".join(
        _V1.format(n=30 + i, name=name, ctl=name) for i, name in enumerate(("cpu", "pids"))
    )
    results = check.check_cgroups(_mountinfo(tmp_path, text))
    assert results[0].detail == "v1"
    assert results[1].status == check.FAIL and "memory" in results[1].detail


def test_cgroup_v2_reads_its_controllers(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory\n")
    info = _mountinfo(tmp_path, f"30 20 0:30 / {root} rw - cgroup2 cgroup2 rw\n")
    results = check.check_cgroups(info, str(root))
    assert results[0].detail == "v2 (unified)"
    assert results[1].status == check.WARN and "pids" in results[1].detail


def test_podshim_init_that_does_not_answer_with_its_usage_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from podshim.host.namespaces import initbin

    assert check.check_init().status == check.OK  # the real one, built for this machine
    fake = tmp_path / "podshim-init"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setattr(initbin, "find_init_binary", lambda: str(fake))
    result = check.check_init()
    assert result.status == check.FAIL and "exit 0" in result.detail


def test_exit_code_is_1_only_on_a_fail(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    warned = [check.Result("containerd running", check.WARN, "nothing serves x", "start it")]
    monkeypatch.setattr(check, "run_all", lambda target: warned)
    assert cli.main(["check", "--address", "/nonexistent.sock", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "warn"
    failed = [*warned, check.Result("runc", check.FAIL, "not found", "apt-get install runc")]
    monkeypatch.setattr(check, "run_all", lambda target: failed)
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "[fail] runc: not found  -> apt-get install runc" in out


def test_no_containerd_at_the_address_is_a_warning_not_a_failure() -> None:
    target = check.Target.find("/run/podshim-test-nothing.sock", None, None)
    results, _ = check.check_containerd(target)
    running = [r for r in results if r.name == "containerd running"]
    assert running and running[0].status == check.WARN
    assert check.check_cri(target, None).status == check.WARN


def test_config_changed_after_containerd_started_asks_for_a_restart(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    dropin = tmp_path / "podshim.toml"
    config.write_text(f'version = 2\nimports = ["{dropin}"]\n')
    dropin.write_text("version = 2\n")
    started = check._started_at(os.getpid())
    assert started is not None
    for f in (config, dropin):
        os.utime(f, (started - 60, started - 60))
    target = check.Target("/x.sock", str(config), None, os.getpid(), "")
    loaded = check.check_loaded(target)
    assert loaded is not None and loaded.status == check.OK
    os.utime(dropin, (started + 30, started + 30))  # the drop-in changed since
    loaded = check.check_loaded(target)
    assert loaded is not None and loaded.status == check.WARN and str(dropin) in loaded.detail
