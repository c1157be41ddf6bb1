"""Bad input to a serving podshim: through ctr, and straight to the shim's ttrpc socket
(``podshim.ttrpc.client.Client``) of a running grouped task. Each bad request gets the
error kind containerd expects, with a message naming the culprit, and afterwards the shim
still serves its other tasks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from podshim import errors as errdefs
from podshim.api.task.v2 import shim_pb2 as pb
from podshim_lab import Containerd, wait_for
from podshim_lab.procfs import ProcStat, read_stat

if TYPE_CHECKING:
    from tests.integration import shimio as si
    from tests.integration import shimutil as su
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import shimio as si
    import shimutil as su

pytestmark = pytest.mark.timeout(300)

KEEPER = "keeper"
GROUP = "gbad"


class Keeper:
    """A long-lived grouped task and its shim."""

    def __init__(self, lab: Containerd) -> None:
        self.lab = lab
        self.pid = su.run_detached(lab, KEEPER, "sleep", "100000", opts=su.group_opts(GROUP))
        self.address = su.shim_address(lab, KEEPER)
        self.shim = su.the_shim(lab)
        st = read_stat(self.shim)
        assert st is not None
        self.shim_stat: ProcStat = st
        self._n = 0

    def assert_serving(self) -> None:
        """Same shim alive; the keeper RUNNING with its pid; exec into it works."""
        assert su.alive(self.shim_stat), "the group shim died"
        assert su.task_status(self.lab, KEEPER) == "RUNNING"
        assert su.task_pid(self.lab, KEEPER) == self.pid
        self._n += 1
        res = self.lab.ctr(
            "task", "exec", "--exec-id", f"ok{self._n}", KEEPER, "echo", "serving", check=False
        )
        assert (res.returncode, res.stdout) == (0, "serving\n"), (res, self.lab.log_tail(20))
        st = si.shim_call(self.address, "State", pb.StateRequest(id=KEEPER), pb.StateResponse)
        assert (st.pid, st.status) == (self.pid, 2)  # RUNNING


# the fixtures (shimutil): one lab for the whole module
lab = su.module_lab


@pytest.fixture(scope="module")
def keeper(lab: Containerd) -> Iterator[Keeper]:
    with su.containers(lab) as ids:
        ids.append(KEEPER)
        yield Keeper(lab)


def expect_error(
    kind: type[errdefs.ShimError], call: Callable[[], Message], *names: str
) -> errdefs.ShimError:
    """``call()`` must fail with ``kind`` and a message containing every one of ``names``."""
    with pytest.raises(errdefs.ShimError) as info:
        call()
    err = info.value
    assert isinstance(err, kind), f"expected {kind.__name__}, got {type(err).__name__}: {err}"
    for name in names:
        assert name in str(err), f"{name!r} not named in {str(err)!r}"
    return err


def create_call(keeper: Keeper, tid: str, bundle: Path | str) -> Callable[[], Message]:
    def call() -> Message:
        req = pb.CreateTaskRequest(id=tid, bundle=str(bundle))
        try:
            return si.shim_call(keeper.address, "Create", req, pb.CreateTaskResponse)
        finally:
            # should a Create wrongly succeed, do not leave a task nobody knows about
            _forget(keeper, tid)

    return call


def _forget(keeper: Keeper, tid: str) -> None:
    try:
        si.shim_call(keeper.address, "State", pb.StateRequest(id=tid), pb.StateResponse)
    except errdefs.ShimError:
        return  # not there (the expected case)
    for method, req in (
        ("Kill", pb.KillRequest(id=tid, signal=9, all=True)),
        ("Delete", pb.DeleteRequest(id=tid)),
    ):
        try:
            si.shim_call(keeper.address, method, req, pb.DeleteResponse)
        except errdefs.ShimError:
            pass


# -- direct ttrpc ---------------------------------------------------------------------------


@pytest.mark.parametrize("tid", ["a/b", "..", "../escape", "x/../../y", "sp ace", ""])
def test_create_with_invalid_id_is_invalid_argument(
    keeper: Keeper, tmp_path: Path, tid: str
) -> None:
    (tmp_path / "config.json").write_text("{}")
    expect_error(errdefs.InvalidArgument, create_call(keeper, tid, tmp_path), repr(tid))
    keeper.assert_serving()


@pytest.mark.parametrize("method", ["State", "Start", "Kill", "Delete", "Pids", "Connect"])
def test_invalid_id_in_other_calls_is_invalid_argument(keeper: Keeper, method: str) -> None:
    requests: dict[str, Message] = {
        "State": pb.StateRequest(id="../keeper"),
        "Start": pb.StartRequest(id="../keeper"),
        "Kill": pb.KillRequest(id="../keeper", signal=9),
        "Delete": pb.DeleteRequest(id="../keeper"),
        "Pids": pb.PidsRequest(id="../keeper"),
        "Connect": pb.ConnectRequest(id="../keeper"),
    }
    expect_error(
        errdefs.InvalidArgument,
        lambda: si.shim_call(keeper.address, method, requests[method], empty_pb2.Empty),
        "../keeper",
    )
    keeper.assert_serving()


def test_create_without_config_json_is_invalid_argument(keeper: Keeper, tmp_path: Path) -> None:
    expect_error(errdefs.InvalidArgument, create_call(keeper, "nocfg", tmp_path), "config.json")
    keeper.assert_serving()


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", json.dumps({"ociVersion": "1.0.2", "root": {"path": "rootfs"}})],
    ids=["garbage", "not-an-object", "no-process"],
)
def test_create_with_invalid_config_json_is_invalid_argument(
    keeper: Keeper, tmp_path: Path, content: str
) -> None:
    (tmp_path / "config.json").write_text(content)
    expect_error(
        errdefs.InvalidArgument,
        create_call(keeper, "badspec", tmp_path),
        str(tmp_path / "config.json"),
    )
    keeper.assert_serving()


def test_create_with_bad_bundle_path_is_invalid_argument(keeper: Keeper, tmp_path: Path) -> None:
    expect_error(errdefs.InvalidArgument, create_call(keeper, "rel", "relative/bundle"), "bundle")
    missing = tmp_path / "missing"
    expect_error(errdefs.InvalidArgument, create_call(keeper, "gone", missing), str(missing))
    keeper.assert_serving()


def test_create_of_an_existing_id_is_already_exists(keeper: Keeper, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    req = pb.CreateTaskRequest(id=KEEPER, bundle=str(tmp_path))
    expect_error(
        errdefs.AlreadyExists,
        lambda: si.shim_call(keeper.address, "Create", req, pb.CreateTaskResponse),
        KEEPER,
    )
    keeper.assert_serving()


@pytest.mark.parametrize(
    "method", ["State", "Start", "Kill", "Delete", "Wait", "ResizePty", "CloseIO"]
)
def test_unknown_exec_id_is_not_found(keeper: Keeper, method: str) -> None:
    requests: dict[str, Message] = {
        "State": pb.StateRequest(id=KEEPER, exec_id="nosuchexec"),
        "Start": pb.StartRequest(id=KEEPER, exec_id="nosuchexec"),
        "Kill": pb.KillRequest(id=KEEPER, exec_id="nosuchexec", signal=9),
        "Delete": pb.DeleteRequest(id=KEEPER, exec_id="nosuchexec"),
        "Wait": pb.WaitRequest(id=KEEPER, exec_id="nosuchexec"),
        "ResizePty": pb.ResizePtyRequest(id=KEEPER, exec_id="nosuchexec", width=80, height=24),
        "CloseIO": pb.CloseIORequest(id=KEEPER, exec_id="nosuchexec", stdin=True),
    }
    expect_error(
        errdefs.NotFound,
        lambda: si.shim_call(keeper.address, method, requests[method], empty_pb2.Empty),
        "nosuchexec",
    )
    keeper.assert_serving()


@pytest.mark.parametrize("method", ["State", "Kill", "Delete", "Wait", "Pids", "Stats"])
def test_unknown_task_id_is_not_found(keeper: Keeper, method: str) -> None:
    requests: dict[str, Message] = {
        "State": pb.StateRequest(id="ghost"),
        "Kill": pb.KillRequest(id="ghost", signal=9),
        "Delete": pb.DeleteRequest(id="ghost"),
        "Wait": pb.WaitRequest(id="ghost"),
        "Pids": pb.PidsRequest(id="ghost"),
        "Stats": pb.StatsRequest(id="ghost"),
    }
    expect_error(
        errdefs.NotFound,
        lambda: si.shim_call(keeper.address, method, requests[method], empty_pb2.Empty),
        "ghost",
    )
    keeper.assert_serving()


def test_exec_with_invalid_exec_id_is_invalid_argument(keeper: Keeper) -> None:
    spec = json.dumps({"args": ["true"], "cwd": "/", "env": ["PATH=/bin"]}).encode()
    req = pb.ExecProcessRequest(id=KEEPER, exec_id="../x")
    req.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process"
    req.spec.value = spec
    expect_error(
        errdefs.InvalidArgument,
        lambda: si.shim_call(keeper.address, "Exec", req, empty_pb2.Empty),
        "../x",
    )
    keeper.assert_serving()


# -- via ctr --------------------------------------------------------------------------------


def test_duplicate_exec_id_is_already_exists(lab: Containerd, keeper: Keeper) -> None:
    lab.ctr("task", "exec", "-d", "--exec-id", "dup", KEEPER, "sleep", "300")
    try:
        res = lab.ctr("task", "exec", "--exec-id", "dup", KEEPER, "true", check=False)
        assert res.returncode != 0
        assert "already exists" in res.stderr, res.stderr
    finally:
        lab.ctr("task", "kill", "-s", "SIGKILL", "--exec-id", "dup", KEEPER, check=False)
    keeper.assert_serving()


def test_missing_binary_in_grouped_container(lab: Containerd, keeper: Keeper) -> None:
    """runc cannot find the executable: ``ctr run`` fails naming it; the group's shim
    and its other task are unaffected, and nothing of the failed task is left."""
    with su.containers(lab) as ids:
        ids.append("nobin")
        res = su.run(lab, "nobin", "nosuchbinary", opts=su.group_opts(GROUP))
        assert res.returncode != 0
        assert "nosuchbinary" in res.stderr, res.stderr
        assert "executable file not found" in res.stderr, res.stderr
        assert su.task_status(lab, "nobin") is None
        assert "nobin" not in su.runc_ids(lab)
        rootfs = str(su.bundle_dir(lab, "nobin") / "rootfs")
        wait_for(
            lambda: rootfs not in su.lab_mounts(lab),
            timeout=su.DEADLINE,
            message="rootfs of the failed task unmounted",
        )
        assert not [c for c in su.lab_cgroups(lab) if c.endswith("/nobin")]
        assert list(su.shim_daemons(lab)) == [keeper.shim]
    keeper.assert_serving()


def test_missing_binary_alone_leaves_no_shim(lab: Containerd, keeper: Keeper) -> None:
    with su.containers(lab) as ids:
        ids.append("nobin2")
        res = su.run(lab, "nobin2", "/no/such/binary")
        assert res.returncode != 0
        assert "/no/such/binary" in res.stderr, res.stderr
        assert "nobin2" not in su.runc_ids(lab)
        wait_for(
            lambda: list(su.shim_daemons(lab)) == [keeper.shim],
            timeout=45,  # well below the shim's 60 s idle exit: Shutdown must end it
            message=lambda: f"only the group shim left: {su.shim_daemons(lab)}",
        )
        wait_for(
            lambda: not os.path.exists(su.socket_for(lab, "nobin2")),
            timeout=su.DEADLINE,
            message="socket of the failed task's shim removed",
        )
    keeper.assert_serving()
