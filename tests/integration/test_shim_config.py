"""podshim's TOML config (``ctr run --runtime-config-path``) and crun support.

A wrapper script named as ``runtime`` in the config records every OCI runtime call the
shim makes, then execs the real runtime. Invalid configs must fail ``ctr run`` with a
message naming the problem. crun 1.8 cannot run containers on this host's hybrid
cgroups, so its end-to-end test is skipped there; the argv podshim builds is still
checked against the real crun binary, without containerd.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podshim.oci import runc as shim_runc
from podshim.oci.runtime import RuntimeConfig
from podshim_lab import Containerd, wait_for

if TYPE_CHECKING:
    from tests.integration import shimutil as su
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import shimutil as su

pytestmark = pytest.mark.timeout(300)

CRUN_HYBRID_REASON = "crun 1.8: cgroups in hybrid mode not supported"


# the fixtures (shimutil): one lab for the whole module, per-test container cleanup
lab = su.module_lab
ids = su.ids


def write_wrapper(directory: Path, runtime: str) -> tuple[Path, Path]:
    """A runtime wrapper that appends its argv (one line per call) to a record file and
    execs ``runtime``; returns (wrapper, record)."""
    real = shutil.which(runtime)
    assert real is not None, f"{runtime} not installed"
    record = directory / "calls.txt"
    wrapper = directory / f"{runtime}-wrapper"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{record}"\nexec "{real}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return wrapper, record


def write_config(directory: Path, text: str, name: str = "podshim.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


_GLOBAL_WITH_VALUE = {"--root", "--log", "--log-format"}


def recorded_calls(record: Path) -> list[list[str]]:
    """Each recorded runtime call without its global options: [verb, args...]."""
    calls: list[list[str]] = []
    for line in record.read_text().splitlines():
        args, i = line.split(), 0
        while i < len(args) and args[i].startswith("--"):
            i += 2 if args[i] in _GLOBAL_WITH_VALUE else 1
        if args[i:]:
            calls.append(args[i:])
    return calls


def subcommands(record: Path, cid: str) -> list[str]:
    """The runtime subcommands recorded for container ``cid``, in call order."""
    return [call[0] for call in recorded_calls(record) if cid in call[1:]]


def config_opts(path: Path) -> list[str]:
    return ["--runtime-config-path", str(path)]


# -- a runtime wrapper from the config ------------------------------------------------------


def test_config_runtime_wrapper_is_used(lab: Containerd, tmp_path: Path) -> None:
    wrapper, record = write_wrapper(tmp_path, "runc")
    cfg = write_config(tmp_path, f'runtime = "{wrapper}"\n')
    res = su.run(lab, "cfg1", "sh", "-c", "echo via-wrapper", opts=config_opts(cfg))
    assert (res.returncode, res.stdout) == (0, "via-wrapper\n"), res
    verbs = subcommands(record, "cfg1")
    assert verbs[:2] == ["create", "start"], record.read_text()
    assert "delete" in verbs[2:], record.read_text()
    # the wrapper got podshim's usual global options first
    first = record.read_text().splitlines()[0].split()
    assert first[:2] == ["--root", su.runc_root(lab)], first
    assert "create" in first and "--bundle" in first and first[-1] == "cfg1"


def test_config_wrapper_sees_exec_kill_and_delete(
    lab: Containerd, ids: list[str], tmp_path: Path
) -> None:
    wrapper, record = write_wrapper(tmp_path, "runc")
    cfg = write_config(tmp_path, f'runtime = "{wrapper}"\nlog_level = "debug"\n')
    ids.append("cfg2")
    su.run_detached(lab, "cfg2", "sleep", "1000", opts=config_opts(cfg))
    res = lab.ctr("task", "exec", "--exec-id", "x1", "cfg2", "echo", "hi", check=False)
    assert (res.returncode, res.stdout) == (0, "hi\n"), res
    lab.ctr("task", "kill", "-s", "SIGKILL", "cfg2")
    su.wait_status(lab, "cfg2", "STOPPED")
    lab.ctr("task", "delete", "cfg2")
    su.wait_status(lab, "cfg2", None)
    wait_for(
        lambda: "delete" in subcommands(record, "cfg2"),
        timeout=su.DEADLINE,
        message=lambda: f"delete in {record.read_text()}",
    )
    verbs = subcommands(record, "cfg2")
    for verb in ("create", "start", "exec", "kill", "delete"):
        assert verb in verbs, (verb, record.read_text())
    assert verbs.index("create") < verbs.index("start") < verbs.index("exec")
    assert verbs.index("exec") < verbs.index("kill") < verbs.index("delete")


# -- invalid configs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cid", "text", "expected"),
    [
        ("badtoml", 'runtime = "runc\n', "podshim config"),  # unterminated string
        ("badkey", 'runtime = "runc"\nno_such_key = 1\n', "no_such_key"),  # unknown key
        ("badtype", "runtime = 5\n", "runtime"),  # wrong type
        ("badvalue", 'log_level = "loud"\n', "log_level"),  # value not allowed
    ],
)
def test_invalid_config_fails_ctr_run_naming_the_problem(
    lab: Containerd, ids: list[str], tmp_path: Path, cid: str, text: str, expected: str
) -> None:
    cfg = write_config(tmp_path, text)
    ids.append(cid)
    res = su.run(lab, cid, "echo", "must-not-run", opts=config_opts(cfg))
    assert res.returncode != 0, res
    assert "must-not-run" not in res.stdout
    assert str(cfg) in res.stderr, res.stderr
    assert expected in res.stderr, res.stderr
    assert "invalid argument" in res.stderr, res.stderr
    # nothing is left running for it: no task, no shim, no runc state, no socket
    assert su.task_status(lab, cid) is None
    assert cid not in su.runc_ids(lab)
    wait_for(
        lambda: not os.path.exists(su.socket_for(lab, cid)),
        timeout=45,
        message=f"shim socket of {cid} removed",
    )
    wait_for(
        lambda: not any(cid in argv for argv in su.shim_daemons(lab).values()),
        timeout=45,
        message=lambda: f"shim of {cid} gone: {su.shim_daemons(lab)}",
    )


def test_missing_config_file_fails_ctr_run(lab: Containerd, ids: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    ids.append("cfgmiss")
    res = su.run(lab, "cfgmiss", "true", opts=config_opts(missing))
    assert res.returncode != 0
    assert str(missing) in res.stderr, res.stderr
    assert "No such file" in res.stderr, res.stderr


# -- crun ---------------------------------------------------------------------------------


def crun_skip_reason() -> str | None:
    if shutil.which("crun") is None:
        return "crun not installed"
    if su.cgroup_mode() == "hybrid":
        return CRUN_HYBRID_REASON
    return None


def test_crun_end_to_end(lab: Containerd, ids: list[str], tmp_path: Path) -> None:
    reason = crun_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    wrapper, record = write_wrapper(tmp_path, "crun")
    cfg = write_config(tmp_path, f'runtime = "{wrapper}"\n')
    res = su.run(lab, "crun1", "sh", "-c", "echo from-crun; exit 2", opts=config_opts(cfg))
    assert (res.returncode, res.stdout) == (2, "from-crun\n"), res
    verbs = subcommands(record, "crun1")
    assert verbs[:2] == ["create", "start"] and "delete" in verbs, record.read_text()

    ids.append("crun2")
    su.run_detached(lab, "crun2", "sleep", "1000", opts=config_opts(cfg))
    res = lab.ctr("task", "exec", "--exec-id", "x", "crun2", "echo", "exec-crun", check=False)
    assert (res.returncode, res.stdout) == (0, "exec-crun\n"), res
    lab.ctr("task", "kill", "-s", "SIGKILL", "crun2")
    su.wait_status(lab, "crun2", "STOPPED")
    lab.ctr("task", "delete", "crun2")
    su.wait_status(lab, "crun2", None)


def test_crun_skip_reason_on_this_host() -> None:
    """The hybrid detection the crun test relies on agrees with the host."""
    unified = Path("/sys/fs/cgroup/unified")
    mode = su.cgroup_mode()
    assert mode in ("unified", "hybrid", "legacy")
    if mode == "hybrid":
        assert unified.is_dir()
        assert not (Path("/sys/fs/cgroup") / "cgroup.controllers").exists()
        if shutil.which("crun"):
            assert crun_skip_reason() == CRUN_HYBRID_REASON


# -- the argv podshim builds, checked against the real crun (no containerd) ---------------

_PROBE = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from podshim import errors
    from podshim.linux.reaper import Reaper
    from podshim.oci.runc import Runc
    from podshim.oci.runtime import RuntimeConfig

    async def main() -> None:
        binary, root, work, systemd = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
        reaper = Reaper()
        reaper.start()
        cfg = RuntimeConfig(binary=binary, root=root, no_pivot_root=True,
                            no_new_keyring=True, systemd_cgroup=systemd == "1")
        r = Runc(cfg, "probe", reaper, os.path.join(work, "log.json"))
        bundle = os.path.join(work, "bundle")
        os.makedirs(bundle, exist_ok=True)
        proc = os.path.join(work, "process.json")
        with open(proc, "w") as f:
            json.dump({"args": ["true"], "cwd": "/"}, f)
        null = os.open(os.devnull, os.O_RDWR)
        sock = os.path.join(work, "console.sock")
        stdio = (null, null, null)
        calls = {
            "create": lambda: r.create("nope", bundle, os.path.join(work, "i.pid"), stdio, sock),
            "start": lambda: r.start("nope"),
            "exec": lambda: r.exec("nope", proc, os.path.join(work, "e.pid"), stdio, sock),
            "kill": lambda: r.kill("nope", 15),
            "kill-all": lambda: r.kill("nope", 9, all_=True),
            "pause": lambda: r.pause("nope"),
            "resume": lambda: r.resume("nope"),
            "ps": lambda: r.ps("nope"),
            "update": lambda: r.update("nope", {"pids": {"limit": 10}}),
            "state": lambda: r.state("nope"),
            "delete": lambda: r.delete("nope"),
            "delete-force": lambda: r.delete("nope", force=True),
        }
        out = {}
        for name, fn in calls.items():
            try:
                await fn()
                out[name] = ["ok", ""]
            except errors.ShimError as exc:
                out[name] = [type(exc).__name__, str(exc)]
        reaper.stop()
        print(json.dumps(out))

    asyncio.run(main())
    """
)

