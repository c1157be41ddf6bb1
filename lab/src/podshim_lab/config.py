"""Paths and configuration files of a private lab containerd.

Everything an instance owns is derived from one random token:

* scratch dir ``<base>/podshim-lab-<token>``: ``config.toml``, the log, the
  containerd root (``root/``), the CNI conf dir and built image archives;
* state dir ``<run>/podshim-lab-<token>`` (kept short: unix socket paths must stay
  below ~100 bytes): the gRPC socket, runtime bundles, runc state, CNI IPAM data;
* the CNI bridge ``psl<token>`` (at most 15 characters, a Linux limit).

The TOML writer here only knows the few value types a containerd config needs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CRI_PLUGIN",
    "LabPaths",
    "RuntimeHandler",
    "TomlValue",
    "render_cni_conflist",
    "render_config",
    "render_config_v3",
    "toml_value",
]

CRI_PLUGIN = "io.containerd.grpc.v1.cri"
#: containerd 2.x: the CRI plugin's runtime and image halves, and NRI
CRI_RUNTIME_PLUGIN = "io.containerd.cri.v1.runtime"
CRI_IMAGES_PLUGIN = "io.containerd.cri.v1.images"
#: what a 2.x instance without CRI disables (the images half stays: the transfer
#: service that ctr uses needs it; the pod sandbox controllers need the runtime half)
CRI_PLUGINS_V3 = (
    CRI_PLUGIN,
    CRI_RUNTIME_PLUGIN,
    "io.containerd.podsandbox.controller.v1.podsandbox",
    "io.containerd.grpc.v1.sandbox-controllers",
)
NRI_PLUGIN = "io.containerd.nri.v1.nri"
CNI_BIN_DIR = "/usr/lib/cni"
MAX_SOCKET_PATH = 100

TomlScalar = str | int | float | bool
TomlValue = TomlScalar | Sequence[TomlScalar]


@dataclass(frozen=True)
class RuntimeHandler:
    """A CRI runtime handler (``[...containerd.runtimes.<name>]``).

    ``runtime_type`` ``io.containerd.<name>.<ver>`` makes containerd run the
    binary ``containerd-shim-<name>-<ver>`` found on its PATH.  ``options`` is the
    handler's ``options`` table (for non-runc runtimes: ``TypeUrl``/``ConfigPath``).
    """

    runtime_type: str
    options: Mapping[str, TomlValue] = field(default_factory=dict)
    pod_annotations: Sequence[str] = ()
    container_annotations: Sequence[str] = ()
    privileged_without_host_devices: bool = False
    #: ``runtime_path``: the shim binary by path (containerd 1.6.20 ignores it and
    #: looks the binary up on PATH; 1.7 and 2.1 use it)
    runtime_path: str = ""
    #: containerd 2.x: the pod sandbox controller, ``"podsandbox"`` (the default: a
    #: pause container, a sandbox task for podshim), ``"shim"`` (the shim's own Sandbox
    #: API) or a proxy plugin's name; "" leaves it out (older versions do not know it)
    sandboxer: str = ""
    #: containerd 2.x: the address of the sandbox controller ``sandboxer`` names, when
    #: that is a proxy plugin: the config then declares ``[proxy_plugins.<sandboxer>]``
    #: ``type = "sandbox"`` at this address
    proxy_address: str = ""


@dataclass(frozen=True)
class LabPaths:
    """Every path (and the bridge name) owned by one lab instance."""

    token: str
    scratch: Path
    state: Path

    @classmethod
    def create(cls, base_dir: Path, run_dir: Path, token: str) -> LabPaths:
        """Derive the paths for ``token`` under ``base_dir`` and ``run_dir``."""
        paths = cls(
            token,
            Path(base_dir).absolute() / f"podshim-lab-{token}",
            Path(run_dir).absolute() / f"podshim-lab-{token}",
        )
        if len(str(paths.address).encode()) + len(".ttrpc") >= MAX_SOCKET_PATH:
            raise ValueError(f"socket path too long (>= {MAX_SOCKET_PATH}): {paths.address}")
        return paths

    @property
    def root(self) -> Path:
        """containerd's ``--root`` (persistent data: content, snapshots, metadata)."""
        return self.scratch / "root"

    @property
    def address(self) -> Path:
        """The gRPC socket."""
        return self.state / "containerd.sock"

    @property
    def config(self) -> Path:
        """The generated ``config.toml``."""
        return self.scratch / "config.toml"

    @property
    def log(self) -> Path:
        """containerd's (and the subreaper's) combined stdout/stderr."""
        return self.scratch / "containerd.log"

    @property
    def pidfile(self) -> Path:
        """Where the subreaper publishes containerd's pid."""
        return self.scratch / "containerd.pid"

    @property
    def cni_conf_dir(self) -> Path:
        """CNI network configuration directory for the CRI plugin."""
        return self.scratch / "cni" / "net.d"

    @property
    def images(self) -> Path:
        """Cache of built image archives."""
        return self.scratch / "images"

    @property
    def runc_root(self) -> Path:
        """runc state root used by the CRI ``runc`` handler (and ``ctr run --runc-root``)."""
        return self.state / "runc"

    @property
    def fifo_dir(self) -> Path:
        """Where :meth:`Containerd.ctr` puts ``ctr``'s stdio FIFOs."""
        return self.state / "fifo"

    @property
    def ipam_dir(self) -> Path:
        """host-local IPAM data directory."""
        return self.state / "cni-ipam"

    @property
    def opt(self) -> Path:
        """The ``io.containerd.internal.v1.opt`` path (``<opt>/bin`` is put on shim PATH)."""
        return self.root / "opt"

    @property
    def bridge(self) -> str:
        """Name of the CNI bridge (<= 15 characters)."""
        return f"psl{self.token}"[:15]

    @property
    def subnet(self) -> str:
        """A per-instance /24 for pod IPs (not routed unless ``portmap``: no gateway, no
        masquerade)."""
        return f"10.88.{int(self.token, 16) % 256}.0/24"

    @property
    def gateway(self) -> str:
        """The bridge's address in :attr:`subnet` (only with ``portmap``)."""
        return f"10.88.{int(self.token, 16) % 256}.1"

    def owned_dirs(self) -> tuple[Path, Path]:
        """The two directory trees the instance creates and removes."""
        return self.scratch, self.state


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_key(key: str) -> str:
    """A TOML key, quoted unless it is a bare key."""
    return key if _BARE_KEY.match(key) else json.dumps(key)


