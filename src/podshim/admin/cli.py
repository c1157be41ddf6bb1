"""Arguments and entry points of ``podshim install``, ``uninstall`` and ``check``
(standard library only at import: ``podshim --help`` stays fast)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from podshim.admin.install import Options, Plan

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"


def _print(line: str) -> None:
    print(line, flush=True)


#: install's path options, as node-install passes them on (dest -> option)
PATH_OPTIONS = {
    "root": "--root",
    "config": "--config",
    "containerd": "--containerd",
    "bin_dir": "--bin-dir",
    "podshim_config_dir": "--podshim-config-dir",
    "state_dir": "--state-dir",
    "dropin": "--dropin",
    "unit_dir": "--unit-dir",
    "daemon_socket": "--daemon-socket",
}


def _path_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="/", help="prefix of every default path (default: /)")
    p.add_argument(
        "--config", help="containerd's main config (default: /etc/containerd/config.toml)"
    )
    p.add_argument(
        "--containerd",
        help="the containerd binary reading that config (default: containerd on PATH)",
    )
    p.add_argument("--bin-dir", help="where the shim binary is linked (default: /usr/local/bin)")
    p.add_argument("--podshim-config-dir", help="podshim's config files (default: /etc/podshim)")
    p.add_argument(
        "--state-dir", help="where the install manifest is kept (default: /var/lib/podshim)"
    )
    p.add_argument(
        "--dropin", help="containerd drop-in to write (default: <config dir>/conf.d/podshim.toml)"
    )
    p.add_argument(
        "--unit-dir",
        help="containerd 2.x: where the podshim daemon's systemd unit goes "
        "(default: /etc/systemd/system)",
    )
    p.add_argument(
        "--daemon-socket",
        help="containerd 2.x: the proxy plugin's address, the podshim daemon's --socket "
        "(default: /run/podshim/sandbox.sock)",
    )


def _paths(p: argparse.ArgumentParser) -> None:
    _path_options(p)
    p.add_argument("--dry-run", action="store_true", help="print every change, change nothing")
    p.add_argument(
        "--restart",
        action="store_true",
        help="restart containerd through systemd afterwards (else print what to do)",
    )


def configure_install(p: argparse.ArgumentParser) -> None:
    _paths(p)


def configure_uninstall(p: argparse.ArgumentParser) -> None:
    _paths(p)


def _options(args: argparse.Namespace) -> Options:
    from podshim.admin import install

    return install.options(
        root=args.root,
        config=args.config,
        containerd=args.containerd,
        bin_dir=args.bin_dir,
        podshim_dir=args.podshim_config_dir,
        state_dir=args.state_dir,
        dropin=args.dropin,
        unit_dir=args.unit_dir,
        daemon_socket=args.daemon_socket,
    )


def restart_containerd(restart: bool, dry_run: bool) -> int:
    """Restart containerd through systemd (``restart``), or say how to."""
    systemd = os.path.isdir("/run/systemd/system") and shutil.which("systemctl")
    if dry_run:
        return 0
    if not restart or not systemd:
        why = "" if not restart else " (no systemd here)"
        _print(
            f"containerd reads its config at start{why}: restart it to load the change "
            "(systemctl restart containerd, or how your system runs it)"
        )
        return 0
    res = subprocess.run(["systemctl", "restart", "containerd"], check=False)
    if res.returncode != 0:
        print("podshim: systemctl restart containerd failed", file=sys.stderr)
        return 1
    _print("restarted containerd")
    return 0


def start_daemon(p: Plan, restart: bool) -> int:
    """containerd 2.x: start the daemon's unit through systemd (``restart``) before
    containerd restarts, or say how to."""
    from podshim.admin import service

    name = os.path.basename(p.unit)
    written = [c for c in p.changes if c.kind == "unit"]
    if not restart or not service.systemd_running():
        command = " ".join(p.daemon)
        _print(
            f"the proxy plugin's daemon must serve before containerd starts: systemctl "
            f"daemon-reload && systemctl enable --now {name} (without systemd, run it under "
            f"your service manager, started before containerd: {command})"
        )
        return 0
    for args in (["daemon-reload"], ["enable", "--now", name]):
        failed = service.systemctl(*args)
        if failed is not None:
            print(f"podshim: systemctl {' '.join(args)} failed: {failed}", file=sys.stderr)
            return 1
        _print(f"systemctl {' '.join(args)}")
    if any(c.old for c in written):
        _print(
            f"note: a running {name} keeps its old command line until it restarts; "
            "restarting it ends every pod on podshim-node: drain the node first"
        )
    return 0


def run_install(args: argparse.Namespace) -> int:
    from podshim.admin import install
    from podshim.admin.errors import AdminError

    opts = _options(args)
    try:
        p = install.run(opts, dry_run=args.dry_run, report=_print)
    except AdminError as exc:
        print(f"podshim install: {exc} (nothing changed)", file=sys.stderr)
        return 1
    if not p.changes:
        return 0
    if p.unit and not args.dry_run:
        code = start_daemon(p, args.restart)
        if code != 0:
            return code
    return restart_containerd(args.restart, args.dry_run)


def run_uninstall(args: argparse.Namespace) -> int:
    from podshim.admin import uninstall
    from podshim.admin.errors import AdminError

    opts = _options(args)
    recorded = os.path.exists(opts.manifest)
    try:
        code = uninstall.run(opts, dry_run=args.dry_run, report=_print)
    except AdminError as exc:
        print(f"podshim uninstall: {exc}", file=sys.stderr)
        return 1
    if not recorded:
        return code
    return code or restart_containerd(args.restart, args.dry_run)


def configure_check(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help=f"the containerd to check (default: {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--config",
        help="its config (default: the --config of the containerd serving --address, "
        "else /etc/containerd/config.toml)",
    )
    p.add_argument("--containerd", help="its binary (default: the running one, else PATH)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of lines")


def run_check(args: argparse.Namespace) -> int:
    import json

    from podshim.admin import check

    results = check.run_all(check.Target.find(args.address, args.config, args.containerd))
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        for r in results:
            print(r.line())
    return 1 if any(r.status == check.FAIL for r in results) else 0


def configure_node_install(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cleanup", action="store_true", help="undo a node-install (uninstall, remove the copy)"
    )
    p.add_argument(
        "--host-root", default="/host", help="where the host's / is mounted (default: /host)"
    )
    p.add_argument(
        "--host-pid",
        type=int,
        default=1,
        help="a host process whose namespaces host commands run in (nsenter; default: 1)",
    )
    p.add_argument(
        "--prefix", help="the bundle's directory on the host (default: <root>/opt/podshim)"
    )
    p.add_argument("--bundle", help="the bundle to copy (default: the one running this)")
    p.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help=f"the containerd podshim check looks at (default: {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--label-node",
        metavar="NODE",
        help="set (remove, with --cleanup) the label podshim.io/installed=true on NODE "
        "through the Kubernetes API (in-cluster service account)",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="then stay running until SIGTERM (a DaemonSet's container)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="restart the host's containerd through its systemd (else print what to do)",
    )
    _path_options(p)


def _wait_for_term() -> None:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _print("waiting for SIGTERM")
    while True:
        signal.pause()


def run_node_install(args: argparse.Namespace) -> int:
    from podshim.admin import node
    from podshim.admin.errors import AdminError

    passed: list[str] = []
    for dest, flag in PATH_OPTIONS.items():
        value = getattr(args, dest)
        if value is not None and not (dest == "root" and value == "/"):
            passed += [flag, value]
    prefix = args.prefix or os.path.join(args.root, "opt/podshim")
    opts = node.NodeOptions(
        bundle=os.path.abspath(args.bundle or node.default_bundle()),
        host_root=os.path.abspath(args.host_root),
        host_pid=args.host_pid,
        prefix=os.path.abspath(prefix),
        address=args.address,
        install_args=tuple(passed),
        restart=args.restart,
        label_node=args.label_node,
    )
    what = "node-install --cleanup" if args.cleanup else "node-install"
    try:
        code = node.cleanup(opts, _print) if args.cleanup else node.install(opts, _print)
    except (AdminError, OSError) as exc:
        print(f"podshim {what}: {exc}", file=sys.stderr)
        return 1
    if code == 0 and args.wait:
        _wait_for_term()
    return code
