"""Entry point of the Python shim (``containerd-shim-podshim-v1-py``, which the launcher
``containerd-shim-podshim-v1`` execs for everything but its fast ``start`` and ``delete``).

This module is imported for every ``start`` and ``delete`` containerd runs, so it imports
only what each action needs, late (the function-level imports below are there for speed).
"""

from __future__ import annotations

import sys

from podshim.shim.flags import FlagError, parse

RUNTIME_TYPE = "io.containerd.podshim.v1"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        flags = parse(args)
    except FlagError as exc:
        print(f"containerd-shim-podshim-v1: {exc}", file=sys.stderr)
        return 2
    if flags.version:
        from podshim import __version__

        print(f"containerd-shim-podshim-v1:\n  Version: {__version__}\n  Runtime: {RUNTIME_TYPE}")
        return 0
    if flags.info:  # after -v, before any action, as containerd's own shims
        from podshim.shim.info import info

        return info(flags)
    if flags.action == "start":
        from podshim.shim.start import start

        return start(flags)
    if flags.action == "delete":
        from podshim.shim.delete import delete

        return delete(flags)
    if flags.action == "zygote":
        from podshim.shim.zygote_server import run

        return run(flags)
    if flags.action == "":
        from podshim.shim.spawn import name_process

        name_process()  # a daemon started as `python -Pm podshim.shim.main` (self_command)
        from podshim.shim.daemon import serve

        return serve(flags)
    print(f"containerd-shim-podshim-v1: unknown action {flags.action!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
