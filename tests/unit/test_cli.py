"""``podshim`` command line: ``demo`` needs the test lab (podshim_lab), which the runtime
never imports statically; without it the command says how to install it."""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

from podshim import __version__, cli

SRC = Path(cli.__file__).resolve().parent


def _lab_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if podshim_lab were not installed: importing it fails, find_spec finds nothing."""
    for name in list(sys.modules):
        if name == cli.LAB_PACKAGE or name.startswith(cli.LAB_PACKAGE + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, cli.LAB_PACKAGE, None)  # import raises ModuleNotFoundError


def test_demo_without_the_lab_prints_one_line_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _lab_gone(monkeypatch)
    assert cli.main(["demo"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == cli.DEMO_NEEDS_LAB + "\n"
    assert "pip install ./lab" in err


def test_demo_when_find_spec_finds_no_lab(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    asked: list[str] = []

    def find_spec(name: str, package: str | None = None) -> importlib.machinery.ModuleSpec | None:
        asked.append(name)
        return None if name.split(".")[0] == cli.LAB_PACKAGE else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr() == ("", cli.DEMO_NEEDS_LAB + "\n")
    assert cli.LAB_PACKAGE in asked


def test_demo_runs_the_labs_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    package = types.ModuleType(cli.LAB_PACKAGE)
    package.__spec__ = importlib.machinery.ModuleSpec(cli.LAB_PACKAGE, None, is_package=True)
    package.__path__ = []
    demo = types.ModuleType(f"{cli.LAB_PACKAGE}.demo")
    demo.__spec__ = importlib.machinery.ModuleSpec(demo.__name__, None)

    def run() -> int:
        calls.append("run")
        return 7

    demo.run = run  # type: ignore[attr-defined]
    package.demo = demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, cli.LAB_PACKAGE, package)
    monkeypatch.setitem(sys.modules, demo.__name__, demo)
    assert cli.main(["demo"]) == 7
    assert calls == ["run"]


def test_version_needs_no_lab(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _lab_gone(monkeypatch)
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out == f"podshim {__version__}\n"


def test_runtime_never_imports_the_lab_statically() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.split(".")[0] == cli.LAB_PACKAGE:
                    offenders.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {name}")
    assert not offenders


def test_importing_the_cli_and_version_load_no_lab() -> None:
    code = (
        "import sys\n"
        "from podshim import cli\n"
        "assert cli.main(['version']) == 0\n"
        f"lab = sorted(m for m in sys.modules if m.split('.')[0] == {cli.LAB_PACKAGE!r})\n"
        "assert not lab, lab\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"podshim {__version__}\n"


def test_admin_commands_load_their_work_only_when_they_run() -> None:
    """``podshim --help`` and each admin command's ``--help`` build the parser without
    importing install, check or tomlkit (so the help stays fast)."""
    code = (
        "import sys\n"
        "from podshim import cli\n"
        "parser = cli.build_parser()\n"
        "for name in ('check', 'install', 'uninstall'):\n"
        "    assert name in parser.format_help(), name\n"
        "heavy = ('podshim.admin.install', 'podshim.admin.check', 'tomlkit', 'podshim.service')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert res.stdout.strip() == "[]", res.stdout
