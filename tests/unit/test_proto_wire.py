"""Wire facts of the generated protobuf code that containerd 1.6.20 depends on.

Full names (they appear in ttrpc service names and Any type URLs), field numbers and a
few exact encodings. See docs in /work/shared/reference/containerd-1.6-shim-protocol.md.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("podshim") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import pytest
from google.protobuf import any_pb2, descriptor, timestamp_pb2
from google.protobuf.message import Message

from podshim.api.cgroups.v1 import metrics_pb2 as cg1
from podshim.api.cgroups.v2 import metrics_pb2 as cg2
from podshim.api.diag.v1 import diag_pb2
from podshim.api.events import task_pb2 as events_pb2
from podshim.api.runc.options import oci_pb2
from podshim.api.runtimeoptions.v1 import api_pb2 as runtimeoptions_pb2
from podshim.api.services.ttrpc.events.v1 import events_pb2 as ttrpc_events_pb2
from podshim.api.task.v2 import shim_pb2
from podshim.api.types import mount_pb2, task_pb2

GO_ZERO_TIME_SECONDS = -62135596800  # 0001-01-01T00:00:00Z, gogo's "not exited"


def _varint(value: int) -> bytes:
    """Protobuf varint of an int64 (negative values take ten bytes)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# --- (a) exact bytes ---------------------------------------------------------------


def test_runtimeoptions_any_matches_observed_stdin() -> None:
    opts = runtimeoptions_pb2.Options(
        type_url="example.v1.Config", config_path="/etc/example/config.toml"
    )
    wrapped = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=opts.SerializeToString())
    expected = (
        bytes.fromhex("0a19")
        + b"runtimeoptions.v1.Options"
        + bytes.fromhex("122d")
        + bytes.fromhex("0a11")
        + b"example.v1.Config"
        + bytes.fromhex("1218")
        + b"/etc/example/config.toml"
    )
    assert wrapped.SerializeToString() == expected

    decoded_any = any_pb2.Any.FromString(expected)
    assert decoded_any.type_url == runtimeoptions_pb2.Options.DESCRIPTOR.full_name
    decoded = runtimeoptions_pb2.Options.FromString(decoded_any.value)
    assert decoded.type_url == "example.v1.Config"
    assert decoded.config_path == "/etc/example/config.toml"


# --- (b) negative timestamps ---------------------------------------------------------


def test_varint_helper() -> None:
    assert _varint(1) == b"\x01"
    assert _varint(300) == b"\xac\x02"
    assert _varint(-1) == b"\xff" * 9 + b"\x01"


def test_state_response_go_zero_time_round_trips() -> None:
    resp = shim_pb2.StateResponse(
        id="c1",
        pid=42,
        status=task_pb2.RUNNING,
        exited_at=timestamp_pb2.Timestamp(seconds=GO_ZERO_TIME_SECONDS),
    )
    data = resp.SerializeToString()

    seconds = _varint(GO_ZERO_TIME_SECONDS)
    assert len(seconds) == 10
    # field 10, wire type 2 (0x52), length 11: Timestamp{seconds (field 1, varint) = 10 bytes}
    assert b"\x52\x0b\x08" + seconds in data

    back = shim_pb2.StateResponse.FromString(data)
    assert back.exited_at.seconds == GO_ZERO_TIME_SECONDS
    assert back.exited_at.nanos == 0
    assert back.HasField("exited_at")
    assert back.status == task_pb2.RUNNING
    assert back == resp


def test_delete_response_layout() -> None:
    # The `delete` action writes this message raw to stdout.
    resp = shim_pb2.DeleteResponse(
        pid=7, exit_status=137, exited_at=timestamp_pb2.Timestamp(seconds=1, nanos=2)
    )
    assert resp.SerializeToString() == bytes.fromhex("0807 108901 1a04 0801 1002")


# --- (c) descriptors -----------------------------------------------------------------

TASK_METHODS: dict[str, tuple[str, str]] = {
    "State": ("StateRequest", "StateResponse"),
    "Create": ("CreateTaskRequest", "CreateTaskResponse"),
    "Start": ("StartRequest", "StartResponse"),
    "Delete": ("DeleteRequest", "DeleteResponse"),
    "Pids": ("PidsRequest", "PidsResponse"),
    "Pause": ("PauseRequest", "google.protobuf.Empty"),
    "Resume": ("ResumeRequest", "google.protobuf.Empty"),
    "Checkpoint": ("CheckpointTaskRequest", "google.protobuf.Empty"),
    "Kill": ("KillRequest", "google.protobuf.Empty"),
    "Exec": ("ExecProcessRequest", "google.protobuf.Empty"),
    "ResizePty": ("ResizePtyRequest", "google.protobuf.Empty"),
    "CloseIO": ("CloseIORequest", "google.protobuf.Empty"),
    "Update": ("UpdateTaskRequest", "google.protobuf.Empty"),
    "Wait": ("WaitRequest", "WaitResponse"),
    "Stats": ("StatsRequest", "StatsResponse"),
    "Connect": ("ConnectRequest", "ConnectResponse"),
    "Shutdown": ("ShutdownRequest", "google.protobuf.Empty"),
}


def _qualify(name: str) -> str:
    return name if "." in name else f"containerd.task.v2.{name}"


def test_task_service_methods() -> None:
    service = shim_pb2.DESCRIPTOR.services_by_name["Task"]
    assert service.full_name == "containerd.task.v2.Task"
    got = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods}
    expected = {name: (_qualify(i), _qualify(o)) for name, (i, o) in TASK_METHODS.items()}
    assert got == expected
    assert len(service.methods) == 17


