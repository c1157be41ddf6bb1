"""Where podshim keeps its sockets and state, and how tasks are grouped into shims.

Standard library only: used on the ``start`` path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

#: podshim's own directory under /run (sockets, later the diag registry and pins).
RUN_DIR = os.environ.get("PODSHIM_RUN_DIR", "/run/podshim")
SOCKET_DIR = os.path.join(RUN_DIR, "s")

#: Annotation grouping tasks into one shim (like runc's ``io.containerd.runc.v2.group``).
GROUP_ANNOTATION = "io.containerd.podshim.v1.group"
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"

# containerd's identifier rule (pkg/identifiers): alphanumerics joined by single . _ -
_ID_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
MAX_ID_LEN = 76


def valid_id(value: str) -> bool:
    """True for a containerd identifier: never contains ``/``, ``..`` or spaces."""
    return len(value) <= MAX_ID_LEN and bool(_ID_RE.match(value))


def read_annotations(bundle: str) -> dict[str, str]:
    """Annotations of ``<bundle>/config.json`` ({} when unreadable: start must not fail
    here; Create reports a bad spec with a proper error)."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return {}
    ann = spec.get("annotations") if isinstance(spec, dict) else None
    return {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}


def group_id(task_id: str, annotations: dict[str, str]) -> str:
    """The shim a task belongs to: podshim group annotation, else the CRI sandbox id,
    else the task itself."""
    return annotations.get(GROUP_ANNOTATION) or annotations.get(SANDBOX_ID_ANNOTATION) or task_id


def socket_path(address: str, namespace: str, group: str) -> str:
    """``/run/podshim/s/<sha256(address/namespace/group)>``: unique per containerd
    instance, namespace and group, and short enough for sun_path."""
    digest = hashlib.sha256(f"{address}/{namespace}/{group}".encode()).hexdigest()
    return os.path.join(SOCKET_DIR, digest)


def socket_address(path: str) -> str:
    return "unix://" + path
