"""A tiny child-subreaper supervisor for a private containerd.

Run as ``python -m podshim_lab.subreaper [options] -- cmd args...``.

On this machine PID 1 never reaps orphans, so shims and containers that outlive
their parents would stay zombies forever.  This process

* marks itself a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER, 1)``), so every
  orphan below it is reparented to it instead of PID 1;
* spawns the command and reaps *every* child exit (``waitpid(-1)``);
* forwards SIGTERM/SIGINT to the command (a second one, or ``--stop-timeout``
  seconds, escalates to SIGKILL);
* on SIGHUP restarts the command: SIGTERM it (SIGKILL after ``--stop-timeout``),
  wait for it to exit and spawn it again *without* touching any other
  descendant, so shims survive a containerd restart and stay reaped;
* when the command exits for good, SIGKILLs every remaining descendant (thawing
  frozen cgroups if needed), reaps them and exits with the command's status
  (128+N when it was killed by signal N);
* with ``--watch-parent``, stops as on SIGTERM when its parent dies, and then
  also does the owner's host cleanup (``--cleanup-dir``: unmount, remove the
  tasks' shim sockets/runc state/cgroups, delete the dirs; ``--cleanup-link``:
  delete network links; ``--cleanup-empty``/``--cleanup-cgroup``: rmdir shared
  dirs and cgroups if empty), since nobody else will.

The ``/proc`` walking lives in :mod:`podshim_lab.procfs`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from podshim_lab.cleanup import orphan_cleanup
from podshim_lab.procfs import descendants, thaw_cgroups

#: set by the lab: the PYTHONPATH of the supervised program ("" for none)
CHILD_PYTHONPATH = "PODSHIM_LAB_CHILD_PYTHONPATH"
PR_SET_CHILD_SUBREAPER = 36
_TICK_SECONDS = 0.5
_PREFIX = "podshim-subreaper"


def set_child_subreaper(enable: bool = True) -> None:
    """Make the calling process a child subreaper (Linux >= 3.4), or stop being one."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(enable), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def _log(message: str) -> None:
    print(f"{_PREFIX}[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class Supervisor:
    """Spawns the command, reaps everything, restarts or stops on signals."""

    def __init__(
        self,
        argv: Sequence[str],
        pidfile: Path | None,
        stop_timeout: float,
        watch_parent: bool,
    ) -> None:
        self.argv = list(argv)
        self.pidfile = pidfile
        self.stop_timeout = stop_timeout
        self.parent = os.getppid() if watch_parent else 0
        self.orphaned = False
        self.child = 0
        self.stopping = False
        self.restarting = False
        self.kill_deadline = 0.0

    # -- signal handlers (run in the main thread between bytecodes) -------
    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            self._signal_child(signal.SIGKILL)
            return
        self.stopping = True
        self.kill_deadline = time.monotonic() + self.stop_timeout
        self._signal_child(signum)

    def _on_restart(self, _signum: int, _frame: FrameType | None) -> None:
        if self.stopping or self.restarting or not self.child:
            return
        self.restarting = True
        self.kill_deadline = time.monotonic() + self.stop_timeout
        self._signal_child(signal.SIGTERM)

    def _on_tick(self, _signum: int, _frame: FrameType | None) -> None:
        if self.parent and os.getppid() != self.parent and not self.stopping:
            _log("parent went away; stopping")
            self.parent = 0
            self.orphaned = True
            self._on_stop(signal.SIGTERM, None)
        waiting = (self.stopping or self.restarting) and self.child
        if waiting and time.monotonic() > self.kill_deadline:
            _log(f"child {self.child} ignored SIGTERM; sending SIGKILL")
            self._signal_child(signal.SIGKILL)
            self.kill_deadline = time.monotonic() + 3600.0

    def _signal_child(self, signum: int) -> None:
        if self.child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signum)

    # -- main loop -----------------------------------------------------------
    def spawn(self) -> None:
        """Start the command and publish its pid."""
        defaults = (signal.SIGPIPE, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM)
        self.child = os.posix_spawnp(
            self.argv[0], self.argv, child_env(), setsigdef=defaults, setsigmask=()
        )
        if self.pidfile is not None:
            tmp = self.pidfile.with_name(self.pidfile.name + ".tmp")
            tmp.write_text(f"{self.child}\n")
            tmp.replace(self.pidfile)
        _log(f"started {self.argv[0]} as pid {self.child}")

    def run(self) -> int:
        """Supervise until the command exits for good; return its status."""
        set_child_subreaper()
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_restart)
        signal.signal(signal.SIGALRM, self._on_tick)
        try:
            return self._supervise()
        finally:  # whatever happened: leave no descendant behind
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            kill_all_descendants()

    def _supervise(self) -> int:
        try:
            self.spawn()
        except OSError as exc:
            _log(f"cannot start {self.argv[0]}: {exc}")
            return 127
        signal.setitimer(signal.ITIMER_REAL, _TICK_SECONDS, _TICK_SECONDS)
        if self.stopping:
            self._signal_child(signal.SIGTERM)
        while True:
            try:
                pid, raw = os.waitpid(-1, 0)  # blocks; signal handlers run meanwhile
            except ChildProcessError:
                _log("no child left")
                return 1
            if pid != self.child:
                continue  # an orphan (shim, container, ...) reaped
            status = _exit_code(raw)
            self.child = 0
            if not self.restarting or self.stopping:
                _log(f"command exited with {status}")
                return status
            self.restarting = False
            _log(f"command exited with {status}; restarting it")
            try:
                self.spawn()
            except OSError as exc:
                _log(f"cannot restart {self.argv[0]}: {exc}")
                return 127


