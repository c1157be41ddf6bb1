"""``podshim uvm``'s arguments and handler (light: only ``run`` imports the builder)."""

from __future__ import annotations

import argparse
import sys

from podshim.host.uvm import guest

__all__ = ["configure", "run"]


def configure(p: argparse.ArgumentParser) -> None:
    """``podshim uvm``'s arguments (standard library only: --help stays fast)."""
    sub = p.add_subparsers(dest="uvm_command", metavar="COMMAND", required=True)
    prep = sub.add_parser(
        "prepare",
        help="build the utility VM's guest kernel and initramfs (once), probe KVM",
        description=(
            "Build the guest image of VM pods into DIR: the kernel from Debian's "
            "linux-source-6.1 with podshim's config fragment and patches (~4 min on 2 "
            "cores, once), the initramfs (agent, runc), then boot it to choose KVM or TCG. "
            "Does nothing when the image is current."
        ),
    )
    prep.add_argument("--dir", default=guest.DEFAULT_DIR, help="the image directory")
    prep.add_argument("--force", action="store_true", help="rebuild everything")
    prep.add_argument(
        "--stock-kernel",
        action="store_true",
        help="use Debian's kernel (linux-image-amd64, downloaded and unpacked, not installed) "
        "with its modules instead of building one: a slower boot (q35; ~5 s under TCG)",
    )
    prep.add_argument("--no-probe", action="store_true", help="skip the boot probe")


def run(args: argparse.Namespace) -> int:
    """``podshim uvm prepare``: 0 when the image is current, 1 with the reason if not."""
    from podshim import errors as errdefs
    from podshim.host.uvm.guest.prepare import prepare

    try:
        prepare(
            args.dir,
            force=args.force,
            do_probe=not args.no_probe,
            stock_kernel=args.stock_kernel,
        )
    except errdefs.ShimError as e:
        print(f"podshim uvm prepare: {e}", file=sys.stderr)
        return 1
    return 0
