"""A pod's description from CRI's ``PodSandboxConfig``: the Sandbox API's way in.

With ``sandboxer = "shim"`` containerd 2.x writes no ``config.json`` for the sandbox:
CRI's ``PodSandboxConfig`` arrives in ``CreateSandboxRequest.options`` with the network
namespace CRI made. :func:`pod_spec` turns the two into the OCI-shaped description the
seed's sandbox task reads from its bundle, as containerd's own ``podsandbox`` controller
would have written it for the pause container (``sandboxContainerSpec`` in containerd
2.1): the same namespaces, hostname, sysctls, cgroup path, CPU shares, OOM score and CRI
annotations. So one pod model (:class:`~podshim.pod.pod.Pod` and its host) serves both
front doors, and the host kind validates the result as it validates a sandbox's spec.

What podshim cannot honour is refused here, before anything is made (InvalidArgument):
a pod user namespace, and a namespace mode that is none of CRI's.
"""

from __future__ import annotations

import os
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from podshim import errors as errdefs
from podshim.api.cri.v1 import pod_pb2 as cri
from podshim.oci.ids import CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION
from podshim.oci.spec import Spec

#: the type CRI's options Any carries (typeurl: the message's full name, no prefix)
POD_CONFIG_TYPE = "runtime.v1.PodSandboxConfig"
#: CRI's annotations on a sandbox (containerd's pkg/cri/annotations)
SANDBOX_NAME_ANNOTATION = "io.kubernetes.cri.sandbox-name"
SANDBOX_NAMESPACE_ANNOTATION = "io.kubernetes.cri.sandbox-namespace"
SANDBOX_UID_ANNOTATION = "io.kubernetes.cri.sandbox-uid"
SANDBOX_LOG_DIR_ANNOTATION = "io.kubernetes.cri.sandbox-log-directory"
#: what CRI gives the pause container (customopts.WithDefaultSandboxShares, and
#: defaultSandboxOOMAdj); podshim's PID init takes the OOM score, raised only
SANDBOX_CPU_SHARES = 2
SANDBOX_OOM_SCORE_ADJ = -998

_MODES: dict[int, str] = {
    cri.POD: "POD",
    cri.CONTAINER: "CONTAINER",
    cri.NODE: "NODE",
    cri.TARGET: "TARGET",
}


def parse_options(options: any_pb2.Any | None, sandbox_id: str) -> cri.PodSandboxConfig:
    """The PodSandboxConfig in CreateSandbox's ``options`` (an empty one when there are
    none: a pod with every namespace of its own and nothing else).

    Raises:
        InvalidArgument: options of another type, or bytes that do not parse.
    """
    config = cri.PodSandboxConfig()
    if options is None or not options.type_url:
        return config
    name = options.type_url.rsplit("/", 1)[-1]
    if name != POD_CONFIG_TYPE:
        raise errdefs.InvalidArgument(
            f"sandbox {sandbox_id}: options of type {options.type_url!r}, "
            f"podshim reads {POD_CONFIG_TYPE}"
        )
    try:
        config.ParseFromString(options.value)
    except DecodeError as exc:
        raise errdefs.InvalidArgument(f"sandbox {sandbox_id}: bad {name}: {exc}") from None
    return config


def _mode(value: int, what: str, sandbox_id: str) -> str:
    mode = _MODES.get(int(value))
    if mode is None:
        raise errdefs.InvalidArgument(
            f"sandbox {sandbox_id}: unknown {what} namespace mode {value}"
        )
    return mode


def cgroups_path_for(parent: str, sandbox_id: str) -> str:
    """CRI's ``getCgroupsPath``: a ``.slice`` parent makes the systemd form
    ``<slice>:cri-containerd:<id>``, any other parent ``<parent>/<id>``."""
    if not parent:
        return ""
    base = os.path.basename(parent.rstrip("/")) or parent
    if base.endswith(".slice"):
        return f"{base}:cri-containerd:{sandbox_id}"
    return os.path.join(parent, sandbox_id)


def _namespaces(opts: cri.NamespaceOption, netns_path: str, sandbox_id: str) -> list[Any]:
    network = _mode(opts.network, "network", sandbox_id)
    pid = _mode(opts.pid, "pid", sandbox_id)
    ipc = _mode(opts.ipc, "ipc", sandbox_id)
    if opts.HasField("userns_options"):
        userns = _mode(opts.userns_options.mode, "user", sandbox_id)
        if userns != "NODE":
            raise errdefs.InvalidArgument(
                f"sandbox {sandbox_id}: podshim cannot give a pod a user namespace (mode {userns})"
            )
    # as CRI's sandboxContainerSpec: the pod has a namespace of its own unless NODE
    nss: list[dict[str, str]] = [{"type": "mount"}]
    if network != "NODE":
        net = {"type": "network"}
        if netns_path:
            net["path"] = netns_path
        nss += [net, {"type": "uts"}]
    elif netns_path:
        raise errdefs.InvalidArgument(
            f"sandbox {sandbox_id}: host network, yet network namespace {netns_path}"
        )
    if pid != "NODE":
        nss.append({"type": "pid"})
    if ipc != "NODE":
        nss.append({"type": "ipc"})
    return nss


def pod_spec(sandbox_id: str, config: cri.PodSandboxConfig, netns_path: str) -> Spec:
    """The pod's description in the shape of a sandbox ``config.json`` (module doc).

    Raises:
        InvalidArgument: a user namespace, or an unknown namespace mode.
    """
    linux_cfg = config.linux
    sc = linux_cfg.security_context
    annotations = dict(config.annotations)
    meta = config.metadata
    annotations.update(
        {
            CONTAINER_TYPE_ANNOTATION: "sandbox",
            SANDBOX_ID_ANNOTATION: sandbox_id,
            SANDBOX_NAME_ANNOTATION: meta.name,
            SANDBOX_NAMESPACE_ANNOTATION: meta.namespace,
            SANDBOX_UID_ANNOTATION: meta.uid,
            SANDBOX_LOG_DIR_ANNOTATION: config.log_directory,
        }
    )
    linux: dict[str, Any] = {
        "namespaces": _namespaces(sc.namespace_options, netns_path, sandbox_id),
    }
    if linux_cfg.sysctls:
        linux["sysctl"] = dict(sorted(linux_cfg.sysctls.items()))
    cgroups_path = cgroups_path_for(linux_cfg.cgroup_parent, sandbox_id)
    if cgroups_path:  # no parent: no sandbox cgroup (CRI's pause would get containerd's)
        linux["cgroupsPath"] = cgroups_path
        linux["resources"] = {"cpu": {"shares": SANDBOX_CPU_SHARES}}
    user: dict[str, Any] = {"uid": 0, "gid": 0}
    if sc.HasField("run_as_user"):
        user["uid"] = sc.run_as_user.value
    if sc.HasField("run_as_group"):
        user["gid"] = sc.run_as_group.value
    if sc.supplemental_groups:
        user["additionalGids"] = list(sc.supplemental_groups)
    spec: Spec = {
        "ociVersion": "1.0.2",
        "process": {"user": user, "args": [], "cwd": "/", "oomScoreAdj": SANDBOX_OOM_SCORE_ADJ},
        "root": {"path": "rootfs", "readonly": True},
        "annotations": annotations,
        "linux": linux,
    }
    if config.hostname:
        spec["hostname"] = config.hostname
    return spec