def toml_value(value: TomlValue) -> str:
    """Render a scalar or a flat array as TOML (JSON strings are valid TOML strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def _table(lines: list[str], name: str, values: Mapping[str, TomlValue]) -> None:
    lines.append("")
    lines.append(f"[{name}]")
    lines.extend(f"  {toml_key(k)} = {toml_value(v)}" for k, v in values.items())


def render_config(
    paths: LabPaths,
    *,
    cri: bool,
    runtimes: Mapping[str, RuntimeHandler],
    sandbox_image: str,
    log_level: str = "debug",
    default_runtime: str = "runc",
    snapshotter: str = "overlayfs",
    config_version: int = 2,
) -> str:
    """The containerd ``config.toml`` for this instance: ``version = 2`` (containerd 1.6,
    1.7) or, with ``config_version=3``, containerd 2.x's dialect."""
    if config_version == 3:
        return render_config_v3(
            paths,
            cri=cri,
            runtimes=runtimes,
            sandbox_image=sandbox_image,
            log_level=log_level,
            default_runtime=default_runtime,
            snapshotter=snapshotter,
        )
    if config_version != 2:
        raise ValueError(f"unknown containerd config version {config_version}")
    if any(h.proxy_address for h in runtimes.values()):
        raise ValueError("proxy sandbox plugins need containerd 2.x (version = 3)")
    lines = [
        "# generated by podshim_lab; private instance " + paths.token,
        "version = 2",
        f"root = {toml_value(str(paths.root))}",
        f"state = {toml_value(str(paths.state))}",
        f"disabled_plugins = {toml_value([] if cri else [CRI_PLUGIN])}",
    ]
    _table(lines, "grpc", {"address": str(paths.address)})
    _table(lines, "debug", {"level": log_level})
    _table(lines, 'plugins."io.containerd.internal.v1.opt"', {"path": str(paths.opt)})
    if not cri:
        return "\n".join(lines) + "\n"
    cri_t = f'plugins."{CRI_PLUGIN}"'
    _table(
        lines,
        cri_t,
        {
            "sandbox_image": sandbox_image,
            "stream_server_address": "127.0.0.1",
            "stream_server_port": "0",
            "netns_mounts_under_state_dir": True,
            "restrict_oom_score_adj": True,
            "disable_apparmor": True,
            "enable_selinux": False,
        },
    )
    _table(
        lines,
        f"{cri_t}.cni",
        {"bin_dir": CNI_BIN_DIR, "conf_dir": str(paths.cni_conf_dir), "max_conf_num": 1},
    )
    _table(
        lines,
        f"{cri_t}.containerd",
        {"snapshotter": snapshotter, "default_runtime_name": default_runtime},
    )
    handlers: dict[str, RuntimeHandler] = {
        "runc": RuntimeHandler("io.containerd.runc.v2", {"Root": str(paths.runc_root)})
    }
    handlers.update(runtimes)
    _runtime_tables(lines, f"{cri_t}.containerd.runtimes", handlers)
    return "\n".join(lines) + "\n"


