"""The namespace rewrite fails closed."""

from __future__ import annotations

from typing import Any

import pytest

from podshim import errors as errdefs
from podshim.host import rewrite

P = 777


def spec(*nss: dict[str, str]) -> dict[str, Any]:
    return {"process": {}, "root": {}, "linux": {"namespaces": list(nss)}}


def run(s: dict[str, Any], **kw: Any) -> list[dict[str, str]]:
    args: dict[str, Any] = {
        "sandbox_pid": P,
        "sandbox_types": {"network", "ipc", "uts", "pid"},
        "pod_paths": {
            "network": "/run/netns/cni-1",
            "ipc": "/pins/ipc",
            "uts": "/pins/uts",
            "pid": "/proc/55/ns/pid",
        },
        "pod_pids": {900},
        "host_kind": "namespaces",
    }
    args.update(kw)
    out: list[dict[str, str]] = rewrite.rewrite(s, **args)["linux"]["namespaces"]
    return out


def test_cri_workload_paths_become_the_pods() -> None:
    s = spec(
        {"type": "pid"},
        {"type": "ipc", "path": f"/proc/{P}/ns/ipc"},
        {"type": "uts", "path": f"/proc/{P}/ns/uts"},
        {"type": "mount"},
        {"type": "network", "path": f"/proc/{P}/ns/net"},
    )
    assert run(s) == [
        {"type": "pid"},
        {"type": "ipc", "path": "/pins/ipc"},
        {"type": "uts", "path": "/pins/uts"},
        {"type": "mount"},
        {"type": "network", "path": "/run/netns/cni-1"},
    ]
    assert rewrite.sandbox_refs(s, P) == {"ipc", "uts", "network"}
    assert s["linux"]["namespaces"][1]["path"] == f"/proc/{P}/ns/ipc"  # input untouched


def test_host_namespaces_when_the_sandbox_left_them_out() -> None:
    s = spec(
        {"type": "network", "path": f"/proc/{P}/ns/net"},
        {"type": "ipc", "path": f"/proc/{P}/ns/ipc"},
    )
    assert run(s, sandbox_types={"ipc"}) == [{"type": "ipc", "path": "/pins/ipc"}]


def test_missing_pod_namespace_is_refused_not_the_hosts() -> None:
    s = spec({"type": "ipc", "path": f"/proc/{P}/ns/ipc"})
    with pytest.raises(errdefs.InvalidArgument, match="pod host 'none' has no ipc namespace"):
        run(s, pod_paths={"ipc": None}, host_kind="none")


def test_debug_target_pid_of_a_pod_container_is_accepted() -> None:
    s = spec({"type": "pid", "path": "/proc/900/ns/pid"})
    assert run(s) == [{"type": "pid", "path": "/proc/900/ns/pid"}]


@pytest.mark.parametrize(
    "ns",
    [
        {"type": "network", "path": "/proc/1/ns/net"},
        {"type": "pid", "path": "/proc/1/ns/pid"},
        {"type": "ipc", "path": "/proc/900/ns/ipc"},  # only pid may target a container
        {"type": "network", "path": "/var/run/netns/other"},
        {"type": "network", "path": f"/proc/{P}/ns/ipc"},  # mismatched kind
        {"type": "uts", "path": f"/proc/{P}/../1/ns/uts"},
    ],
)
def test_foreign_paths_are_refused(ns: dict[str, str]) -> None:
    with pytest.raises(errdefs.InvalidArgument):
        run(spec(ns))
