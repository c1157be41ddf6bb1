"""How tasks are grouped into shims, and where each shim's socket is.

Standard library only: used on the ``start`` path.
"""

from __future__ import annotations

import os

from podshim import rundir
from podshim.oci import bundle as files
from podshim.oci.ids import GROUP_ANNOTATION, SANDBOX_ID_ANNOTATION, valid_id


def read_annotations(bundle: str) -> dict[str, str]:
    """Annotations of ``<bundle>/config.json`` ({} when unreadable: start must not fail
    here; Create reports a bad spec with a proper error)."""
    import json

    try:
        with open(os.path.join(bundle, files.CONFIG), "rb") as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return {}
    ann = spec.get("annotations") if isinstance(spec, dict) else None
    return {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}


def bundle_group(task_id: str, bundle: str) -> str:
    """:func:`group_id` of a bundle, fast: containerd writes config.json compactly, so the
    two annotations are looked up as ``"key":"value"`` in the raw bytes (a key followed by
    ``":"`` can only be a key: quotes inside JSON strings are escaped). Anything unusual
    (spacing, escapes, an invalid id) falls back to a full JSON parse."""
    try:
        with open(os.path.join(bundle, files.CONFIG), "rb") as f:
            raw = f.read()
    except OSError:
        return task_id
    for key in (GROUP_ANNOTATION, SANDBOX_ID_ANNOTATION):
        k = key.encode()
        pat = b'"' + k + b'":"'
        i = raw.find(pat)
        if i >= 0:
            start = i + len(pat)
            value = raw[start : raw.find(b'"', start)].decode(errors="replace")
            if valid_id(value):
                return value
            return group_id(task_id, read_annotations(bundle))
        if b'"' + k + b'"' in raw:  # present, but not in the compact form
            return group_id(task_id, read_annotations(bundle))
    return task_id


def group_id(task_id: str, annotations: dict[str, str]) -> str:
    """The shim a task belongs to: podshim group annotation, else the CRI sandbox id,
    else the task itself."""
    return annotations.get(GROUP_ANNOTATION) or annotations.get(SANDBOX_ID_ANNOTATION) or task_id


def socket_path(address: str, namespace: str, group: str) -> str:
    """``<run dir>/s/<sha256(address/namespace/group)>``: unique per containerd
    instance, namespace and group, and short enough for sun_path."""
    digest = rundir.digest(f"{address}/{namespace}/{group}")
    return os.path.join(rundir.sockets_dir(), digest)


def socket_address(path: str) -> str:
    return "unix://" + path
