"""``podshim``: the operator command line.

Subcommands live in :data:`COMMANDS`; each one imports what it needs only when it
runs, so ``podshim --help`` (and every other subcommand) stays fast.

* ``podshim demo``: a smoke run of podshim against a private, embedded containerd; the
  demo is part of the test lab (``podshim_lab``, the ``podshim-lab`` distribution in
  ``lab/``), imported only when the command runs, never statically.
* ``podshim diag``: inspect live shims (``podshim.diag``; hcsshim's shimdiag).
* ``podshim check``, ``podshim install``, ``podshim uninstall``: put podshim on this
  machine's containerd and check it (``podshim.admin``); ``podshim node-install``: the
  same from a Kubernetes DaemonSet's container (``deploy/``).
* ``podshim daemon``: the resident sandbox controller of a containerd 2.x proxy plugin
  (``podshim.shim.proxyd``).
* ``podshim uvm prepare``: build the utility VM's guest image (``podshim.host.uvm.guest``).
* ``podshim version``: print podshim's version.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["COMMANDS", "DEMO_NEEDS_LAB", "LAB_PACKAGE", "Command", "build_parser", "main"]

#: the test lab's package; ``podshim demo`` runs ``<LAB_PACKAGE>.demo``
LAB_PACKAGE = "podshim_lab"
#: the one line ``podshim demo`` prints (exit 2) when the lab is not installed
DEMO_NEEDS_LAB = "podshim demo needs the test lab: pip install ./lab (run from a podshim checkout)"


@dataclass(frozen=True)
class Command:
    """One subcommand: its help text, an optional argument setup and its handler."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    description: str = ""
    configure: Callable[[argparse.ArgumentParser], None] | None = None


def _version(args: argparse.Namespace) -> int:
    from podshim import __version__

    print(f"podshim {__version__}")
    return 0


def _lab_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(LAB_PACKAGE) is not None
    except (ImportError, ValueError):  # a broken entry in sys.modules
        return False


def _demo(args: argparse.Namespace) -> int:
    # by name, at run time: the runtime never imports the lab statically (a plain
    # `pip install podshim` has neither the lab nor its grpc dependency)
    import importlib

    if not _lab_installed():
        print(DEMO_NEEDS_LAB, file=sys.stderr)
        return 2
    demo = importlib.import_module(f"{LAB_PACKAGE}.demo")
    run: Callable[[], int] = demo.run
    return run()


def _diag(args: argparse.Namespace) -> int:
    from podshim.diag import cli

    return cli.run(args)


def _diag_configure(p: argparse.ArgumentParser) -> None:
    from podshim.diag import cli  # standard library only at import: --help stays fast

    cli.configure(p)


