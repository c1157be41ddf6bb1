"""The Container with its injected OCI driver (the fake one: real processes, recorded
calls): what it asks the runtime, in which order, and which events it publishes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from google.protobuf import any_pb2

from podshim.linux.reaper import Reaper
from podshim.oci.runtime import RuntimeConfig
from podshim.task.container import Container
from podshim.task.contract import ExecRequest, ShimContext

from .fakeoci import FakeOci
from .fakes import RecordingPublisher


def test_container_drives_its_injected_runtime_and_reports_exits(tmp_path: Path) -> None:
    spec = {"process": {"args": ["sleep", "1000"]}, "root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "pid"}]}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(spec))
    oci = FakeOci(RuntimeConfig(binary="fake-runc", root=str(tmp_path / "root")))
    pub = RecordingPublisher()

    async def main() -> None:
        reaper = Reaper()
        reaper.start()
        ctx = ShimContext("ns", reaper, pub)
        c = Container(ctx, "c1", str(tmp_path), spec, [], oci,
                      terminal=False, stdin="", stdout="", stderr="")  # fmt: skip
        await c.create()
        record = json.loads((tmp_path / "podshim-runtime.json").read_text())
        assert record == {"binary": "fake-runc", "root": str(tmp_path / "root")}
        pid = await c.start("")
        assert c.running and pid == oci.inits["c1"]
        process = any_pb2.Any(value=json.dumps({"args": ["sh", "-c", "exit 3"]}).encode())
        await c.exec(ExecRequest("e1", False, "", "", "", process))
        await c.start("e1")
        assert (await asyncio.wait_for(c.wait("e1"), 20)).status == 3
        await c.delete("e1")
        await c.kill("", 15, False)
        assert (await asyncio.wait_for(c.wait(""), 20)).status == 128 + 15
        await c.delete("")
        assert len(c.jobs) == 0  # its monitors ended with it

    asyncio.run(asyncio.wait_for(main(), 60))
    verbs = [call[0] for call in oci.calls]
    assert verbs == ["create", "start", "exec", "kill", "delete"]
    assert oci.calls[0][-1] == "c1" and oci.calls[3] == ("kill", "c1", "15")
    assert pub.topics == ["/tasks/create", "/tasks/start", "/tasks/exec-added",
                          "/tasks/exec-started", "/tasks/exit", "/tasks/exit",
                          "/tasks/delete"]  # fmt: skip


def test_create_of_an_id_the_runtime_already_has_touches_nothing(tmp_path: Path) -> None:
    """Another containerd's container of the same id in a shared runtime root: the
    Create is AlreadyExists before it writes, mounts or asks the runtime anything (it
    used to end in ``runc delete --force`` of the other's container)."""
    import pytest

    from podshim import errors as errdefs

    spec = {"process": {"args": ["true"]}, "root": {"path": "rootfs"}}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    oci = FakeOci(RuntimeConfig(binary="fake-runc", root=str(tmp_path / "root")))
    oci.foreign.add("c1")
    pub = RecordingPublisher()

    async def main() -> None:
        ctx = ShimContext("ns", Reaper(), pub)
        c = Container(ctx, "c1", str(tmp_path), spec, [], oci,
                      terminal=False, stdin="", stdout="", stderr="")  # fmt: skip
        with pytest.raises(errdefs.AlreadyExists, match="left alone"):
            await c.create()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert oci.calls == []
    assert not (tmp_path / "podshim-runtime.json").exists()
    assert pub.topics == []
