"""``podshim check``: can this machine run pods on podshim, and is podshim registered?

One :class:`Result` per line: ``ok``, ``warn`` or ``fail`` with a fix hint. ``fail``
only for what stops every pod (no runc, no ``podshim-init``, a cgroup controller or
kernel feature podshim uses is missing); what ``podshim install`` or starting containerd
fixes (no containerd running, handler not registered yet) is a warning, so the check
passes on a machine that can run podshim before it is installed.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tomllib
from dataclasses import asdict, dataclass
from typing import Any

from podshim import __version__
from podshim.admin import ctdconfig, service
from podshim.admin.errors import AdminError
from podshim.admin.install import HANDLERS, SANDBOX_HANDLER

OK, WARN, FAIL = "ok", "warn", "fail"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_CONFIG = "/etc/containerd/config.toml"
#: controllers a pod's cgroup needs (limits, OOM) and ones kubelet expects too
NEEDED_CONTROLLERS = ("cpu", "memory")
WANTED_CONTROLLERS = ("pids",)
_SYS_OPEN_TREE = 428  # the same number on every architecture (asm-generic, 5.2+)
_OPEN_TREE_CLOEXEC = 0o2000000
_AT_FDCWD = -100


@dataclass(frozen=True)
class Result:
    name: str
    status: str
    detail: str
    hint: str = ""

    def line(self) -> str:
        hint = f"  -> {self.hint}" if self.hint and self.status != OK else ""
        return f"[{self.status:>4}] {self.name}: {self.detail}{hint}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Target:
    """The containerd to check: its socket, config, binary and (if running) process."""

    address: str
    config: str
    binary: str | None
    pid: int | None
    path_env: str

    @classmethod
    def find(cls, address: str, config: str | None, binary: str | None) -> Target:
        pid, argv = _serving(address)
        cfg = config or _flag(argv, "--config", "-c") or DEFAULT_CONFIG
        exe = binary
        if exe is None and pid is not None:
            try:
                exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
            except OSError:
                exe = None
        exe = exe or shutil.which("containerd")
        path_env = _environ_path(pid) if pid is not None else None
        return cls(address, cfg, exe, pid, path_env or os.environ.get("PATH", os.defpath))


def _flag(argv: list[str], long: str, short: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg in (long, short) and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(long + "="):
            return arg.split("=", 1)[1]
    return None


def _serving(address: str) -> tuple[int | None, list[str]]:
    """The containerd process listening on ``address`` (by its command line)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if not argv or os.path.basename(argv[0]) != "containerd":
            continue
        if len(argv) > 1 and not argv[1].startswith("-"):
            continue  # a subcommand (config dump, ...), not a daemon
        own = _flag(argv, "--address", "-a") or _config_address(_flag(argv, "--config", "-c"))
        if own == address:
            return int(name), argv
    return None, []


def _config_address(config: str | None) -> str:
    try:
        with open(config or DEFAULT_CONFIG, "rb") as f:
            grpc = tomllib.load(f).get("grpc", {})
        found = grpc.get("address") if isinstance(grpc, dict) else None
        return found if isinstance(found, str) and found else DEFAULT_ADDRESS
    except (OSError, tomllib.TOMLDecodeError):
        return DEFAULT_ADDRESS


def _environ_path(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"PATH="):
                    return item[5:].decode(errors="replace")
    except OSError:
        pass
    return None