def _admin(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from podshim.admin import cli

        handler: Callable[[argparse.Namespace], int] = getattr(cli, f"run_{name}")
        return handler(args)

    return run


def _admin_configure(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def configure(p: argparse.ArgumentParser) -> None:
        from podshim.admin import cli  # standard library only at import: --help stays fast

        setup: Callable[[argparse.ArgumentParser], None] = getattr(cli, f"configure_{name}")
        setup(p)

    return configure


def _uvm(args: argparse.Namespace) -> int:
    from podshim.host.uvm.guest import command

    return command.run(args)


def _uvm_configure(p: argparse.ArgumentParser) -> None:
    from podshim.host.uvm.guest import command  # standard library only at import

    command.configure(p)


def _daemon(args: argparse.Namespace) -> int:
    from podshim.shim import proxyd

    return proxyd.run(args)


def _daemon_configure(p: argparse.ArgumentParser) -> None:
    # here, not in podshim.shim.proxyd: building the parser must import nothing heavy
    p.add_argument("--address", required=True, help="containerd's gRPC socket path")
    p.add_argument(
        "--socket",
        default="",
        help="the controller socket, the proxy plugin's address in containerd's config "
        "(default: <run dir>/sandbox.sock, i.e. /run/podshim/sandbox.sock)",
    )
    p.add_argument("--config", default="", help="podshim's config file (TOML) for every pod")
    p.add_argument("--name", default="podshim", help="the proxy plugin's name (for status)")
    p.add_argument("--log", default="", help="append the log to this file (default: stderr)")
    p.add_argument("--debug", action="store_true", help="debug logging")


COMMANDS: tuple[Command, ...] = (
    Command(
        "check",
        "can this machine run podshim, and is it registered with containerd?",
        _admin("check"),
        description=(
            "Check containerd (version, CRI plugin, podshim's handlers and shim binary), "
            "runc/crun, cgroups, the kernel features podshim uses and podshim-init. One "
            "line each: ok, warn or fail with a hint; exit 1 only on a fail (something "
            "that stops pods)."
        ),
        configure=_admin_configure("check"),
    ),
    Command(
        "daemon",
        "run the resident sandbox controller of a containerd 2.x proxy plugin",
        _daemon,
        description=(
            "Serve containerd 2.x's sandbox Controller (gRPC, for [proxy_plugins.<name>] "
            'type = "sandbox" and a CRI handler with sandboxer = "<name>") and the Task v3 '
            "API of every pod of one containerd, in this one process: no shim process per "
            "pod or per container. Run it under a service manager; at start it reports "
            "the tasks a previous daemon lost as exited and cleans them up. Needs grpcio."
        ),
        configure=_daemon_configure,
    ),
    Command(
        "demo",
        "smoke-run podshim against a private, embedded containerd",
        _demo,
        description=(
            "Start a private containerd (own root, state and socket; the machine's containerd "
            "is not touched), show podshim's ttrpc client talking to it and to the shims, run "
            "a busybox container through podshim (io.containerd.podshim.v1) and runc, then "
            "tear everything down. Needs root, containerd, ctr, runc and busybox-static, "
            "and the test lab (pip install ./lab from a podshim checkout)."
        ),
    ),
    Command(
        "diag",
        "inspect live podshim shims: list, exec in a pod, stacks, tasks, share, stats",
        _diag,
        description=(
            "Talk to live podshim shims (like hcsshim's shimdiag): list them, run a command "
            "in a pod's namespaces and sandbox cgroup without any container image, dump a "
            "shim's stacks, show its own view of its tasks, share a path, read statistics. "
            "Pods are named by a unique prefix of their id."
        ),
        configure=_diag_configure,
    ),
    Command(
        "install",
        "register podshim with this machine's containerd (handlers podshim, podshim-node)",
        _admin("install"),
        description=(
            "Link the shim binary onto containerd's PATH, write podshim's config files and a "
            "containerd drop-in with the runtime handlers podshim and podshim-node, add it to "
            "the imports of containerd's config (after a backup), and record every change "
            "for podshim uninstall. --dry-run prints the changes only. Idempotent."
        ),
        configure=_admin_configure("install"),
    ),
    Command(
        "node-install",
        "the Kubernetes node installer: copy this podshim bundle to the host and install it",
        _admin("node_install"),
        description=(
            "Run by deploy/'s DaemonSet, in a container holding a relocatable podshim bundle "
            "(deploy/build_bundle.py), with the host's / at --host-root: copy the bundle to "
            "<prefix>/<version> on the host, run that copy's podshim install and check in the "
            "host's namespaces (nsenter), remove older copies no process runs from, label "
            "the node. --cleanup reverses it."
        ),
        configure=_admin_configure("node_install"),
    ),
    Command(
        "uninstall",
        "undo exactly what podshim install did",
        _admin("uninstall"),
        description=(
            "Undo the changes recorded by podshim install; anything that changed since "
            "(or that the record names but podshim did not write) is left alone and "
            "reported. Idempotent."
        ),
        configure=_admin_configure("uninstall"),
    ),
    Command(
        "uvm",
        "the utility VM of VM pods: prepare its guest image",
        _uvm,
        description=(
            "podshim uvm prepare: build the guest kernel (from Debian's linux-source-6.1, "
            "once, ~4 min on 2 cores) and initramfs of VM pods into /var/lib/podshim/uvm "
            "and probe whether KVM can boot it (else TCG). Does nothing when current."
        ),
        configure=_uvm_configure,
    ),
    Command("version", "print podshim's version", _version),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="podshim",
        description="podshim operator tool (the shim itself is containerd-shim-podshim-v1).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(
            command.name, help=command.help, description=command.description or command.help
        )
        if command.configure is not None:
            command.configure(p)
        p.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point: parse ``argv`` and run the subcommand."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("podshim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