def _reap_nohang() -> bool:
    """Reap every exited child; return False once there are no children."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def kill_all_descendants(deadline: float = 60.0) -> None:
    """SIGKILL and reap every descendant of this process until none is left."""
    me = os.getpid()
    end = time.monotonic() + deadline
    started = time.monotonic()
    while True:
        has_children = _reap_nohang()
        alive = [s for s in descendants(me) if s.state != "Z"]
        if not has_children and not alive:
            return
        if time.monotonic() > end:
            _log(f"giving up on {[(s.pid, s.comm, s.state) for s in alive]}")
            return
        for stat in alive:
            if time.monotonic() - started > 1.0:
                thaw_cgroups(stat.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(stat.pid, signal.SIGKILL)
        time.sleep(0.02)


def child_env() -> dict[str, str]:
    """The supervised program's environment: ours, but with the PYTHONPATH we needed
    ourselves replaced by ``PODSHIM_LAB_CHILD_PYTHONPATH`` when that is set (so the
    shims of a containerd run only what their own venv installed)."""
    env = dict(os.environ)
    child = env.pop(CHILD_PYTHONPATH, None)
    if child is not None:
        if child:
            env["PYTHONPATH"] = child
        else:
            env.pop("PYTHONPATH", None)
    return env


def stop_supervisor(proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    """Stop a subreaper started with :class:`subprocess.Popen` and reap it.

    SIGTERM (containerd shuts down, then the subreaper kills what is left); after
    ``timeout`` a second SIGTERM (SIGKILL for the command); as a last resort kill
    the whole tree ourselves.
    """
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        for stat in descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(stat.pid, signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=60)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m podshim_lab.subreaper", description=__doc__)
    parser.add_argument("--pidfile", type=Path, help="write the command's pid here")
    parser.add_argument(
        "--stop-timeout", type=float, default=30.0, help="seconds before SIGTERM escalates"
    )
    parser.add_argument(
        "--watch-parent", action="store_true", help="stop everything when our parent dies"
    )
    parser.add_argument(
        "--cleanup-dir", type=Path, action="append", default=[], help="clean up if orphaned"
    )
    parser.add_argument(
        "--cleanup-link", action="append", default=[], help="ip link del if orphaned"
    )
    parser.add_argument(
        "--cleanup-empty", action="append", default=[], help="rmdir (if empty) if orphaned"
    )
    parser.add_argument(
        "--cleanup-cgroup", action="append", default=[], help="rmdir cgroup if orphaned"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- cmd args...")
    args = parser.parse_args(argv)
    command: list[str] = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("missing command after --")
    supervisor = Supervisor(command, args.pidfile, args.stop_timeout, args.watch_parent)
    status = supervisor.run()
    if supervisor.orphaned:
        problems = orphan_cleanup(
            args.cleanup_dir, args.cleanup_link, args.cleanup_empty, args.cleanup_cgroup
        )
        for problem in problems:
            _log(f"cleanup: {problem}")
    return status


if __name__ == "__main__":
    sys.exit(main())
