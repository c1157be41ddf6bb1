"""Gates: wrapper programs that make a fault happen at an exact point, not after a sleep.

A gate is a small ``sh`` script standing in for a program podshim (or the lab) runs: the
OCI runtime (podshim's config names it with ``runtime = "<path>"``), a helper found on
the shim's ``PATH`` (``unshare`` of the namespaces host's start), or containerd itself.
It does what the real program does (``exec``) unless the test armed it through files in
the gate's control directory:

* :meth:`Gate.block` ``(verb, target)``: the next call of ``verb`` with an argument equal
  to ``target`` (``"*"``: any call) claims the arm (one call only: the claim is an atomic
  rename), announces itself (its pid, its parent's pid and its arguments) and waits until
  :meth:`Gate.release`; :meth:`Gate.wait_blocked` returns that announcement. The parent of
  a blocked OCI runtime call is the shim that made it, so a test can SIGKILL exactly that
  shim while the call is in flight.
* :meth:`Gate.fail` ``(verb, target)``: every matching call fails (exit 1, a runc-style
  JSON error in its ``--log`` file and on stderr) until :meth:`Gate.clear`;
  :meth:`Gate.failures` counts them.
* :meth:`Gate.hold` (containerd only): the next start of containerd waits while the hold
  lasts, so a test can keep containerd *down* (see :class:`ContainerdGate`).

A blocked call gives up waiting after ``max_block`` seconds and proceeds, so a failed
test never leaves a process waiting forever.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from podshim_lab.poll import wait_for

__all__ = ["Blocked", "ContainerdGate", "Gate", "PinGate", "RuncGate", "ToolGate"]

#: how long a blocked call waits for its release at most (s)
MAX_BLOCK = 300

_SCRIPT = r"""#!/bin/sh
# podshim-lab gate for @NAME@ (podshim_lab.gates); control directory @CTL@
ctl=@CTL@
real=@REAL@
verb=@VERB@
log=""
if [ "$verb" = "" ]; then
    # runc/crun: global options (some with a value), then the subcommand
    prev=""
    for a in "$@"; do
        if [ "$prev" = "--log" ]; then log="$a"; fi
        case "$prev" in
            --root|--log|--log-format|--criu|--rootless) prev="$a"; continue ;;
        esac
        prev="$a"
        case "$a" in
            -*) continue ;;
        esac
        verb="$a"
        break
    done
fi
matches() {
    want=$(cat "$1" 2>/dev/null) || return 1
    [ "$want" = "*" ] && return 0
    for a in "$@"; do
        [ "$a" = "$want" ] && return 0
    done
    return 1
}
if [ -e "$ctl/fail.$verb" ] && matches "$ctl/fail.$verb" "$@"; then
    msg="podshim-lab gate: $verb fails on purpose"
    if [ -n "$log" ]; then
        printf '{"level":"error","msg":"%s","time":"1970-01-01T00:00:00Z"}\n' "$msg" >> "$log"
    fi
    echo "$msg" >&2
    echo "$*" >> "$ctl/failed.$verb"
    exit 1
fi
if [ -e "$ctl/block.$verb" ] && matches "$ctl/block.$verb" "$@" \
        && mv "$ctl/block.$verb" "$ctl/claimed.$verb.$$" 2>/dev/null; then
    printf '%s %s %s\n' "$$" "$PPID" "$*" > "$ctl/.blocked.$verb.$$"
    mv "$ctl/.blocked.$verb.$$" "$ctl/blocked.$verb"
    waited=0
    while [ ! -e "$ctl/release.$verb" ] && [ "$waited" -lt @TICKS@ ]; do
        sleep 0.05
        waited=$((waited + 1))
    done
    rm -f "$ctl/claimed.$verb.$$"
fi
if [ "$verb" = "containerd" ]; then
    waited=0
    while [ -e "$ctl/hold" ] && [ "$waited" -lt @TICKS@ ]; do
        sleep 0.05
        waited=$((waited + 1))
    done
fi
exec "$real" "$@"
"""


@dataclass(frozen=True)
class Blocked:
    """A call waiting in a gate: its pid, its parent's pid (the caller) and argv."""

    pid: int
    ppid: int
    args: list[str]