def test_events_service() -> None:
    service = ttrpc_events_pb2.DESCRIPTOR.services_by_name["Events"]
    assert service.full_name == "containerd.services.events.ttrpc.v1.Events"
    assert [m.name for m in service.methods] == ["Forward"]
    forward = service.methods_by_name["Forward"]
    assert forward.input_type.full_name == "containerd.services.events.ttrpc.v1.ForwardRequest"
    assert forward.output_type.full_name == "google.protobuf.Empty"


def test_diag_service() -> None:
    service = diag_pb2.DESCRIPTOR.services_by_name["Diag"]
    assert service.full_name == "podshim.diag.v1.Diag"
    assert sorted(m.name for m in service.methods) == sorted(
        [
            "ExecInHost",
            "SignalExecInHost",
            "ResizeExecInHost",
            "Stacks",
            "Tasks",
            "Share",
            "Pid",
            "Stats",
        ]
    )


@pytest.mark.parametrize(
    ("fd", "package"),
    [
        (mount_pb2.DESCRIPTOR, "containerd.types"),
        (task_pb2.DESCRIPTOR, "containerd.v1.types"),
        (shim_pb2.DESCRIPTOR, "containerd.task.v2"),
        (events_pb2.DESCRIPTOR, "containerd.events"),
        (ttrpc_events_pb2.DESCRIPTOR, "containerd.services.events.ttrpc.v1"),
        (runtimeoptions_pb2.DESCRIPTOR, "runtimeoptions.v1"),
        (oci_pb2.DESCRIPTOR, "containerd.runc.v1"),
        (cg1.DESCRIPTOR, "io.containerd.cgroups.v1"),
        (cg2.DESCRIPTOR, "io.containerd.cgroups.v2"),
        (diag_pb2.DESCRIPTOR, "podshim.diag.v1"),
    ],
)
def test_proto_packages(fd: descriptor.FileDescriptor, package: str) -> None:
    assert fd.package == package


@pytest.mark.parametrize(
    ("cls", "full_name"),
    [
        (shim_pb2.CreateTaskRequest, "containerd.task.v2.CreateTaskRequest"),
        (shim_pb2.DeleteResponse, "containerd.task.v2.DeleteResponse"),
        (events_pb2.TaskExit, "containerd.events.TaskExit"),
        (events_pb2.TaskOOM, "containerd.events.TaskOOM"),
        (events_pb2.TaskCreate, "containerd.events.TaskCreate"),
        (cg1.Metrics, "io.containerd.cgroups.v1.Metrics"),
        (cg2.Metrics, "io.containerd.cgroups.v2.Metrics"),
        (oci_pb2.Options, "containerd.runc.v1.Options"),
        (oci_pb2.ProcessDetails, "containerd.runc.v1.ProcessDetails"),
        (runtimeoptions_pb2.Options, "runtimeoptions.v1.Options"),
        (mount_pb2.Mount, "containerd.types.Mount"),
        (task_pb2.ProcessInfo, "containerd.v1.types.ProcessInfo"),
        (ttrpc_events_pb2.Envelope, "containerd.services.events.ttrpc.v1.Envelope"),
    ],
)
def test_message_full_names(cls: type[Message], full_name: str) -> None:
    assert cls.DESCRIPTOR.full_name == full_name


@pytest.mark.parametrize(
    ("cls", "field", "number"),
    [
        (shim_pb2.CreateTaskRequest, "options", 10),
        (shim_pb2.CreateTaskRequest, "rootfs", 3),
        (shim_pb2.StateResponse, "exited_at", 10),
        (shim_pb2.StateResponse, "exec_id", 11),
        (shim_pb2.DeleteResponse, "exited_at", 3),
        (shim_pb2.WaitResponse, "exited_at", 2),
        (shim_pb2.UpdateTaskRequest, "annotations", 3),
        (shim_pb2.ConnectResponse, "task_pid", 2),
        (events_pb2.TaskExit, "exited_at", 5),
        (events_pb2.TaskDelete, "id", 5),
        (events_pb2.TaskCreate, "pid", 6),
        (ttrpc_events_pb2.Envelope, "event", 4),
        (oci_pb2.Options, "criu_work_path", 11),
        (cg1.Metrics, "cpu", 3),
        (cg1.Metrics, "memory", 4),
        (cg1.Metrics, "memory_oom_control", 9),
        (cg1.CPUUsage, "per_cpu", 4),
        (cg1.MemoryStat, "total_rss", 19),
        (cg1.MemoryStat, "total_inactive_file", 30),
        (cg1.MemoryStat, "usage", 33),
        (cg1.MemoryStat, "kernel_tcp", 36),
        (cg2.Metrics, "cpu", 2),
        (cg2.Metrics, "memory", 4),
        (cg2.Metrics, "memory_events", 8),
        (cg2.MemoryStat, "inactive_file", 13),
        (cg2.MemoryStat, "usage", 32),
        (cg2.MemoryStat, "usage_limit", 33),
        (diag_pb2.ExecInHostRequest, "exec_id", 8),
    ],
)
def test_field_numbers(cls: type[Message], field: str, number: int) -> None:
    assert cls.DESCRIPTOR.fields_by_name[field].number == number


def test_status_enum() -> None:
    status = task_pb2.DESCRIPTOR.enum_types_by_name["Status"]
    assert status.full_name == "containerd.v1.types.Status"
    assert {v.name: v.number for v in status.values} == {
        "UNKNOWN": 0,
        "CREATED": 1,
        "RUNNING": 2,
        "STOPPED": 3,
        "PAUSED": 4,
        "PAUSING": 5,
    }
    field = shim_pb2.StateResponse.DESCRIPTOR.fields_by_name["status"]
    assert field.enum_type is status
