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
    from podshim.admin.install import Options

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"


def _print(line: str) -> None:
    print(line, flush=True)


def _paths(p: argparse.ArgumentParser) -> None:
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
