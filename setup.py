"""podshim's build steps beyond setuptools' defaults: compile its two C programs.

``podshim-init`` (``src/podshim/host/namespaces/podshim-init.c``) is the PID-namespace init
of pods that share their PID namespace (CRI's default). It is a program of its own, not a
Python extension: this step compiles it with the C compiler (static when libc.a is there,
so the binary runs in any mount namespace) into the package, next to the module that
runs it, where ``find_init_binary`` looks first.

The launcher (``src/podshim/shim/launcher.c``) is installed as the shim binary
``containerd-shim-podshim-v1`` in the environment's ``bin`` (a script of the distribution,
compiled by ``build_scripts``: a wheel carries it in ``.data/scripts``): it answers
containerd's common ``start`` and ``delete`` itself and execs the Python shim, the console
script ``containerd-shim-podshim-v1-py``, for everything else. podshim's version is compiled
into it (node-scope socket names carry it).

The wheel is therefore tagged for the platform but not for a Python version or ABI
(``py3-none-linux_<arch>``).

Everything else about the distribution is in ``pyproject.toml``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
INIT_SRC = os.path.join("src", "podshim", "host", "namespaces", "podshim-init.c")
INIT_REL = os.path.join("podshim", "host", "namespaces", "podshim-init")
LAUNCHER_SRC = os.path.join("src", "podshim", "shim", "launcher.c")
#: compiled with it (launcher.h is their shared header)
LAUNCHER_EXTRA = tuple(
    os.path.join("src", "podshim", "shim", f) for f in ("launcher_zygote.c", "launcher_sha256.c")
)
LAUNCHER = "containerd-shim-podshim-v1"


def version() -> str:
    """podshim's ``__version__``, read from the source (the launcher is built with it)."""
    with open(os.path.join(HERE, "src", "podshim", "__init__.py")) as f:
        found = re.search(r'^__version__ = "([0-9A-Za-z.+_-]+)"$', f.read(), re.M)
    if not found:
        raise SystemExit("setup.py: no plain __version__ in src/podshim/__init__.py")
    return found.group(1)


def compile_init(out: str) -> None:
    """Compile podshim-init to ``out`` (mode 0755), static if the toolchain can."""
    compile_c(INIT_SRC, out, "podshim-init")


def compile_launcher(out: str) -> None:
    """Compile the launcher to ``out`` (mode 0755), static if the toolchain can."""
    compile_c(
        LAUNCHER_SRC, out, "the shim launcher", f'-DPODSHIM_VERSION="{version()}"',
        extra=LAUNCHER_EXTRA,
    )


def compile_c(source: str, out: str, what: str, *defines: str, extra: tuple[str, ...] = ()) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SystemExit(
            f"building podshim needs a C compiler for {what} "
            "(Debian: apt-get install gcc libc6-dev)"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    srcs = [os.path.join(HERE, s) for s in (source, *extra)]
    flags = ["-O2", "-Wall", "-Wextra", *defines, "-o", tmp, *srcs]
    static = subprocess.run([cc, "-static", *flags], stderr=subprocess.DEVNULL, check=False)
    if static.returncode != 0:
        subprocess.run([cc, *flags], check=True)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)


class BuildPy(build_py):
    """setuptools' build_py, plus podshim-init compiled into the built package (into the
    source tree for an editable install, where the package is imported from)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            compile_init(os.path.join(HERE, "src", INIT_REL))
        else:
            compile_init(os.path.join(self.build_lib, INIT_REL))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, INIT_REL))
        return outputs


#: distutils' build_scripts as setuptools provides it (it has no module of its own for it)
build_scripts = Distribution().get_command_class("build_scripts")


class BuildScripts(build_scripts):  # type: ignore[valid-type,misc]
    """The launcher, the one script (its source: ``scripts`` in ``setup()``), compiled where
    ``install_scripts`` takes the scripts from (into the wheel's ``.data/scripts``, which
    pip installs into ``bin``; an editable install too)."""

    def copy_scripts(self) -> tuple[list[str], list[str]]:
        out = os.path.join(self.build_dir, LAUNCHER)
        compile_launcher(out)
        return [out], [out]


class NativeDistribution(Distribution):
    """Holds native programs: installed as platform-specific (platlib, the wheel's root)."""

    def has_ext_modules(self) -> bool:
        return True


class BdistWheel(bdist_wheel):
    """A platform wheel (it holds a native program) for any Python 3."""

    def get_tag(self) -> tuple[str, str, str]:
        _python, _abi, platform = super().get_tag()
        return "py3", "none", platform


if sys.argv[1:2] == ["compile-init"]:  # scripts/install.sh: `python setup.py compile-init OUT`
    compile_init(sys.argv[2])
elif sys.argv[1:2] == ["compile-launcher"]:  # scripts/install.sh, tests: `... compile-launcher OUT`
    compile_launcher(sys.argv[2])
else:
    setup(
        distclass=NativeDistribution,
        scripts=[LAUNCHER_SRC],  # compiled by BuildScripts, not copied
        cmdclass={"build_py": BuildPy, "build_scripts": BuildScripts, "bdist_wheel": BdistWheel},
    )
