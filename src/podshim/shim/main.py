"""Entry point of the Python shim (``containerd-shim-podshim-v1-py``, which the launcher
``containerd-shim-podshim-v1`` execs for everything but its fast ``start`` and ``delete``).

This module is imported for every ``start`` and ``delete`` containerd runs, so it imports
only what each action needs, late (the function-level imports below are there for speed).
"""

from __future__ import annotations

import os
import sys

from podshim.shim.flags import FlagError, parse


def without_tls(environ: dict[str, str] | None = None) -> bool:
    """Keep a serving process (daemon or zygote) from loading OpenSSL: the shim speaks no
    TLS, but asyncio imports ``ssl`` if it can (~1.3 MB of private memory per process).
    Not when any ``OTEL_*`` variable is set (tracing may export over HTTPS). True when
    ``ssl`` is kept out."""
    env = os.environ if environ is None else environ
    if "ssl" in sys.modules or any(k.startswith("OTEL_") for k in env):
        return False
    sys.modules["ssl"] = None  # type: ignore[assignment]  # import ssl: ImportError
    return True



def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        flags = parse(args)
    except FlagError as exc:
        print(f"containerd-shim-podshim-v1: {exc}", file=sys.stderr)
        return 2
    if flags.version:
        from podshim import RUNTIME_TYPE, __version__

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
        without_tls()
        from podshim.shim.zygote_server import run

        return run(flags)
    if flags.action == "":
        from podshim.shim.spawn import name_process

        name_process()  # a daemon started as `python -Pm podshim.shim.main` (self_command)
        without_tls()
        from podshim.shim.daemon import serve

        return serve(flags)
    print(f"containerd-shim-podshim-v1: unknown action {flags.action!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
