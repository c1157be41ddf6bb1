"""A small, typed, synchronous CRI (``runtime.v1``) client for podshim's tests.

It talks gRPC over containerd's unix socket (the RuntimeService and the ImageService
share it), one deadline per call, and turns gRPC failures into :class:`CriError`
(code name + the server's message, which carries containerd's error chain)::

    with CriClient(lab.address) as cri:
        config = cri.pod_config("web", hostname="web")
        pod = cri.run_pod_config(config, runtime_handler="podshim")
        cid = cri.create_container(pod, config, "c1", busybox, ["sleep", "3600"])
        cri.start_container(cid)
        code, out, err = cri.exec_sync(cid, ["hostname"])

Verbose status calls are parsed: :meth:`CriClient.pod_status` and
:meth:`CriClient.container_status` expose the pid and the OCI runtime spec containerd's
CRI plugin reports in its ``info`` JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

import grpc  # type: ignore[import-untyped,unused-ignore]  # typed only with types-grpcio

from podshim_lab.cri import api_pb2 as api
from podshim_lab.cri import api_pb2_grpc as api_grpc

__all__ = [
    "DEFAULT_TIMEOUT",
    "ContainerInfo",
    "CriClient",
    "CriError",
    "ExecResult",
    "PidMode",
    "PodInfo",
    "api",
]

#: per-call deadline (seconds) unless the caller says otherwise
DEFAULT_TIMEOUT = 120.0

PidMode = Literal["POD", "CONTAINER", "NODE", "TARGET"]

_Req = TypeVar("_Req", contravariant=True)
_Resp = TypeVar("_Resp", covariant=True)


class _Unary(Protocol[_Req, _Resp]):
    def __call__(self, request: _Req, timeout: float | None = ...) -> _Resp: ...


class CriError(RuntimeError):
    """A CRI call failed. ``code`` is the gRPC status name (``"UNKNOWN"``, ...)."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"{method}: {code}: {details}")
        self.method = method
        self.code = code
        self.details = details


class ExecResult(NamedTuple):
    """What ExecSync returned."""

    exit_code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class PodInfo:
    """PodSandboxStatus, flattened. ``state`` is ``"READY"`` or ``"NOTREADY"``."""

    id: str
    state: str
    ip: str
    handler: str
    #: the sandbox task's pid as CRI sees it (verbose info; 0 when not reported)
    pid: int
    #: the parsed verbose ``info`` JSON ({} without verbose)
    info: Mapping[str, Any] = field(default_factory=dict)
    raw: api.PodSandboxStatusResponse = field(default_factory=api.PodSandboxStatusResponse)

    @property
    def ready(self) -> bool:
        return self.state == "READY"


@dataclass(frozen=True)
class ContainerInfo:
    """ContainerStatus, flattened. ``state`` is CREATED, RUNNING, EXITED or UNKNOWN."""

    id: str
    state: str
    exit_code: int
    reason: str
    message: str
    #: the task's pid (verbose info; 0 when not reported)
    pid: int
    sandbox_id: str
    #: the OCI runtime spec containerd generated ({} without verbose)
    spec: Mapping[str, Any] = field(default_factory=dict)
    raw: api.ContainerStatusResponse = field(default_factory=api.ContainerStatusResponse)

    @property
    def cgroups_path(self) -> str:
        """``linux.cgroupsPath`` of the runtime spec ("" when unknown)."""
        linux = self.spec.get("linux") or {}
        return str(linux.get("cgroupsPath") or "") if isinstance(linux, dict) else ""


def _state_name(enum_name: str, prefix: str) -> str:
    return enum_name.removeprefix(prefix)


def _info_json(info: Mapping[str, str]) -> dict[str, Any]:
    raw = info.get("info")
    if not raw:
        return {}
    data = json.loads(raw)
    return data if isinstance(data, dict) else {}


_MODES: dict[str, api.NamespaceMode] = {
    "POD": api.POD,
    "CONTAINER": api.CONTAINER,
    "NODE": api.NODE,
    "TARGET": api.TARGET,
}


def _mode(mode: PidMode) -> api.NamespaceMode:
    return _MODES[mode]


def resources(
    *,
    memory_limit: int = 0,
    cpu_quota: int = 0,
    cpu_period: int = 0,
    cpu_shares: int = 0,
    memory_swap_limit: int = 0,
) -> api.LinuxContainerResources:
    """A LinuxContainerResources message (0 = unset, as in CRI)."""
    return api.LinuxContainerResources(
        memory_limit_in_bytes=memory_limit,
        cpu_quota=cpu_quota,
        cpu_period=cpu_period,
        cpu_shares=cpu_shares,
        memory_swap_limit_in_bytes=memory_swap_limit,
    )


