"""The namespace rewrite of workload specs, failing closed. Pure functions.

CRI writes ``/proc/<sandbox pid>/ns/<t>`` into workload specs. For each namespace entry:

* ``/proc/P/ns/<t>`` (P = the sandbox's pid) becomes the pod's own namespace of that type;
  when the sandbox spec left type ``<t>`` out (host network/IPC/PID pods) the entry is
  dropped, so the workload uses the host's, as runc would; when the sandbox spec asked
  for ``<t>`` but the pod host has none, the workload is refused (never silently the
  host's);
* ``/proc/<pid of a running container of this pod>/ns/pid`` is kept (``kubectl debug
  --target``);
* any other path is refused with InvalidArgument and no container is created.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Mapping
from typing import Any

from podshim import errors as errdefs

#: OCI namespace type -> the file name under /proc/<pid>/ns
NS_FILE = {
    "network": "net",
    "ipc": "ipc",
    "uts": "uts",
    "pid": "pid",
    "mount": "mnt",
    "user": "user",
    "cgroup": "cgroup",
    "time": "time",
}

_PROC_NS = re.compile(r"^/proc/(\d+)/ns/([a-z_]+)$")


def namespace_types(spec: Mapping[str, Any]) -> set[str]:
    """The namespace types a spec lists."""
    nss = (spec.get("linux") or {}).get("namespaces") or []
    return {str(ns.get("type")) for ns in nss if isinstance(ns, dict)}


def sandbox_refs(spec: Mapping[str, Any], sandbox_pid: int) -> set[str]:
    """The namespace types a workload spec takes from ``/proc/<sandbox_pid>/ns``."""
    out = set()
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        m = _PROC_NS.match(str(ns.get("path") or ""))
        if m and int(m.group(1)) == sandbox_pid:
            out.add(str(ns.get("type")))
    return out


def rewrite(
    spec: Mapping[str, Any],
    *,
    sandbox_pid: int,
    sandbox_types: Collection[str],
    pod_paths: Mapping[str, str | None],
    pod_pids: Collection[int],
    host_kind: str,
) -> dict[str, Any]:
    """Return a copy of ``spec`` with its namespace paths rewritten (see module doc).

    Args:
        sandbox_pid: the pid the sandbox reports (P).
        sandbox_types: namespace types listed in the sandbox's own spec.
        pod_paths: for each type referenced through P, the pod's path or None.
        pod_pids: pids of running containers of this pod (targets for ``pid``).
        host_kind: for error messages.

    Raises:
        InvalidArgument: a path that is not the pod's, a malformed entry, or a type the
            sandbox asked for that the pod host does not provide.
    """
    out = copy.deepcopy(dict(spec))
    linux = out.get("linux") or {}
    kept = []
    for ns in linux.get("namespaces") or []:
        if not isinstance(ns, dict) or "type" not in ns:
            raise errdefs.InvalidArgument(f"invalid namespace entry {ns!r}")
        ns_type, path = str(ns["type"]), str(ns.get("path") or "")
        if not path:
            kept.append(ns)
            continue
        m = _PROC_NS.match(path)
        if m is None:
            raise errdefs.InvalidArgument(f"{ns_type} namespace {path!r} is not one of this pod's")
        pid, file = int(m.group(1)), m.group(2)
        if NS_FILE.get(ns_type) != file:
            raise errdefs.InvalidArgument(
                f"{ns_type} namespace path {path!r} names a {file} namespace"
            )
        if pid == sandbox_pid:
            if ns_type not in sandbox_types:
                continue  # the pod uses the host's: so does the workload
            target = pod_paths.get(ns_type)
            if target is None:
                raise errdefs.InvalidArgument(
                    f"pod host {host_kind!r} has no {ns_type} namespace for {path!r}"
                )
            kept.append({**ns, "path": target})
            continue
        if ns_type == "pid" and pid in pod_pids:
            kept.append(ns)
            continue
        raise errdefs.InvalidArgument(
            f"{ns_type} namespace {path!r} belongs to pid {pid}, which is not in this pod"
        )
    if linux:
        linux["namespaces"] = kept
    return out