_USAGE_ERRORS = ("unrecognized option", "invalid option", "unknown command", "Usage:", "Try `")


def probe_runtime(binary: str, tmp: Path, systemd: bool = False) -> dict[str, list[str]]:
    """Run every podshim runtime call against a container that does not exist, in a
    separate process (the shim's reaper owns waitpid there, not pytest's)."""
    work = tmp / f"work-{os.path.basename(binary)}-{int(systemd)}"
    work.mkdir()
    res = subprocess.run(
        [sys.executable, "-c", _PROBE, binary, str(tmp / "root"), str(work), str(int(systemd))],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    out: dict[str, list[str]] = json.loads(res.stdout)
    return out


def need_crun() -> None:
    if shutil.which("crun") is None:
        pytest.skip("crun not installed")


def test_runc_argv_builders_are_crun_compatible(tmp_path: Path) -> None:
    need_crun()
    cfg = RuntimeConfig(binary="crun", root="/run/x", systemd_cgroup=True)
    head = shim_runc.global_args(cfg, "ns1", "/b/log.json")
    assert head == [
        "crun",
        "--root",
        "/run/x/ns1",
        "--log",
        "/b/log.json",
        "--log-format",
        "json",
        "--systemd-cgroup",
    ]
    cfg2 = RuntimeConfig(binary="crun", no_pivot_root=True, no_new_keyring=True)
    assert shim_runc.create_args(cfg2, "c1", "/b", "/b/init.pid", "/s.sock") == [
        "create", "--bundle", "/b", "--pid-file", "/b/init.pid",
        "--console-socket", "/s.sock", "--no-pivot", "--no-new-keyring", "c1",
    ]  # fmt: skip
    assert shim_runc.exec_args("c1", "/p.json", "/e.pid", None) == [
        "exec", "--process", "/p.json", "--detach", "--pid-file", "/e.pid", "c1",
    ]  # fmt: skip
    assert shim_runc.kill_args("c1", 9, True) == ["kill", "--all", "c1", "9"]
    assert shim_runc.delete_args("c1", True) == ["delete", "--force", "c1"]

    # every call podshim makes, run by the real crun: none is refused as bad usage
    for systemd in (False, True):
        results = probe_runtime("crun", tmp_path, systemd)
        assert set(results) >= {"create", "start", "exec", "kill", "delete", "ps", "update"}
        for name, (kind, message) in results.items():
            assert not any(u in message for u in _USAGE_ERRORS), (name, kind, message)
            assert kind == "ok" or message.startswith(f"crun {name.split('-')[0]} failed"), (
                name,
                message,
            )
        assert results["delete-force"] == ["ok", ""], results["delete-force"]


def test_crun_errors_map_like_runc(tmp_path: Path) -> None:
    """A container that does not exist is NotFound for crun as it is for runc (the
    shim relies on NotFound for 'already gone' in kill/delete paths)."""
    need_crun()
    with_runc = probe_runtime("runc", tmp_path)
    with_crun = probe_runtime("crun", tmp_path)
    kinds_runc = {name: kind for name, (kind, _) in with_runc.items()}
    kinds_crun = {name: kind for name, (kind, _) in with_crun.items()}
    assert kinds_runc["kill"] == "NotFound", with_runc
    differ = {
        name: f"runc {kinds_runc[name]}, crun {kinds_crun.get(name)}"
        for name in kinds_runc
        if kinds_runc[name] != kinds_crun.get(name)
    }
    assert not differ, (
        f"crun errors classified differently from runc's: {differ}; "
        f"e.g. crun kill: {with_crun['kill'][1]!r}, runc kill: {with_runc['kill'][1]!r}"
    )
