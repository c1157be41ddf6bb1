"""``containerd-shim-podshim-v1 -info`` (src/podshim/shim/info.py): containerd 2.x reads a
``containerd.types.RuntimeInfo`` from its stdout, with the OCI runtime's own ``features``
document in ``features`` (the JSON of ``<runtime> features`` in an Any of runtime-spec's
type URL), the options it wrote to stdin echoed in ``options``.

The OCI runtimes here are small scripts that print a features document of the test's own
(or fail), chosen as a Create would choose them: podshim's config ``runtime``, or
``binary_name`` of runc options. One test runs Debian's runc itself; one goes through the
C launcher, as containerd execs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2

from podshim import __version__
from podshim import errors as errdefs
from podshim.api.runc.options import oci_pb2
from podshim.api.runtimeoptions.v1 import api_pb2 as ro_pb2
from podshim.api.types import introspection_pb2
from podshim.oci import runc
from podshim.shim import flags as shimflags
from podshim.shim import info

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = "containerd-shim-podshim-v1"
FEATURES_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
ENTRY = f"""#!{sys.executable}
import sys
from podshim.shim.main import main
sys.exit(main())
"""


def fake_runtime(directory: Path, name: str, doc: Any = None, script: str = "") -> Path:
    """An executable ``name`` whose ``features`` prints ``doc`` as JSON (or runs
    ``script``); every other subcommand fails."""
    path = directory / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(doc, indent=4))
    body = script or f'cat "{directory / name}.json"'
    path.write_text(f'#!/bin/sh\n[ "$1" = features ] || exit 3\n{body}\n')
    path.chmod(0o755)
    return path


def doc_with(mount_options: list[str]) -> dict[str, Any]:
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "mountOptions": mount_options,
        "linux": {
            "namespaces": ["mount", "pid", "user"],
            "mountExtensions": {"idmap": {"enabled": True}},
        },
        "annotations": {"org.example.runtime": "fake"},
    }


def runc_options(binary: str) -> any_pb2.Any:
    o = oci_pb2.Options(binary_name=binary, root="/run/x")
    return any_pb2.Any(type_url="containerd.runc.v1.Options", value=o.SerializeToString())


def podshim_options(config: Path) -> any_pb2.Any:
    ro = ro_pb2.Options(type_url="io.containerd.podshim.v1.Options", config_path=str(config))
    return any_pb2.Any(type_url="runtimeoptions.v1.Options", value=ro.SerializeToString())


def run_info(
    stdin: bytes, program: list[str] | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``-info`` as containerd runs it: options on stdin, RuntimeInfo from stdout."""
    argv = program or [sys.executable, "-m", "podshim.shim.main"]
    return subprocess.run(
        [*argv, "-info"], input=stdin, capture_output=True, timeout=120, check=False,
        env=env or dict(os.environ),
    )  # fmt: skip


def decode(res: subprocess.CompletedProcess[bytes]) -> introspection_pb2.RuntimeInfo:
    assert res.returncode == 0, res.stderr.decode()
    return introspection_pb2.RuntimeInfo.FromString(res.stdout)


def features_of(ri: introspection_pb2.RuntimeInfo) -> Any:
    """What containerd's typeurl makes of ``features``: the URL names runtime-spec's
    Features, the value is its JSON."""
    assert ri.HasField("features")
    assert ri.features.type_url == FEATURES_URL
    return json.loads(ri.features.value)


# -- flags --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "want"),
    [(["-info"], True), (["--info"], True), (["-info=true"], True), (["-info=false"], False),
     (["-debug", "-info"], True), ([], False), (["-info", "start"], True)],
)  # fmt: skip
def test_info_is_a_boolean_flag(argv: list[str], want: bool) -> None:
    assert shimflags.parse(argv).info is want


def test_version_wins_over_info() -> None:
    res = run_info(b"", [sys.executable, "-m", "podshim.shim.main", "-v"])
    assert res.returncode == 0 and b"Version: " + __version__.encode() in res.stdout


# -- the RuntimeInfo ------------------------------------------------------------------------


@pytest.mark.parametrize("mount_options", [["ro", "rro", "rbind"], ["ro", "rbind"]])
def test_features_are_the_runtimes_own(tmp_path: Path, mount_options: list[str]) -> None:
    doc = doc_with(mount_options)
    rt = fake_runtime(tmp_path / "bin", "myruntime", doc)
    opts = runc_options(str(rt))
    ri = decode(run_info(opts.SerializeToString()))
    assert ri.name == "io.containerd.podshim.v1"
    assert ri.version.version == __version__
    assert ri.options == opts  # echoed as read
    got = features_of(ri)
    assert got == doc
    assert ("rro" in got["mountOptions"]) is ("rro" in mount_options)


