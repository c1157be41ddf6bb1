"""The TOML pieces of podshim install: the imports edit keeps the file's bytes, the
containerd version parse, which files containerd loads and which CRI section wins."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from podshim.admin import ctdconfig, tomledit

MAIN = """\
# comment kept
version = 2   # trailing comment kept
root = "/var/lib/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"
"""


def test_add_then_remove_import_gives_back_the_same_bytes() -> None:
    added = tomledit.add_import(MAIN, "/etc/containerd/conf.d/podshim.toml")
    assert added.count("\n") == MAIN.count("\n") + 1
    assert tomllib.loads(added)["imports"] == ["/etc/containerd/conf.d/podshim.toml"]
    assert tomllib.loads(added)["grpc"] == tomllib.loads(MAIN)["grpc"]  # not under [grpc]
    assert tomledit.add_import(added, "/etc/containerd/conf.d/podshim.toml") == added
    assert tomledit.remove_import(added, "/etc/containerd/conf.d/podshim.toml") == MAIN


def test_an_existing_multiline_imports_array_is_extended_and_restored() -> None:
    text = 'version = 2\nimports = [\n  "/a.toml",  # the node agent\'s\n]\n'
    added = tomledit.add_import(text, "/p.toml")
    assert tomllib.loads(added)["imports"] == ["/a.toml", "/p.toml"]
    assert "# the node agent's" in added
    assert tomllib.loads(tomledit.remove_import(added, "/p.toml"))["imports"] == ["/a.toml"]
    assert tomledit.remove_import(text, "/p.toml") == text


@pytest.mark.parametrize(
    "output, version",
    [
        ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3", (1, 6, 20)),
        ("containerd github.com/containerd/containerd/v2 2.1.9+unknown ", (2, 1, 9)),
        ("containerd containerd.io v1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da", (1, 7, 27)),
        ("containerd (devel)", None),
    ],
)
def test_parse_version(output: str, version: tuple[int, int, int] | None) -> None:
    assert ctdconfig.parse_version(output) == version


def test_imported_files_follow_containerds_order(tmp_path: Path) -> None:
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    (conf_d / "b.toml").write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  x = "b"\n'
    )
    (conf_d / "a.toml").write_text(f'version = 2\nimports = ["{tmp_path}/nested.toml"]\n')
    (tmp_path / "nested.toml").write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  x = "n"\n'
    )
    main = tmp_path / "config.toml"
    main.write_text(
        'version = 2\nimports = ["conf.d/*.toml"]\n[plugins."io.containerd.grpc.v1.cri"]\n  x = "main"\n'
    )
    _, table = ctdconfig.read(str(main))
    files = ctdconfig.imported_files(str(main), table)
    assert [Path(n).name for n, _ in files] == ["a.toml", "nested.toml", "b.toml"]
    found = ctdconfig.effective_section([(str(main), table), *files], ctdconfig.CRI_V2)
    assert found is not None and found[1] == {"x": "b"}


def test_render_starts_with_the_marker_and_round_trips() -> None:
    table = {"version": 2, "plugins": {"io.containerd.grpc.v1.cri": {"a": {"b": [1, 2]}}}}
    text = tomledit.render("line one\nline two", table)
    assert text.splitlines()[0] == tomledit.MARKER
    assert tomllib.loads(text) == table