def _runtime_tables(lines: list[str], prefix: str, handlers: Mapping[str, RuntimeHandler]) -> None:
    for name, handler in handlers.items():
        table = f"{prefix}.{toml_key(name)}"
        values: dict[str, TomlValue] = {"runtime_type": handler.runtime_type}
        if handler.runtime_path:
            values["runtime_path"] = handler.runtime_path
        if handler.pod_annotations:
            values["pod_annotations"] = list(handler.pod_annotations)
        if handler.container_annotations:
            values["container_annotations"] = list(handler.container_annotations)
        if handler.privileged_without_host_devices:
            values["privileged_without_host_devices"] = True
        if handler.sandboxer:
            values["sandboxer"] = handler.sandboxer
        _table(lines, table, values)
        if handler.options:
            _table(lines, f"{table}.options", handler.options)


def render_config_v3(
    paths: LabPaths,
    *,
    cri: bool,
    runtimes: Mapping[str, RuntimeHandler],
    sandbox_image: str,
    log_level: str = "debug",
    default_runtime: str = "runc",
    snapshotter: str = "overlayfs",
) -> str:
    """containerd 2.x's ``config.toml`` (``version = 3``): the CRI plugin is split into
    ``io.containerd.cri.v1.runtime`` (runtime handlers, CNI, security knobs) and
    ``io.containerd.cri.v1.images`` (snapshotter, the pinned sandbox image), the
    ``io.containerd.grpc.v1.cri`` plugin keeps only the streaming server. NRI (on by
    default in 2.x, on a machine-wide socket) is turned off."""
    lines = [
        "# generated by podshim_lab; private instance " + paths.token,
        "version = 3",
        f"root = {toml_value(str(paths.root))}",
        f"state = {toml_value(str(paths.state))}",
        f"disabled_plugins = {toml_value([] if cri else list(CRI_PLUGINS_V3))}",
    ]
    _table(lines, "grpc", {"address": str(paths.address)})
    _table(lines, "debug", {"level": log_level})
    _table(lines, 'plugins."io.containerd.internal.v1.opt"', {"path": str(paths.opt)})
    _table(lines, f'plugins."{NRI_PLUGIN}"', {"disable": True})
    for handler in runtimes.values():  # the sandbox controllers handlers name by address
        if handler.proxy_address and handler.sandboxer:
            plugin = {"type": "sandbox", "address": handler.proxy_address}
            _table(lines, f"proxy_plugins.{toml_key(handler.sandboxer)}", plugin)
    if not cri:
        return "\n".join(lines) + "\n"
    _table(
        lines,
        f'plugins."{CRI_PLUGIN}"',
        {"stream_server_address": "127.0.0.1", "stream_server_port": "0"},
    )
    images = f'plugins."{CRI_IMAGES_PLUGIN}"'
    _table(lines, images, {"snapshotter": snapshotter})
    _table(lines, f"{images}.pinned_images", {"sandbox": sandbox_image})
    runtime = f'plugins."{CRI_RUNTIME_PLUGIN}"'
    _table(
        lines,
        runtime,
        {
            "netns_mounts_under_state_dir": True,
            "restrict_oom_score_adj": True,
            "disable_apparmor": True,
            "enable_selinux": False,
            "enable_cdi": False,
        },
    )
    _table(
        lines,
        f"{runtime}.cni",
        {"bin_dirs": [CNI_BIN_DIR], "conf_dir": str(paths.cni_conf_dir), "max_conf_num": 1},
    )
    _table(lines, f"{runtime}.containerd", {"default_runtime_name": default_runtime})
    handlers: dict[str, RuntimeHandler] = {
        "runc": RuntimeHandler("io.containerd.runc.v2", {"Root": str(paths.runc_root)})
    }
    handlers.update(runtimes)
    _runtime_tables(lines, f"{runtime}.containerd.runtimes", handlers)
    return "\n".join(lines) + "\n"


def render_cni_conflist(paths: LabPaths, *, portmap: bool = False) -> str:
    """A bridge + loopback conflist: pods get an IP, no traffic leaves the host.

    With ``portmap`` the bridge gets :attr:`LabPaths.gateway` (``isGateway``; pods get a
    default route through it), so the host reaches pods, and the ``portmap`` plugin
    (capability ``portMappings``) makes a pod's host ports answer on the host
    (``podshim_lab.hostnet`` guards what that changes on the host).
    """
    subnet: dict[str, str] = {"subnet": paths.subnet}
    ipam: dict[str, object] = {"type": "host-local", "dataDir": str(paths.ipam_dir)}
    if portmap:
        subnet["gateway"] = paths.gateway
        ipam["routes"] = [{"dst": "0.0.0.0/0"}]
    ipam["ranges"] = [[subnet]]
    bridge = {
        "type": "bridge",
        "bridge": paths.bridge,
        "isGateway": portmap,
        "ipMasq": False,
        "hairpinMode": False,
        "ipam": ipam,
    }
    chained: list[dict[str, object]] = [bridge]
    if portmap:
        chained.append({"type": "portmap", "capabilities": {"portMappings": True}})
    chained.append({"type": "loopback"})
    conf = {"cniVersion": "0.4.0", "name": f"podshim-lab-{paths.token}", "plugins": chained}
    return json.dumps(conf, indent=2) + "\n"
