"""``podshim node-install``: the node installer of ``deploy/`` (a DaemonSet's container).

The installer runs in a container whose image holds a relocatable podshim bundle
(``deploy/build_bundle.py``); the host's ``/`` is mounted at ``--host-root``. A link from
the host's bin dir into the image would dangle on the host, so install:

1. copies the bundle to the host: ``<prefix>/<version>/`` (``/opt/podshim/0.1.0``), and
   points ``<prefix>/current`` at it; a version directory already there with the same
   bundle is kept as it is;
2. runs the **copied** ``podshim install`` in the host's namespaces (``nsenter`` into
   ``--host-pid``'s, 1 by default, as kata-deploy does): the shim link in the host's bin
   dir, the drop-in and podshim's config files name host paths into the copy, and
   ``--restart`` restarts the host's containerd through its systemd (without systemd it
   says what to do);
3. runs the copied ``podshim check`` there (exit 0, or install is undone: e.g. a host
   whose glibc is older than the bundle's);
4. removes older version directories no process runs from (a pod-scope shim keeps running
   its version's code until its pod ends; a node daemon of an old version drains);
5. labels the node (``--label-node``) so RuntimeClasses schedule onto it only now:
   ``podshim.io/installed=true``, and ``podshim.io/sandbox-api=true`` where the host's
   check found the handler ``podshim-sb`` registered and runnable (containerd 2.x; the
   label is removed elsewhere, e.g. after a downgrade to 1.7).

``--cleanup`` reverses it: the label, the copied ``podshim uninstall`` (from the copy's
manifest), then the whole ``<prefix>``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from podshim.admin.errors import AdminError

#: the bundle's description file (written by deploy/build_bundle.py)
BUNDLE_FILE = "podshim-bundle.json"
CURRENT = "current"
#: in ``<prefix>``: the parent directories install created for it (cleanup removes them)
CREATED = ".podshim-created-dirs.json"
LABEL = "podshim.io/installed"
#: containerd 2.x: the handler podshim-sb (the shim's Sandbox API) is registered
SANDBOX_LABEL = "podshim.io/sandbox-api"
SANDBOX_CHECK = "handler podshim-sb"
#: the host's usual command directories, added to the host commands' PATH
HOST_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


@dataclass(frozen=True)
class NodeOptions:
    """Where things are: ``host_root`` is the host's ``/`` as this process sees it,
    ``prefix`` the bundle's directory as the host sees it; ``install_args`` are passed to
    the copied ``podshim install``/``uninstall`` (host paths)."""

    bundle: str
    host_root: str
    host_pid: int
    prefix: str
    address: str
    install_args: tuple[str, ...]
    restart: bool
    label_node: str | None

    def local(self, host_path: str) -> str:
        """``host_path`` as this process reaches it (through ``host_root``)."""
        return os.path.join(self.host_root, host_path.lstrip("/"))

    @property
    def host_command(self) -> list[str]:
        """The prefix running a command in the host's namespaces."""
        return [
            "nsenter", f"--target={self.host_pid}",
            "--mount", "--uts", "--ipc", "--net", "--pid", "--",
        ]


def bundle_info(bundle: str) -> dict[str, str]:
    """The bundle's description; :class:`AdminError` when ``bundle`` is not one."""
    try:
        with open(os.path.join(bundle, BUNDLE_FILE)) as f:
            info: dict[str, str] = json.load(f)
    except (OSError, ValueError) as exc:
        raise AdminError(
            f"{bundle} is not a podshim bundle ({BUNDLE_FILE}: {exc}); deploy/build_bundle.py "
            "makes one, the installer image holds one"
        ) from None
    if not info.get("podshim"):
        raise AdminError(f"{bundle}/{BUNDLE_FILE} names no podshim version")
    return info


def default_bundle() -> str:
    """The bundle this podshim runs from (its interpreter's prefix)."""
    return sys.prefix


def _run_host(
    opts: NodeOptions, argv: list[str], report: Callable[[str], None]
) -> subprocess.CompletedProcess[str]:
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    path += [p for p in HOST_PATH if p not in path]
    env = {**os.environ, "PATH": os.pathsep.join(path)}
    for var in ("PYTHONHOME", "PYTHONPATH"):  # the host's copy imports only what it holds
        env.pop(var, None)
    res = subprocess.run(
        [*opts.host_command, *argv], capture_output=True, text=True, env=env, check=False
    )
    for line in (res.stdout + res.stderr).splitlines():
        report(f"  {line}")
    return res