def test_runtime_named_by_the_podshim_config(tmp_path: Path) -> None:
    doc = doc_with(["rro"])
    rt = fake_runtime(tmp_path / "bin", "cfgruntime", doc)
    config = tmp_path / "podshim.toml"
    config.write_text(f'runtime = "{rt}"\n')
    opts = podshim_options(config)
    ri = decode(run_info(opts.SerializeToString()))
    assert ri.options == opts
    assert features_of(ri) == doc


def test_without_options_the_default_runtime_is_found_on_path(tmp_path: Path) -> None:
    """No stdin (a handler without options): ``runc`` on containerd's PATH."""
    doc = doc_with(["rro", "ro"])
    bindir = tmp_path / "bin"
    fake_runtime(bindir, "runc", doc)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '')}")
    ri = decode(run_info(b"", env=env))
    assert not ri.HasField("options")
    assert features_of(ri) == doc


@pytest.mark.parametrize(
    "script",
    ['echo "unknown command features" >&2; exit 1', "echo '[1, 2]'", "echo '{nope'"],
    ids=["no-features-command", "not-an-object", "not-json"],
)
def test_a_runtime_that_cannot_tell_leaves_features_unset(tmp_path: Path, script: str) -> None:
    """As containerd's runc shim (youki, crun 1.8): the info itself still succeeds."""
    rt = fake_runtime(tmp_path / "bin", "quiet", script=script)
    ri = decode(run_info(runc_options(str(rt)).SerializeToString()))
    assert ri.name == "io.containerd.podshim.v1"
    assert not ri.HasField("features")


@pytest.mark.parametrize(
    ("make_stdin", "says"),
    [
        (lambda tmp: runc_options(str(tmp / "no-such-runtime")).SerializeToString(),
         "no-such-runtime"),
        (lambda tmp: b"\xff\xff\xff", "runtime options"),
        (lambda tmp: any_pb2.Any(type_url="x.y/Other", value=b"").SerializeToString(),
         "x.y/Other"),
        (lambda tmp: podshim_options(tmp / "missing.toml").SerializeToString(), "missing.toml"),
    ],
    ids=["missing-runtime", "not-an-any", "unknown-options-type", "missing-config"],
)  # fmt: skip
def test_bad_input_fails_with_the_reason(tmp_path: Path, make_stdin: Any, says: str) -> None:
    res = run_info(make_stdin(tmp_path))
    assert res.returncode == 1
    assert res.stdout == b""
    err = res.stderr.decode()
    assert err.startswith("io.containerd.podshim.v1: ") and says in err, err


@pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed")
def test_debian_runc_features_reach_containerd() -> None:
    """The real runc: the document is runc's own ``runc features`` output."""
    want = json.loads(subprocess.run(["runc", "features"], capture_output=True,
                                     check=True, timeout=60).stdout)  # fmt: skip
    got = features_of(decode(run_info(b"")))
    assert got == want
    assert "mountOptions" in got and "linux" in got


def test_through_the_launcher(tmp_path: Path) -> None:
    """containerd execs the C launcher: ``-info`` reaches the Python shim with stdin."""
    bindir = tmp_path / "shimbin"
    bindir.mkdir()
    subprocess.run(
        [sys.executable, "setup.py", "compile-launcher", str(bindir / LAUNCHER)],
        cwd=REPO, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (bindir / f"{LAUNCHER}-py").write_text(ENTRY)
    (bindir / f"{LAUNCHER}-py").chmod(0o755)
    doc = doc_with(["rro"])
    opts = runc_options(str(fake_runtime(tmp_path / "rt", "viarun", doc)))
    ri = decode(run_info(opts.SerializeToString(), [str(bindir / LAUNCHER)]))
    assert ri.options == opts
    assert features_of(ri) == doc


# -- the OCI driver's features (go-runc's Features) -------------------------------------------


def test_driver_features_errors(tmp_path: Path) -> None:
    with pytest.raises(errdefs.FailedPrecondition, match="cannot run"):
        runc.features(str(tmp_path / "absent"))
    slow = fake_runtime(tmp_path, "slow", script="exec sleep 30")
    with pytest.raises(errdefs.Unknown, match="no answer"):
        runc.features(str(slow), timeout=0.5)
    failing = fake_runtime(tmp_path, "failing", script="echo boom >&2; exit 1")
    with pytest.raises(errdefs.Unknown, match="failing features failed: boom"):
        runc.features(str(failing))
    assert runc.features_args() == ["features"]


def test_info_module_reads_stdin_like_containerd() -> None:
    assert info.read_options(b"") is None
    opts = runc_options("runc")
    assert info.read_options(opts.SerializeToString()) == opts