class Gate:
    """One wrapper script and its control directory (see the module docstring)."""

    def __init__(
        self, directory: Path, name: str, real: str, verb: str = "", max_block: int = MAX_BLOCK
    ) -> None:
        found = shutil.which(real) if "/" not in real else real
        if not found:
            raise FileNotFoundError(f"gate {name}: {real} not found on PATH")
        self.real = found
        self.ctl = directory / f"{name}.ctl"
        self.ctl.mkdir(parents=True, exist_ok=True)
        self.path = directory / name
        text = (
            _SCRIPT.replace("@NAME@", name)
            .replace("@CTL@", shlex.quote(str(self.ctl)))
            .replace("@REAL@", shlex.quote(found))
            .replace("@VERB@", shlex.quote(verb))
            .replace("@TICKS@", str(int(max_block / 0.05)))
        )
        self.path.write_text(text)
        self.path.chmod(0o755)

    # -- arming ---------------------------------------------------------------------------
    def _write(self, name: str, text: str) -> None:
        tmp = self.ctl / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(self.ctl / name)

    def block(self, verb: str, target: str = "*") -> None:
        """Make the next ``verb`` call naming ``target`` wait for :meth:`release`."""
        for name in (f"blocked.{verb}", f"release.{verb}"):
            with contextlib.suppress(FileNotFoundError):
                (self.ctl / name).unlink()
        self._write(f"block.{verb}", target)

    def fail(self, verb: str, target: str = "*") -> None:
        """Make every ``verb`` call naming ``target`` fail until :meth:`clear`."""
        self._write(f"fail.{verb}", target)

    def release(self, verb: str) -> None:
        """Let the blocked ``verb`` call (and any later one) go on."""
        (self.ctl / f"release.{verb}").touch()

    def clear(self) -> None:
        """Disarm everything and release every blocked call."""
        for entry in list(self.ctl.iterdir()):
            if entry.name.startswith(("fail.", "failed.", "block.", "hold")):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
        for entry in list(self.ctl.iterdir()):
            if entry.name.startswith("claimed."):
                self.release(entry.name.split(".")[1])

    # -- observing --------------------------------------------------------------------------
    def blocked(self, verb: str) -> Blocked | None:
        """The announcement of the call blocked in ``verb``, if one is."""
        try:
            pid, ppid, *args = (self.ctl / f"blocked.{verb}").read_text().split()
        except (FileNotFoundError, ValueError):
            return None
        return Blocked(int(pid), int(ppid), args)

    def wait_blocked(self, verb: str, timeout: float = 120.0) -> Blocked:
        """Wait until a call blocks in ``verb``; its announcement."""
        return wait_for(
            lambda: self.blocked(verb), timeout=timeout, interval=0.05, message=f"{verb} blocked"
        )

    def failures(self, verb: str) -> int:
        """How many ``verb`` calls this gate has failed so far."""
        try:
            return len((self.ctl / f"failed.{verb}").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def pending(self) -> list[str]:
        """Arms not claimed yet (``block.<verb>``)."""
        return sorted(e.name for e in self.ctl.iterdir() if e.name.startswith("block."))

    def remove(self) -> None:
        """Release everything and delete the script and its control directory."""
        self.clear()
        shutil.rmtree(self.ctl, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class RuncGate(Gate):
    """A gate standing in for runc: podshim's ``runtime = "<path>"`` names it; the verb
    is runc's subcommand."""

    def __init__(self, directory: Path, real: str = "runc") -> None:
        super().__init__(directory, "runc-gate", real)


class ToolGate(Gate):
    """A gate for a helper the shim finds on ``PATH`` (put :attr:`directory` first on
    containerd's PATH); its verb is the tool's name."""

    def __init__(self, directory: Path, tool: str) -> None:
        self.directory = directory
        super().__init__(directory, tool, tool, verb=tool)


class PinGate(Gate):
    """The namespaces host's start runs no program a script could stand in for: its
    forked child (``podshim.host.namespaces.pin``) honours this control directory itself
    when the shim's environment names it (:attr:`ENV`, give it to containerd). Verb
    ``pin``; the announced arguments are ``--<namespace>=<pin file>...`` and the pod's
    hostname, the child blocks with the namespaces pinned and the sysctls not written."""

    ENV = "PODSHIM_PIN_GATE"

    def __init__(self, directory: Path) -> None:  # no script: only the control directory
        self.real = ""
        self.ctl = directory / "pin.ctl"
        self.ctl.mkdir(parents=True, exist_ok=True)
        self.path = self.ctl

    def remove(self) -> None:
        self.clear()
        shutil.rmtree(self.ctl, ignore_errors=True)


class ContainerdGate(Gate):
    """A gate for containerd (the lab's ``containerd_bin``): :meth:`hold` keeps the next
    start of containerd waiting, so ``lab.restart()`` leaves it down until
    :meth:`unhold`."""

    def __init__(self, directory: Path, real: str = "containerd") -> None:
        super().__init__(directory, "containerd-gate", real, verb="containerd")

    def hold(self) -> None:
        (self.ctl / "hold").touch()

    def unhold(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.ctl / "hold").unlink()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold for the ``with`` block, always let go afterwards."""
        self.hold()
        try:
            yield
        finally:
            self.unhold()


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal ``pid`` if it still exists."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