def _run(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def check_containerd(t: Target) -> tuple[list[Result], ctdconfig.ContainerdBinary | None]:
    out: list[Result] = []
    binary = None
    if t.binary is None:
        out.append(Result("containerd", WARN, "not found on PATH", "apt-get install containerd"))
    else:
        try:
            binary = ctdconfig.probe(t.binary)
            out.append(
                Result("containerd", OK, f"{binary.path} {'.'.join(map(str, binary.version))}")
            )
        except AdminError as exc:
            out.append(Result("containerd", WARN, str(exc), "install containerd 1.6 or newer"))
    if t.pid is None:
        out.append(
            Result(
                "containerd running",
                WARN,
                f"nothing serves {t.address}",
                "start containerd, or name its socket with --address",
            )
        )
    else:
        out.append(Result("containerd running", OK, f"pid {t.pid} on {t.address}"))
    return out, binary


def check_cri(t: Target, binary: ctdconfig.ContainerdBinary | None) -> Result:
    if t.pid is None:
        return Result("CRI plugin", WARN, "cannot tell: containerd is not running")
    ctr = shutil.which("ctr", path=os.path.dirname(binary.path) if binary else None)
    ctr = ctr or shutil.which("ctr")
    res = _run([ctr, "--address", t.address, "plugins", "ls"]) if ctr else None
    if res is None or res.returncode != 0:
        return Result("CRI plugin", WARN, "cannot tell (ctr plugins ls failed)")
    for line in res.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1] == "cri" and fields[0] == "io.containerd.grpc.v1":
            if fields[-1] == "ok":
                return Result("CRI plugin", OK, "io.containerd.grpc.v1.cri is on")
            return Result(
                "CRI plugin",
                WARN,
                f"io.containerd.grpc.v1.cri is {fields[-1]}",
                f"remove it from disabled_plugins in {t.config} and restart containerd",
            )
    return Result("CRI plugin", WARN, "not loaded", f"enable it in {t.config}")


def _dumped(binary: ctdconfig.ContainerdBinary, config: str) -> tuple[dict[str, Any], Any]:
    """The runtimes and the ``proxy_plugins`` of containerd's effective config."""
    table = tomllib.loads(ctdconfig.dump(binary.path, config))
    version = table.get("version", 2)
    return ctdconfig.runtimes_of(table, 3 if version == 3 else 2), table.get("proxy_plugins")


def _find_shim(t: Target, binary: ctdconfig.ContainerdBinary | None) -> str | None:
    found = shutil.which(ctdconfig.SHIM_BINARY, path=t.path_env)
    if found is None and binary is not None:  # containerd also looks beside itself
        beside = os.path.join(os.path.dirname(binary.path), ctdconfig.SHIM_BINARY)
        found = beside if os.access(beside, os.X_OK) else None
    return found


def _shim_version(path: str) -> str | None:
    res = _run([path, "-v"])
    if res is None or res.returncode != 0:
        return None
    return res.stdout.strip() or None


def check_shim(t: Target, binary: ctdconfig.ContainerdBinary | None) -> Result:
    found = _find_shim(t, binary)
    where = "containerd's PATH" if t.pid is not None else "PATH"
    if found is None:
        return Result(
            "shim binary",
            WARN,
            f"{ctdconfig.SHIM_BINARY} not on {where} ({t.path_env})",
            "podshim install (on 1.6, with a --bin-dir on that PATH)",
        )
    version = _shim_version(found)
    if version is None:
        return Result("shim binary", WARN, f"{found} does not run", "podshim install again")
    return Result("shim binary", OK, f"{found} ({version})")


def check_handlers(t: Target, binary: ctdconfig.ContainerdBinary | None) -> list[Result]:
    if binary is None:
        return [Result("handlers", WARN, "cannot tell: no containerd binary")]
    try:
        runtimes, proxies = _dumped(binary, t.config)
    except (AdminError, tomllib.TOMLDecodeError) as exc:
        return [Result("handlers", WARN, f"cannot read {t.config}: {exc}", "fix the config")]
    out = []
    wanted = [*HANDLERS, *([SANDBOX_HANDLER] if binary.version[0] >= 2 else [])]
    for handler in wanted:
        name = f"handler {handler}"
        spec = runtimes.get(handler)
        if not isinstance(spec, dict):
            out.append(Result(name, WARN, f"not in {t.config}", "podshim install"))
            continue
        if spec.get("runtime_type") != ctdconfig.RUNTIME_TYPE:
            out.append(
                Result(
                    name,
                    WARN,
                    f"runtime_type {spec.get('runtime_type')!r}",
                    "the name belongs to another runtime",
                )
            )
            continue
        sandboxer = spec.get("sandboxer")
        if isinstance(sandboxer, str) and sandboxer not in ("", "podsandbox", "shim"):
            plugins = proxies if isinstance(proxies, dict) else {}
            out.append(_proxy_reachable(name, sandboxer, plugins.get(sandboxer)))
            continue
        out.append(_reachable(name, spec, t, binary))
    return out


