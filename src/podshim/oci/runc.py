"""Driving the OCI runtime (runc, or crun with the same command line).

Argument building is pure (one ``*_args`` function per subcommand, unit-tested for both
runtimes); execution goes through the shim's one :class:`~podshim.linux.reaper.Reaper`.
Failures become :mod:`podshim.errors` kinds whose message names the runtime, the
subcommand and the runtime's own error text (read from its JSON log).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from typing import Any

from podshim import errors as errdefs
from podshim.linux.reaper import OnCancel, Reaper, Result
from podshim.oci import bundle as files
from podshim.oci.runtime import OciFactory, OciRuntime, RuntimeConfig


def global_args(cfg: RuntimeConfig, namespace: str, log_path: str) -> list[str]:
    """``runc --root <root>/<ns> --log <log> --log-format json [--systemd-cgroup]``."""
    args = [cfg.binary, "--root", os.path.join(cfg.root, namespace), "--log", log_path]
    args += ["--log-format", "json"]
    if cfg.systemd_cgroup:
        args.append("--systemd-cgroup")
    return args


def create_args(
    cfg: RuntimeConfig, cid: str, bundle: str, pid_file: str, console_socket: str | None
) -> list[str]:
    args = ["create", "--bundle", bundle, "--pid-file", pid_file]
    if console_socket:
        args += ["--console-socket", console_socket]
    if cfg.no_pivot_root:
        args.append("--no-pivot")
    if cfg.no_new_keyring:
        args.append("--no-new-keyring")
    return [*args, cid]


def exec_args(cid: str, process_json: str, pid_file: str, console_socket: str | None) -> list[str]:
    args = ["exec", "--process", process_json, "--detach", "--pid-file", pid_file]
    if console_socket:
        args += ["--console-socket", console_socket]
    return [*args, cid]


def kill_args(cid: str, signal: int, all_: bool) -> list[str]:
    return ["kill", *(["--all"] if all_ else []), cid, str(signal)]


def delete_args(cid: str, force: bool) -> list[str]:
    return ["delete", *(["--force"] if force else []), cid]


def features_args() -> list[str]:
    return ["features"]


#: how long ``features`` waits for the runtime (it only prints a document)
FEATURES_TIMEOUT = 10.0


def features(binary: str, timeout: float = FEATURES_TIMEOUT) -> dict[str, Any]:
    """The runtime's OCI features document (``runc features``, go-runc's ``Features``):
    the decoded JSON object (runtime-spec ``features.md``: ``mountOptions``, ``linux``...).

    Synchronous, without the shim's reaper: it serves ``-info``, a process of its own
    that containerd runs outside any shim daemon.

    Raises:
        FailedPrecondition: ``binary`` cannot be run (missing, not executable).
        Unknown: the runtime failed (crun 1.8 has no ``features``), timed out, or printed
            something other than a JSON object.
    """
    name = os.path.basename(binary)
    try:
        res = subprocess.run(
            [binary, *features_args()], stdin=subprocess.DEVNULL, capture_output=True,
            timeout=timeout, check=False,
        )  # fmt: skip
    except OSError as exc:
        raise errdefs.FailedPrecondition(
            f"OCI runtime binary {binary!r} cannot run: {exc.strerror}"
        ) from None
    except subprocess.TimeoutExpired:
        raise errdefs.Unknown(f"{name} features: no answer in {timeout:g}s") from None
    if res.returncode != 0:
        detail = res.stderr.decode(errors="replace").strip() or f"exit status {res.returncode}"
        raise errdefs.Unknown(f"{name} features failed: {detail}")
    try:
        doc = json.loads(res.stdout)
    except ValueError as exc:
        raise errdefs.Unknown(f"{name} features printed no JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise errdefs.Unknown(f"{name} features printed {type(doc).__name__}, not an object")
    return doc


def last_error(log_path: str, offset: int) -> str:
    """The last ``error``/``fatal`` message the runtime wrote to its JSON log past
    ``offset`` ("" when none)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            lines = f.read().splitlines()
    except OSError:
        return ""
    msg = ""
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            msg = str(entry.get("msg", ""))
    return msg


_NOT_FOUND_HINTS = (
    "container does not exist",  # runc
    "container not running",
    "process already finished",
    "no such process",
    "not exist",
    "No such file or directory",  # crun: its state files are gone
)
#: subcommands whose failure can mean "the container is gone" (create/exec failures
#: naming a missing file are about the image, not the container)
_STATEFUL = frozenset({"start", "kill", "delete", "pause", "resume", "ps", "update", "state"})