def _same_bundle(a: str, b: str) -> bool:
    try:
        return bundle_info(a) == bundle_info(b)
    except AdminError:
        return False


def copy_bundle(opts: NodeOptions, version: str, report: Callable[[str], None]) -> None:
    """``<prefix>/<version>`` and ``<prefix>/current`` on the host (atomic renames)."""
    local = opts.local(opts.prefix)
    dest = os.path.join(local, version)
    if not os.path.isdir(local):
        made = _missing_parents(opts.prefix, opts)
        os.makedirs(local, mode=0o755)
        with open(os.path.join(local, CREATED), "w") as f:
            json.dump(made, f)
    if os.path.isdir(dest) and _same_bundle(dest, opts.bundle):
        report(f"{os.path.join(opts.prefix, version)}: this bundle is there already")
    else:
        tmp = os.path.join(local, f".{version}.new-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(opts.bundle, tmp, symlinks=True)
        if os.path.lexists(dest):  # another build of the same version, not in use
            old = os.path.join(local, f".{version}.old-{os.getpid()}")
            os.rename(dest, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, dest)
        report(f"copied {opts.bundle} to {os.path.join(opts.prefix, version)}")
    link = os.path.join(local, CURRENT)
    if not (os.path.islink(link) and os.readlink(link) == version):
        tmp_link = os.path.join(local, f".{CURRENT}.new-{os.getpid()}")
        os.symlink(version, tmp_link)
        os.replace(tmp_link, link)
        report(f"{os.path.join(opts.prefix, CURRENT)} -> {version}")


def _missing_parents(prefix: str, opts: NodeOptions) -> list[str]:
    """The parents of ``prefix`` (host paths) that do not exist yet, outermost first."""
    missing = []
    parent = os.path.dirname(prefix)
    while parent != "/" and not os.path.isdir(opts.local(parent)):
        missing.append(parent)
        parent = os.path.dirname(parent)
    return missing[::-1]


def _running_files(version_dir: str) -> set[tuple[int, int]]:
    """(dev, inode) of the programs a process runs from ``version_dir``."""
    files = set()
    for directory, _dirs, names in os.walk(version_dir):
        for name in names:
            path = os.path.join(directory, name)
            if not os.path.islink(path) and os.access(path, os.X_OK):
                st = os.stat(path)
                files.add((st.st_dev, st.st_ino))
    return files


def in_use(version_dir: str) -> list[int]:
    """Pids of the processes whose program is a file of ``version_dir`` (a shim, its
    podshim-init): /proc/<pid>/exe names the file whatever mount namespace it is in."""
    files = _running_files(version_dir)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/exe")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in files:
            pids.append(int(entry))
    return sorted(pids)


def _argv(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return repr(f.read().replace(b"\0", b" ").decode(errors="replace").strip())
    except OSError:
        return "(gone)"


def prune(opts: NodeOptions, keep: str, report: Callable[[str], None]) -> None:
    """Remove the version directories other than ``keep`` that no process runs from."""
    local = opts.local(opts.prefix)
    for name in sorted(os.listdir(local)):
        path = os.path.join(local, name)
        if name in (keep, CURRENT, CREATED) or os.path.islink(path) or not os.path.isdir(path):
            continue
        if name.startswith("."):  # a copy left by an interrupted run
            shutil.rmtree(path, ignore_errors=True)
            continue
        pids = in_use(path)
        if pids:
            users = ", ".join(f"{pid} {_argv(pid)}" for pid in pids)
            report(f"keep {os.path.join(opts.prefix, name)}: in use by pids {pids} ({users})")
            continue
        shutil.rmtree(path)
        report(f"removed {os.path.join(opts.prefix, name)} (no process runs from it)")


def host_check(
    opts: NodeOptions, podshim: str, report: Callable[[str], None]
) -> tuple[bool, list[dict[str, str]]]:
    """The host's ``podshim check --json``, reported a line each: (passed, results)."""
    res = _run_host(opts, [podshim, "check", "--address", opts.address, "--json"], _quiet)
    try:
        results = [dict(r) for r in json.loads(res.stdout)]
    except (ValueError, TypeError):
        results = []
        for line in (res.stdout + res.stderr).splitlines():
            report(f"  {line}")
    for r in results:
        hint = f"  -> {r.get('hint')}" if r.get("hint") and r.get("status") != "ok" else ""
        report(f"  [{r.get('status', '?'):>4}] {r.get('name')}: {r.get('detail')}{hint}")
    return res.returncode == 0, results


def node_labels(results: list[dict[str, str]]) -> dict[str, str | None]:
    """The node's labels from the host's check: installed, and the Sandbox API handler
    where it is registered and runnable (``None``: remove the label)."""
    sandbox = any(r.get("name") == SANDBOX_CHECK and r.get("status") == "ok" for r in results)
    return {LABEL: "true", SANDBOX_LABEL: "true" if sandbox else None}


def _quiet(line: str) -> None:
    pass


def install(opts: NodeOptions, report: Callable[[str], None]) -> int:
    """Copy, install, check, prune, label; 0, or 1 with what failed reported."""
    version = bundle_info(opts.bundle)["podshim"]
    if os.geteuid() != 0:
        raise AdminError("podshim node-install must run as root (a privileged container)")
    copy_bundle(opts, version, report)
    podshim = os.path.join(opts.prefix, version, "bin", "podshim")
    argv = [podshim, "install", *opts.install_args, *(["--restart"] if opts.restart else [])]
    report("on the host: " + " ".join(argv))
    if _run_host(opts, argv, report).returncode != 0:
        raise AdminError(f"{podshim} install failed on the host (see above)")
    report(f"on the host: {podshim} check --address {opts.address} --json")
    ok, results = host_check(opts, podshim, report)
    if not ok:
        report("podshim check failed on the host: undoing the install")
        _run_host(opts, [podshim, "uninstall", *opts.install_args], report)
        raise AdminError("podshim cannot run pods on this host (see podshim check above)")
    prune(opts, version, report)
    if opts.label_node:
        from podshim.admin import kubeapi

        labels = node_labels(results)
        kubeapi.label_node_with(opts.label_node, labels)
        shown = ", ".join(f"{k}={v}" if v else f"{k} removed" for k, v in labels.items())
        report(f"labelled node {opts.label_node}: {shown}")
    report(f"podshim {version} is installed on this node")
    return 0


def cleanup(opts: NodeOptions, report: Callable[[str], None]) -> int:
    """Undo :func:`install`: the label, the host's install (from its manifest), the
    copies; 0, or 1 when uninstall refused something (the copy then stays)."""
    if os.geteuid() != 0:
        raise AdminError("podshim node-install --cleanup must run as root")
    if opts.label_node:
        from podshim.admin import kubeapi

        kubeapi.label_node_with(opts.label_node, {LABEL: None, SANDBOX_LABEL: None})
        report(f"removed the labels {LABEL}, {SANDBOX_LABEL} from node {opts.label_node}")
    local = opts.local(opts.prefix)
    current = os.path.join(local, CURRENT)
    if os.path.isdir(current):
        podshim = os.path.join(opts.prefix, CURRENT, "bin", "podshim")
        argv = [podshim, "uninstall", *opts.install_args, *(["--restart"] if opts.restart else [])]
        report("on the host: " + " ".join(argv))
        if _run_host(opts, argv, report).returncode != 0:
            report(f"podshim uninstall refused something: {opts.prefix} stays")
            return 1
    if os.path.lexists(local):
        for name in sorted(os.listdir(local)):
            path = os.path.join(local, name)
            if os.path.isdir(path) and not os.path.islink(path) and in_use(path):
                report(f"note: processes still run from {os.path.join(opts.prefix, name)}")
        try:
            with open(os.path.join(local, CREATED)) as f:
                made = [str(p) for p in json.load(f)]
        except (OSError, ValueError):
            made = []
        shutil.rmtree(local)
        report(f"removed {opts.prefix}")
        for parent in reversed(made):  # the directories install made for it, if empty
            try:
                os.rmdir(opts.local(parent))
            except OSError:
                break
            report(f"removed {parent}")
    else:
        report(f"{opts.prefix} is not there: nothing to remove")
    return 0