def _proxy_reachable(name: str, plugin: str, spec: Any) -> Result:
    """A handler whose sandboxer is a proxy plugin: its daemon accepts connections."""
    address = spec.get("address") if isinstance(spec, dict) else None
    if not address or spec.get("type") not in service.SANDBOX_TYPES:
        hint = "podshim install again (it declares [proxy_plugins.podshim])"
        return Result(name, WARN, f"sandboxer {plugin!r} is no sandbox proxy plugin", hint)
    why = service.reachable(str(address))
    if why is None:
        return Result(name, OK, f"registered, proxy plugin {plugin}, daemon serving {address}")
    if os.geteuid() != 0:  # the socket is root's (0600)
        return Result(name, WARN, f"cannot connect to {address} ({why})", "run as root")
    detail = f"registered (proxy plugin {plugin}), nothing serves {address} ({why})"
    return Result(name, WARN, detail, service.start_hint(str(address)))


def _started_at(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch, to within a second)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def check_loaded(t: Target) -> Result | None:
    """Whether the running containerd started after its config files last changed (it
    reads them only at start); ``None`` when it is not running."""
    if t.pid is None:
        return None
    started = _started_at(t.pid)
    try:
        _, table = ctdconfig.read(t.config)
        files = [t.config, *(name for name, _ in ctdconfig.imported_files(t.config, table))]
    except AdminError as exc:
        return Result("config loaded", WARN, f"cannot tell: {exc}")
    if started is None:
        return Result("config loaded", WARN, f"cannot tell when pid {t.pid} started")
    newer = [f for f in files if os.path.exists(f) and os.stat(f).st_mtime > started + 1]
    if newer:
        return Result(
            "config loaded",
            WARN,
            f"containerd (pid {t.pid}) started before {', '.join(newer)} changed",
            "restart containerd to load it",
        )
    return Result("config loaded", OK, "containerd started after its config last changed")


def _reachable(
    name: str, spec: dict[str, Any], t: Target, binary: ctdconfig.ContainerdBinary
) -> Result:
    from podshim.errors import ShimError
    from podshim.service import config as podshim_config

    path = spec.get("runtime_path") if binary.version >= (1, 7, 0) else None
    shim = path if isinstance(path, str) and path else _find_shim(t, binary)
    if shim is None or _shim_version(shim) is None:
        return Result(
            name,
            WARN,
            f"registered, but containerd cannot run {shim or ctdconfig.SHIM_BINARY}",
            "podshim install (it links the shim onto containerd's PATH)",
        )
    options = spec.get("options")
    config_path = options.get("ConfigPath") if isinstance(options, dict) else None
    if isinstance(config_path, str) and config_path:
        try:
            podshim_config.load_file(config_path)
        except ShimError as exc:
            return Result(name, WARN, str(exc), "fix the file; pods on this handler fail")
    return Result(name, OK, f"registered, shim {shim}, config {config_path or '(defaults)'}")


def check_oci_runtimes() -> list[Result]:
    out = []
    for runtime, needed in (("runc", True), ("crun", False)):
        path = shutil.which(runtime)
        if path is None:
            if needed:
                out.append(Result(runtime, FAIL, "not found", "apt-get install runc"))
            else:
                out.append(Result(runtime, OK, "not installed (optional)"))
            continue
        res = _run([path, "--version"])
        if res is None or res.returncode != 0:
            out.append(
                Result(
                    runtime,
                    FAIL if needed else WARN,
                    f"{path} --version failed",
                    f"reinstall {runtime}",
                )
            )
            continue
        first = res.stdout.splitlines()[0] if res.stdout else "?"
        out.append(Result(runtime, OK, f"{path}: {first}"))
    return out


