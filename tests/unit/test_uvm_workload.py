"""The guest workload (podshim.host.uvm.workload) against FakeAgent: real runc on the
host with a busybox rootfs, as it runs in the VM (root only). Lifecycle, stdio through
containerd-style FIFOs, exit statuses, exec, kill, and what failures leave (nothing)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim.api.events import task_pb2 as ev
from podshim.task.contract import ExecRequest
from podshim.task.states import Status

from .uvmfakes import SKIP, Bed

pytestmark = pytest.mark.skipif(bool(SKIP), reason=SKIP)


@pytest.fixture
def bed() -> Iterator[Bed]:
    with tempfile.TemporaryDirectory(prefix="podshim-uvmw-") as tmp:
        b = Bed(tmp)
        yield b


def run(bed: Bed, fn: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    async def main() -> None:
        bed.start()
        try:
            await asyncio.wait_for(fn(), timeout)
        finally:
            await bed.cleanup()

    asyncio.run(main())


class FifoReader:
    """containerd's side of an output FIFO: reads everything until EOF."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.data = bytearray()
        self.done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        if chunk:
            self.data += chunk
            return
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)
        if not self.done.done():
            self.done.set_result(None)

    async def all(self, timeout: float = 20) -> bytes:
        await asyncio.wait_for(asyncio.shield(self.done), timeout)
        return bytes(self.data)


def process_spec(args: list[str]) -> any_pb2.Any:
    spec = {"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}
    return any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                       value=json.dumps(spec).encode())  # fmt: skip


def test_lifecycle_output_and_exit_status(bed: Bed) -> None:
    async def main() -> None:
        out, err = bed.fifo("out"), bed.fifo("err")
        req = bed.request("c1", ["sh", "-c", "echo hello; echo oops >&2; exit 3"],
                          stdout=out, stderr=err)  # fmt: skip
        rout, rerr = FifoReader(out), FifoReader(err)
        c = await bed.create(req)
        assert bed.topics() == ["/tasks/create"]
        assert c.pid > 0 and c.state("").status is Status.CREATED
        with open(os.path.join(bed.share, "c1", "config.json")) as f:
            cfg = json.load(f)
        assert cfg["root"]["path"] == f"{bed.share}/c1/rootfs"
        assert await c.start("") == c.pid
        ex = await c.wait("")
        assert ex.status == 3
        # output was copied before the exit was reported
        assert bytes(rout.data) == b"hello\n" and bytes(rerr.data) == b"oops\n"
        assert await rout.all() == b"hello\n"
        pid, got = await c.delete("")
        assert (pid, got) == (c.pid, ex)
        assert bed.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
        exit_ev = bed.publisher.events[2][1]
        assert isinstance(exit_ev, ev.TaskExit) and exit_ev.exit_status == 3
        assert bed.leftovers() == []

    run(bed, main)


def test_stdin_through_fifo_and_close_io(bed: Bed) -> None:
    async def main() -> None:
        inp, out = bed.fifo("in"), bed.fifo("out")
        c = await bed.create(bed.request("c1", ["cat"], stdin=inp, stdout=out))
        rout = FifoReader(out)
        w = os.open(inp, os.O_WRONLY)
        await c.start("")
        os.write(w, b"through the agent\n")
        os.close(w)
        await asyncio.sleep(0.2)
        assert not c.init.has_exited  # our own writer keeps stdin open until CloseIO
        c.close_io("")
        assert (await c.wait("")).status == 0
        assert await rout.all() == b"through the agent\n"
        await c.delete("")
        assert bed.leftovers() == []

    run(bed, main)


def test_terminal_via_console_socket(bed: Bed) -> None:
    async def main() -> None:
        out = bed.fifo("out")
        req = bed.request("c1", ["sh", "-c", "sleep 0.3; [ -t 0 ] && echo tty; stty size"],
                          terminal=True, stdout=out)  # fmt: skip
        c = await bed.create(req)
        rout = FifoReader(out)
        await c.start("")
        c.resize("", 100, 30)
        assert (await c.wait("")).status == 0
        assert (await rout.all()).replace(b"\r", b"") == b"tty\n30 100\n"
        plain = await bed.create(bed.request("c2", ["true"]))
        with pytest.raises(errdefs.FailedPrecondition):
            plain.resize("", 80, 24)  # not a tty
        await c.delete("")
        await plain.delete("")
        assert bed.leftovers() == []

    run(bed, main)


