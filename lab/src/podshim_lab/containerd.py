"""A private, throw-away containerd for tests, the demo and benchmarks.

Usage::

    with Containerd() as lab:
        ref = lab.ensure_busybox()
        lab.ctr("run", "--rm", ref, "t1", "echo", "hi")

containerd runs below :mod:`podshim_lab.subreaper`, which reaps the shims and
containers it orphans (PID 1 on this machine never does) and restarts containerd
alone on :meth:`Containerd.restart`, so shims survive it.  :meth:`Containerd.close`
stops everything, unmounts, removes the CNI bridge, runc state and all dirs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from podshim_lab import cleanup, hostnet, subreaper, versions
from podshim_lab.config import (
    LabPaths,
    RuntimeHandler,
    TomlValue,
    render_cni_conflist,
    render_config,
)
from podshim_lab.images import (
    DEFAULT_BUSYBOX_REF,
    DEFAULT_PAUSE_REF,
    build_busybox_image,
    build_pause_image,
)
from podshim_lab.poll import WaitTimeout, wait_for
from podshim_lab.procfs import (
    ZYGOTE_COMM,
    ProcStat,
    descendants,
    process_table,
    without_zygotes,
)
from podshim_lab.subreaper import stop_supervisor

__all__ = ["Containerd", "CtrError", "LabError"]

DEFAULT_NAMESPACE = "podshim-test"
CRI_NAMESPACE = "k8s.io"
_FIFO_COMMANDS = {("run",)} | {(t, c) for t in ("tasks", "task", "t") for c in ("start", "exec")}
_RUNC_ROOT_COMMANDS = {("run",)}


def _package_roots() -> list[str]:
    """The dirs holding ``podshim_lab`` and ``podshim`` (once if the same): the PYTHONPATH
    of the subreaper, of containerd and so of the shims it starts."""
    roots = [str(Path(__file__).resolve().parents[1])]
    spec = importlib.util.find_spec("podshim")  # finds, does not import
    if spec is not None and spec.submodule_search_locations:
        roots.append(str(Path(next(iter(spec.submodule_search_locations))).resolve().parent))
    return list(dict.fromkeys(roots))


_PACKAGE_ROOTS = _package_roots()

RuntimeSpec = RuntimeHandler | tuple[str, Mapping[str, TomlValue]]


class LabError(RuntimeError):
    """The lab containerd could not be started, restarted or cleaned up."""


class CtrError(subprocess.CalledProcessError):
    """A ``ctr`` command failed; the message carries its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout!s}\nstderr: {self.stderr!s}"


