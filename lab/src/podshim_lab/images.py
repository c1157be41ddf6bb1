"""Build small OCI image archives locally, without any registry.

The archives are plain ``oci-layout`` tarballs that ``ctr images import``
understands.  Their single, uncompressed layer holds the statically linked
``busybox`` binary of the machine plus one ``/bin`` symlink per applet, a few
empty directories and a minimal ``/etc/passwd`` and ``/etc/group``.

Everything is deterministic (sorted entries, fixed mtimes and owners), so
building the same image twice yields byte-identical archives and digests.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import shutil
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_BUSYBOX_REF",
    "DEFAULT_PAUSE_REF",
    "ImageInfo",
    "build_busybox_image",
    "build_image",
    "build_pause_image",
    "oci_platform",
]

DEFAULT_BUSYBOX_REF = "docker.io/podshim/busybox:test"
DEFAULT_PAUSE_REF = "docker.io/podshim/pause:test"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"

_MTIME = 946684800  # 2000-01-01T00:00:00Z, fixed for reproducibility
_CREATED = "2000-01-01T00:00:00Z"
_ARCH = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}
_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = b"root:x:0:\nnogroup:x:65534:\n"


@dataclass(frozen=True)
class ImageInfo:
    """What was written: the archive path and the image's digests."""

    path: Path
    ref: str
    manifest_digest: str
    config_digest: str
    layer_digest: str


def oci_platform(machine: str | None = None) -> dict[str, str]:
    """The OCI platform (os, architecture[, variant]) of this machine."""
    machine = machine or platform.machine()
    arch, variant = _ARCH.get(machine, (machine, None))
    result = {"architecture": arch, "os": "linux"}
    if variant is not None and arch != "arm64":
        result["variant"] = variant
    return result


def _find_busybox(busybox: Path | None) -> Path:
    if busybox is not None:
        return busybox
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(candidate).is_file():
            return Path(candidate)
    found = shutil.which("busybox")
    if found is None:
        raise FileNotFoundError("busybox not found (apt-get install busybox-static)")
    return Path(found)


def _applets(busybox: Path) -> list[str]:
    out = subprocess.run(
        [str(busybox), "--list"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return sorted({a for a in out.split() if a and "/" not in a and a != "busybox"})


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.mtime = _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _tar_bytes(members: Sequence[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in sorted(members, key=lambda m: m[0].name):
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def busybox_layer(busybox: Path | None = None) -> bytes:
    """The uncompressed layer tar: busybox, its applet symlinks, /etc and empty dirs."""
    binary = _find_busybox(busybox)
    payload = binary.read_bytes()
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for name, mode in (
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("var", 0o755),
    ):
        members.append((_tarinfo(name, tarfile.DIRTYPE, mode), None))
    members.append((_tarinfo("bin/busybox", tarfile.REGTYPE, 0o755, len(payload)), payload))
    for applet in _applets(binary):
        members.append((_tarinfo(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox"), None))
    members.append((_tarinfo("etc/passwd", tarfile.REGTYPE, 0o644, len(_PASSWD)), _PASSWD))
    members.append((_tarinfo("etc/group", tarfile.REGTYPE, 0o644, len(_GROUP)), _GROUP))
    return _tar_bytes(members)


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tag_of(ref: str) -> str:
    last = ref.rsplit("/", 1)[-1]
    if "@" in last:
        return last.split("@", 1)[1]
    return last.split(":", 1)[1] if ":" in last else "latest"


def build_image(
    path: Path,
    ref: str,
    *,
    layer: bytes,
    entrypoint: Sequence[str] | None = None,
    cmd: Sequence[str] | None = None,
    env: Sequence[str] = (DEFAULT_PATH_ENV,),
    working_dir: str = "/",
) -> ImageInfo:
    """Write a single-layer OCI archive for ``ref`` with the given layer tar and config."""
    plat = oci_platform()
    runtime_config: dict[str, Any] = {"Env": list(env), "WorkingDir": working_dir}
    if entrypoint is not None:
        runtime_config["Entrypoint"] = list(entrypoint)
    if cmd is not None:
        runtime_config["Cmd"] = list(cmd)
    layer_digest = _digest(layer)
    config = _canonical(
        {
            **plat,
            "created": _CREATED,
            "config": runtime_config,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [{"created": _CREATED, "created_by": "podshim_lab.images"}],
        }
    )
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": len(layer)}],
        }
    )
    index = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [
                {
                    "mediaType": MEDIA_MANIFEST,
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "platform": plat,
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": _tag_of(ref),
                    },
                }
            ],
        }
    )
    layout = _canonical({"imageLayoutVersion": "1.0.0"})
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (_tarinfo("blobs", tarfile.DIRTYPE, 0o755), None),
        (_tarinfo("blobs/sha256", tarfile.DIRTYPE, 0o755), None),
        (_tarinfo("oci-layout", tarfile.REGTYPE, 0o644, len(layout)), layout),
        (_tarinfo("index.json", tarfile.REGTYPE, 0o644, len(index)), index),
    ]
    for blob in (layer, config, manifest):
        name = "blobs/sha256/" + _digest(blob).split(":", 1)[1]
        members.append((_tarinfo(name, tarfile.REGTYPE, 0o644, len(blob)), blob))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(_tar_bytes(members))
    tmp.replace(path)
    return ImageInfo(path, ref, _digest(manifest), _digest(config), layer_digest)


def build_busybox_image(
    path: Path, ref: str = DEFAULT_BUSYBOX_REF, *, busybox: Path | None = None
) -> Path:
    """Write a busybox OCI archive (Cmd ``["sh"]``) for ``ref`` to ``path``; return ``path``."""
    build_image(path, ref, layer=busybox_layer(busybox), cmd=["sh"])
    return path


def build_pause_image(
    path: Path, ref: str = DEFAULT_PAUSE_REF, *, busybox: Path | None = None
) -> Path:
    """Write a pause-like image (Entrypoint ``/bin/sleep infinity``) for CRI sandboxes."""
    build_image(path, ref, layer=busybox_layer(busybox), entrypoint=["/bin/sleep", "infinity"])
    return path
