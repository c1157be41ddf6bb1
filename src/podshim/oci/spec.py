"""Reading and writing a bundle's OCI spec, and the few facts podshim takes from it."""

from __future__ import annotations

import json
import os
from typing import Any

from podshim import errors as errdefs
from podshim.oci import bundle as files

Spec = dict[str, Any]


def load_spec(bundle: str) -> Spec:
    """Read ``<bundle>/config.json``. Raises InvalidArgument naming the problem."""
    path = os.path.join(bundle, files.CONFIG)
    try:
        with open(path, "rb") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise errdefs.InvalidArgument(f"bundle {bundle}: missing config.json") from None
    except (OSError, ValueError) as exc:
        raise errdefs.InvalidArgument(f"{path}: invalid OCI spec: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("process"), dict):
        raise errdefs.InvalidArgument(f"{path}: invalid OCI spec: no process")
    if not isinstance(spec.get("root"), dict):
        raise errdefs.InvalidArgument(f"{path}: invalid OCI spec: no root")
    check_shapes(spec, path)
    return spec


def check_shapes(spec: Spec, where: str) -> None:
    """The parts podshim reads must have the types the OCI spec gives them; ``null``
    reads as absent (as Go's decoder, hence runc, reads it). InvalidArgument otherwise,
    so no later reader meets a surprise (an exit monitor that raised on ``"linux":
    null`` once left a task RUNNING for ever)."""

    def bad(what: str) -> errdefs.InvalidArgument:
        return errdefs.InvalidArgument(f"{where}: invalid OCI spec: {what}")

    for key in ("linux", "annotations"):
        if key in spec and spec[key] is None:
            del spec[key]
        elif key in spec and not isinstance(spec[key], dict):
            raise bad(f"{key} must be an object")
    ann = spec.get("annotations") or {}
    if not all(isinstance(v, str) for v in ann.values()):
        raise bad("annotation values must be strings")
    process = spec["process"]
    args = process.get("args")
    if args is not None and not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        raise bad("process.args must be a list of strings")
    if not isinstance(process.get("terminal", False), bool | None):
        raise bad("process.terminal must be a boolean")
    linux = spec.get("linux") or {}
    nss = linux.get("namespaces")
    if nss is None:
        return
    if not isinstance(nss, list):
        raise bad("linux.namespaces must be a list")
    for ns in nss:
        if not isinstance(ns, dict) or not isinstance(ns.get("type"), str):
            raise bad(f"linux.namespaces entry {ns!r} has no type")
        if not isinstance(ns.get("path") or "", str):
            raise bad(f"linux.namespaces entry {ns!r}: path must be a string")


def write_spec(bundle: str, spec: Spec) -> None:
    """Replace ``<bundle>/config.json`` atomically (the runtime reads the bundle's file)."""
    path = os.path.join(bundle, files.CONFIG)
    tmp = path + ".podshim"
    with open(tmp, "w") as f:
        json.dump(spec, f)
    os.replace(tmp, path)


def spec_annotations(spec: Spec) -> dict[str, str]:
    """The spec's annotations as strings ({} when absent or malformed)."""
    ann = spec.get("annotations") or {}
    return {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}


def cgroups_path(spec: Spec) -> str:
    """``linux.cgroupsPath`` ("" when absent)."""
    linux = spec.get("linux")
    value = linux.get("cgroupsPath") if isinstance(linux, dict) else None
    return value if isinstance(value, str) else ""


def private_pid_ns(spec: Spec) -> bool:
    """Whether the container gets a PID namespace of its own (one without a path)."""
    linux = spec.get("linux")
    nss = (linux.get("namespaces") if isinstance(linux, dict) else None) or []
    return any(
        isinstance(ns, dict) and ns.get("type") == "pid" and not ns.get("path") for ns in nss
    )
