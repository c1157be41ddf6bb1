"""Make a pod's namespaces in a forked child: no program is executed per pod.

The child (``os.fork`` of the shim; the shim runs no other threads) first closes every
fd it inherited but its report pipe (a shim killed meanwhile must drop its connections at
once), then calls
``unshare(2)`` for the namespaces the pod gets of its own, sets the hostname, brings up
``lo`` in a network namespace it made, bind-mounts each new namespace onto its pin file
(in the shim's own mount namespace, as ``unshare --net=<file>`` does), then joins the
pod's network namespace when CRI made it and writes the pod's sysctls, each in the
namespace it belongs to. It exits 0, or 1 after one line on a pipe saying which step
failed. The shim's reaper reaps it (:meth:`~podshim.linux.reaper.Reaper.watch`), and the
shim never changes namespaces itself. What the child made is undone by the caller (the
pin files it was given are unmounted and removed by the host's teardown).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from podshim import errors as errdefs
from podshim.linux import mount, ns
from podshim.linux.reaper import Reaper

#: first byte of the child's error line: which step failed
_PIN, _SYSCTL = b"p", b"s"
#: tests only: a gate control directory (``podshim_lab.gates.PinGate``); the child, once
#: the namespaces are pinned and before the sysctls, honours its ``block.pin`` arm as a
#: gate script does, so a fault test can catch a pod's host start half-way
GATE_ENV = "PODSHIM_PIN_GATE"
#: above any fd the shim has open (close_range(2) makes closing them cheap)
_MAX_FD = 1 << 20
#: how long a gated child waits for its release at most (s)
GATE_MAX_BLOCK = 300.0


@dataclass(frozen=True)
class Namespaces:
    """What to make for a pod."""

    pod_id: str
    #: namespace type ("network", "ipc", "uts") -> its pin file (exists, empty)
    pins: Mapping[str, str] = field(default_factory=dict)
    hostname: str = ""
    #: the pod's network namespace when CRI made it (net sysctls are written there)
    netns: str | None = None
    #: (key, value, namespace type) in the order to write them
    sysctls: Sequence[tuple[str, str, str]] = ()


def _sysctl_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def _work(want: Namespaces, report: int) -> None:
    """The child's steps (raises on the first failure, after reporting it)."""
    step, key = _PIN, ""
    try:
        flags = 0
        for t in want.pins:
            flags |= ns.KINDS[t][0]
        if flags:
            ns.unshare(flags)
        if want.hostname:
            ns.sethostname(want.hostname)
        if "network" in want.pins:
            ns.loopback_up()
        for t, pin in want.pins.items():
            mount.mount("", f"/proc/self/ns/{ns.KINDS[t][1]}", pin, ["bind"])
        gate = os.environ.get(GATE_ENV)
        if gate:
            _gate(gate, [f"--{t}={p}" for t, p in want.pins.items()] + [want.hostname])
        step = _SYSCTL
        if want.netns and any(t == "network" for _, _, t in want.sysctls):
            key = "(join the pod network namespace)"
            ns.setns(want.netns, ns.CLONE_NEWNET)
        for key, value, _ in want.sysctls:
            fd = os.open(_sysctl_path(key), os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
    except BaseException as exc:
        why = str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
        with contextlib.suppress(OSError):
            os.write(report, step + b"\0" + key.encode() + b"\0" + why.encode()[:3000])
        raise


def _gate(ctl: str, args: list[str]) -> None:
    """The gate protocol of ``podshim_lab.gates`` for verb ``pin`` (tests only)."""
    import time

    arm = os.path.join(ctl, "block.pin")
    try:
        with open(arm) as f:
            target = f.read()
    except OSError:
        return
    me = os.getpid()
    if target != "*" and target not in args:
        return
    try:
        os.rename(arm, os.path.join(ctl, f"claimed.pin.{me}"))
    except OSError:
        return  # another call claimed it
    tmp = os.path.join(ctl, f".blocked.pin.{me}")
    with open(tmp, "w") as f:
        f.write(f"{me} {os.getppid()} {' '.join(args)}\n")
    os.rename(tmp, os.path.join(ctl, "blocked.pin"))
    deadline = time.monotonic() + GATE_MAX_BLOCK
    while not os.path.exists(os.path.join(ctl, "release.pin")) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(ctl, f"claimed.pin.{me}"))


def _child(want: Namespaces, report: int) -> NoReturn:
    code = 1
    try:
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)  # the shim's event loop keeps its own
        # hold nothing of the shim's (its sockets: a shim killed while this child runs
        # must drop containerd's connection at once), only the report pipe
        os.closerange(3, report)
        os.closerange(report + 1, _MAX_FD)
        _work(want, report)
        code = 0
    finally:
        os._exit(code)


def _read_report(fd: int) -> bytes:
    os.set_blocking(fd, False)  # the child is gone; a sibling may still hold the write end
    try:
        return os.read(fd, 8192)
    except BlockingIOError:
        return b""


async def make(reaper: Reaper, want: Namespaces) -> None:
    """Make ``want`` in a forked child and wait for it.

    Raises:
        InvalidArgument: a sysctl could not be written (runc's answer too).
        Internal: a namespace could not be made or pinned.
    """
    if not want.pins and not want.sysctls:
        return
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        since = reaper.mark()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            os.close(r)
            _child(want, w)
        os.close(w)
        w = -1
        ex = await reaper.watch(pid, since)
        report = _read_report(r)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if ex.status == 0:
        return
    step, key, why = [*report.split(b"\0", 2), b"", b""][:3]
    reason = why.decode(errors="replace") or f"helper exited {ex.status}"
    if step == _SYSCTL:
        value = dict((k, v) for k, v, _ in want.sysctls).get(key.decode(errors="replace"))
        raise errdefs.InvalidArgument(
            f'sysctl "{key.decode(errors="replace")}"={value!r} for pod {want.pod_id}: {reason}'
        )
    raise errdefs.Internal(f"pin namespaces {sorted(want.pins)} of pod {want.pod_id}: {reason}")
