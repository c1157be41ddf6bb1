"""Build the guest kernel from Debian's ``linux-source-6.1``.

``make allnoconfig`` with this package's ``kernel.config`` as ``KCONFIG_ALLCONFIG``, then
``olddefconfig``; every symbol the fragment sets must still be set the same way after it
(Kconfig silently drops a symbol whose dependencies are missing: the build fails naming
it). The patches in ``patches/`` are applied first, in name order. ``make vmlinux``
(PVH-bootable: QEMU's microvm loads the ELF directly), stripped, is the result.

About 4 minutes on 2 cores. The tree is unpacked under ``<image dir>/build`` and removed
after a successful build; make's output is in ``<image dir>/build/make.log`` (quoted on
failure).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable

from podshim import errors as errdefs
from podshim.host.uvm import guest

__all__ = ["BUILD_DEPS", "build_kernel", "check_config", "fragment_symbols", "missing_tools"]

ARCH = "x86_64"
#: (tool or header, the Debian package that has it)
BUILD_DEPS = (
    ("make", "build-essential"),
    ("gcc", "build-essential"),
    ("ld", "binutils"),
    ("strip", "binutils"),
    ("patch", "patch"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("/usr/include/gelf.h", "libelf-dev"),
    ("/usr/include/openssl/opensslv.h", "libssl-dev"),
)
_SYMBOL = re.compile(r"^(CONFIG_\w+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def missing_tools() -> list[str]:
    """The Debian packages of missing build tools, each once."""
    missing: list[str] = []
    for tool, package in BUILD_DEPS:
        found = os.path.exists(tool) if tool.startswith("/") else shutil.which(tool)
        if not found and package not in missing:
            missing.append(package)
    return missing


def fragment_symbols(path: str | None = None) -> dict[str, str]:
    """The settings of a config (default: the fragment): ``CONFIG_X=v`` lines, and
    ``# CONFIG_X is not set`` as "n"."""
    symbols: dict[str, str] = {}
    with open(path or guest.FRAGMENT, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if m := _SYMBOL.match(line):
                symbols[m.group(1)] = m.group(2)
            elif m := _UNSET.match(line):
                symbols[m.group(1)] = "n"
    return symbols


def check_config(config: str, wanted: dict[str, str]) -> list[str]:
    """The symbols of ``wanted`` that the ``.config`` at ``config`` does not have as wanted."""
    have = fragment_symbols(config)
    return sorted(k for k, v in wanted.items() if have.get(k, "n") != v)


def _run(argv: list[str], cwd: str, log_path: str, env: dict[str, str] | None = None) -> None:
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        done = subprocess.run(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
    if done.returncode != 0:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - 3000))
            tail = f.read().decode(errors="replace")
        raise errdefs.Internal(
            f"guest kernel build: {' '.join(argv)} failed ({done.returncode}); "
            f"log {log_path}, its end:\n{tail}"
        )


def _unpack(source: str, build: str, log_path: str, log: Log) -> str:
    log(f"unpacking {source}")
    _run(["tar", "-xf", source, "-C", build], build, log_path)
    trees = [n for n in os.listdir(build) if os.path.isfile(os.path.join(build, n, "Makefile"))]
    if len(trees) != 1:
        raise errdefs.FailedPrecondition(f"{source}: not one kernel tree at its top: {trees}")
    return os.path.join(build, trees[0])


def build_kernel(
    out: str,
    directory: str = guest.DEFAULT_DIR,
    *,
    source: str | None = None,
    jobs: int | None = None,
    keep_tree: bool = False,
    log: Log = _stderr,
) -> None:
    """Build the guest kernel into ``out`` (atomically; FailedPrecondition naming the
    package when the source or a build tool is missing, Internal with make's log when the
    build fails)."""
    source = source or guest.KERNEL_SOURCE
    if not os.path.isfile(source):
        raise errdefs.FailedPrecondition(
            f"{source} not found: apt-get install {guest.KERNEL_SOURCE_PACKAGE}"
        )
    missing = missing_tools()
    if missing:
        raise errdefs.FailedPrecondition(
            f"building the guest kernel needs: apt-get install {' '.join(missing)}"
        )
    build = os.path.join(directory, "build")
    shutil.rmtree(build, ignore_errors=True)
    os.makedirs(build)
    make_log = os.path.join(build, "make.log")
    tree = _unpack(source, build, make_log, log)
    for patch in guest.patch_files():
        log(f"applying {os.path.basename(patch)}")
        _run(["patch", "-p1", "--forward", "--batch", "-i", patch], tree, make_log)
    env = {**os.environ, "KCONFIG_ALLCONFIG": guest.FRAGMENT, "ARCH": ARCH}
    _run(["make", "-s", "allnoconfig"], tree, make_log, env)
    env.pop("KCONFIG_ALLCONFIG")
    _run(["make", "-s", "olddefconfig"], tree, make_log, env)
    lost = check_config(os.path.join(tree, ".config"), fragment_symbols())
    if lost:
        raise errdefs.Internal(
            "guest kernel config: these symbols of kernel.config did not survive "
            f"olddefconfig (a dependency is missing): {', '.join(lost)}"
        )
    n = jobs or os.cpu_count() or 1
    log(f"building the guest kernel (make -j{n} vmlinux; ~4 min on 2 cores), log {make_log}")
    _run(["make", f"-j{n}", "vmlinux"], tree, make_log, env)
    tmp = f"{out}.tmp.{os.getpid()}"
    try:
        _run(["strip", "-o", tmp, os.path.join(tree, "vmlinux")], tree, make_log)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if not keep_tree:
        shutil.rmtree(build, ignore_errors=True)
