"""podshim's configuration: a TOML file named by the runtime options, with defaults.

The file's path arrives as ``config_path`` in ``runtimeoptions.v1.Options`` (a CRI
handler's ``ConfigPath`` option, or ``ctr run --runtime-config-path``). A direct ttrpc
Create may instead send ``containerd.runc.v1.Options``, whose ``binary_name``/``root``
override the runtime settings. Example (every key optional; these are the defaults)::

    runtime = "runc"              # OCI runtime binary: "runc", "crun" or a path
    runtime_root = "/run/podshim/runc/<instance>"  # --root (+ a namespace dir); <instance>
                                  # = sha256(containerd address)[:16]
    systemd_cgroup = false
    log_level = "info"            # debug | info | warn | error (-debug forces debug)
    log_format = "text"           # text (logrus-like) | json
    default_host = "namespaces"   # pod host kind: namespaces | none | uvm | a plug-in
    zygote = true                 # pod scope: fork shims from a pre-warmed parent (read by
                                  # `start`; false: each shim is a fresh Python process)
    shim_scope = "pod"            # "pod": one shim process per pod | "node": one resident
                                  # daemon per containerd serves every pod (read by `start`)
    shards = 1                    # node scope: spread pods over N daemons (1-64)
    idle_exit_seconds = 60        # a daemon holding no task and no connection exits
                                  # after this long (0-3600)

    [uvm]                         # a table named after a host kind: its options, checked
    runtime = "crun"              # by the kind when a pod is made (uvm: README, "VM pods")
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

from google.protobuf import any_pb2

from podshim import errors as errdefs
from podshim.api.runc.options import oci_pb2
from podshim.api.runtimeoptions.v1 import api_pb2 as runtimeoptions_pb2
from podshim.host import registry
from podshim.oci.runtime import RuntimeConfig

RUNTIMEOPTIONS_TYPE = "runtimeoptions.v1.Options"
RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class Config:
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    log_level: str = "info"
    log_format: str = "text"
    default_host: str = "namespaces"
    zygote: bool = True
    shim_scope: str = "pod"
    shards: int = 1
    idle_exit_seconds: float = 60.0
    #: tables named after a host kind (``[uvm]``): its options, checked by the kind
    host_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""  # the file it came from, "" for defaults


_KEYS = {
    "runtime",
    "runtime_root",
    "systemd_cgroup",
    "log_level",
    "log_format",
    "default_host",
    "zygote",
    "shim_scope",
    "shards",
    "idle_exit_seconds",
}
SCOPES = ("pod", "node")
#: the most daemons one node-scope config may spread its pods over (start's MAX_SHARDS)
MAX_SHARDS = 64


def _expect(table: dict[str, Any], key: str, typ: type, path: str) -> Any:
    value = table[key]
    if not isinstance(value, typ):
        raise errdefs.InvalidArgument(
            f"podshim config {path}: {key} must be a {typ.__name__}, not {value!r}"
        )
    return value


def load_file(path: str) -> Config:
    """Read and validate a podshim TOML config file.

    Raises:
        InvalidArgument: unreadable file, bad TOML, unknown key or bad value (the
            message names the file and the key).
    """
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise errdefs.InvalidArgument(f"podshim config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise errdefs.InvalidArgument(f"podshim config {path}: {exc}") from None
    kinds = {k for k, v in table.items() if isinstance(v, dict) and registry.known(k)}
    unknown = set(table) - _KEYS - kinds
    if unknown:
        raise errdefs.InvalidArgument(f"podshim config {path}: unknown keys {sorted(unknown)}")
    rt = RuntimeConfig()
    cfg = Config(source=path, host_options={k: dict(table[k]) for k in kinds})
    if "runtime" in table:
        rt = replace(rt, binary=_expect(table, "runtime", str, path))
    if "runtime_root" in table:
        rt = replace(rt, root=_expect(table, "runtime_root", str, path))
    if "systemd_cgroup" in table:
        rt = replace(rt, systemd_cgroup=_expect(table, "systemd_cgroup", bool, path))
    if "zygote" in table:
        cfg = replace(cfg, zygote=_expect(table, "zygote", bool, path))
    if "shards" in table:
        shards = _expect(table, "shards", int, path)
        if isinstance(shards, bool) or not 1 <= shards <= MAX_SHARDS:
            raise errdefs.InvalidArgument(
                f"podshim config {path}: shards must be 1 to {MAX_SHARDS}, not {shards!r}"
            )
        cfg = replace(cfg, shards=shards)
    if "idle_exit_seconds" in table:
        idle = table["idle_exit_seconds"]
        if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not 0 <= idle <= 3600:
            raise errdefs.InvalidArgument(
                f"podshim config {path}: idle_exit_seconds must be 0 to 3600, not {idle!r}"
            )
        cfg = replace(cfg, idle_exit_seconds=float(idle))
    if "default_host" in table:  # any kind the host registry knows (plug-ins too)
        kind = _expect(table, "default_host", str, path)
        if not registry.known(kind):
            raise errdefs.InvalidArgument(
                f"podshim config {path}: default_host must be one of {registry.names()}, "
                f"not {kind!r}"
            )
        cfg = replace(cfg, default_host=kind)
    for key, allowed in (
        ("log_level", LOG_LEVELS),
        ("log_format", LOG_FORMATS),
        ("shim_scope", SCOPES),
    ):
        if key in table:
            value = _expect(table, key, str, path)
            if value not in allowed:
                raise errdefs.InvalidArgument(
                    f"podshim config {path}: {key} must be one of {list(allowed)}, not {value!r}"
                )
            cfg = replace(cfg, **{key: value})
    if not rt.binary:
        raise errdefs.InvalidArgument(f"podshim config {path}: runtime must not be empty")
    return replace(cfg, runtime=rt)


def from_options(options: any_pb2.Any | None, base: Config | None = None) -> Config:
    """The config a Create asks for through its ``options`` Any.

    Raises:
        InvalidArgument: an options type podshim does not know, or a bad config file.
    """
    cfg = base or Config()
    if options is None or not options.type_url:
        return cfg
    name = options.type_url.rsplit("/", 1)[-1]
    if name == RUNTIMEOPTIONS_TYPE:
        ro = runtimeoptions_pb2.Options.FromString(options.value)
        return load_file(ro.config_path) if ro.config_path else cfg
    if name == RUNC_OPTIONS_TYPE:
        o = oci_pb2.Options.FromString(options.value)
        rt = cfg.runtime
        rt = replace(
            rt,
            binary=o.binary_name or rt.binary,
            root=o.root or rt.root,
            systemd_cgroup=o.systemd_cgroup or rt.systemd_cgroup,
            no_pivot_root=o.no_pivot_root,
            no_new_keyring=o.no_new_keyring,
        )
        return replace(cfg, runtime=rt)
    raise errdefs.InvalidArgument(f"unsupported runtime options type {options.type_url!r}")
