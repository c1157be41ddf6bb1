"""The zygote trusts no peer (issue 9, defect 4): only root is served, every request is
checked and a bad one answered while the zygote lives on, a daemon removes only its own
socket file, an abandoned request is never served, and a silent client delays nobody.

Most tests run a real zygote (``podshim.shim.main zygote``) in a private run dir and talk
to it over its socket; every process they cause is ended by the fixtures.
"""

from __future__ import annotations

import _socket
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from podshim import rundir
from podshim.shim import zygote as zygote_client
from podshim.shim import zygote_server
from podshim.shim.flags import Flags
from podshim.shim.start import listen
from podshim.shim.zygote import GO, PROTOCOL, bound_file, is_socket_file_of, request_fork
from podshim.shim.zygote import zygote_path as zpath

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (SO_PEERCRED, setuid)")

ADDRESS = "/run/podshim-test/containerd.sock"
NOBODY = 65534


# -- helpers ----------------------------------------------------------------------------
def children(pid: int) -> set[int]:
    """Live (non-zombie) children of ``pid``."""
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(c) for c in f.read().split())
    return {c for c in out if _state(c) not in ("Z", "")}


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def started_in(run: str) -> set[int]:
    """Processes whose environment names the private run dir ``run`` (so this test
    started them, daemons of a zygote that died included)."""
    mark = f"PODSHIM_RUN_DIR={run}".encode()
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            with contextlib.suppress(OSError), open(f"/proc/{name}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    out.add(int(name))
    return out


def holders(sock: _socket.socket, among: set[int]) -> set[int]:
    """Which of the processes ``among`` hold the socket ``sock``."""
    link = f"socket:[{os.fstat(sock.fileno()).st_ino}]"
    out = set()
    for pid in among:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                        out.add(pid)
    return out


def wait_until(cond: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        time.sleep(0.02)


def read_line(s: socket.socket, timeout: float = 5.0) -> dict[str, object]:
    s.settimeout(timeout)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    answer = json.loads(buf)
    assert isinstance(answer, dict)
    return answer


def ask(path: str, payload: bytes, fds: list[int], timeout: float = 5.0) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        if fds:
            socket.send_fds(s, [payload], fds)
        else:
            s.sendall(payload)
        return read_line(s, timeout)


class Zygote:
    def __init__(self, run: str, proc: subprocess.Popen[bytes]) -> None:
        self.run, self.proc, self.pid = run, proc, proc.pid
        self.path = os.path.join(run, "z", os.path.basename(zpath(ADDRESS)))
        self.sockets = os.path.join(run, "s")
        self.bundle = os.path.join(run, "bundle")
        os.makedirs(self.bundle, exist_ok=True)

    def request(self, sock_path: str, **changes: object) -> dict[str, object]:
        req: dict[str, object] = {
            "v": PROTOCOL, "namespace": "ns", "id": "t1", "address": ADDRESS,
            "bundle": self.bundle, "socket": sock_path, "debug": False,
            "containerd_pid": os.getpid(),
        }  # fmt: skip
        req.update(changes)
        return req

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def running_zygote() -> Iterator[Zygote]:
    run = tempfile.mkdtemp(prefix="pz", dir="/tmp")  # short: sun_path has 108 bytes
    os.chmod(run, 0o755)
    env = {**os.environ, "PODSHIM_RUN_DIR": run, "PODSHIM_ZYGOTE_IDLE": "120"}
    with open(os.path.join(run, "zygote.log"), "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "podshim.shim.main", "-address", ADDRESS, "-namespace", "ns",
             "zygote"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True,
        )  # fmt: skip
    z = Zygote(run, proc)
    try:
        wait_until(lambda: os.path.exists(z.path) or proc.poll() is not None, 30, "the zygote")
        assert proc.poll() is None, Path(run, "zygote.log").read_text()
        yield z
    finally:
        proc.kill()
        proc.wait()
        for pid in started_in(run):  # daemons it forked for this test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(run, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_zygote_spawned(monkeypatch: pytest.MonkeyPatch) -> None:
    """``request_fork`` must find the test's zygote, never start one of its own."""

    def spawn(flags: Flags) -> None:
        raise AssertionError("request_fork spawned a zygote")

    monkeypatch.setattr(zygote_client, "_spawn_zygote", spawn)


@pytest.fixture
def zygote(monkeypatch: pytest.MonkeyPatch) -> Iterator[Zygote]:
    with running_zygote() as z:
        monkeypatch.setenv("PODSHIM_RUN_DIR", z.run)
        yield z


@pytest.fixture(scope="module")
def shared_zygote() -> Iterator[Zygote]:
    with running_zygote() as z:
        yield z


@pytest.fixture
def listener(zygote: Zygote) -> Iterator[tuple[_socket.socket, str]]:
    """A shim socket as ``start`` makes it (bound elsewhere, linked into place)."""
    path = os.path.join(zygote.sockets, "a" * 64)
    sock = listen(path)
    assert sock is not None
    with contextlib.closing(sock):
        yield sock, path


def flags() -> Flags:
    f = Flags()
    f.namespace, f.id, f.address = "ns", "t1", ADDRESS
    return f


# -- SO_PEERCRED ------------------------------------------------------------------------
def test_only_root_peers_are_allowed() -> None:
    assert zygote_server.peer_allowed((123, 0, 0))
    assert zygote_server.peer_allowed((123, 0, NOBODY))
    assert not zygote_server.peer_allowed((123, NOBODY, 0))
    assert not zygote_server.peer_allowed((123, 1000, 1000))


def test_a_non_root_peer_is_refused_and_the_zygote_lives_on(
    zygote: Zygote, listener: tuple[_socket.socket, str]
) -> None:
    sock, path = listener
    os.chmod(os.path.dirname(zygote.path), 0o755)  # let nobody reach the socket at all
    os.chmod(zygote.path, 0o666)
    payload = json.dumps(zygote.request(path)).encode() + b"\n"  # valid but for the uid
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(zygote.path)
                with contextlib.suppress(OSError):  # it may have answered and closed
                    socket.send_fds(s, [payload], [sock.fileno()])
                os.write(w, json.dumps(read_line(s)).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert select.select([r], [], [], 10)[0], "no answer for the non-root peer"
        answer = json.loads(os.read(r, 4096))
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert "pid" not in answer and "not root" in str(answer.get("error")), answer
    assert zygote.alive() and not children(zygote.pid)
    assert "error" in ask(zygote.path, b"[]\n", [sock.fileno()])  # still serving root


# -- request validation ------------------------------------------------------------------
def _line(req: object) -> bytes:
    return json.dumps(req).encode() + b"\n"


class Fx:
    """What a bad request is made of: a valid request and the fds and files around it."""

    def __init__(self, z: Zygote, stack: contextlib.ExitStack) -> None:
        self.path = os.path.join(z.sockets, "b" * 64)
        self.other = os.path.join(z.sockets, "c" * 64)  # another listener's file
        self.victim = os.path.join(z.sockets, "victim")  # a regular file
        self.outside = os.path.join(z.run, "outside.sock")  # a listener outside the dir
        self.dotdot = os.path.join(z.sockets, "..", "s", "b" * 64)
        self.good = z.request(self.path)
        sock, other = listen(self.path), listen(self.other)
        assert sock is not None and other is not None
        for s, path in ((sock, self.path), (other, self.other)):
            stack.callback(os.unlink, path)
            stack.enter_context(contextlib.closing(s))
        out = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        out.bind(self.outside)
        out.listen()
        stack.callback(os.unlink, self.outside)
        Path(self.victim).write_text("precious")
        stack.callback(os.unlink, self.victim)
        self.pipe, w = os.pipe()
        stack.callback(os.close, self.pipe)
        stack.callback(os.close, w)
        a, b = socket.socketpair()
        stack.enter_context(a)
        stack.enter_context(b)
        self.fd, self.out_fd, self.pair = sock.fileno(), out.fileno(), a.fileno()

    def req(self, **changes: object) -> bytes:
        return _line({**self.good, **changes})


BAD: dict[str, Callable[[Fx], tuple[bytes, list[int]]]] = {
    "json array": lambda f: (b"[]\n", [f.fd]),
    "json string": lambda f: (b'"x"\n', [f.fd]),
    "not json": lambda f: (b"{nope\n", [f.fd]),
    "no newline": lambda f: (f.req()[:-1], [f.fd]),
    "missing field": lambda f: (_line({k: v for k, v in f.good.items() if k != "id"}), [f.fd]),
    "unknown field": lambda f: (f.req(x=1), [f.fd]),
    "id not a string": lambda f: (f.req(id=5), [f.fd]),
    "debug not a bool": lambda f: (f.req(debug="yes"), [f.fd]),
    "pid a bool": lambda f: (f.req(containerd_pid=True), [f.fd]),
    "pid zero": lambda f: (f.req(containerd_pid=0), [f.fd]),
    "old protocol": lambda f: (f.req(v=1), [f.fd]),
    "namespace a path": lambda f: (f.req(namespace="../x"), [f.fd]),
    "other containerd": lambda f: (f.req(address="/x"), [f.fd]),
    "relative bundle": lambda f: (f.req(bundle="b"), [f.fd]),
    "missing bundle": lambda f: (f.req(bundle="/nope/x"), [f.fd]),
    "no fd": lambda f: (f.req(), []),
    "two fds": lambda f: (f.req(), [f.fd, f.fd]),
    "a pipe": lambda f: (f.req(), [f.pipe]),
    "not listening": lambda f: (f.req(), [f.pair]),
    "socket outside the socket dir": lambda f: (f.req(socket=f.outside), [f.out_fd]),
    "socket a regular file": lambda f: (f.req(socket=f.victim), [f.fd]),
    "another socket's file": lambda f: (f.req(socket=f.other), [f.fd]),
    "dot-dot path": lambda f: (f.req(socket=f.dotdot), [f.fd]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_request_is_answered_and_the_zygote_lives_on(
    shared_zygote: Zygote, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    z = shared_zygote
    monkeypatch.setenv("PODSHIM_RUN_DIR", z.run)
    with contextlib.ExitStack() as stack:
        fx = Fx(z, stack)
        payload, fds = BAD[case](fx)
        answer = ask(z.path, payload, fds)
        assert "pid" not in answer and answer.get("error"), answer
        assert z.alive(), "the zygote died"
        assert not children(z.pid), "it forked for a bad request"
        assert Path(fx.victim).read_text() == "precious"
        assert ask(z.path, fx.req(), [])["error"]  # and it answers the next one


def test_the_socket_path_must_be_the_passed_sockets_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tempfile.mkdtemp(prefix="pz", dir="/tmp")
    try:
        monkeypatch.setenv("PODSHIM_RUN_DIR", run)
        sdir = rundir.sockets_dir()
        path = os.path.join(sdir, "d" * 64)
        sock = listen(path)  # bound as <path>.<pid>, linked to <path>, the first unlinked
        assert sock is not None
        with contextlib.closing(sock):
            st = os.stat(path)
            assert bound_file(sock.fileno()) == (st.st_dev, st.st_ino)
            assert is_socket_file_of(path, sock.fileno())
            assert not is_socket_file_of(os.path.join(sdir, "..", "s", "d" * 64), sock.fileno())
            assert not is_socket_file_of(os.path.relpath(path), sock.fileno())
            link = os.path.join(run, "elsewhere")
            os.link(path, link)  # the same file, outside the directory
            assert not is_socket_file_of(link, sock.fileno())
            other = listen(os.path.join(sdir, "e" * 64))
            assert other is not None
            with contextlib.closing(other):
                assert not is_socket_file_of(os.path.join(sdir, "e" * 64), sock.fileno())
            regular = os.path.join(sdir, "f" * 64)
            Path(regular).write_text("")
            assert not is_socket_file_of(regular, sock.fileno())
            a, b = socket.socketpair()
            with a, b:
                assert bound_file(a.fileno()) is None  # not listening, not bound
            os.unlink(path)
            assert bound_file(sock.fileno()) == (st.st_dev, st.st_ino)  # the socket still is
            assert not is_socket_file_of(path, sock.fileno())
        assert bound_file(sock.fileno()) is None  # closed
    finally:
        shutil.rmtree(run, ignore_errors=True)


# -- the daemon removes its own socket only ---------------------------------------------
@pytest.mark.parametrize("where", ["outside", "socket dir"])
def test_a_daemon_removes_no_foreign_file_on_exit(where: str) -> None:
    run = tempfile.mkdtemp(prefix="pz", dir="/tmp")
    try:
        env = {**os.environ, "PODSHIM_RUN_DIR": run}
        sdir = os.path.join(run, "s")
        os.makedirs(sdir)
        victim = os.path.join(run if where == "outside" else sdir, "victim")
        Path(victim).write_text("precious")
        bundle = os.path.join(run, "bundle")
        os.makedirs(bundle)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(os.path.join(sdir, "g" * 64))
            sock.listen()
            argv = [sys.executable, "-m", "podshim.shim.main", "-namespace", "ns", "-id", "t1",
                    "-address", ADDRESS, "-bundle", bundle, "-socket", victim]  # fmt: skip
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                os.set_inheritable(sock.fileno(), True)
                actions = [(os.POSIX_SPAWN_DUP2, devnull, i) for i in (0, 1, 2)]
                actions.append((os.POSIX_SPAWN_DUP2, sock.fileno(), 3))
                pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
            finally:
                os.close(devnull)
        try:
            shims = os.path.join(run, "shims")
            wait_until(lambda: os.path.isdir(shims) and os.listdir(shims), 60, "the daemon")
        finally:
            os.kill(pid, signal.SIGTERM)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert Path(victim).read_text() == "precious"
    finally:
        shutil.rmtree(run, ignore_errors=True)


# -- one daemon per socket ----------------------------------------------------------------
def test_a_daemon_serves_after_the_go_and_removes_its_own_socket(
    zygote: Zygote, listener: tuple[_socket.socket, str]
) -> None:
    sock, path = listener
    pid = request_fork(flags(), zygote.bundle, sock, path)
    assert children(zygote.pid) == {pid}
    shims = os.path.join(zygote.run, "shims")
    wait_until(lambda: os.path.isdir(shims) and os.listdir(shims), 30, "the daemon serving")
    assert holders(sock, {zygote.pid, pid}) == {pid}
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: pid not in children(zygote.pid) and _state(pid) == "", 30, "its exit")
    assert not os.path.exists(path)


def test_a_daemon_without_the_go_never_serves(
    zygote: Zygote, listener: tuple[_socket.socket, str]
) -> None:
    sock, path = listener
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(zygote.path)
        socket.send_fds(s, [_line(zygote.request(path))], [sock.fileno()])
        answer = read_line(s)
    pid = answer["pid"]  # and start closed without a go (it timed out just now)
    assert isinstance(pid, int) and answer["v"] == PROTOCOL
    wait_until(lambda: _state(pid) == "", 10, "the unserving daemon to leave")
    assert os.path.exists(path)  # it did not take the socket file with it
    assert holders(sock, {zygote.pid, os.getpid()}) == {os.getpid()}


def test_a_stopped_zygote_never_forks_the_abandoned_request(
    zygote: Zygote, listener: tuple[_socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("PODSHIM_ZYGOTE_TIMEOUT", "1")
    os.kill(zygote.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError):
            request_fork(flags(), zygote.bundle, sock, path)
        assert time.monotonic() - t0 < 4.0  # one timeout, not a second round of waiting
    finally:
        os.kill(zygote.pid, signal.SIGCONT)
    # start now serves the socket itself (this test stands for its daemon); the zygote
    # catches up on the abandoned request: its answer to a later one says it has
    assert ask(zygote.path, _line(zygote.request(path)), [])["error"]
    for _ in range(25):  # and nothing it forked (if anything) keeps or serves the socket
        wait_until(lambda: not children(zygote.pid), 10, "no daemon for the abandoned request")
        assert holders(sock, {zygote.pid, os.getpid()}) == {os.getpid()}
        time.sleep(0.02)
    assert os.path.exists(path)


def test_a_go_after_the_daemon_gave_up_fails_for_start() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert not zygote_server.await_go(a, 0.05)  # nothing came: it gives up first...
        with pytest.raises(BrokenPipeError):
            b.send(GO)  # ...so a late go fails, and start falls back knowingly
    a, b = socket.socketpair()
    with a, b:
        b.send(GO)
        assert zygote_server.await_go(a, 5.0)
    a, b = socket.socketpair()
    with a:
        b.close()  # start closed: no go
        assert not zygote_server.await_go(a, 5.0)


# -- a silent client ------------------------------------------------------------------------
def test_a_silent_client_delays_nobody(shared_zygote: Zygote) -> None:
    z = shared_zygote
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(z.path)
        time.sleep(0.2)  # the zygote has accepted it by now
        t0 = time.monotonic()
        answer = ask(z.path, b'"x"\n', [])
        assert answer.get("error") and time.monotonic() - t0 < 1.0
        dropped = read_line(silent, zygote_server.REQUEST_SECONDS + 5)  # dropped in time
        assert "no request" in str(dropped.get("error"))
    assert z.alive()