def test_exec_output_status_kill_and_pids(bed: Bed) -> None:
    async def main() -> None:
        c = await bed.create(bed.request("c1", ["sleep", "1000"]))
        await c.start("")
        out = bed.fifo("eout")
        await c.exec(ExecRequest("e1", False, "", out, "", process_spec(
            ["sh", "-c", "echo from exec; exit 5"])))  # fmt: skip
        rout = FifoReader(out)
        pid = await c.start("e1")
        assert pid > 0 and pid != c.pid
        ex = await c.wait("e1")
        assert ex.status == 5
        assert await rout.all() == b"from exec\n"
        assert await c.delete("e1") == (pid, ex)
        with pytest.raises(errdefs.NotFound):
            c.state("e1")
        await c.exec(ExecRequest("e2", False, "", "", "", process_spec(["sleep", "1000"])))
        epid = await c.start("e2")
        got = dict(await c.pids())
        assert got[c.pid] == "" and got[epid] == "e2"
        await c.kill("e2", 15, False)
        assert (await c.wait("e2")).status == 143
        with pytest.raises(errdefs.NotFound):
            await c.kill("e2", 9, False)
        await c.kill("", 9, True)
        assert (await c.wait("")).status == 137
        assert await c.pids() == []
        await c.delete("e2")
        await c.delete("")
        topics = bed.topics()
        assert topics.count("/tasks/exec-added") == 2 and topics.count("/tasks/exec-started") == 2
        assert topics[-1] == "/tasks/delete"
        assert bed.leftovers() == []

    run(bed, main)


def test_exec_of_a_missing_program_fails_and_can_be_deleted(bed: Bed) -> None:
    async def main() -> None:
        c = await bed.create(bed.request("c1", ["sleep", "1000"]))
        await c.start("")
        await c.exec(ExecRequest("e1", False, "", "", "", process_spec(["/no/such/program"])))
        with pytest.raises(errdefs.Unknown, match="runc exec failed"):
            await c.start("e1")
        assert c.state("e1").status is Status.STOPPED
        await c.delete("e1")
        await c.kill("", 9, False)
        await c.wait("")
        await c.delete("")
        assert bed.leftovers() == []

    run(bed, main)


def test_binds_ro_and_shm_in_the_share(bed: Bed) -> None:
    async def main() -> None:
        data = os.path.join(bed.tmp, "data")
        os.mkdir(data)
        with open(os.path.join(data, "f"), "w") as f:
            f.write("in a volume")
        single = os.path.join(bed.tmp, "single")
        with open(single, "w") as f:
            f.write("one file")

        def edit(spec: dict[str, Any]) -> None:
            spec["mounts"] += [
                {"destination": "/tmp", "type": "bind", "source": data,
                 "options": ["rbind", "ro"]},
                {"destination": "/etc/hostname", "type": "bind", "source": single,
                 "options": ["bind", "rw"]},
            ]  # fmt: skip

        out = bed.fifo("out")
        script = "cat /tmp/f; echo; cat /etc/hostname; echo; echo x > /tmp/g || echo ro"
        c = await bed.create(bed.request("c1", ["sh", "-c", script], stdout=out, edit=edit))
        rout = FifoReader(out)
        with open(os.path.join(bed.share, "c1", "config.json")) as f:
            binds = [m for m in json.load(f)["mounts"] if m["type"] == "bind"]
        assert [m["source"] for m in binds] == [f"{bed.share}/c1/mounts/0",
                                                 f"{bed.share}/c1/mounts/1"]  # fmt: skip
        await c.start("")
        assert (await c.wait("")).status == 0
        assert (await rout.all()).split(b"\n")[:3] == [b"in a volume", b"one file", b"ro"]
        await c.delete("")
        assert bed.leftovers() == []
        assert os.listdir(data) == ["f"]  # the source was never written or removed

    run(bed, main)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda s: s.update(hooks={"prestart": [{"path": "/bin/true"}]}), "hooks.prestart"),
        (lambda s: s["linux"]["namespaces"].append({"type": "user"}), "linux.namespaces[5]"),
        (
            lambda s: s["mounts"].append(
                {"destination": "/s", "type": "bind", "source": "/dev/null", "options": ["bind"]}
            ),
            "mounts[7].source",
        ),  # not a file or directory: found after the dir was made
        (
            lambda s: s["mounts"].append(
                {"destination": "/x", "type": "bind", "source": "/no/such/dir", "options": ["bind"]}
            ),
            "mounts[7].source",
        ),
    ],
)
def test_a_spec_the_vm_cannot_honour_is_refused_naming_the_field_and_leaves_nothing(
    bed: Bed, edit: Callable[[dict[str, Any]], None], field: str
) -> None:
    async def main() -> None:
        out = bed.fifo("out")
        with pytest.raises(errdefs.InvalidArgument, match=re.escape(field)):
            await bed.create(bed.request("c1", ["true"], stdout=out, edit=edit))
        assert bed.leftovers() == [] and bed.topics() == []
        assert bed.agent.calls == []  # refused before runc ran

    run(bed, main)


