"""containerd's ``config.toml`` as ``podshim install`` reads and edits it.

Facts about containerd this module relies on (checked against 1.6.20, 1.7.24 and 2.1.9
with ``containerd config dump``):

* ``imports`` names more files (globs, relative to the main file's directory), loaded
  after the main file, depth first.
* containerd 1.6 and 1.7 **replace** a whole ``[plugins."<id>"]`` section with an imported
  file's section of the same plugin; 2.x merges the tables deeply. So on 1.x podshim's
  drop-in carries the CRI plugin's whole section as the files before it define it, plus
  podshim's handlers.
* Each file is read in the dialect of its own ``version`` (2 for 1.x; 2 or 3 for 2.x,
  which migrates each file), but on 2.x a ``version = 3`` drop-in next to a
  ``version = 2`` main file is read wrongly: the drop-in follows the main file's version.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import tomllib
from dataclasses import dataclass
from typing import Any

from podshim import RUNTIME_TYPE as PODSHIM_RUNTIME_TYPE
from podshim.admin.errors import AdminError

#: the CRI plugin of a ``version = 2`` file, and the runtime half of it in ``version = 3``
CRI_V2 = "io.containerd.grpc.v1.cri"
CRI_RUNTIME_V3 = "io.containerd.cri.v1.runtime"
#: podshim's runtime type (containerd runs ``containerd-shim-podshim-v1`` for it)
RUNTIME_TYPE = PODSHIM_RUNTIME_TYPE  # the one definition: podshim.RUNTIME_TYPE
SHIM_BINARY = "containerd-shim-podshim-v1"

_VERSION = re.compile(r"\sv?(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class ContainerdBinary:
    """A containerd binary and the version it reports."""

    path: str
    version: tuple[int, int, int]
    text: str

    @property
    def short(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    @property
    def replaces_plugin_sections(self) -> bool:
        """1.x: an imported file's plugin section replaces the main file's whole."""
        return self.version[0] < 2


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``(1, 6, 20)`` from ``containerd --version`` output, or ``None``."""
    found = _VERSION.search(" " + text)
    if found is None:
        return None
    return int(found.group(1)), int(found.group(2)), int(found.group(3))


def probe(binary: str) -> ContainerdBinary:
    """Run ``<binary> --version``.

    Raises:
        AdminError: not found, not runnable or an unknown answer.
    """
    try:
        res = subprocess.run(
            [binary, "--version"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
    except FileNotFoundError:
        raise AdminError(
            f"containerd not found ({binary}): install containerd, or name its binary "
            "with --containerd"
        ) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AdminError(f"cannot run {binary} --version: {exc}") from None
    version = parse_version(res.stdout)
    if res.returncode != 0 or version is None:
        raise AdminError(
            f"{binary} --version did not name a containerd version "
            f"(exit {res.returncode}): {(res.stdout + res.stderr).strip()[:200]}"
        )
    return ContainerdBinary(binary, version, res.stdout.strip())


def dump(binary: str, config: str) -> str:
    """``containerd --config <config> config dump``: the effective configuration.

    Raises:
        AdminError: containerd refused the file (its message is included).
    """
    try:
        res = subprocess.run(
            [binary, "--config", config, "config", "dump"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AdminError(f"cannot run {binary} config dump: {exc}") from None
    if res.returncode != 0:
        raise AdminError(f"containerd cannot load {config}: {res.stderr.strip()[-400:]}")
    return res.stdout


def read(path: str) -> tuple[bytes, dict[str, Any]]:
    """The bytes and the parsed table of a containerd config file.

    Raises:
        AdminError: missing, unreadable or not TOML.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise AdminError(
            f"{path} does not exist: write containerd's config first "
            f"(containerd config default > {path}), or name it with --config"
        ) from None
    except OSError as exc:
        raise AdminError(f"cannot read {path}: {exc.strerror}") from None
    try:
        table = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AdminError(f"{path} is not valid TOML: {exc}") from None
    return data, table


def config_version(path: str, table: dict[str, Any], binary: ContainerdBinary) -> int:
    """The file's ``version``, checked against what ``binary`` reads.

    Raises:
        AdminError: version 1 (plugin names podshim does not edit), or 3 on 1.x.
    """
    version = table.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version not in (1, 2, 3):
        raise AdminError(f"{path}: unknown config version {version!r}")
    if version == 1:
        raise AdminError(
            f"{path} is a version 1 config (no `version = 2`): podshim edits version 2 "
            "and 3 configs only; migrate it (containerd 1.7+: containerd config migrate)"
        )
    if version == 3 and binary.version[0] < 2:
        raise AdminError(f"{path}: version = 3 needs containerd 2.x, this is {binary.short}")
    return version


def cri_plugin(version: int) -> str:
    """The plugin holding the runtime handlers in a file of ``version``."""
    return CRI_V2 if version == 2 else CRI_RUNTIME_V3


def runtimes_of(table: dict[str, Any], version: int) -> dict[str, Any]:
    """The ``containerd.runtimes`` table of one file (``{}`` when absent)."""
    section = table.get("plugins", {}).get(cri_plugin(version), {})
    found = section.get("containerd", {}).get("runtimes", {}) if isinstance(section, dict) else {}
    return found if isinstance(found, dict) else {}


def imports_of(table: dict[str, Any]) -> list[str]:
    """The ``imports`` entries of one file, as written."""
    value = table.get("imports", [])
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def expand_import(entry: str, base_dir: str) -> list[str]:
    """The files one ``imports`` entry names (a glob, relative to ``base_dir``)."""
    pattern = entry if os.path.isabs(entry) else os.path.join(base_dir, entry)
    if glob.has_magic(pattern):
        return sorted(glob.glob(pattern))
    return [pattern]


def imported_files(path: str, table: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every file ``path`` imports, depth first, in containerd's order, parsed.

    Raises:
        AdminError: an imported file is unreadable or not TOML.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    seen = {os.path.abspath(path)}

    def walk(parent: str, parent_table: dict[str, Any]) -> None:
        for entry in imports_of(parent_table):
            for name in expand_import(entry, os.path.dirname(parent)):
                name = os.path.abspath(name)
                if name in seen:
                    continue
                seen.add(name)
                _, sub = read(name)
                out.append((name, sub))
                walk(name, sub)

    walk(path, table)
    return out


def effective_section(
    files: list[tuple[str, dict[str, Any]]], plugin: str
) -> tuple[str, dict[str, Any]] | None:
    """1.x: the ``[plugins."<plugin>"]`` section in force, from the last of ``files``
    (in load order) that has one, with the file it comes from."""
    found: tuple[str, dict[str, Any]] | None = None
    for name, table in files:
        section = table.get("plugins", {}).get(plugin)
        if isinstance(section, dict):
            found = (name, section)
    return found
