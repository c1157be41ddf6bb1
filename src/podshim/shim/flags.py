"""Go-style command-line flags, as containerd passes them to a shim.

containerd runs ``containerd-shim-podshim-v1 -namespace ns -address /run/x.sock
-publish-binary /usr/bin/containerd -id t1 [-debug] start`` (and ``... -bundle B delete``);
containerd 2.x also runs ``containerd-shim-podshim-v1 -info`` (a flag, not an action).
Go's ``flag`` package accepts ``-x v``, ``-x=v``, ``--x v`` and ``--x=v``; boolean flags
take no value unless written ``-x=true``. Parsing stops at the first non-flag argument,
which is the action. Pure code, standard library only: this runs on the ``start`` path.
"""

from __future__ import annotations

BOOL_FLAGS = frozenset({"debug", "v", "info"})
VALUE_FLAGS = frozenset(
    {"namespace", "id", "socket", "bundle", "address", "publish-binary", "log-format", "node"}
)


class FlagError(ValueError):
    """The command line does not parse; the message says why."""


class Flags:
    """The parsed command line (a plain class: ``dataclasses`` costs ~8 ms to import)."""

    def __init__(self) -> None:
        self.namespace = ""
        self.id = ""
        self.socket = ""
        self.bundle = ""
        self.address = ""
        self.publish_binary = ""
        #: a node-scope daemon's key (``start`` passes it; empty for a pod-scope shim)
        self.node = ""
        self.debug = False
        self.version = False
        #: ``-info``: print the RuntimeInfo protobuf (options read from stdin) and exit
        self.info = False
        self.action = ""  # "start", "delete" or "" (serve)
        self.args: tuple[str, ...] = ()


def parse(argv: list[str]) -> Flags:
    """Parse ``argv`` (without the program name)."""
    f = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in BOOL_FLAGS:
            on = value.lower() in ("", "1", "t", "true") if eq else True
            if eq and value.lower() not in ("", "0", "1", "t", "f", "true", "false"):
                raise FlagError(f"invalid boolean value {value!r} for -{name}")
            if name == "v":
                f.version = on
            elif name == "info":
                f.info = on
            else:
                f.debug = on
        elif name in VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise FlagError(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(f, name.replace("-", "_"), value)
        else:
            raise FlagError(f"flag provided but not defined: -{name}")
        i += 1
    rest = argv[i:]
    if rest:
        f.action, f.args = rest[0], tuple(rest[1:])
    return f
