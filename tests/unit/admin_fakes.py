"""A fake node for the admin tests: a temporary root with containerd's config, a fake
``containerd`` binary (answers ``--version`` and ``config dump``) and a fake shim."""

from __future__ import annotations

import os
from pathlib import Path

from podshim.admin import install

MAIN_V2 = """\
# the node's own containerd config
version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"  # pinned by the node image
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    SystemdCgroup = true
"""

MAIN_V3 = """\
version = 3

[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "registry.k8s.io/pause:3.10"
[plugins."io.containerd.cri.v1.runtime".cni]
  conf_dir = "/etc/cni/net.d"
"""


def fake_containerd(directory: Path, version: str) -> str:
    """A ``containerd`` that reports ``version`` and whose ``config dump`` fails on a
    file containing ``BROKEN``."""
    path = directory / "containerd"
    path.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = --version ] && {{ echo "containerd github.com/containerd/containerd '
        f'v{version} deadbeef"; exit 0; }}\n'
        '[ "$1" = --config ] && [ "$3" = config ] || exit 3\n'
        'if grep -q BROKEN "$2"; then echo "failed to load TOML" >&2; exit 1; fi\n'
        "exit 0\n"
    )
    path.chmod(0o755)
    return str(path)


def node(tmp: Path, version: str = "1.6.20", main: str = MAIN_V2) -> install.Options:
    """A root under ``tmp`` with ``etc/containerd/config.toml``; the options install
    would use there."""
    root = tmp / "root"
    (root / "etc" / "containerd").mkdir(parents=True)
    (root / "etc" / "containerd" / "config.toml").write_text(main)
    tools = tmp / "tools"
    tools.mkdir()
    shim = tools / "containerd-shim-podshim-v1"
    shim.write_text("#!/bin/sh\necho podshim\n")
    shim.chmod(0o755)
    return install.options(
        root=str(root), containerd=fake_containerd(tools, version), shim=str(shim)
    )


def tree(root: Path) -> dict[str, str]:
    """Every path below ``root``: file bytes, link targets, ``dir``."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                out[p] = "-> " + os.readlink(p)
            elif os.path.isdir(p):
                out[p] = "dir"
            else:
                out[p] = Path(p).read_text()
    return out


def quiet(line: str) -> None:
    """A report callback that drops the lines."""