class CriClient:
    """Synchronous CRI client on ``unix://<address>`` (see the module docstring)."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self._channel: Any = grpc.insecure_channel(f"unix://{address}")
        self._runtime = api_grpc.RuntimeServiceStub(self._channel)
        self._images = api_grpc.ImageServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self,
        method: str,
        fn: _Unary[_Req, _Resp],
        request: _Req,
        timeout: float | None = None,
    ) -> _Resp:
        try:
            return fn(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            name = str(getattr(code, "name", code))
            raise CriError(method, name, str(exc.details())) from None

    # -- runtime -----------------------------------------------------------------------
    def version(self) -> api.VersionResponse:
        return self._call("Version", self._runtime.Version, api.VersionRequest(version="v1"))

    def status(self, verbose: bool = False) -> api.StatusResponse:
        return self._call("Status", self._runtime.Status, api.StatusRequest(verbose=verbose))

    # -- pods ----------------------------------------------------------------------------
    @staticmethod
    def pod_config(
        name: str,
        namespace: str = "default",
        uid: str = "",
        attempt: int = 0,
        *,
        hostname: str = "",
        host_network: bool = False,
        pid_mode: PidMode = "CONTAINER",
        ipc_host: bool = False,
        sysctls: Mapping[str, str] | None = None,
        cgroup_parent: str = "",
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        log_directory: str = "",
    ) -> api.PodSandboxConfig:
        """A PodSandboxConfig as kubelet would send it.

        ``pid_mode`` is the pod's PID namespace mode: "CONTAINER" (kubelet's default:
        no sharing), "POD" (shareProcessNamespace) or "NODE" (hostPID). A host-network
        pod must have an empty ``hostname`` (no UTS namespace of its own).
        """
        ns_opts = api.NamespaceOption(
            network=api.NODE if host_network else api.POD,
            pid=_mode(pid_mode),
            ipc=api.NODE if ipc_host else api.POD,
        )
        return api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(
                name=name, namespace=namespace, uid=uid or f"uid-{name}", attempt=attempt
            ),
            hostname=hostname,
            log_directory=log_directory,
            labels=dict(labels or {}),
            annotations=dict(annotations or {}),
            linux=api.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent,
                sysctls=dict(sysctls or {}),
                security_context=api.LinuxSandboxSecurityContext(namespace_options=ns_opts),
            ),
        )

    def run_pod_config(
        self, config: api.PodSandboxConfig, runtime_handler: str = "", timeout: float | None = None
    ) -> str:
        """RunPodSandbox; returns the pod sandbox id."""
        req = api.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        return self._call("RunPodSandbox", self._runtime.RunPodSandbox, req, timeout).pod_sandbox_id

    def run_pod(
        self,
        name: str,
        namespace: str = "default",
        uid: str = "",
        attempt: int = 0,
        *,
        hostname: str = "",
        host_network: bool = False,
        pid_mode: PidMode = "CONTAINER",
        sysctls: Mapping[str, str] | None = None,
        cgroup_parent: str = "",
        annotations: Mapping[str, str] | None = None,
        runtime_handler: str = "",
    ) -> str:
        """:meth:`pod_config` + :meth:`run_pod_config`; returns the pod sandbox id."""
        config = self.pod_config(
            name,
            namespace,
            uid,
            attempt,
            hostname=hostname,
            host_network=host_network,
            pid_mode=pid_mode,
            sysctls=sysctls,
            cgroup_parent=cgroup_parent,
            annotations=annotations,
        )
        return self.run_pod_config(config, runtime_handler)

    def stop_pod(self, pod_id: str, timeout: float | None = None) -> None:
        req = api.StopPodSandboxRequest(pod_sandbox_id=pod_id)
        self._call("StopPodSandbox", self._runtime.StopPodSandbox, req, timeout)

    def remove_pod(self, pod_id: str, timeout: float | None = None) -> None:
        req = api.RemovePodSandboxRequest(pod_sandbox_id=pod_id)
        self._call("RemovePodSandbox", self._runtime.RemovePodSandbox, req, timeout)

    def pod_status(self, pod_id: str, verbose: bool = True) -> PodInfo:
        req = api.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        resp = self._call("PodSandboxStatus", self._runtime.PodSandboxStatus, req)
        st = resp.status
        info = _info_json(resp.info)
        return PodInfo(
            id=st.id,
            state=_state_name(api.PodSandboxState.Name(st.state), "SANDBOX_"),
            ip=st.network.ip,
            handler=st.runtime_handler,
            pid=int(info.get("pid") or 0),
            info=info,
            raw=resp,
        )

    def list_pods(self, pod_id: str = "") -> list[api.PodSandbox]:
        req = api.ListPodSandboxRequest(filter=api.PodSandboxFilter(id=pod_id))
        return list(self._call("ListPodSandbox", self._runtime.ListPodSandbox, req).items)

    def pod_stats(self, pod_id: str) -> api.PodSandboxStats:
        req = api.PodSandboxStatsRequest(pod_sandbox_id=pod_id)
        return self._call("PodSandboxStats", self._runtime.PodSandboxStats, req).stats

    # -- containers ----------------------------------------------------------------------
    @staticmethod
    def container_config(
        name: str,
        image: str,
        command: Sequence[str] = (),
        args: Sequence[str] = (),
        attempt: int = 0,
        *,
        log_path: str = "",
        envs: Mapping[str, str] | None = None,
        pid_mode: PidMode = "CONTAINER",
        target_id: str = "",
        host_network: bool = False,
        resources: api.LinuxContainerResources | None = None,
        working_dir: str = "",
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> api.ContainerConfig:
        """A ContainerConfig as kubelet would send it. ``pid_mode`` must match the
        pod's (kubelet sends "POD" for shareProcessNamespace pods, "CONTAINER"
        otherwise); "TARGET" needs ``target_id`` (a running container of the same pod)."""
        ns_opts = api.NamespaceOption(
            network=api.NODE if host_network else api.POD,
            pid=_mode(pid_mode),
            target_id=target_id,
        )
        linux = api.LinuxContainerConfig(
            security_context=api.LinuxContainerSecurityContext(namespace_options=ns_opts)
        )
        if resources is not None:
            linux.resources.CopyFrom(resources)
        return api.ContainerConfig(
            metadata=api.ContainerMetadata(name=name, attempt=attempt),
            image=api.ImageSpec(image=image),
            command=list(command),
            args=list(args),
            working_dir=working_dir,
            envs=[api.KeyValue(key=k, value=v) for k, v in (envs or {}).items()],
            labels=dict(labels or {}),
            annotations=dict(annotations or {}),
            log_path=log_path,
            linux=linux,
        )

    def create_container_config(
        self,
        pod_id: str,
        pod_config: api.PodSandboxConfig,
        config: api.ContainerConfig,
        timeout: float | None = None,
    ) -> str:
        """CreateContainer; returns the container id."""
        req = api.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config
        )
        return self._call(
            "CreateContainer", self._runtime.CreateContainer, req, timeout
        ).container_id

    def create_container(
        self,
        pod_id: str,
        pod_config: api.PodSandboxConfig,
        name: str,
        image: str,
        command: Sequence[str] = (),
        args: Sequence[str] = (),
        attempt: int = 0,
        *,
        log_path: str = "",
        pid_mode: PidMode | None = None,
        target_id: str = "",
        resources: api.LinuxContainerResources | None = None,
        envs: Mapping[str, str] | None = None,
    ) -> str:
        """:meth:`container_config` + :meth:`create_container_config`. Without
        ``pid_mode`` the container follows the pod's mode; the network mode always
        follows the pod's."""
        ns = pod_config.linux.security_context.namespace_options
        mode: PidMode = pid_mode or ("POD" if ns.pid == api.POD else "CONTAINER")
        config = self.container_config(
            name,
            image,
            command,
            args,
            attempt,
            log_path=log_path,
            pid_mode=mode,
            target_id=target_id,
            host_network=ns.network == api.NODE,
            resources=resources,
            envs=envs,
        )
        return self.create_container_config(pod_id, pod_config, config)

    def start_container(self, cid: str, timeout: float | None = None) -> None:
        req = api.StartContainerRequest(container_id=cid)
        self._call("StartContainer", self._runtime.StartContainer, req, timeout)

    def stop_container(self, cid: str, grace: int = 10, timeout: float | None = None) -> None:
        """StopContainer: SIGTERM, SIGKILL after ``grace`` seconds."""
        req = api.StopContainerRequest(container_id=cid, timeout=grace)
        self._call("StopContainer", self._runtime.StopContainer, req, timeout)

    def remove_container(self, cid: str, timeout: float | None = None) -> None:
        req = api.RemoveContainerRequest(container_id=cid)
        self._call("RemoveContainer", self._runtime.RemoveContainer, req, timeout)

    def list_containers(self, pod_id: str = "") -> list[api.Container]:
        req = api.ListContainersRequest(filter=api.ContainerFilter(pod_sandbox_id=pod_id))
        return list(self._call("ListContainers", self._runtime.ListContainers, req).containers)

    def container_status(self, cid: str, verbose: bool = True) -> ContainerInfo:
        req = api.ContainerStatusRequest(container_id=cid, verbose=verbose)
        resp = self._call("ContainerStatus", self._runtime.ContainerStatus, req)
        st = resp.status
        info = _info_json(resp.info)
        spec = info.get("runtimeSpec")
        return ContainerInfo(
            id=st.id,
            state=_state_name(api.ContainerState.Name(st.state), "CONTAINER_"),
            exit_code=st.exit_code,
            reason=st.reason,
            message=st.message,
            pid=int(info.get("pid") or 0),
            sandbox_id=str(info.get("sandboxID") or ""),
            spec=spec if isinstance(spec, dict) else {},
            raw=resp,
        )

    def update_resources(
        self,
        cid: str,
        res: api.LinuxContainerResources,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        req = api.UpdateContainerResourcesRequest(
            container_id=cid, linux=res, annotations=dict(annotations or {})
        )
        self._call("UpdateContainerResources", self._runtime.UpdateContainerResources, req)

    def exec_sync(
        self, cid: str, cmd: Sequence[str], timeout: int = 30, margin: float = 20.0
    ) -> ExecResult:
        """ExecSync with a ``timeout`` (seconds) for the command; the RPC deadline is
        that plus ``margin``, so a command that hangs fails with the CRI's own error
        and a CRI that hangs fails with DEADLINE_EXCEEDED."""
        req = api.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout)
        resp = self._call("ExecSync", self._runtime.ExecSync, req, timeout + margin)
        return ExecResult(
            resp.exit_code,
            resp.stdout.decode(errors="replace"),
            resp.stderr.decode(errors="replace"),
        )

    def container_stats(self, cid: str) -> api.ContainerStats:
        req = api.ContainerStatsRequest(container_id=cid)
        return self._call("ContainerStats", self._runtime.ContainerStats, req).stats

    def list_container_stats(
        self, cid: str = "", pod_id: str = "", labels: Mapping[str, str] | None = None
    ) -> list[api.ContainerStats]:
        """ListContainerStats; the filter's fields are ANDed ("" / None: any)."""
        flt = api.ContainerStatsFilter(id=cid, pod_sandbox_id=pod_id, label_selector=labels)
        req = api.ListContainerStatsRequest(filter=flt)
        return list(self._call("ListContainerStats", self._runtime.ListContainerStats, req).stats)

    def reopen_log(self, cid: str) -> None:
        req = api.ReopenContainerLogRequest(container_id=cid)
        self._call("ReopenContainerLog", self._runtime.ReopenContainerLog, req)

    # -- streaming: each answers with a one-time URL of containerd's streaming server --
    def exec_url(
        self,
        cid: str,
        cmd: Sequence[str],
        *,
        stdin: bool = False,
        stdout: bool = True,
        stderr: bool = True,
        tty: bool = False,
    ) -> str:
        """Exec: the URL to open the exec's streams at."""
        req = api.ExecRequest(
            container_id=cid, cmd=list(cmd), tty=tty, stdin=stdin, stdout=stdout, stderr=stderr
        )
        return self._call("Exec", self._runtime.Exec, req).url

    def attach_url(
        self,
        cid: str,
        *,
        stdin: bool = True,
        stdout: bool = True,
        stderr: bool = True,
        tty: bool = False,
    ) -> str:
        """Attach: the URL to open the container's streams at."""
        req = api.AttachRequest(
            container_id=cid, stdin=stdin, tty=tty, stdout=stdout, stderr=stderr
        )
        return self._call("Attach", self._runtime.Attach, req).url

    def port_forward_url(self, pod_id: str, ports: Sequence[int] = ()) -> str:
        """PortForward: the URL to open forwarded connections to the pod at."""
        req = api.PortForwardRequest(pod_sandbox_id=pod_id, port=list(ports))
        return self._call("PortForward", self._runtime.PortForward, req).url

    # -- images --------------------------------------------------------------------------
    def list_images(self) -> list[api.Image]:
        return list(
            self._call("ListImages", self._images.ListImages, api.ListImagesRequest()).images
        )

    def image_status(self, ref: str) -> api.Image | None:
        """The image, or None when the CRI does not know ``ref``."""
        req = api.ImageStatusRequest(image=api.ImageSpec(image=ref))
        resp = self._call("ImageStatus", self._images.ImageStatus, req)
        return resp.image if resp.HasField("image") else None
