"""The systemd cgroup driver (``systemd_cgroup = true``): what podshim asks systemd for.

There is no systemd on these machines, so a D-Bus peer of this test stands in for the
system bus and systemd's manager: it speaks the real wire protocol (SASL, then D-Bus
messages), records every call, answers jobs with ``JobRemoved`` signals as systemd
does. The driver must ask for the unit runc's systemd driver would make for the same
``slice:prefix:name`` (``StartTransientUnit`` with slice, delegation, the pid,
accounting and limits), stop it on removal, and fail with a clear error when no bus
answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from jeepney import DBusAddress, new_error, new_method_return, new_signal
from jeepney.low_level import Message, Parser

from podshim import errors as errdefs
from podshim.host.namespaces import systemd as sd
from podshim.host.namespaces.cgroup import Resources

UNIT_PATH = "kubepods-burstable-pod4a1b_22.slice:cri-containerd:sb1"


def test_parse_unit_as_runc_does() -> None:
    u = sd.parse_unit(UNIT_PATH)
    assert u == sd.Unit(
        "kubepods-burstable-pod4a1b_22.slice",
        "cri-containerd-sb1.scope",
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod4a1b_22.slice/"
        "cri-containerd-sb1.scope",
    )
    assert sd.parse_unit(":cri-containerd:x").slice == "system.slice"
    assert sd.parse_unit("a.slice::x").name == "x.scope"
    assert sd.parse_unit("a.slice:p:b.slice").is_slice
    for bad in ("/k8s.io/x", "a.slice:x", "a.slice:p:", "a-.slice:p:x", "a.slice:p:x/y"):
        with pytest.raises(errdefs.InvalidArgument):
            sd.parse_unit(bad)


def test_cpu_quota_per_second_rounds_up_to_10ms() -> None:
    assert sd.cpu_quota_per_sec(None, None) is None
    assert sd.cpu_quota_per_sec(50_000, 100_000) == 500_000
    assert sd.cpu_quota_per_sec(33_333, 100_000) == 340_000
    assert sd.cpu_quota_per_sec(20_000, None) == 200_000  # the default 100 ms period
    assert sd.cpu_quota_per_sec(-1, 100_000) == sd.INFINITY
    assert sd.cpu_quota_per_sec(None, 50_000) == sd.INFINITY


def test_unit_properties_v1_and_v2() -> None:
    u = sd.parse_unit(UNIT_PATH)
    res = Resources(cpu_shares=512, cpu_quota=50_000, cpu_period=100_000, memory_limit=1 << 28)
    v1 = dict(sd.unit_properties(u, 42, res, unified=False, pod_id="sb1"))
    assert v1["Slice"] == ("s", "kubepods-burstable-pod4a1b_22.slice")
    assert v1["Delegate"] == ("b", True)
    assert v1["PIDs"] == ("au", [42])
    assert v1["DefaultDependencies"] == ("b", False)
    assert v1["BlockIOAccounting"] == ("b", True) and "IOAccounting" not in v1
    assert v1["CPUShares"] == ("t", 512)
    assert v1["CPUQuotaPerSecUSec"] == ("t", 500_000)
    assert v1["CPUQuotaPeriodUSec"] == ("t", 100_000)
    assert v1["MemoryLimit"] == ("t", 1 << 28)
    v2 = dict(sd.unit_properties(u, 42, Resources(512, memory_limit=-1), unified=True, pod_id="x"))
    assert v2["CPUWeight"] == ("t", 20) and "CPUShares" not in v2
    assert v2["MemoryMax"] == ("t", sd.INFINITY)
    assert v2["IOAccounting"] == ("b", True)
    s = dict(
        sd.unit_properties(
            sd.parse_unit("a.slice:p:b.slice"), 1, Resources(), unified=True, pod_id="x"
        )
    )
    assert s["Wants"] == ("as", ["a.slice"]) and "Slice" not in s and "Delegate" not in s


class FakeSystemd:
    """A system bus with systemd's manager behind it, on a unix socket."""

    def __init__(self, fail_jobs: bool = False, refuse: str = "") -> None:
        self.calls: list[tuple[str, str, tuple[Any, ...]]] = []
        self.fail_jobs = fail_jobs
        self.refuse = refuse  # a method answered with a D-Bus error
        self._jobs = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readuntil(b"\r\n")
            assert line.lstrip(b"\0").startswith(b"AUTH EXTERNAL "), line
            writer.write(b"OK 0123456789abcdef0123456789abcdef\r\n")
            assert await reader.readuntil(b"\r\n") == b"BEGIN\r\n"
            parser = Parser()
            serial = 1000
            while data := await reader.read(65536):
                for msg in parser.feed(data):
                    serial += 1
                    for out in self.answer(msg):
                        writer.write(out.serialise(serial=serial))
                        serial += 1
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def answer(self, msg: Message) -> list[Message]:
        h = msg.header.fields
        member = h[3]  # HeaderFields.member
        self.calls.append((h[2], member, msg.body))  # (interface, member, body)
        if member == "Hello":
            return [new_method_return(msg, "s", (":1.7",))]
        if member == self.refuse:
            return [new_error(msg, "org.freedesktop.systemd1.UnitExists", "s", ("exists",))]
        if member in ("AddMatch", "Subscribe"):
            return [new_method_return(msg)]
        if member in ("StartTransientUnit", "StopUnit"):
            self._jobs += 1
            job = f"/org/freedesktop/systemd1/job/{self._jobs}"
            manager = DBusAddress(sd.MANAGER_PATH, interface=sd.MANAGER)
            result = "failed" if self.fail_jobs else "done"
            # another job's end first: the driver must wait for its own
            other = new_signal(manager, "JobRemoved", "uoss", (9, "/x/job/0", "x", "done"))
            done = new_signal(manager, "JobRemoved", "uoss", (self._jobs, job, msg.body[0], result))
            return [new_method_return(msg, "o", (job,)), other, done]
        return [new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (member,))]


