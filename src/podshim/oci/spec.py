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
    return spec


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
    nss = spec.get("linux", {}).get("namespaces", []) or []
    return any(ns.get("type") == "pid" and not ns.get("path") for ns in nss)
