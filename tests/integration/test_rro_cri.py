"""Recursive read-only mounts through CRI on containerd 2.1, on podshim and on runc.v2.

containerd 2.x's CRI asks each handler's shim binary ``-info`` at start-up and turns on
``recursive_read_only_mounts`` for a handler whose OCI runtime's features list the mount
option ``rro``. For a ContainerConfig mount with ``readonly`` and ``recursive_read_only``
it then gives runc the options ``rbind, rprivate, rro``, and runc makes every submount
read-only as well (``mount_setattr``). On a handler without the feature CreateContainer
fails; on a handler whose ``-info`` failed, CRI 2.1.9 has no features at all and
dereferences nil: containerd dies (so the tests check the announcement first).

CRI 2.1.9 (as every release up to 2.3.3) introspects only handlers of ``runtime_type =
"io.containerd.runc.v2"`` (2.3.4 and 2.4 ask every runtime type); so this module's
``podshim`` handler is podshim under that type by ``runtime_path`` (options: runc's,
``Root`` keeping podshim's runc state below the lab), the configuration that gives
podshim pods ``rro`` there. ``runc`` is containerd's own runc shim.

The host directory of the mount has a tmpfs submount made by the test (removed, lazily,
whatever happens). Runs on ``$PODSHIM_CONTAINERD`` when that names a 2.x build (the
2.1 line of scripts/test.sh), skipped otherwise.
The lab's CRI client (cri-api v0.25) has no ``recursive_read_only`` (Mount field 8) nor
``runtime_handlers`` (StatusResponse field 3): the few fields are declared here, and
merged into (or read from) the lab's messages by their wire encoding.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from podshim import mountinfo
from podshim_lab import Containerd, RuntimeHandler
from podshim_lab.cri.client import ExecResult, api

if TYPE_CHECKING:
    from tests.integration import criutil as cu
    from tests.integration import matrix
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    import criutil as cu
    import matrix

pytestmark = pytest.mark.timeout(600)

HANDLERS = pytest.mark.parametrize("handler", [cu.PODSHIM, cu.RUNC])
SLEEP = ["sleep", "3600"]
SHIM = "containerd-shim-podshim-v1"
EROFS = "Read-only file system"
cri = cu.cri


# -- the cri-api fields the lab's client lacks ---------------------------------------------


def _cri_extras() -> dict[str, Any]:
    """Message classes with just the newer cri-api fields (their numbers as in
    k8s.io/cri-api/pkg/apis/runtime/v1/api.proto of containerd 2.1.9's vendor tree)."""
    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="podshim_tests/cri_rro.proto", package="podshim.tests.rro", syntax="proto3"
    )

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name

    opt, rep = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    message("MountRro", ("recursive_read_only", 8, f.TYPE_BOOL, opt, ""))
    message(
        "RuntimeHandlerFeatures",
        ("recursive_read_only_mounts", 1, f.TYPE_BOOL, opt, ""),
        ("user_namespaces", 2, f.TYPE_BOOL, opt, ""),
    )
    message(
        "RuntimeHandler",
        ("name", 1, f.TYPE_STRING, opt, ""),
        ("features", 2, f.TYPE_MESSAGE, opt, ".podshim.tests.rro.RuntimeHandlerFeatures"),
    )
    message(
        "StatusHandlers",
        ("runtime_handlers", 3, f.TYPE_MESSAGE, rep, ".podshim.tests.rro.RuntimeHandler"),
    )
    classes = message_factory.GetMessages([fdp], descriptor_pool.DescriptorPool())
    return {name.rsplit(".", 1)[-1]: cls for name, cls in classes.items()}


EXTRAS = _cri_extras()


def rro_mount(host: Path, target: str, recursive: bool) -> api.Mount:
    """A read-only, private-propagation bind of ``host``; ``recursive``: with
    ``recursive_read_only`` (merged in by its wire encoding)."""
    mount = api.Mount(container_path=target, host_path=str(host), readonly=True,
                      propagation=api.PROPAGATION_PRIVATE)  # fmt: skip
    extra = EXTRAS["MountRro"](recursive_read_only=recursive).SerializeToString()
    return api.Mount.FromString(mount.SerializeToString() + extra)


def handler_features(crilab: cu.CriLab) -> dict[str, Any]:
    """CRI Status's runtime_handlers: {handler name: its features message}."""
    raw = crilab.cri.status().SerializeToString()  # unknown fields are kept
    status = EXTRAS["StatusHandlers"].FromString(raw)
    return {h.name: h.features for h in status.runtime_handlers}


# -- the lab ------------------------------------------------------------------------------


def _version() -> str:
    """The 2.x build ``$PODSHIM_CONTAINERD`` names (scripts/test.sh: 2.1); skipped on
    any other line, as the Sandbox API tests are (CRI 1.x has no rro)."""
    selected = matrix.selected() or ""
    if not selected.startswith("2."):
        pytest.skip("recursive read-only mounts through CRI need containerd 2.x: "
                    "run with PODSHIM_CONTAINERD=2.1")  # fmt: skip
    return matrix.require(selected)