@contextlib.asynccontextmanager
async def bus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeSystemd
) -> AsyncIterator[None]:
    sock = tmp_path / "bus"
    server = await asyncio.start_unix_server(fake.serve, str(sock))
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={sock}")
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def manager_calls(fake: FakeSystemd) -> list[tuple[str, tuple[Any, ...]]]:
    return [(m, b) for i, m, b in fake.calls if i == sd.MANAGER]


def test_scope_started_with_the_init_and_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeSystemd()

    async def main() -> None:
        async with bus(tmp_path, monkeypatch, fake):
            # root=tmp: no cgroup hierarchy is mounted there, so nothing on the host changes
            scope = sd.SystemdScope(UNIT_PATH, pod_id="sb1", root=str(tmp_path))
            assert scope.planned() == []
            await scope.create()
            assert [m for m, _ in manager_calls(fake)] == ["Subscribe"]  # nothing made yet
            scope.apply(Resources(cpu_shares=256, memory_limit=1 << 27))
            await scope.add(4242)
            (name, mode, props, aux) = manager_calls(fake)[-1][1]
            assert (name, mode, aux) == ("cri-containerd-sb1.scope", "replace", [])
            got = dict(props)
            assert got["PIDs"] == ("au", [4242])
            assert got["Slice"] == ("s", "kubepods-burstable-pod4a1b_22.slice")
            assert got["CPUShares"] == ("t", 256) and got["MemoryLimit"] == ("t", 1 << 27)
            assert await scope.remove() == []
            assert manager_calls(fake)[-1] == ("StopUnit", ("cri-containerd-sb1.scope", "replace"))
            assert await scope.remove() == []  # idempotent: nothing more is asked
            assert [m for m, _ in manager_calls(fake)].count("StopUnit") == 1

    asyncio.run(asyncio.wait_for(main(), 60))


def test_failed_job_and_refusal_are_clear_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main(fake: FakeSystemd, kind: type[Exception], match: str) -> None:
        async with bus(tmp_path, monkeypatch, fake):
            scope = sd.SystemdScope(UNIT_PATH, pod_id="sb1", root=str(tmp_path))
            await scope.create()
            with pytest.raises(kind, match=match):
                await scope.add(1)
            await scope.remove()

    asyncio.run(main(FakeSystemd(fail_jobs=True), errdefs.FailedPrecondition, "job ended 'failed'"))
    asyncio.run(
        main(
            FakeSystemd(refuse="StartTransientUnit"),
            errdefs.AlreadyExists,
            "cri-containerd-sb1.scope",
        )
    )


def test_unreachable_systemd_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/nobody-listens")

    async def main() -> None:
        scope = sd.SystemdScope(UNIT_PATH, pod_id="sb1", root=str(tmp_path))
        with pytest.raises(errdefs.FailedPrecondition, match="systemd is not reachable on D-Bus"):
            await scope.create()
        assert await scope.remove() == []

    asyncio.run(main())
