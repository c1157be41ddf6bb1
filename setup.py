"""podshim's one build step beyond setuptools' defaults: compile ``podshim-init``.

``podshim-init`` (``src/podshim/host/namespaces/podshim-init.c``) is the PID-namespace init
of pods that share their PID namespace (CRI's default). It is a program of its own, not a
Python extension: this step compiles it with the C compiler (static when libc.a is there,
so the binary runs in any mount namespace) into the package, next to the module that
runs it, where ``find_init_binary`` looks first. The wheel is therefore tagged for the
platform but not for a Python version or ABI (``py3-none-linux_<arch>``).

Everything else about the distribution is in ``pyproject.toml``.
"""

from __future__ import annotations

import os
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


def compile_init(out: str) -> None:
    """Compile podshim-init to ``out`` (mode 0755), static if the toolchain can."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SystemExit(
            "building podshim needs a C compiler for podshim-init "
            "(Debian: apt-get install gcc libc6-dev)"
        )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    src = os.path.join(HERE, INIT_SRC)
    flags = ["-O2", "-Wall", "-Wextra", "-o", tmp, src]
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


class NativeDistribution(Distribution):
    """Holds a native program: installed as platform-specific (platlib, the wheel's root)."""

    def has_ext_modules(self) -> bool:
        return True


class BdistWheel(bdist_wheel):
    """A platform wheel (it holds a native program) for any Python 3."""

    def get_tag(self) -> tuple[str, str, str]:
        _python, _abi, platform = super().get_tag()
        return "py3", "none", platform


if sys.argv[1:2] == ["compile-init"]:  # scripts/install.sh: `python setup.py compile-init OUT`
    compile_init(sys.argv[2])
else:
    setup(distclass=NativeDistribution, cmdclass={"build_py": BuildPy, "bdist_wheel": BdistWheel})