def check_cgroups(
    mountinfo: str = "/proc/self/mountinfo", root: str = "/sys/fs/cgroup"
) -> list[Result]:
    from podshim.host.namespaces import cgroup

    hierarchies = cgroup.hierarchies(root, mountinfo)
    if not hierarchies:
        return [Result("cgroups", FAIL, f"no cgroup hierarchy under {root}", "mount cgroup2")]
    if len(hierarchies) == 1 and hierarchies[0].version == 2:
        mode = "v2 (unified)"
        try:
            with open(os.path.join(hierarchies[0].mountpoint, "cgroup.controllers")) as f:
                have = set(f.read().split())
        except OSError:
            have = set()
    else:
        mode = "hybrid (v1 + v2)" if any(h.version == 2 for h in hierarchies) else "v1"
        have = set().union(*(h.controllers for h in hierarchies))
    out = [Result("cgroup mode", OK, mode)]
    missing = [c for c in NEEDED_CONTROLLERS if c not in have]
    unwanted = [c for c in WANTED_CONTROLLERS if c not in have]
    if missing:
        out.append(
            Result(
                "cgroup controllers",
                FAIL,
                f"missing {', '.join(missing)}",
                "enable them (kernel command line, cgroup mounts)",
            )
        )
    elif unwanted:
        out.append(
            Result(
                "cgroup controllers",
                WARN,
                f"missing {', '.join(unwanted)}",
                "kubelet's pod pid limits need it",
            )
        )
    else:
        needed = NEEDED_CONTROLLERS + WANTED_CONTROLLERS
        out.append(Result("cgroup controllers", OK, ", ".join(needed)))
    return out


def check_kernel() -> list[Result]:
    out = []
    try:
        os.close(os.pidfd_open(os.getpid()))
        out.append(Result("pidfd", OK, "pidfd_open works"))
    except OSError as exc:
        out.append(Result("pidfd", FAIL, f"pidfd_open: {exc.strerror}", "Linux 5.3 or newer"))
    missing = [
        n for n in ("pid", "ipc", "uts", "net", "mnt") if not os.path.exists(f"/proc/self/ns/{n}")
    ]
    if missing:
        out.append(
            Result(
                "namespaces",
                FAIL,
                f"no {', '.join(missing)} namespaces",
                "a kernel with CONFIG_*_NS",
            )
        )
    elif os.geteuid() != 0:
        out.append(Result("namespaces", WARN, "present; run as root to try them"))
    else:
        res = _run(["unshare", "--pid", "--ipc", "--uts", "--mount", "--fork", "true"])
        if res is None or res.returncode != 0:
            why = res.stderr.strip() if res is not None else "unshare not found (util-linux)"
            out.append(
                Result(
                    "namespaces",
                    FAIL,
                    f"cannot make pid/ipc/uts/mount namespaces: {why}",
                    "apt-get install util-linux; allow namespaces (seccomp, sysctl)",
                )
            )
        else:
            out.append(Result("namespaces", OK, "pid, ipc, uts, mount (made one of each), net"))
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, b"/", _OPEN_TREE_CLOEXEC)
    if fd >= 0:
        os.close(fd)
        out.append(Result("new mount API", OK, "open_tree works"))
    else:
        err = ctypes.get_errno()
        out.append(
            Result(
                "new mount API",
                WARN,
                f"open_tree: {os.strerror(err)}",
                "Linux 5.2+; runc falls back to mount(2)",
            )
        )
    return out


def check_init() -> Result:
    from podshim.errors import ShimError
    from podshim.host.namespaces.initbin import find_init_binary

    try:
        path = find_init_binary()
    except ShimError as exc:
        return Result("podshim-init", FAIL, str(exc), "pip install podshim (wheel or sdist)")
    # a bad argument: it must start and answer with its usage (exit 2), nothing else
    res = _run([path, "--podshim-check"])
    if res is None or res.returncode != 2 or "usage:" not in res.stderr:
        got = (
            "did not start" if res is None else f"exit {res.returncode}: {res.stderr.strip()[:200]}"
        )
        return Result(
            "podshim-init",
            FAIL,
            f"{path} {got}",
            "reinstall podshim (the build compiles it for this machine)",
        )
    return Result("podshim-init", OK, path)


def check_uvm(directory: str | None = None) -> Result:
    """The utility VM of VM pods (its image, the accelerator): warn, never fail."""
    from podshim.host.uvm.guest.status import image_status

    ready, detail, hint = image_status(directory) if directory else image_status()
    return Result("utility VM", OK if ready else WARN, detail, hint)


def run_all(t: Target) -> list[Result]:
    results, binary = check_containerd(t)
    results.append(check_cri(t, binary))
    results.append(check_shim(t, binary))
    results += check_handlers(t, binary)
    loaded = check_loaded(t)
    if loaded is not None:
        results.append(loaded)
    results += check_oci_runtimes()
    results += check_cgroups()
    results += check_kernel()
    results.append(check_init())
    results.append(check_uvm())
    results.append(Result("podshim", OK, __version__))
    return results
