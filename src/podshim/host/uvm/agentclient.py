"""The host side of the guest agent: :class:`AgentClient` speaks ``podshim.agent.v1.Agent``
(``proto/podshim/api/agent/v1/agent.proto``) over ttrpc on a unix socket: QEMU's chardev
socket of the VM's virtio-serial port, or the socket of an agent run with ``--listen`` (tests).

Calls that wait for an event in the guest (:meth:`~AgentClient.wait`,
:meth:`~AgentClient.wait_pid`, :meth:`~AgentClient.read`, :meth:`~AgentClient.watch_file`)
have no deadline: they end when the event comes or the channel goes (Unavailable). The
others have the client's ``timeout`` (:data:`DEFAULT_TIMEOUT` unless given).

Errors are the :mod:`podshim.errors` kinds the agent's statuses map to (the ttrpc client
maps them). Cancelling a :meth:`~AgentClient.read` may lose the bytes the agent was already
sending for it; cancel reads only when the stream is no longer wanted.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import Message

from podshim.api.agent.v1 import agent_pb2 as pb
from podshim.host.uvm.agentapi import SERVICE, AgentApi, AgentInfo, Chunk, SpawnSpec
from podshim.ttrpc.client import Client

M = TypeVar("M", bound=Message)

#: the deadline of calls that do not wait for guest events, in seconds
DEFAULT_TIMEOUT = 10.0
#: a long-poll call's deadline: none
_NO_DEADLINE = 0.0


class AgentClient:
    """:class:`~podshim.host.uvm.agentapi.AgentApi` over ttrpc.

    Args:
        path: the unix socket (the channel is opened on the first call, and again on the
            first call after it was lost).
        timeout: the deadline of calls that do not wait for a guest event (seconds).
    """

    def __init__(self, path: str, *, timeout: float | None = None) -> None:
        self.path = path
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self._client = Client(path)

    async def _call(
        self, method: str, request: Message, response_type: type[M], timeout: float | None = None
    ) -> M:
        t = self.timeout if timeout is None else timeout
        # the ttrpc client reads a falsy timeout as its own default: ours is None there
        return await self._client.call(
            SERVICE, method, request, response_type, timeout=t if t else None
        )

    async def _wait_call(self, method: str, request: Message, response_type: type[M]) -> M:
        return await self._call(method, request, response_type, timeout=_NO_DEADLINE)

    async def ping(self, timeout: float | None = None) -> AgentInfo:
        r = await self._call("Ping", pb.PingRequest(), pb.PingResponse, timeout)
        return AgentInfo(version=r.version, kernel=r.kernel, uptime_ms=r.uptime_ms)

    async def spawn(self, spec: SpawnSpec) -> int:
        req = pb.SpawnRequest(
            key=spec.key,
            args=list(spec.args),
            env=list(spec.env),
            cwd=spec.cwd,
            stdin=spec.stdin,
            stdout=spec.stdout,
            stderr=spec.stderr,
            terminal=spec.terminal,
            console_socket=spec.console_socket,
            width=spec.width,
            height=spec.height,
        )
        return (await self._call("Spawn", req, pb.SpawnResponse)).pid

    async def wait(self, key: str) -> int:
        return (await self._wait_call("Wait", pb.WaitRequest(key=key), pb.WaitResponse)).status

    async def wait_pid(self, pid: int) -> int:
        r = await self._wait_call("WaitPid", pb.WaitPidRequest(pid=pid), pb.WaitResponse)
        return r.status

    async def signal(self, signal: int, *, key: str = "", pid: int = 0) -> None:
        await self._call("Signal", pb.SignalRequest(key=key, pid=pid, signal=signal), pb.Empty)

    async def read(self, key: str, stream: int, max_bytes: int = 0) -> Chunk:
        req = pb.ReadRequest(key=key, stream=stream, max=max_bytes)
        r = await self._wait_call("ReadStream", req, pb.ReadResponse)
        return Chunk(data=r.data, eof=r.eof)

    async def write_stdin(self, key: str, data: bytes) -> int:
        r = await self._call("WriteStdin", pb.WriteRequest(key=key, data=data), pb.WriteResponse)
        return r.written

    async def close_stdin(self, key: str) -> None:
        await self._call("CloseStdin", pb.KeyRequest(key=key), pb.Empty)

    async def resize(self, key: str, width: int, height: int) -> None:
        req = pb.ResizeRequest(key=key, width=width, height=height)
        await self._call("Resize", req, pb.Empty)

    async def release(self, key: str) -> None:
        await self._call("Release", pb.KeyRequest(key=key), pb.Empty)

    async def read_file(self, path: str, max_bytes: int = 0) -> bytes:
        req = pb.ReadFileRequest(path=path, max=max_bytes)
        return (await self._call("ReadFile", req, pb.ReadFileResponse)).data

    async def write_file(self, path: str, data: bytes, mkdirs: bool = False) -> None:
        req = pb.WriteFileRequest(path=path, data=data, mkdirs=mkdirs)
        await self._call("WriteFile", req, pb.Empty)

    async def watch_file(self, path: str, timeout_ms: int) -> bool:
        """True when the file was modified within ``timeout_ms`` (0: wait without end)."""
        req = pb.WatchFileRequest(path=path, timeout_ms=timeout_ms)
        return (await self._wait_call("WatchFile", req, pb.WatchFileResponse)).changed

    async def mount(
        self,
        source: str,
        target: str,
        fstype: str = "",
        flags: int = 0,
        data: str = "",
        mkdir: bool = False,
        pid: int = 0,
    ) -> None:
        req = pb.MountRequest(
            source=source, target=target, fstype=fstype, flags=flags, data=data, mkdir=mkdir,
            pid=pid,
        )  # fmt: skip
        await self._call("Mount", req, pb.Empty)

    async def stacks(self) -> tuple[str, str]:
        r = await self._call("Stacks", pb.Empty(), pb.StacksResponse)
        return r.agent, r.tasks

    async def shutdown(self) -> None:
        await self._call("Shutdown", pb.Empty(), pb.Empty)

    async def close(self) -> None:
        await self._client.close()


_check: type[AgentApi] = AgentClient