def test_runc_create_failure_is_unknown_with_runcs_message_and_leaves_nothing(bed: Bed) -> None:
    async def main() -> None:
        def edit(spec: dict[str, Any]) -> None:
            spec["process"]["cwd"] = "relative"  # runc: cwd must be an absolute path

        with pytest.raises(errdefs.Unknown, match=r"runc create failed: .*absolute"):
            await bed.create(bed.request("c1", ["true"], edit=edit))
        assert bed.leftovers() == [] and bed.topics() == []

    run(bed, main)


def test_an_existing_directory_in_the_share_is_already_exists_and_left_alone(bed: Bed) -> None:
    async def main() -> None:
        os.makedirs(os.path.join(bed.share, "c1", "keep"))
        with pytest.raises(errdefs.AlreadyExists):
            await bed.create(bed.request("c1", ["true"]))
        assert os.listdir(os.path.join(bed.share, "c1")) == ["keep"]
        os.rmdir(os.path.join(bed.share, "c1", "keep"))
        os.rmdir(os.path.join(bed.share, "c1"))

    run(bed, main)


@pytest.mark.parametrize("after", ["spawn", "created"])
def test_a_cancelled_create_leaves_nothing(bed: Bed, after: str) -> None:
    """Cancelled while runc create runs in the guest (the undo waits for it), or just
    as it finished: no runc container, init, key, mount, directory or event."""

    async def main() -> None:
        out = bed.fifo("out")
        gate = bed.agent.gates["c1/create"] = asyncio.Event()  # runc create's end waits
        if after == "spawn":
            gate.set()
        task = asyncio.ensure_future(bed.create(bed.request("c1", ["sleep", "1000"],
                                                            stdout=out)))  # fmt: skip
        while ("spawn", "c1/create") not in bed.agent.calls:
            await asyncio.sleep(0.001)
        if after == "created":
            while not os.path.exists(os.path.join(bed.share, "c1", "init.pid")):
                await asyncio.sleep(0.001)
        task.cancel()
        asyncio.get_running_loop().call_later(0.05, gate.set)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert bed.leftovers() == [] and bed.topics() == []

    run(bed, main)


def test_a_cancelled_start_kills_the_init(bed: Bed) -> None:
    async def main() -> None:
        c = await bed.create(bed.request("c1", ["sleep", "1000"]))
        task = asyncio.ensure_future(c.start(""))
        while not any(k.startswith("c1/runc/start") for _, k in bed.agent.calls):
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await asyncio.wait_for(c.wait(""), 20)).status == 137
        await c.delete("")
        assert bed.leftovers() == []
        assert "/tasks/start" not in bed.topics()

    run(bed, main)


def test_fail_reports_every_process_exited_and_kills_them(bed: Bed) -> None:
    async def main() -> None:
        c = await bed.create(bed.request("c1", ["sleep", "1000"]))
        await c.start("")
        await c.exec(ExecRequest("e1", False, "", "", "", process_spec(["sleep", "1000"])))
        await c.start("e1")
        c.fail(RuntimeError("the VM died"))
        c.fail(RuntimeError("again"))  # idempotent
        assert (await c.wait("")).status == 255 and (await c.wait("e1")).status == 255
        exits = [e for t, e in bed.publisher.events if t == "/tasks/exit"]
        assert len(exits) == 2
        status = Path(f"/proc/{c.pid}/status")

        def gone() -> bool:
            try:
                return "zombie" in status.read_text()
            except FileNotFoundError:
                return True

        for _ in range(200):  # the kill job ends the processes
            if gone():
                break
            await asyncio.sleep(0.05)
        assert gone()
        await c.delete("e1")
        await c.delete("")
        assert bed.leftovers() == []

    run(bed, main)


def test_after_the_vm_died_delete_needs_no_agent_and_leaves_nothing_on_the_host(bed: Bed) -> None:
    """The host's death: the agent is gone (every call Unavailable), the pod fails the
    container; Delete of the exec and the init still succeed and remove the share's
    mounts and directory."""

    async def main() -> None:
        c = await bed.create(bed.request("c1", ["sleep", "1000"]))
        await c.start("")
        await c.exec(ExecRequest("e1", False, "", "", "", process_spec(["sleep", "1000"])))
        await c.start("e1")
        await bed.agent.shutdown()  # the VM's processes end with it...
        await bed.agent.close()  # ...and so does the channel
        c.fail(errdefs.Unavailable("the VM of pod p is gone"))
        assert (await c.wait("")).status == 255
        with pytest.raises(errdefs.Unavailable):
            await bed.agent.ping()  # the agent is really gone
        await c.delete("e1")
        _, ex = await c.delete("")
        assert ex.status == 255
        # runc's state, cgroups and keys went with the VM (here the host's: cleanup)
        assert [x for x in bed.leftovers() if x.startswith("share/")] == []
        assert bed.topics()[-1] == "/tasks/delete"

    run(bed, main)
