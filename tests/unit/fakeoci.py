"""A fake OCI runtime driver (``podshim.oci.runtime.OciRuntime``) for unit tests.

It records every call like an argv and runs real processes: the container init is
``sh`` blocked on a gate pipe until ``start``, then ``exec``s the spec's args, so its
pid stays the same, exactly as a runc init's does. Nothing here waits for a process:
every exit reaches the shim's one reaper, as with runc.
"""

from __future__ import annotations

import json
import os
import shutil
import signal as signals
import socket
from typing import Any

from podshim import errors as errdefs
from podshim.oci import bundle as files
from podshim.oci.runtime import OciFactory, OciRuntime, RuntimeConfig

_GATE = 'read _ <&3; exec 3<&-; exec "$@"'


def _spawn(args: list[str], stdio: tuple[int, int, int], gate: int | None = None) -> int:
    actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(stdio)]
    argv = list(args)
    if gate is not None:
        actions.append((os.POSIX_SPAWN_DUP2, gate, 3))
        argv = ["sh", "-c", _GATE, "sh", *args]
    path = shutil.which(argv[0])
    if path is None:
        raise errdefs.Unknown(f"fake runtime: {argv[0]}: not found")
    return os.posix_spawn(path, argv, os.environ, file_actions=actions)


def _console(console_socket: str | None) -> int | None:
    """As runc with ``--console-socket``: make a pty, send its master over the socket,
    and give the process the slave as stdin, stdout and stderr. Returns the slave, to
    close once the process is spawned; None without a console socket."""
    if console_socket is None:
        return None
    master, slave = os.openpty()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(console_socket)
            socket.send_fds(s, [b"/dev/pts/fake"], [master])
    except BaseException:
        os.close(slave)
        raise
    finally:
        os.close(master)
    return slave


def _write_pid(path: str, pid: int) -> None:
    with open(path, "w") as f:
        f.write(str(pid))


class FakeOci:
    """One fake runtime instance; ``calls`` holds what was asked, in order."""

    def __init__(self, cfg: RuntimeConfig | None = None) -> None:
        self.cfg = cfg or RuntimeConfig(binary="fake-runc", root="/nonexistent")
        self.calls: list[tuple[str, ...]] = []
        self.inits: dict[str, int] = {}
        self.gates: dict[str, int] = {}
        self.execs: dict[str, list[int]] = {}
        #: containers somebody else made in the same runtime root (tests set them)
        self.foreign: set[str] = set()

    def exists(self, cid: str) -> bool:
        return cid in self.inits or cid in self.foreign

    def _pid(self, cid: str) -> int:
        pid = self.inits.get(cid)
        if pid is None:
            raise errdefs.NotFound(f"fake runtime: container {cid} does not exist")
        return pid

    async def create(
        self,
        cid: str,
        bundle: str,
        pid_file: str,
        stdio: tuple[int, int, int],
        console_socket: str | None = None,
    ) -> None:
        self.calls.append(("create", "--bundle", bundle, "--pid-file", pid_file, cid))
        with open(os.path.join(bundle, files.CONFIG)) as f:
            spec: dict[str, Any] = json.load(f)
        args = (spec.get("process") or {}).get("args")
        if not args or not isinstance(args, list):  # runc: "args must not be empty"
            raise errdefs.Unknown(f"fake runtime: container {cid}: args must not be empty")
        tty = _console(console_socket)
        r, w = os.pipe()
        try:
            pid = _spawn([str(a) for a in args], stdio if tty is None else (tty, tty, tty), gate=r)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
            if tty is not None:
                os.close(tty)
        self.inits[cid], self.gates[cid], self.execs[cid] = pid, w, []
        _write_pid(pid_file, pid)

    async def start(self, cid: str) -> None:
        self.calls.append(("start", cid))
        self._pid(cid)
        w = self.gates.pop(cid)
        os.write(w, b"go\n")
        os.close(w)

    async def exec(
        self,
        cid: str,
        process_json: str,
        pid_file: str,
        stdio: tuple[int, int, int],
        console_socket: str | None = None,
    ) -> None:
        self.calls.append(("exec", "--process", process_json, "--pid-file", pid_file, cid))
        self._pid(cid)
        with open(process_json) as f:
            process = json.load(f)
        tty = _console(console_socket)
        try:
            pid = _spawn([str(a) for a in process["args"]], stdio if tty is None else (tty,) * 3)
        finally:
            if tty is not None:
                os.close(tty)
        self.execs[cid].append(pid)
        _write_pid(pid_file, pid)

    async def kill(self, cid: str, signal: int, all_: bool = False) -> None:
        self.calls.append(("kill", *(["--all"] if all_ else []), cid, str(signal)))
        pids = [self._pid(cid), *(self.execs.get(cid, []) if all_ else [])]
        for pid in pids:
            try:
                os.kill(pid, signal)
            except ProcessLookupError:
                if pid == pids[0] and not all_:
                    raise errdefs.NotFound(f"fake runtime: {cid}: process already finished") from None

    async def delete(self, cid: str, force: bool = False) -> None:
        self.calls.append(("delete", *(["--force"] if force else []), cid))
        pid = self._pid(cid)
        if force:
            for p in [pid, *self.execs.get(cid, [])]:
                try:
                    os.kill(p, signals.SIGKILL)
                except ProcessLookupError:
                    pass
        w = self.gates.pop(cid, None)
        if w is not None:
            os.close(w)
        del self.inits[cid]
        self.execs.pop(cid, None)

    async def pause(self, cid: str) -> None:
        self.calls.append(("pause", cid))
        os.kill(self._pid(cid), signals.SIGSTOP)

    async def resume(self, cid: str) -> None:
        self.calls.append(("resume", cid))
        os.kill(self._pid(cid), signals.SIGCONT)

    async def ps(self, cid: str) -> list[int]:
        self.calls.append(("ps", cid))
        return [self._pid(cid), *self.execs.get(cid, [])]

    async def update(self, cid: str, resources: dict[str, Any]) -> None:
        self.calls.append(("update", cid, json.dumps(resources, sort_keys=True)))
        self._pid(cid)


def fake_oci_factory(made: list[FakeOci] | None = None) -> OciFactory:
    """An :data:`~podshim.oci.runtime.OciFactory` making :class:`FakeOci` drivers (each
    appended to ``made``)."""

    def make(cfg: RuntimeConfig, bundle: str) -> OciRuntime:
        driver = FakeOci(cfg)
        if made is not None:
            made.append(driver)
        return driver

    return make
