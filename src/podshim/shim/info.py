"""``containerd-shim-podshim-v1 -info``: what the shim and its OCI runtime support.

containerd 2.x runs the shim binary with ``-info`` (its introspection service's
``PluginInfo`` for a runtime: CRI asks at start-up for each handler, and task Create asks
before it runs a container with idmapped mounts). It writes the handler's runtime options
to stdin, a serialized ``google.protobuf.Any`` (or nothing), and reads one
``containerd.types.RuntimeInfo`` from stdout: the runtime's name and version, the options
echoed, and in ``features`` the OCI runtime's own ``features`` document, JSON in an Any
of type :data:`FEATURES_TYPE_URL`. CRI turns on recursive read-only mounts for a handler
whose features list the mount option ``rro`` (and user namespaces for ``user`` with
idmapped mounts).

The OCI runtime is the one a Create with the same options would run (podshim's
``runtime`` setting, or ``binary_name`` of runc options). As containerd's runc shim: a
runtime binary that is not there, or options that do not decode, fail ``-info`` (exit 1,
the reason on stderr); a runtime without a ``features`` command (crun 1.8) leaves
``features`` unset.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import BinaryIO

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from podshim import RUNTIME_TYPE, __version__
from podshim import errors as errdefs
from podshim.api.types import introspection_pb2
from podshim.oci import runc
from podshim.service import config
from podshim.shim.flags import Flags

#: the type URL containerd registers for runtime-spec's ``features.Features`` (typeurl:
#: a Go type that is no protobuf travels as JSON)
FEATURES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"


def read_options(data: bytes) -> any_pb2.Any | None:
    """The options Any containerd wrote to stdin; ``None`` for none.

    Raises:
        InvalidArgument: the bytes are no Any.
    """
    if not data:
        return None
    opts = any_pb2.Any()
    try:
        opts.ParseFromString(data)
    except DecodeError as exc:
        raise errdefs.InvalidArgument(f"failed to read runtime options: {exc}") from None
    return opts


def runtime_binary(options: any_pb2.Any | None) -> str:
    """The absolute path of the OCI runtime a Create with ``options`` would run.

    Raises:
        InvalidArgument: options podshim does not know, or a bad podshim config.
        FailedPrecondition: the runtime binary is not there.
    """
    binary = config.from_options(options).runtime.binary
    found = shutil.which(binary)
    if found is None:
        raise errdefs.FailedPrecondition(f"failed to look up the path of {binary!r}")
    return os.path.abspath(found)


def features_any(binary: str) -> any_pb2.Any | None:
    """The runtime's features as containerd decodes them, or ``None`` when the runtime
    cannot say (no ``features`` command, a failure, no JSON object)."""
    try:
        doc = runc.features(binary)
    except errdefs.ShimError:
        return None
    value = json.dumps(doc, separators=(",", ":")).encode()
    return any_pb2.Any(type_url=FEATURES_TYPE_URL, value=value)


def runtime_info(stdin: bytes) -> introspection_pb2.RuntimeInfo:
    """The RuntimeInfo for the options in ``stdin`` (see the module doc)."""
    options = read_options(stdin)
    binary = runtime_binary(options)
    out = introspection_pb2.RuntimeInfo(
        name=RUNTIME_TYPE, version=introspection_pb2.RuntimeVersion(version=__version__)
    )
    if options is not None:
        out.options.CopyFrom(options)
    feats = features_any(binary)
    if feats is not None:
        out.features.CopyFrom(feats)
    return out


def _read_all(stream: BinaryIO) -> bytes:
    """All of stdin, as Go's ``io.ReadAll``; nothing from a terminal or a closed fd."""
    try:
        if stream.isatty():
            return b""
        return stream.read()
    except (OSError, ValueError):
        return b""


def info(flags: Flags) -> int:
    """Run ``-info``: RuntimeInfo on stdout (exit 0), or the reason on stderr (exit 1)."""
    del flags  # -info takes nothing but stdin; other flags (-debug...) change nothing
    try:
        data = runtime_info(_read_all(sys.stdin.buffer)).SerializeToString()
    except errdefs.ShimError as exc:
        print(f"{RUNTIME_TYPE}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0