class Containerd:
    """A private containerd instance (context manager; see the module docstring).

    Nothing starts before :meth:`start` (or ``with``).  Every path is unique to the
    instance (see :class:`podshim_lab.config.LabPaths`); ``close()`` only removes
    what the instance created.
    """

    def __init__(
        self,
        base_dir: Path | str | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        cri: bool = False,
        runtimes: Mapping[str, RuntimeSpec] | None = None,
        default_runtime: str = "runc",
        sandbox_image: str = DEFAULT_PAUSE_REF,
        extra_path: Sequence[Path | str] = (),
        extra_env: Mapping[str, str] | None = None,
        shim_pythonpath: bool = True,
        log_level: str = "debug",
        start_timeout: float = 60.0,
        watch_parent: bool = True,
        run_dir: Path | str = "/run",
        containerd_bin: str | None = None,
        ctr_bin: str | None = None,
        cni_portmap: bool = False,
        version: str | None = None,
        binary_dir: Path | str | None = None,
    ) -> None:
        """Describe the instance; ``runtimes`` are extra CRI handlers.

        ``extra_path`` is prepended to containerd's PATH (where shim binaries such as
        ``containerd-shim-podshim-v1`` live); ``extra_env`` is added to its
        environment.  With ``watch_parent`` the subreaper stops everything when the
        creating process dies. Without ``shim_pythonpath`` containerd (and the shims it
        starts) gets no PYTHONPATH: the shims import only what their own venv holds
        (the test of the runtime wheel). ``cni_portmap`` (with ``cri``): host ports
        answer on the host, under :class:`podshim_lab.hostnet.HostNetGuard`.
        ``version`` (default 1.6, the system package) or ``binary_dir``: which containerd,
        ctr, runc shim (first on PATH) and config dialect, see :mod:`podshim_lab.versions`.
        """
        self.build = versions.resolve(version, binary_dir)
        base = Path(base_dir) if base_dir is not None else Path(tempfile.gettempdir())
        self.paths = LabPaths.create(base, Path(run_dir), secrets.token_hex(4))
        self._namespace = namespace
        self.cri = cri
        self.runtimes: dict[str, RuntimeHandler] = {
            name: spec if isinstance(spec, RuntimeHandler) else RuntimeHandler(spec[0], spec[1])
            for name, spec in (runtimes or {}).items()
        }
        self.default_runtime = default_runtime
        self.sandbox_image = sandbox_image
        self.extra_path = [str(p) for p in extra_path]
        self.extra_env = dict(extra_env or {})
        self.shim_pythonpath = shim_pythonpath
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.watch_parent = watch_parent
        self.containerd_bin = containerd_bin or self.build.binary("containerd")
        self.ctr_bin = ctr_bin or self.build.binary("ctr")
        if cni_portmap and not cri:
            raise ValueError("cni_portmap needs cri=True")
        self._hostnet = hostnet.HostNetGuard(self.paths.subnet) if cni_portmap else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._created: list[Path] = []
        self._namespaces = {namespace} | ({CRI_NAMESPACE} if cri else set())
        self._cgroup_parents: set[str] = set()
        self._images: dict[tuple[str, str], Path] = {}
        self._imported: set[tuple[str, str]] = set()
        self._seen: list[ProcStat] = []
        self._bundles: dict[tuple[str, str], cleanup.Bundle] = {}
        self._shared_before: set[str] | None = None
        self._ready = False
        self._closed = False

    # -- properties ----------------------------------------------------------
    @property
    def address(self) -> str:
        """containerd's gRPC socket path."""
        return str(self.paths.address)

    @property
    def ttrpc_address(self) -> str:
        """containerd's ttrpc socket path (what shims get as ``TTRPC_ADDRESS``)."""
        return self.address + ".ttrpc"

    @property
    def root(self) -> Path:
        """containerd's root dir."""
        return self.paths.root

    @property
    def state(self) -> Path:
        """containerd's state dir."""
        return self.paths.state

    @property
    def namespace(self) -> str:
        """Default namespace used by :meth:`ctr`."""
        return self._namespace

    @property
    def log_path(self) -> Path:
        """The containerd + subreaper log file."""
        return self.paths.log

    @property
    def runc_root(self) -> Path:
        """runc root of the CRI runc handler and of ``ctr("run", ...)`` (see :meth:`ctr`)."""
        return self.paths.runc_root

    @property
    def subreaper_pid(self) -> int | None:
        """pid of the subreaper process (``None`` before start)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def pid(self) -> int | None:
        """pid of the current containerd process (changes on :meth:`restart`)."""
        try:
            return int(self.paths.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        """True while the subreaper (and so normally containerd) is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------
    def __enter__(self) -> Containerd:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Containerd:
        """Write the config, start subreaper + containerd, wait until it answers."""
        if self._closed:
            raise LabError("this Containerd instance is closed")
        if self._proc is not None:
            return self
        for directory, mode in ((self.paths.scratch, 0o755), (self.paths.state, 0o711)):
            directory.mkdir(mode=mode)  # fails if it exists: never reuse foreign dirs
            self._created.append(directory)
        self.paths.root.mkdir(mode=0o711)
        self.paths.config.write_text(
            render_config(
                self.paths,
                cri=self.cri,
                runtimes=self.runtimes,
                sandbox_image=self.sandbox_image,
                log_level=self.log_level,
                default_runtime=self.default_runtime,
                config_version=self.build.config_version,
            )
        )
        if self.cri:
            self.paths.cni_conf_dir.mkdir(parents=True)
            conflist = self.paths.cni_conf_dir / "10-podshim-lab.conflist"
            conflist.write_text(render_cni_conflist(self.paths, portmap=self._hostnet is not None))
        if self._hostnet is not None:
            self._hostnet.acquire()  # before containerd can run any CNI plugin
        self._cgroup_parents = {
            ns for ns in self._namespaces | {CRI_NAMESPACE} if not cleanup.cgroup_dirs(ns)
        }
        self._shared_before = cleanup.shared_dirs()
        self._spawn()
        self._wait_ready(previous_pid=None)
        self._ready = True
        return self

    def _spawn(self) -> None:
        env = dict(os.environ)
        env.update(self.extra_env)
        own = [] if self.build.bin_dir is None else [str(self.build.bin_dir)]
        env["PATH"] = os.pathsep.join([*self.extra_path, *own, env.get("PATH", os.defpath)])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (*_PACKAGE_ROOTS, env.get("PYTHONPATH", "")) if p
        )
        if not self.shim_pythonpath:
            env[subreaper.CHILD_PYTHONPATH] = ""
        for var in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "NOTIFY_SOCKET"):
            env.pop(var, None)
        cmd = [sys.executable, "-m", "podshim_lab.subreaper", "--pidfile", str(self.paths.pidfile)]
        cmd += ["--stop-timeout", "20"]
        if self.watch_parent:
            cmd.append("--watch-parent")
            cmd += ["--cleanup-dir", str(self.paths.scratch), "--cleanup-dir", str(self.state)]
            if self.cri:
                cmd += ["--cleanup-link", self.paths.bridge]
            for path in sorted(cleanup.shared_candidates(self._namespaces)):
                if not os.path.isdir(path):
                    cmd += ["--cleanup-empty", path]
            for ns in sorted(self._cgroup_parents):
                cmd += ["--cleanup-cgroup", ns]
        cmd += ["--", self.containerd_bin, "--config", str(self.paths.config)]
        cmd += ["--root", str(self.root), "--state", str(self.state), "--address", self.address]
        with open(self.paths.log, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.paths.scratch,
                start_new_session=True,
            )

    def _answers(self) -> bool:
        try:
            result = subprocess.run(
                [self.ctr_bin, "--address", self.address, "--connect-timeout", "2s", "version"],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=20,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def _wait_ready(self, previous_pid: int | None) -> None:
        def ready() -> bool:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise LabError(f"containerd exited ({code}) during start\n{self.log_tail()}")
            pid = self.pid
            return pid is not None and pid != previous_pid and self._answers()

        try:
            wait_for(ready, timeout=self.start_timeout, interval=0.05, message=self.address)
        except WaitTimeout as exc:
            raise LabError(f"{exc}\n{self.log_tail()}") from None

    def restart(self, timeout: float | None = None) -> None:
        """Restart containerd only (same dirs); shims and containers keep running."""
        if not self.running or self._proc is None:
            raise LabError("containerd is not running")
        old = self.pid
        self._ready = False
        self._proc.send_signal(signal.SIGHUP)
        saved = self.start_timeout
        self.start_timeout = timeout if timeout is not None else saved
        try:
            self._wait_ready(previous_pid=old)
        finally:
            self.start_timeout = saved
        self._ready = True

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the containerd log (for error messages)."""
        try:
            text = self.paths.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- ctr -----------------------------------------------------------------
    def ctr(
        self,
        *args: str,
        namespace: str | None = None,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address <sock> -n <ns> args...`` and capture its output.

        Host-global defaults are redirected into the instance's state dir unless
        the caller passes the flag: ``run``, ``tasks start`` and ``tasks exec`` get
        ``--fifo-dir <state>/fifo`` (ctr leaves FIFOs behind for detached tasks),
        ``run`` gets ``--runc-root <state>/runc`` (only io.containerd.runc.v2 uses
        it), so instances sharing a namespace name never collide.
        """
        ns = namespace or self.namespace
        self._namespaces.add(ns)
        argv = list(args)
        for flag, value, commands in (
            ("--fifo-dir", self.paths.fifo_dir, _FIFO_COMMANDS),
            ("--runc-root", self.paths.runc_root, _RUNC_ROOT_COMMANDS),
        ):
            for prefix in commands:
                given = any(a == flag or a.startswith(flag + "=") for a in argv)
                if tuple(argv[: len(prefix)]) == prefix and not given:
                    argv[len(prefix) : len(prefix)] = [flag, str(value)]
        cmd = [self.ctr_bin, "--address", self.address, "--namespace", ns, *argv]
        result = subprocess.run(
            cmd,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise CtrError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def tasks(self, namespace: str | None = None) -> dict[str, tuple[int, str]]:
        """``ctr task ls`` as ``{task id: (pid, status)}``."""
        out = self.ctr("tasks", "ls", namespace=namespace, timeout=60).stdout
        found: dict[str, tuple[int, str]] = {}
        for line in out.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3:
                found[fields[0]] = (int(fields[1]), fields[2])
        return found

    def import_image(self, archive: Path, namespace: str | None = None) -> None:
        """``ctr images import`` an OCI archive and unpack it for overlayfs."""
        self.ctr(
            "images", "import", "--snapshotter", "overlayfs", str(archive), namespace=namespace
        )

    def _ensure(self, kind: str, ref: str, namespace: str) -> str:
        archive = self._images.get((kind, ref))
        if archive is None:
            name = f"{kind}-{len(self._images)}.tar"
            builder = build_busybox_image if kind == "busybox" else build_pause_image
            archive = builder(self.paths.images / name, ref)
            self._images[(kind, ref)] = archive
        if (namespace, ref) not in self._imported:
            self.import_image(archive, namespace=namespace)
            self._imported.add((namespace, ref))
        return ref

    def ensure_busybox(self, ref: str = DEFAULT_BUSYBOX_REF, namespace: str | None = None) -> str:
        """Build (once per instance) and import the busybox image; return its ref."""
        return self._ensure("busybox", ref, namespace or self.namespace)

    def ensure_pause(self, ref: str | None = None, namespace: str = CRI_NAMESPACE) -> str:
        """Build and import the pause-like sandbox image (default: ``sandbox_image``)."""
        return self._ensure("pause", ref or self.sandbox_image, namespace)

    # -- processes -----------------------------------------------------------
    def descendants(self) -> list[tuple[int, str, str]]:
        """``(pid, state, comm)`` of every process below the subreaper but containerd and
        podshim's zygote (:meth:`zygotes`; the shims it forked are in)."""
        if not self.running or self._proc is None:
            return []
        me = self.pid
        found = without_zygotes(descendants(self._proc.pid))
        return [(s.pid, s.state, s.comm) for s in found if s.pid != me]

    def zygotes(self) -> list[int]:
        """pids of podshim's zygote below the subreaper (one per containerd at most)."""
        if not self.running or self._proc is None:
            return []
        return [s.pid for s in descendants(self._proc.pid) if s.comm == ZYGOTE_COMM]

    # -- teardown ------------------------------------------------------------
    def _delete_tasks(self, budget: float) -> None:
        """Best effort: let containerd kill and delete every task (cleans runc state)."""
        end = time.monotonic() + budget
        try:
            listed = self.ctr("namespaces", "ls", "-q", timeout=30).stdout.split()
        except subprocess.SubprocessError:
            listed = []
        for ns in sorted(self._namespaces | set(listed)):
            try:
                ids = list(self.tasks(namespace=ns))
                if ids:
                    left = max(1.0, end - time.monotonic())
                    self.ctr("tasks", "delete", "-f", *ids, namespace=ns, check=False, timeout=left)
            except (subprocess.SubprocessError, ValueError):
                pass
            if time.monotonic() > end:
                return

    def _host_cleanup(self) -> list[str]:
        errors = cleanup.remove_bundle_traces(self._bundles.values(), self.paths.owned_dirs())
        for ns in sorted(self._cgroup_parents):
            cleanup.remove_cgroup(ns)  # only if empty; busy means another user
        if self._shared_before is not None:
            for path in sorted(cleanup.shared_dirs() - self._shared_before, reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(path)  # only if empty: another instance may use it now
        if self.cri:
            cleanup.remove_link(self.paths.bridge)
        if self._hostnet is not None:
            errors += self._hostnet.restore()
        return errors

    def close(self, *, delete_tasks: bool = True) -> None:
        """Stop everything and remove every trace; idempotent, safe after a failed start.

        With ``delete_tasks`` containerd first force-deletes every task it knows
        (so runc removes its state and cgroups); then containerd is stopped, the
        subreaper kills and reaps whatever is left, mounts below the instance's dirs
        are unmounted, the CNI bridge, leftover shim sockets, runc state and cgroups
        of the instance's tasks and finally its dirs are removed.
        """
        if self._closed:
            return
        errors: list[str] = []
        if delete_tasks and self.running and self._ready:
            self._delete_tasks(budget=60.0)
        if self.state.is_dir():
            self._bundles.update((b[:2], b) for b in cleanup.scan_bundles(self.state))
        if self._proc is not None:
            self._seen = [s for s in descendants(self._proc.pid) if s.pid != self._proc.pid]
        if self._proc is not None:
            stop_supervisor(self._proc)
        owned = self.paths.owned_dirs()
        mine = [d for d in owned if d in self._created]
        if mine:
            errors += [f"still mounted: {m}" for m in cleanup.unmount_under(mine)]
        errors += self._host_cleanup()
        for directory in reversed(self._created):
            try:
                cleanup.remove_tree(directory, owned)
            except (OSError, RuntimeError) as exc:
                errors.append(f"{directory}: {exc}")
        if errors:
            raise LabError("close() left things behind: " + "; ".join(errors))
        self._closed = True

    def leftovers(self) -> list[str]:
        """Describe anything of this instance still present (``[]`` after a clean close)."""
        found: list[str] = []
        table = process_table()
        for old in self._seen:
            now = table.get(old.pid)
            if now is not None and now.starttime == old.starttime:
                found.append(f"process {now.pid} ({now.comm}) state {now.state}")
        owned = [str(d) for d in self.paths.owned_dirs()]
        found += cleanup.processes_using(owned, table)
        found += [f"mount {m}" for m in cleanup.mounts_under(owned)]
        found += [f"dir {d}" for d in owned if os.path.lexists(d)]
        if self.cri and cleanup.link_exists(self.paths.bridge):
            found.append(f"link {self.paths.bridge}")
        found += self._hostnet.leftovers() if self._hostnet is not None else []
        for bundle in self._bundles.values():
            for path in (bundle.socket, os.path.join(bundle.runc_root, bundle.task_id)):
                if path and os.path.lexists(path):
                    found.append(f"file {path}")
        return found
