"""podshim install / uninstall on a fake node (temporary root, fake containerd binary):
what is written for each containerd line, idempotence, bad input, the manifest checks."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from podshim.admin import changes, install, uninstall
from podshim.admin import manifest as mf
from podshim.admin.errors import AdminError
from tests.unit.admin_fakes import MAIN_V2, MAIN_V3, node, quiet, tree

CRI = "io.containerd.grpc.v1.cri"
CRI3 = "io.containerd.cri.v1.runtime"


def _load(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


def test_1x_dropin_carries_the_whole_cri_section_and_uninstall_restores_bytes(
    tmp_path: Path,
) -> None:
    opts = node(tmp_path, "1.6.20")
    before = tree(tmp_path)
    install.run(opts, dry_run=False, report=quiet)

    dropin = _load(opts.dropin)
    assert dropin["version"] == 2
    section = dropin["plugins"][CRI]
    main = tomllib.loads(MAIN_V2)["plugins"][CRI]
    runtimes = section["containerd"]["runtimes"]
    # the main file's CRI section, whole, plus the two handlers
    assert section["sandbox_image"] == main["sandbox_image"]
    assert section["cni"] == main["cni"]
    assert runtimes["runc"] == main["containerd"]["runtimes"]["runc"]
    assert runtimes["podshim"] == {
        "runtime_type": "io.containerd.podshim.v1",
        "options": {"ConfigPath": os.path.join(opts.podshim_dir, "config.toml")},
    }  # no runtime_path: 1.6 ignores it
    node_cfg = runtimes["podshim-node"]["options"]["ConfigPath"]
    assert _load(node_cfg)["shim_scope"] == "node"
    text = Path(opts.config).read_text()
    assert text == MAIN_V2.replace(
        'root = "/var/lib/containerd"\n',
        f'root = "/var/lib/containerd"\nimports = ["{opts.dropin}"]\n',
    )  # one line added, comments and layout kept
    assert os.readlink(opts.link) == opts.shim

    assert uninstall.run(opts, dry_run=False, report=quiet) == 0
    assert tree(tmp_path) == before


def test_2x_dropin_has_only_the_handlers_in_the_main_files_dialect(tmp_path: Path) -> None:
    opts = node(tmp_path, "2.1.9", MAIN_V3)
    install.run(opts, dry_run=False, report=quiet)
    dropin = _load(opts.dropin)
    assert dropin["version"] == 3
    assert list(dropin["plugins"]) == [CRI3]
    runtimes = dropin["plugins"][CRI3]["containerd"]["runtimes"]
    assert set(dropin["plugins"][CRI3]) == {"containerd"}
    assert runtimes["podshim"]["runtime_path"] == opts.link  # 1.7+ read it


def test_2x_with_a_version_2_main_file_writes_a_version_2_dropin(tmp_path: Path) -> None:
    opts = node(tmp_path, "2.0.0", MAIN_V2)
    install.run(opts, dry_run=False, report=quiet)
    dropin = _load(opts.dropin)
    assert dropin["version"] == 2
    assert set(dropin["plugins"][CRI]) == {"containerd"}  # deep merge: no copy on 2.x


def test_1x_copies_the_section_from_the_last_file_that_sets_it(tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(f'version = 2\n[plugins."{CRI}"]\n  sandbox_image = "from-import"\n')
    opts = node(
        tmp_path,
        "1.7.24",
        MAIN_V2.replace("version = 2\n", f'version = 2\nimports = ["{other}"]\n'),
    )
    install.run(opts, dry_run=False, report=quiet)
    assert _load(opts.dropin)["plugins"][CRI]["sandbox_image"] == "from-import"
    assert _load(opts.config)["imports"] == [str(other), opts.dropin]  # ours last


def test_install_twice_changes_nothing_and_dry_run_changes_nothing(tmp_path: Path) -> None:
    opts = node(tmp_path)
    lines: list[str] = []
    before = tree(tmp_path)
    install.run(opts, dry_run=True, report=lines.append)
    assert tree(tmp_path) == before
    assert any(line.startswith("would edit " + opts.config) for line in lines)
    install.run(opts, dry_run=False, report=quiet)
    done = tree(tmp_path)
    assert install.plan(opts).changes == []
    install.run(opts, dry_run=False, report=quiet)
    assert tree(tmp_path) == done
    assert uninstall.run(opts, dry_run=False, report=quiet) == 0
    assert uninstall.run(opts, dry_run=False, report=quiet) == 0  # nothing recorded: no-op
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no-containerd", "containerd not found"),
        ("bad-toml", "not valid TOML"),
        ("containerd-refuses", "containerd cannot load"),
        ("no-config", "does not exist"),
        ("version-1", "version 1 config"),
        ("taken", "taken"),
        ("not-root", "must run as root"),
        ("foreign-link", "is not podshim install's link"),
        ("config-is-a-link", "is a link"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, breakage: str, message: str
) -> None:
    opts = node(tmp_path)
    config = Path(opts.config)
    if breakage == "no-containerd":
        opts = install.options(
            root=str(tmp_path / "root"), containerd=str(tmp_path / "nope"), shim=opts.shim
        )
    elif breakage == "bad-toml":
        config.write_text("version = 2\n[plugins\n")
    elif breakage == "containerd-refuses":
        config.write_text(MAIN_V2 + "# BROKEN\n")
    elif breakage == "no-config":
        config.unlink()
    elif breakage == "version-1":
        config.write_text('[plugins.cri]\n  sandbox_image = "x"\n')
    elif breakage == "taken":
        config.write_text(
            MAIN_V2 + f'[plugins."{CRI}".containerd.runtimes.podshim]\n'
            '  runtime_type = "io.containerd.kata.v2"\n'
        )
    elif breakage == "not-root":
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
    elif breakage == "config-is-a-link":
        real = tmp_path / "real.toml"
        config.rename(real)
        config.symlink_to(real)
    elif breakage == "foreign-link":
        os.makedirs(opts.bin_dir)
        os.symlink("/usr/bin/true", opts.link)
    before = tree(tmp_path)
    with pytest.raises(AdminError, match=message):
        install.run(opts, dry_run=False, report=quiet)
    assert tree(tmp_path) == before


def test_a_failed_change_undoes_the_earlier_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = node(tmp_path)
    before = tree(tmp_path)
    real = changes._do

    def failing(change: changes.Change) -> mf.Entry:
        if change.kind == "edit":
            raise OSError(28, "No space left on device")
        return real(change)

    monkeypatch.setattr(changes, "_do", failing)
    with pytest.raises(AdminError, match="undone"):
        install.run(opts, dry_run=False, report=quiet)
    assert tree(tmp_path) == before


def test_main_config_edited_after_install_loses_only_the_import(tmp_path: Path) -> None:
    opts = node(tmp_path)
    install.run(opts, dry_run=False, report=quiet)
    with open(opts.config, "a") as f:
        f.write('\n[debug]\n  level = "debug"\n')
    assert uninstall.run(opts, dry_run=False, report=quiet) == 0
    assert Path(opts.config).read_text() == MAIN_V2 + '\n[debug]\n  level = "debug"\n'
    assert Path(opts.config + ".before-podshim").read_text() == MAIN_V2  # kept


def _edit_manifest(opts: install.Options, change: Any) -> None:
    raw = json.loads(Path(opts.manifest).read_text())
    change(raw["entries"])
    Path(opts.manifest).write_text(json.dumps(raw))


def test_uninstall_refuses_what_a_hand_edited_manifest_adds(tmp_path: Path) -> None:
    opts = node(tmp_path)
    install.run(opts, dry_run=False, report=quiet)
    victim = tmp_path / "precious.toml"
    victim.write_text("mine\n")
    link = tmp_path / "link"
    link.symlink_to("/usr/bin/true")
    _edit_manifest(
        opts,
        lambda entries: entries.extend(
            [
                # the right checksum, but not a file install writes (no marker line)
                {"kind": "file", "path": str(victim), "sha256": mf.sha256(b"mine\n")},
                {"kind": "symlink", "path": str(link), "target": "/usr/bin/true"},
            ]
        ),
    )
    lines: list[str] = []
    assert uninstall.run(opts, dry_run=False, report=lines.append) == 1
    assert victim.read_text() == "mine\n" and link.is_symlink()
    assert sum(line.startswith("refused:") for line in lines) == 2, lines
    assert not os.path.exists(opts.dropin)  # what install did add is gone
    kept = mf.load(opts.manifest)
    assert kept is not None and {e.path for e in kept.entries} >= {str(victim), str(link)}


def test_uninstall_keeps_a_file_changed_since_install(tmp_path: Path) -> None:
    opts = node(tmp_path)
    install.run(opts, dry_run=False, report=quiet)
    pod_cfg = os.path.join(opts.podshim_dir, "config.toml")
    with open(pod_cfg, "a") as f:
        f.write('log_level = "debug"\n')
    assert uninstall.run(opts, dry_run=False, report=quiet) == 1
    assert Path(pod_cfg).read_text().endswith('log_level = "debug"\n')
    assert Path(opts.config).read_text() == MAIN_V2


def test_an_existing_podshim_config_is_kept_and_checked(tmp_path: Path) -> None:
    opts = node(tmp_path)
    os.makedirs(opts.podshim_dir)
    mine = Path(opts.podshim_dir) / "config.toml"
    mine.write_text('log_level = "debug"\n')
    lines: list[str] = []
    install.run(opts, dry_run=False, report=lines.append)
    assert any("keeping your" in line for line in lines)
    assert uninstall.run(opts, dry_run=False, report=quiet) == 0
    assert mine.read_text() == 'log_level = "debug"\n'
    (Path(opts.podshim_dir) / "node.toml").write_text('shim_scope = "pod"\n')
    with pytest.raises(AdminError, match="shim_scope"):
        install.run(opts, dry_run=False, report=quiet)


@pytest.mark.parametrize(
    "imports, edited",
    [
        ('["conf.d/*.toml"]', False),  # 2.x: an import glob that loads the drop-in already
        ('["/elsewhere/*.toml"]', True),
        ('["*"]', True),  # a * does not cross a /, as in Go's filepath.Match
    ],
)
def test_2x_uses_an_existing_import_glob(tmp_path: Path, imports: str, edited: bool) -> None:
    opts = node(
        tmp_path, "2.1.9", MAIN_V3.replace("version = 3\n", f"version = 3\nimports = {imports}\n")
    )
    main = Path(opts.config).read_bytes()
    install.run(opts, dry_run=False, report=quiet)
    assert (Path(opts.config).read_bytes() != main) is edited
    assert os.path.exists(opts.dropin)
    assert uninstall.run(opts, dry_run=False, report=quiet) == 0
    assert Path(opts.config).read_bytes() == main and not os.path.exists(opts.dropin)