@pytest.fixture(scope="module")
def cri_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cu.CriLab]:
    """A 2.x CRI lab whose ``podshim`` handler is podshim as ``io.containerd.runc.v2``
    by ``runtime_path`` (see the module doc), next to the lab's own ``runc``."""
    version = _version()
    lab = Containerd(tmp_path_factory.mktemp("rro"), cri=True, version=version,
                     extra_path=[cu.BIN_DIR])  # fmt: skip
    runtime_root = lab.state / "podshim-runc"
    lab.runtimes[cu.PODSHIM] = RuntimeHandler(
        "io.containerd.runc.v2", {"Root": str(runtime_root)},
        runtime_path=str(Path(cu.BIN_DIR) / SHIM),
    )  # fmt: skip
    crilab = None
    try:
        lab.start()
        lab.ensure_pause()
        crilab = cu.CriLab(lab, runtime_root, lab.ensure_busybox(namespace=cu.CRI_NAMESPACE))
        yield crilab
    finally:
        errors = cu.close_cri_lab(lab, crilab)
        assert not errors, "CRI lab teardown left things behind:\n" + "\n".join(errors)


@pytest.fixture
def host_dir(tmp_path: Path) -> Iterator[Path]:
    """``<tmp>/vol`` with a file, and a tmpfs submount ``sub`` with a file; every mount
    below it is lazily unmounted afterwards."""
    base = tmp_path / "vol"
    (base / "sub").mkdir(parents=True)
    (base / "top.txt").write_text("top\n")
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "rro-test", str(base / "sub")],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        (base / "sub" / "inner.txt").write_text("inner\n")
        yield base
    finally:
        for m in sorted(mountinfo.read(), key=lambda m: len(m.mountpoint), reverse=True):
            if m.mountpoint.startswith(f"{base}/"):
                subprocess.run(["umount", "--lazy", m.mountpoint], check=False,
                               capture_output=True, timeout=60)  # fmt: skip


def _write(crilab: cu.CriLab, cid: str, path: str) -> ExecResult:
    return crilab.exec(cid, "sh", "-c", f"echo x > {path}")


# -- the tests ------------------------------------------------------------------------------


def test_cri_announces_rro_for_podshim_as_for_runc(cri: cu.CriLab) -> None:
    """Both handlers' shims answered ``-info`` with runc's features, ``rro`` among
    them (runc 1.1 has it; the kernel is >= 5.12)."""
    feats = handler_features(cri)
    assert {cu.PODSHIM, cu.RUNC} <= set(feats), feats
    for name in (cu.PODSHIM, cu.RUNC):
        assert feats[name].recursive_read_only_mounts, (name, feats[name])


@HANDLERS
def test_recursive_read_only_mount_covers_submounts(
    cri: cu.CriLab, handler: str, host_dir: Path
) -> None:
    # CRI 2.1.9 dereferences a nil Features (and dies) for rro on a handler whose
    # -info failed: check the announcement first, so a regression fails here cleanly
    feats = handler_features(cri)
    assert feats[handler].recursive_read_only_mounts, (handler, feats.get(handler))
    pod, _ = cri.pod("rro", handler)
    config = cri.container_config(pod, "rro", SLEEP)
    config.mounts.append(rro_mount(host_dir, "/data", recursive=True))
    c = cri.start(pod, cri.create_config(pod, config))
    assert cri.exec_ok(c.id, "cat", "/data/top.txt", "/data/sub/inner.txt") == "top\ninner\n"
    for path in ("/data/new.txt", "/data/sub/new.txt"):
        res = _write(cri, c.id, path)
        assert res.exit_code != 0 and EROFS in res.stderr, (handler, path, res)
    mounts = cri.exec_ok(c.id, "cat", "/proc/self/mounts").splitlines()
    sub = [line.split() for line in mounts if line.split()[1:2] == ["/data/sub"]]
    assert sub and "ro" in sub[0][3].split(","), (handler, sub)
    assert not (host_dir / "sub" / "new.txt").exists()


@HANDLERS
def test_plain_read_only_mount_leaves_submounts_writable(
    cri: cu.CriLab, handler: str, host_dir: Path
) -> None:
    """The control: ``readonly`` alone is ``ro`` on the top mount only, so the test
    above tells the two apart."""
    pod, _ = cri.pod("ro", handler)
    config = cri.container_config(pod, "ro", SLEEP)
    config.mounts.append(rro_mount(host_dir, "/data", recursive=False))
    c = cri.start(pod, cri.create_config(pod, config))
    res = _write(cri, c.id, "/data/new.txt")
    assert res.exit_code != 0 and EROFS in res.stderr, (handler, res)
    cri.exec_ok(c.id, "sh", "-c", "echo x > /data/sub/new.txt")
    assert (host_dir / "sub" / "new.txt").read_text() == "x\n"
