"""critest's streaming specs (``pkg/validate/streaming*.go``) through CRI: Exec, Attach and
PortForward answer with a URL of containerd's streaming server, which the tests open
over WebSocket (``cristream``), on podshim and on runc in the same test.

Beyond what critest checks, the exec tests check the exit status the server reports, an
exec's stdin, and a terminal resize (containerd calls the shim's ResizePty); the attach
test checks that closing the attach ends a ``stdinOnce`` container's stdin (the shim's
CloseIO), as kubelet relies on for ``kubectl run -i``.
"""

from __future__ import annotations

import secrets
import socket
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.integration import cristream as cs
    from tests.integration import criutil as cu
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import cristream as cs
    import criutil as cu

# the fixtures: one CRI containerd per module, per-test cleanup checks
cri_lab = cu.cri_lab
cri = cu.cri

HANDLERS = pytest.mark.parametrize("handler", [cu.PODSHIM, cu.RUNC])
#: seconds a stream may take for anything (loaded 2-core machine)
STREAM = 60.0
IDLE = ["tail", "-f", "/dev/null"]


def _running(cri: cu.CriLab, handler: str, name: str) -> tuple[str, str]:
    """A shared-PID pod (critest's default) with one idle container: (pod, container)."""
    pod, _ = cri.pod(name, handler, pid_mode="POD")
    return pod, cri.container(pod, "c", IDLE).id


@HANDLERS
def test_exec_without_tty(cri: cu.CriLab, handler: str) -> None:
    _, cid = _running(cri, handler, "exec")
    # critest: tty=false, stdin=false, stdout exactly "hello", stderr empty
    with cs.Channels(cri.cri.exec_url(cid, ["echo", "-n", "hello"])) as s:
        s.until_closed(STREAM)
    assert (s.text(cs.STDOUT), s.text(cs.STDERR), s.exit_code()) == ("hello", "", 0)

    script = "echo -n out; echo -n err >&2; exit 3"
    with cs.Channels(cri.cri.exec_url(cid, ["sh", "-c", script])) as s:
        s.until_closed(STREAM)
    assert (s.text(cs.STDOUT), s.text(cs.STDERR), s.exit_code()) == ("out", "err", 3)

    # stdin reaches the process
    with cs.Channels(cri.cri.exec_url(cid, ["head", "-c", "5"], stdin=True)) as s:
        s.send(cs.STDIN, b"abcde")
        s.until_closed(STREAM)
    assert (s.text(cs.STDOUT), s.exit_code()) == ("abcde", 0)


@HANDLERS
def test_exec_with_tty_and_stdin(cri: cu.CriLab, handler: str) -> None:
    _, cid = _running(cri, handler, "exectty")
    # critest: tty=true, stdin=true, stdout contains "hello"
    url = cri.cri.exec_url(cid, ["echo", "-n", "hello"], stdin=True, stderr=False, tty=True)
    with cs.Channels(url) as s:
        s.until_closed(STREAM)
    assert "hello" in s.text(cs.STDOUT) and s.exit_code() == 0, s.data

    # the terminal is a terminal, and a resize reaches it (containerd -> shim ResizePty)
    # (busybox's `stty size` fails on a 0x0 terminal: each answer ends with a marker)
    loop = 'tty; while read x; do [ "$x" = q ] && exit 7; stty size; echo =end=; done'
    url = cri.cri.exec_url(cid, ["sh", "-c", loop], stdin=True, stderr=False, tty=True)
    with cs.Channels(url) as s:
        s.wait(lambda: "/dev/pts/" in s.text(cs.STDOUT), STREAM, "tty's answer")
        s.resize(123, 45)

        rounds = 0
        while "45 123" not in s.text(cs.STDOUT):
            rounds += 1  # each round waits for the shell's answer, not for a fixed time
            assert rounds <= 100, f"no resize to 45x123 seen: {s.text(cs.STDOUT)!r}"
            s.send(cs.STDIN, b"size?\n")
            s.wait(
                lambda n=rounds: s.text(cs.STDOUT).count("=end=") >= n,  # type: ignore[misc]
                STREAM,
                "the answer of stty size",
            )
        s.send(cs.STDIN, b"q\n")
        s.until_closed(STREAM)
    assert s.exit_code() == 7, s.status()


@HANDLERS
def test_attach(cri: cu.CriLab, handler: str) -> None:
    pod, _ = cri.pod("attach", handler, pid_mode="POD")
    config = cri.container_config(pod, "shell", ["/bin/sh"])
    config.stdin = True
    config.stdin_once = True
    cid = cri.start(pod, cri.create_config(pod, config)).id

    with cs.Channels(cri.cri.attach_url(cid)) as s:
        s.send(cs.STDIN, b"echo -n hello\n")
        s.wait(lambda: s.text(cs.STDOUT) == "hello", STREAM, "hello from the attached shell")
        s.send(cs.STDIN, b"echo -n ' world' >&2\n")
        s.wait(lambda: s.text(cs.STDERR) == " world", STREAM, "stderr of the attached shell")
    # closing the only attach of a stdinOnce container closes its stdin: the shell ends
    info = cri.wait_container(cid, "EXITED")
    assert info.exit_code == 0, info
    assert s.text(cs.STDOUT) == "hello", s.data


SERVE = "mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p {addr} -h /www"


def _get(url: str, port: int) -> bytes:
    """One HTTP/1.0 GET of / through a port-forward URL; the raw response."""
    with cs.Channels(url, ports=True) as s:
        s.send(0, b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        s.until_closed(STREAM)
    assert not s.data[1], f"port {port}: error channel: {s.text(1)!r}"
    return bytes(s.data[0])


def _serving(cri: cu.CriLab, cid: str, port: int, body: str) -> None:
    """critest checks the server answers before it forwards: wget in the container."""
    cri.exec_ok(cid, "sh", "-c", f"until wget -O - http://127.0.0.1:{port}/; do sleep 0.1; done")
    out = cri.exec_ok(cid, "wget", "-O", "-", f"http://127.0.0.1:{port}/")
    assert out.strip() == body, out


@HANDLERS
def test_port_forward(cri: cu.CriLab, handler: str) -> None:
    config = cri.pod_config("portfwd", pid_mode="POD")
    config.port_mappings.add(container_port=80)
    pod = cri.run_pod(config, handler)
    body = f"forwarded-{handler}-{secrets.token_hex(3)}"
    server = cri.container(pod, "web", ["sh", "-c", SERVE.format(body=body, addr=80)])
    _serving(cri, server.id, 80, body)

    url = cri.cri.port_forward_url(pod, [80])
    response = _get(url, 80)
    assert response.startswith(b"HTTP/1.") and b" 200 " in response.split(b"\r\n")[0], response
    assert response.rstrip().endswith(body.encode()), response


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@HANDLERS
def test_port_forward_in_host_network(cri: cu.CriLab, handler: str) -> None:
    pod, _ = cri.pod("portfwdhost", handler, pid_mode="POD", host_network=True)
    port = _free_port()
    body = f"host-{handler}-{secrets.token_hex(3)}"
    addr = f"127.0.0.1:{port}"
    server = cri.container(pod, "web", ["sh", "-c", SERVE.format(body=body, addr=addr)])
    _serving(cri, server.id, port, body)

    response = _get(cri.cri.port_forward_url(pod, [port]), port)
    assert b" 200 " in response.split(b"\r\n")[0], response
    assert response.rstrip().endswith(body.encode()), response
