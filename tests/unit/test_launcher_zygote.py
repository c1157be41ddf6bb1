"""The launcher's zygote client (``launcher_zygote.c``): a new pod's ``start`` asks the
zygote for a daemon without Python, speaking the exchange of :mod:`podshim.shim.zygote`;
anything unexpected leaves nothing behind and hands ``start`` to Python.

A fake zygote (a thread on the zygote's socket) checks the request, the passed listening
socket (bound at the shim socket path) and the go byte, as the real one does."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from podshim import rundir
from podshim.shim.paths import socket_path
from podshim.shim.zygote import GO, PROTOCOL, REQUEST_FIELDS, zygote_path

from . import test_launcher
from .test_launcher import ADDRESS, NS, SANDBOX, Shim, bundle, options, start_args

# the launcher's fixtures: compiled once per module, a private run dir per test
bindir = test_launcher.bindir
shim = test_launcher.shim


@dataclass
class FakeZygote:
    """Answers each connection with ``answer`` (None: never answers)."""

    path: str
    answer: bytes | None = b""
    requests: list[dict[str, Any]] = field(default_factory=list)
    #: per request: whether the passed fd listened at the request's socket path
    listening_at_path: list[bool] = field(default_factory=list)
    gos: list[bytes] = field(default_factory=list)
    connections: int = 0

    def serve(self, lst: socket.socket, stop: threading.Event) -> None:
        lst.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = lst.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(10)
                msg, fds, _, _ = socket.recv_fds(conn, 65536, 4)
                req = json.loads(msg)
                self.requests.append(req)
                self.listening_at_path.append(self._check_fd(fds, req.get("socket", "")))
                for fd in fds:
                    os.close(fd)
                if self.answer is None:
                    stop.wait(30)
                    continue
                answer = self.answer or json.dumps({"v": PROTOCOL, "pid": 4242}).encode()
                conn.sendall(answer + b"\n")
                with contextlib.suppress(OSError):
                    self.gos.append(conn.recv(1))

    @staticmethod
    def _check_fd(fds: list[int], path: str) -> bool:
        if len(fds) != 1:
            return False
        lst = socket.socket(fileno=os.dup(fds[0]))
        with lst, socket.socket(socket.AF_UNIX) as c:
            c.connect(path)  # the file at the path is the passed socket's
            lst.settimeout(5)
            conn, _ = lst.accept()
            conn.close()
        return True


@contextlib.contextmanager
def fake_zygote(answer: bytes | None = b"", path: str = "") -> Iterator[FakeZygote]:
    z = FakeZygote(path or zygote_path(ADDRESS), answer)
    os.makedirs(os.path.dirname(z.path), exist_ok=True)
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(z.path)
    lst.listen(8)
    stop = threading.Event()
    t = threading.Thread(target=z.serve, args=(lst, stop), daemon=True)
    t.start()
    try:
        yield z
    finally:
        stop.set()
        t.join(10)
        lst.close()
        os.unlink(z.path)


def test_a_new_pod_is_forked_by_the_zygote_without_python(shim: Shim) -> None:
    b = bundle(shim.tmp / "b", {SANDBOX: "pod-1"})
    path = socket_path(ADDRESS, NS, "pod-1")
    with fake_zygote() as z:
        got = shim.launcher(start_args("pod-1"), b)
    assert shim.python_runs() == [], "the launcher execed Python"
    assert (got.returncode, got.stdout, got.stderr) == (0, f"unix://{path}".encode(), b"")
    assert (b / "address").read_text() == f"unix://{path}"
    assert z.connections == 1 and z.listening_at_path == [True] and z.gos == [GO]
    (req,) = z.requests
    assert set(req) == set(REQUEST_FIELDS)
    assert req == {
        "v": PROTOCOL, "namespace": NS, "id": "pod-1", "address": ADDRESS, "bundle": str(b),
        "socket": path, "debug": False, "containerd_pid": os.getpid(),
    }  # fmt: skip
    assert os.path.exists(path)  # the (fake) daemon's socket stays


def test_debug_and_a_config_that_leaves_the_zygote_at_its_default(shim: Shim) -> None:
    cfg = shim.tmp / "podshim.toml"
    cfg.write_text('runtime = "runc"\n')
    b = bundle(shim.tmp / "b", {SANDBOX: "pod-2"})
    with fake_zygote() as z:
        got = shim.launcher(["-debug", *start_args("c1")], b, options(str(cfg)))
    assert shim.python_runs() == [] and got.returncode == 0
    assert [r["debug"] for r in z.requests] == [True]


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b'{"error": "bundle: not an absolute path of a directory"}', "refused"),
        (b'{"v": 1, "pid": 4242}', "older exchange"),
        (b"not json", "garbage"),
        (None, "no answer in time"),
    ],
)
def test_anything_unexpected_leaves_nothing_and_python_starts(
    shim: Shim, answer: bytes | None, why: str
) -> None:
    shim.env["PODSHIM_ZYGOTE_TIMEOUT"] = "0.5"
    b = bundle(shim.tmp / "b", {SANDBOX: "pod-3"})
    path = socket_path(ADDRESS, NS, "pod-3")
    with fake_zygote(answer) as z:
        got = shim.launcher(start_args("c1"), b)
    assert z.connections == 1, why
    assert z.gos in ([], [b""])  # never the go: the daemon would not serve
    runs = shim.python_runs()
    assert [r["argv"] for r in runs] == [start_args("c1")], why
    assert got.returncode == 0
    assert not os.path.lexists(path), "the launcher left its socket file"
    assert not (b / "address").exists()
    assert sorted(os.listdir(os.path.dirname(path))) == []  # no temporary name either


@pytest.mark.parametrize(
    ("env", "config"),
    [
        ("0", None),
        ("false", None),
        ("maybe", None),  # Python decides what an odd value means
        (None, "zygote = false\n"),
        (None, "zygote = true\n"),  # named: Python reads it
        (None, 'shim_scope = "node"\n'),
    ],
)
def test_python_starts_when_the_zygote_is_off_or_named(
    shim: Shim, env: str | None, config: str | None
) -> None:
    if env is not None:
        shim.env["PODSHIM_ZYGOTE"] = env
    stdin = b""
    if config is not None:
        cfg = shim.tmp / "podshim.toml"
        cfg.write_text(config)
        stdin = options(str(cfg))
    b = bundle(shim.tmp / "b", {SANDBOX: "pod-4"})
    with fake_zygote() as z:
        shim.launcher(start_args("c1"), b, stdin)
    assert z.connections == 0
    assert len(shim.python_runs()) == 1


def test_no_zygote_listening_hands_start_to_python(shim: Shim) -> None:
    b = bundle(shim.tmp / "b", {SANDBOX: "pod-5"})
    shim.launcher(start_args("c1"), b)
    assert len(shim.python_runs()) == 1
    assert not os.path.lexists(socket_path(ADDRESS, NS, "pod-5"))


def test_the_env_turns_it_on_over_a_config(shim: Shim) -> None:
    shim.env["PODSHIM_ZYGOTE"] = "1"
    cfg = shim.tmp / "podshim.toml"
    cfg.write_text("zygote = false\n")
    b = bundle(shim.tmp / "b", {SANDBOX: "pod-6"})
    with fake_zygote() as z:
        got = shim.launcher(start_args("c1"), b, options(str(cfg)))
    assert shim.python_runs() == [] and got.returncode == 0 and z.gos == [GO]


def test_a_zygote_of_another_podshim_version_is_not_asked(shim: Shim) -> None:
    """After an upgrade the old version's zygote may still run: it would fork the old
    code, so the launcher (compiled with this version) never asks it."""
    old = os.path.join(rundir.zygote_dir(), rundir.digest(f"{ADDRESS}//zygote-0.0.0-old")[:40])
    assert old != zygote_path(ADDRESS)
    b = bundle(shim.tmp / "b", {SANDBOX: "pod-7"})
    with fake_zygote(path=old) as z:
        shim.launcher(start_args("c1"), b)
    assert z.connections == 0
    assert len(shim.python_runs()) == 1
