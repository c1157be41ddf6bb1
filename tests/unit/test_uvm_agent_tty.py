"""The guest agent's terminals: a pty of its own (``terminal``) and one received on a
console socket (``console_socket``, as ``runc --console-socket`` sends it)."""

from __future__ import annotations

import re
import sys

from podshim.host.uvm.agentapi import CONSOLE_SOCKET_ARG, STDERR, SpawnSpec
from tests.unit.uvm_agent_util import (
    Agent,
    connected,
    read_all,
    read_until,
    run,
)

#: what runc does with --console-socket: make a pty, send its master over the socket
#: (SCM_RIGHTS), and use the slave; here it writes its window size, then echoes a line
SEND_MASTER = """
import os, socket, sys, fcntl, termios, struct
master, slave = os.openpty()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
socket.send_fds(s, [b"/dev/pts/x"], [master])
s.close()
os.close(master)
os.write(slave, b"sent\\n")
line = b""
while not line.endswith(b"\\n"):
    line += os.read(slave, 100)
rows, cols = struct.unpack("hh", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\\0" * 4))
os.write(slave, b"got " + line.strip() + b" size %d %d\\n" % (rows, cols))
"""


def test_terminal(agent: Agent) -> None:
    async def go() -> None:
        async with connected(agent) as c:
            await c.spawn(SpawnSpec(key="tty", args=("tty",), terminal=True))
            out = await read_all(c, "tty")
            assert re.fullmatch(rb"/dev/pts/\d+\r\n", out), out
            assert await c.wait("tty") == 0
            assert await read_all(c, "tty", STDERR) == b""
            spec = SpawnSpec(key="size", args=("stty", "size"), terminal=True, width=100, height=30)
            await c.spawn(spec)
            assert await read_all(c, "size") == b"30 100\r\n"
            # resize, then ask again; the process is its terminal's session leader
            script = "read line; stty size; ps -o sid= -p $$; echo $$"
            spec = SpawnSpec(key="rs", args=("sh", "-c", script), terminal=True)
            await c.spawn(spec)
            await c.resize("rs", 120, 40)
            await c.write_stdin("rs", b"go\n")
            out = await read_all(c, "rs")
            lines = out.split(b"\r\n")
            assert lines[0] == b"go" and lines[1] == b"40 120", out  # the echo, then stty
            assert lines[2].strip() == lines[3], out
            assert await c.wait("rs") == 0

    run(go)


def test_console_socket(agent: Agent) -> None:
    async def go() -> None:
        async with connected(agent) as c:
            spec = SpawnSpec(
                key="runc",
                args=(sys.executable, "-c", SEND_MASTER, CONSOLE_SOCKET_ARG),
                console_socket=True,
                stderr=True,
                width=90,
                height=20,
            )
            await c.spawn(spec)
            assert (await read_until(c, "runc", b"sent\r\n")).endswith(b"sent\r\n")
            await c.resize("runc", 91, 21)
            await c.write_stdin("runc", b"hello\n")
            out = await read_until(c, "runc", b"size")
            out += await read_all(c, "runc")
            assert b"got hello size 21 91\r\n" in out, out
            assert await c.wait("runc") == 0
            assert await read_all(c, "runc", STDERR) == b""
            # the socket is gone from the agent's directory
            assert not list(agent.tmp.glob("podshim-console-*"))
            # a process that never sends a terminal: stream 1 ends with it
            spec = SpawnSpec(key="nosend", args=("true", CONSOLE_SOCKET_ARG), console_socket=True)
            await c.spawn(spec)
            assert await read_all(c, "nosend") == b""
            assert await c.wait("nosend") == 0

    run(go)