def runtime_error(name: str, args: Sequence[str], detail: str) -> errdefs.ShimError:
    """The error kind of a failed ``<name> <args>`` (runc or crun) that said ``detail``:
    NotFound when a subcommand about an existing container says it is gone."""
    prefix = f"{name} {args[0]} failed"
    msg = detail if detail.startswith(prefix) else f"{prefix}: {detail}"
    if args[0] in _STATEFUL and any(h in detail for h in _NOT_FOUND_HINTS):
        return errdefs.NotFound(msg)
    return errdefs.Unknown(msg)


class Runc:
    """One OCI runtime, bound to a containerd namespace and a bundle's log file
    (an :class:`~podshim.oci.runtime.OciRuntime`)."""

    def __init__(self, cfg: RuntimeConfig, namespace: str, reaper: Reaper, log_path: str) -> None:
        self.cfg = cfg
        self.namespace = namespace
        self.reaper = reaper
        self.log_path = log_path

    @property
    def name(self) -> str:
        return os.path.basename(self.cfg.binary)

    def exists(self, cid: str) -> bool:
        """runc and crun keep a directory per container under ``--root``."""
        return os.path.lexists(os.path.join(self.cfg.root, self.namespace, cid))

    def _log_size(self) -> int:
        try:
            return os.stat(self.log_path).st_size
        except OSError:
            return 0

    async def _run(
        self,
        args: Sequence[str],
        *,
        input: bytes | None = None,
        stdio: tuple[int, int, int] | None = None,
        on_cancel: OnCancel = "wait",
    ) -> Result:
        """Run one subcommand through the shim's reaper. A cancelled caller gets its
        CancelledError only once the runtime has finished (``"wait"``, the default: a
        half-done create, start, exec, kill or delete cannot be undone reliably, a
        finished one can) or was killed (``"kill"``: read-only subcommands)."""
        argv = global_args(self.cfg, self.namespace, self.log_path) + list(args)
        offset = self._log_size()
        try:
            if stdio is None:
                res = await self.reaper.run(argv, input=input, on_cancel=on_cancel)
            else:
                res = await self.reaper.run(argv, stdin=stdio[0], stdout=stdio[1],
                                            stderr=stdio[2], on_cancel=on_cancel)  # fmt: skip
        except FileNotFoundError:
            raise errdefs.FailedPrecondition(
                f"OCI runtime binary {self.cfg.binary!r} not found"
            ) from None
        if res.status != 0:
            detail = (
                last_error(self.log_path, offset) or res.stderr.decode(errors="replace").strip()
            )
            raise runtime_error(self.name, args, detail or f"exit status {res.status}")
        return res

    async def create(
        self,
        cid: str,
        bundle: str,
        pid_file: str,
        stdio: tuple[int, int, int],
        console_socket: str | None = None,
    ) -> None:
        await self._run(create_args(self.cfg, cid, bundle, pid_file, console_socket), stdio=stdio)

    async def start(self, cid: str) -> None:
        await self._run(["start", cid])

    async def exec(
        self,
        cid: str,
        process_json: str,
        pid_file: str,
        stdio: tuple[int, int, int],
        console_socket: str | None = None,
    ) -> None:
        await self._run(exec_args(cid, process_json, pid_file, console_socket), stdio=stdio)

    async def kill(self, cid: str, signal: int, all_: bool = False) -> None:
        await self._run(kill_args(cid, signal, all_))

    async def delete(self, cid: str, force: bool = False) -> None:
        await self._run(delete_args(cid, force))

    async def pause(self, cid: str) -> None:
        await self._run(["pause", cid])

    async def resume(self, cid: str) -> None:
        await self._run(["resume", cid])

    async def ps(self, cid: str) -> list[int]:
        res = await self._run(["ps", "--format", "json", cid], on_cancel="kill")
        pids = json.loads(res.stdout or b"[]")
        return [int(p) for p in pids or []]

    async def update(self, cid: str, resources: dict[str, Any]) -> None:
        await self._run(["update", "--resources", "-", cid], input=json.dumps(resources).encode())

    async def state(self, cid: str) -> dict[str, Any]:
        res = await self._run(["state", cid], on_cancel="kill")
        out: dict[str, Any] = json.loads(res.stdout)
        return out


def factory(namespace: str, reaper: Reaper) -> OciFactory:
    """The :data:`~podshim.oci.runtime.OciFactory` of a shim: a :class:`Runc` per
    container, logging to the bundle's runtime log."""

    def make(cfg: RuntimeConfig, bundle: str) -> OciRuntime:
        return Runc(cfg, namespace, reaper, os.path.join(bundle, files.RUNTIME_LOG))

    return make
