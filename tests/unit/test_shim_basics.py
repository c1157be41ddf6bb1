"""Pure pieces of the shim: flags, grouping, ids, state tables, runtime argv, config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim.api.runc.options import oci_pb2
from podshim.api.runtimeoptions.v1 import api_pb2 as ro_pb2
from podshim.logs import LogrusFormatter
from podshim.oci import ids, runc
from podshim.oci.runtime import RuntimeConfig
from podshim.service import config
from podshim.shim import flags, paths
from podshim.task.states import EXEC_TABLE, INIT_TABLE, Machine, Status, Verb


def test_flags_as_containerd_passes_them() -> None:
    argv = "-namespace k8s.io -address /run/c.sock -publish-binary /usr/bin/containerd -id t1 -debug start"
    f = flags.parse(argv.split())
    assert (f.namespace, f.address, f.publish_binary, f.id, f.debug, f.action) == (
        "k8s.io", "/run/c.sock", "/usr/bin/containerd", "t1", True, "start",
    )  # fmt: skip


def test_flags_go_syntax_variants() -> None:
    f = flags.parse(["--namespace=ns", "-id=x", "--bundle", "/b", "-debug=false", "delete"])
    assert (f.namespace, f.id, f.bundle, f.debug, f.action) == ("ns", "x", "/b", False, "delete")
    assert flags.parse(["-v"]).version
    assert flags.parse(["-id", "t"]).action == ""  # serve


@pytest.mark.parametrize(
    ("argv", "msg"),
    [(["-nope"], "not defined"), (["-id"], "needs an argument"), (["-debug=maybe"], "boolean")],
)
def test_flag_errors(argv: list[str], msg: str) -> None:
    with pytest.raises(flags.FlagError, match=msg):
        flags.parse(argv)


@pytest.mark.parametrize("good", ["a", "t1", "a.b-c_d", "A" * 76])
def test_valid_ids(good: str) -> None:
    assert ids.valid_id(good)


@pytest.mark.parametrize("bad", ["", "a/b", "..", "../x", "a..b", "a b", ".a", "a-", "A" * 77])
def test_invalid_ids(bad: str) -> None:
    assert not ids.valid_id(bad)


def test_grouping_order() -> None:
    ann = {ids.SANDBOX_ID_ANNOTATION: "pod1"}
    assert paths.group_id("c1", ann) == "pod1"
    assert paths.group_id("c1", {**ann, ids.GROUP_ANNOTATION: "g"}) == "g"
    assert paths.group_id("c1", {}) == "c1"


def test_socket_path_is_unique_and_short() -> None:
    a = paths.socket_path("/run/a.sock", "ns", "g")
    assert a != paths.socket_path("/run/b.sock", "ns", "g")
    assert a != paths.socket_path("/run/a.sock", "ns2", "g")
    assert len(a) < 100


def test_read_annotations_tolerates_bad_bundles(tmp_path: Path) -> None:
    assert paths.read_annotations(str(tmp_path)) == {}
    (tmp_path / "config.json").write_text("{not json")
    assert paths.read_annotations(str(tmp_path)) == {}
    (tmp_path / "config.json").write_text('{"annotations": {"a": "b"}}')
    assert paths.read_annotations(str(tmp_path)) == {"a": "b"}


# -- state tables ----------------------------------------------------------------------
def test_init_lifecycle_table() -> None:
    m = Machine(INIT_TABLE, "task t")
    assert m.fire(Verb.START) is Status.RUNNING
    assert m.fire(Verb.PAUSE) is Status.PAUSED
    assert m.fire(Verb.RESUME) is Status.RUNNING
    with pytest.raises(errdefs.FailedPrecondition, match="cannot delete a running process"):
        m.check(Verb.DELETE)
    m.check_kill()
    assert m.fire(Verb.EXIT) is Status.STOPPED
    with pytest.raises(errdefs.NotFound, match="already finished"):
        m.check_kill()
    with pytest.raises(errdefs.FailedPrecondition, match="cannot start a stopped process"):
        m.check(Verb.START)
    assert m.fire(Verb.DELETE) is Status.DELETED
    assert m.state.wire == Status.STOPPED.value
    with pytest.raises(errdefs.NotFound):
        m.check(Verb.DELETE)


def test_exec_cannot_pause_and_created_can_be_deleted() -> None:
    m = Machine(EXEC_TABLE, "exec e")
    assert "pause" not in EXEC_TABLE
    assert m.fire(Verb.DELETE) is Status.DELETED


@pytest.mark.parametrize("table", [INIT_TABLE, EXEC_TABLE])
def test_every_row_leaves_from_a_live_state(table: dict[str, dict[Status, Status]]) -> None:
    for event, moves in table.items():
        for src, dst in moves.items():
            assert src is not Status.DELETED, event
            assert dst is not Status.CREATED, event


# -- runtime argv ------------------------------------------------------------------------
@pytest.mark.parametrize("binary", ["runc", "crun", "/opt/bin/runc-wrapper"])
def test_runtime_argv(binary: str) -> None:
    cfg = RuntimeConfig(binary=binary, root="/run/x", no_pivot_root=True)
    g = runc.global_args(cfg, "ns", "/b/log.json")
    assert g == [binary, "--root", "/run/x/ns", "--log", "/b/log.json", "--log-format", "json"]
    assert runc.create_args(cfg, "c1", "/b", "/b/init.pid", "/s/c.sock") == [
        "create", "--bundle", "/b", "--pid-file", "/b/init.pid",
        "--console-socket", "/s/c.sock", "--no-pivot", "c1",
    ]  # fmt: skip
    assert runc.exec_args("c1", "/b/p.json", "/b/e.pid", None) == [
        "exec", "--process", "/b/p.json", "--detach", "--pid-file", "/b/e.pid", "c1",
    ]  # fmt: skip
    assert runc.kill_args("c1", 15, True) == ["kill", "--all", "c1", "15"]
    assert runc.delete_args("c1", True) == ["delete", "--force", "c1"]
    systemd = RuntimeConfig(binary=binary, systemd_cgroup=True)
    assert runc.global_args(systemd, "ns", "l")[-1] == "--systemd-cgroup"


def test_last_error_from_runtime_log(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    log.write_text('{"level":"error","msg":"old"}\n')
    offset = log.stat().st_size
    with log.open("a") as f:
        f.write(
            '{"level":"info","msg":"x"}\nnot json\n{"level":"error","msg":"exec: nope: not found"}\n'
        )
    assert runc.last_error(str(log), offset) == "exec: nope: not found"
    assert runc.last_error(str(tmp_path / "missing"), 0) == ""


# -- config ------------------------------------------------------------------------------
def test_config_defaults_and_file(tmp_path: Path) -> None:
    assert config.from_options(None) == config.Config()
    p = tmp_path / "podshim.toml"
    p.write_text('runtime = "crun"\nruntime_root = "/run/r"\nlog_level = "debug"\n')
    ro = ro_pb2.Options(config_path=str(p))
    opts = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=ro.SerializeToString())
    cfg = config.from_options(opts)
    assert (cfg.runtime.binary, cfg.runtime.root, cfg.log_level) == ("crun", "/run/r", "debug")


def test_host_kind_tables(tmp_path: Path) -> None:
    """A table named after a host kind holds its options, passed on unchecked (the kind
    checks them); a table of no kind is an unknown key."""
    p = tmp_path / "vm.toml"
    p.write_text('default_host = "uvm"\n[uvm]\nruntime = "runc"\nmemory_mb = 192\n')
    cfg = config.load_file(str(p))
    assert cfg.host_options == {"uvm": {"runtime": "runc", "memory_mb": 192}}
    p.write_text('[vmm]\nruntime = "runc"\n')
    with pytest.raises(errdefs.InvalidArgument, match=r"unknown keys \['vmm'\]"):
        config.load_file(str(p))
    p.write_text('uvm = "x"\n')  # a kind's name, but not a table
    with pytest.raises(errdefs.InvalidArgument, match="unknown keys"):
        config.load_file(str(p))


def test_runc_options_override(tmp_path: Path) -> None:
    o = oci_pb2.Options(binary_name="/x/runc", root="/run/y", no_pivot_root=True)
    opts = any_pb2.Any(type_url="containerd.runc.v1.Options", value=o.SerializeToString())
    rt = config.from_options(opts).runtime
    assert (rt.binary, rt.root, rt.no_pivot_root) == ("/x/runc", "/run/y", True)


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("runtime = ", "podshim config"),
        ('nope = "x"', "unknown keys"),
        ("runtime = 3", "runtime must be a str"),
        ('log_level = "loud"', "log_level must be one of"),
    ],
)
def test_invalid_config_is_invalid_argument(tmp_path: Path, text: str, msg: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(errdefs.InvalidArgument, match=msg):
        config.load_file(str(p))


def test_missing_config_and_unknown_options_type(tmp_path: Path) -> None:
    with pytest.raises(errdefs.InvalidArgument, match="No such file"):
        config.load_file(str(tmp_path / "none.toml"))
    with pytest.raises(errdefs.InvalidArgument, match="unsupported runtime options"):
        config.from_options(any_pb2.Any(type_url="example.v1.Other", value=b""))


# -- logs --------------------------------------------------------------------------------
def test_logrus_text_format() -> None:
    rec = logging.LogRecord("x", logging.WARNING, "f", 1, 'bad "thing"', None, None)
    rec.tid = "t1"
    line = LogrusFormatter({"pod-id": "p"}).format(rec)
    assert line.startswith('time="') and 'Z" level=warning msg="bad \\"thing\\""' in line
    assert line.endswith("pod-id=p tid=t1")


@pytest.mark.parametrize(
    "spec",
    [
        {"annotations": {ids.SANDBOX_ID_ANNOTATION: "pod1"}},
        {"annotations": {ids.SANDBOX_ID_ANNOTATION: "pod1", ids.GROUP_ANNOTATION: "g1"}},
        {"annotations": {"x": f'"{ids.SANDBOX_ID_ANNOTATION}":"evil"'}},  # only in a value
        {"annotations": {ids.SANDBOX_ID_ANNOTATION: "bad/id"}},
        {"annotations": {}},
        {},
    ],
)
@pytest.mark.parametrize("indent", [None, 2])
def test_bundle_group_fast_path_agrees_with_json(
    tmp_path: Path, spec: dict[str, object], indent: int | None
) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(spec, indent=indent, separators=None if indent else (",", ":"))
    )
    expected = paths.group_id("t1", paths.read_annotations(str(tmp_path)))
    assert paths.bundle_group("t1", str(tmp_path)) == expected


def test_lifecycle_tables_refuse_illegal_moves_with_one_error_kind() -> None:
    from podshim.task.states import (
        HOST_TABLE,
        PUBLISHER_TABLE,
        HostState,
        Lifecycle,
        PublisherState,
    )

    host = Lifecycle(HOST_TABLE, HostState.NEW, "host h")
    with pytest.raises(errdefs.FailedPrecondition, match="host h is new: cannot ready"):
        host.fire(Verb.READY)
    assert [host.fire(v) for v in (Verb.CREATE, Verb.READY, Verb.CLOSE, Verb.CLOSED)] == [
        HostState.CREATING, HostState.READY, HostState.CLOSING, HostState.CLOSED,
    ]  # fmt: skip
    with pytest.raises(errdefs.FailedPrecondition):
        host.fire(Verb.CREATE)  # a host is made once
    pub = Lifecycle(PUBLISHER_TABLE, PublisherState.IDLE, "events publisher")
    assert pub.fire(Verb.CLOSE) is PublisherState.CLOSED
    with pytest.raises(errdefs.FailedPrecondition, match="closed: cannot start"):
        pub.fire(Verb.START)
