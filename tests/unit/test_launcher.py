"""The launcher (``src/podshim/shim/launcher.c``): its fast ``start`` and ``delete`` answer
exactly as the Python shim does, and everything else reaches the Python shim unchanged.

The launcher is compiled from the source into a directory with a stand-in Python entry
``containerd-shim-podshim-v1-py``: with ``LAUNCHER_TEST_MARK`` set it only records how it
was run (argv, cwd, stdin, an environment variable) and exits, so a test can tell that
Python ran; without it, it is podshim's real Python shim, the reference.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2

from podshim import __version__
from podshim.api.runtimeoptions.v1 import api_pb2 as ro_pb2
from podshim.api.task.v2 import shim_pb2
from podshim.oci import bundle as files
from podshim.shim import spawn, start
from podshim.shim.paths import socket_path

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = "containerd-shim-podshim-v1"
ENTRY = f"{LAUNCHER}-py"
NS = "k8s.io"
ADDRESS = "/run/containerd/containerd.sock"
SANDBOX = "io.kubernetes.cri.sandbox-id"
GROUP = "io.containerd.podshim.v1.group"
STAND_IN = """#!{python}
import os, sys
mark = os.environ.get("LAUNCHER_TEST_MARK")
if mark:  # record how the launcher ran us, and stop there
    import json
    try:
        stdin = b"" if os.isatty(0) else os.read(0, 1 << 16)
    except OSError:
        stdin = b""
    with open(mark, "a") as f:
        f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "stdin": stdin.hex(),
                            "env": os.environ.get("LAUNCHER_TEST_ENV")}}) + "\\n")
    sys.exit(0)
from podshim.shim.main import main
sys.exit(main())
"""


@pytest.fixture(scope="module")
def bindir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The launcher, as setup.py compiles it, next to the stand-in Python entry."""
    d = tmp_path_factory.mktemp("bin")
    subprocess.run(
        [sys.executable, "setup.py", "compile-launcher", str(d / LAUNCHER)],
        cwd=REPO, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (d / ENTRY).write_text(STAND_IN.format(python=sys.executable))
    (d / ENTRY).chmod(0o755)
    return d


class Shim:
    """Runs the launcher and the Python shim alike, in a private run dir."""

    def __init__(self, bindir: Path, tmp: Path, run: Path) -> None:
        self.bindir = bindir
        self.tmp = tmp
        self.mark = tmp / "python-ran"
        self.env = dict(os.environ, PODSHIM_RUN_DIR=str(run), LAUNCHER_TEST_ENV="same")
        self.env.pop("LAUNCHER_TEST_MARK", None)

    def run(
        self, program: str, args: list[str], cwd: Path, stdin: bytes = b"", mark: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        env = dict(self.env, LAUNCHER_TEST_MARK=str(self.mark)) if mark else self.env
        return subprocess.run(
            [str(self.bindir / program), *args], cwd=cwd, input=stdin, env=env,
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip

    def launcher(self, args: list[str], cwd: Path, stdin: bytes = b"") -> Any:
        """Run the launcher; the stand-in records it if the launcher execs Python."""
        return self.run(LAUNCHER, args, cwd, stdin, mark=True)

    def python(self, args: list[str], cwd: Path, stdin: bytes = b"") -> Any:
        """Run the real Python shim, without the launcher."""
        return self.run(ENTRY, args, cwd, stdin)

    def python_runs(self) -> list[dict[str, Any]]:
        """How the launcher ran Python (once per line); clears the record."""
        if not self.mark.exists():
            return []
        runs = [json.loads(line) for line in self.mark.read_text().splitlines()]
        self.mark.unlink()
        return runs


@pytest.fixture
def shim(bindir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shim]:
    run = Path(tempfile.mkdtemp(prefix="pl-", dir="/tmp"))  # short: socket paths fit sun_path
    monkeypatch.setenv("PODSHIM_RUN_DIR", str(run))  # for the expected paths
    try:
        yield Shim(bindir, tmp_path, run)
    finally:
        shutil.rmtree(run, ignore_errors=True)


def bundle(path: Path, annotations: dict[str, str] | None = None, raw: str = "") -> Path:
    path.mkdir(parents=True)
    spec = {"ociVersion": "1.0.2", "annotations": annotations or {}}
    (path / files.CONFIG).write_text(raw or json.dumps(spec, separators=(",", ":")))
    return path


def contents(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def options(config_path: str) -> bytes:
    ro = ro_pb2.Options(type_url="io.containerd.podshim.v1.Options", config_path=config_path)
    return any_pb2.Any(
        type_url="runtimeoptions.v1.Options", value=ro.SerializeToString()
    ).SerializeToString()


@contextlib.contextmanager
def listening(path: str) -> Iterator[None]:
    """A live shim socket at ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(path)
        s.listen(16)
        yield
    finally:
        s.close()
        os.unlink(path)


def start_args(task_id: str, address: str = ADDRESS) -> list[str]:
    return ["-namespace", NS, "-address", address, "-publish-binary", "/usr/bin/containerd",
            "-id", task_id, "start"]  # fmt: skip


def same_start(shim: Shim, args: list[str], spec: dict[str, str], stdin: bytes = b"") -> bytes:
    """Run start through the launcher and through Python in two equal bundles: the same
    stdout, exit status and bundle files, and Python never ran under the launcher."""
    fast = bundle(shim.tmp / "fast", spec)
    slow = bundle(shim.tmp / "slow", spec)
    got = shim.launcher(args, fast, stdin)
    assert shim.python_runs() == [], "the launcher execed Python"
    want = shim.python(args, slow, stdin)
    assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr)
    assert want.returncode == 0 and want.stdout.startswith(b"unix://"), want
    assert contents(fast) == contents(slow)
    shutil.rmtree(fast)
    shutil.rmtree(slow)
    return bytes(got.stdout)


# -- start ------------------------------------------------------------------------------


@pytest.mark.parametrize("address_len", [31, 43, 44, 51, 52, 100])  # SHA-256 block edges
@pytest.mark.parametrize(
    "spec",
    [{SANDBOX: "pod-1"}, {GROUP: "g.1", SANDBOX: "pod-1"}, {}, {"other": "x"}],
    ids=["sandbox", "group", "none", "other"],
)
def test_start_with_a_live_pod_shim(shim: Shim, spec: dict[str, str], address_len: int) -> None:
    address = "/" + "a" * (address_len - 1)
    group = spec.get(GROUP) or spec.get(SANDBOX) or "task-1"
    path = socket_path(address, NS, group)
    with listening(path):
        out = same_start(shim, start_args("task-1", address), spec)
    assert out == f"unix://{path}".encode()


@pytest.mark.parametrize("config", ['runtime = "crun"\n', None], ids=["pod-config", "unreadable"])
def test_start_pod_scope_with_a_config(shim: Shim, config: str | None) -> None:
    path = shim.tmp / "podshim.toml"
    if config is not None:
        path.write_text(config)
    with listening(socket_path(ADDRESS, NS, "pod-1")):
        same_start(shim, start_args("c1"), {SANDBOX: "pod-1"}, options(str(path)))


def settled(config: Path) -> None:
    """Wait until start.py will cache ``config`` (its ctime older than SETTLED_NS)."""
    deadline = time.monotonic() + 30
    while time.time_ns() - config.stat().st_ctime_ns < start.SETTLED_NS:
        assert time.monotonic() < deadline, "the config never got old enough"
        time.sleep(0.1)


def test_start_node_scope_through_the_settings_cache(shim: Shim) -> None:
    config = shim.tmp / "node.toml"
    config.write_text('shim_scope = "node"\nshards = 4\n')
    opts = options(str(config))
    pods = [f"pod-{i}" for i in range(6)]
    keys = {p: start.node_key(str(config), p, 4) for p in pods}
    assert len({k.rsplit("-", 1)[1] for k in keys.values()}) > 1, "all pods on one shard"
    with contextlib.ExitStack() as stack:
        for key in set(keys.values()):
            stack.enter_context(listening(socket_path(ADDRESS, "", key)))
        cwd = bundle(shim.tmp / "b0", {SANDBOX: pods[0]})
        # no cache yet: Python answers, and gets the options the launcher read
        assert shim.launcher(start_args("c0"), cwd, opts).stdout == b""
        (ran,) = shim.python_runs()
        assert bytes.fromhex(ran["stdin"]) == opts
        settled(config)
        cache = Path(start.settings_cache_path(str(config)))
        assert shim.python(start_args("c0"), cwd, opts).returncode == 0
        assert cache.is_file(), "Python's start left no settings cache"
        for pod in pods:
            out = same_start(shim, start_args(f"c-{pod}"), {SANDBOX: pod}, opts)
            assert out == f"unix://{socket_path(ADDRESS, '', keys[pod])}".encode()
        # the config changed: the cache no longer holds
        os.utime(config)
        assert shim.launcher(start_args("c0"), cwd, opts).stdout == b""
        assert len(shim.python_runs()) == 1


def test_python_caches_only_settled_node_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    node, pod = tmp_path / "node.toml", tmp_path / "pod.toml"
    node.write_text('shim_scope = "node"\nshards = 3\n')
    pod.write_text("shim_scope = 'pod'\n")
    assert start.settings_cache_text(start.settings(options(str(node)))) is None  # just written
    monkeypatch.setattr(start, "SETTLED_NS", 0)
    assert start.settings_cache_text(start.settings(options(str(pod)))) is None
    text = start.settings_cache_text(start.settings(options(str(node))))
    st = node.stat()
    head = f"{start.SETTINGS_MAGIC} {__version__} node 3 {st.st_dev} {st.st_ino} "
    assert text == f"{head}{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}\n{node}"


@pytest.mark.parametrize("stdin", [b"", b"\x0a\x03abc"], ids=["no-options", "options"])
def test_start_without_a_live_shim_execs_python(shim: Shim, stdin: bytes) -> None:
    cwd = bundle(shim.tmp / "b", {SANDBOX: "pod-1"})
    stale = socket_path(ADDRESS, NS, "pod-1")  # a socket file nobody listens on
    os.makedirs(os.path.dirname(stale))
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()
    args = start_args("c1")
    res = shim.launcher(args, cwd, stdin)
    assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")
    (ran,) = shim.python_runs()
    assert ran == {"argv": args, "cwd": str(cwd), "stdin": stdin.hex(), "env": "same"}
    assert not (cwd / files.ADDRESS).exists()


UNUSUAL: list[tuple[list[str], dict[str, str], str]] = [
    (["-foo", "x"], {SANDBOX: "p"}, ""),  # a flag Python rejects
    (["-v"], {SANDBOX: "p"}, ""),  # the version
    (["-debug=maybe"], {SANDBOX: "p"}, ""),  # a bad boolean
    (["-id", ""], {SANDBOX: "p"}, ""),  # no task id: Python says so
    ([], {SANDBOX: "a..b"}, ""),  # not an id: Python parses the JSON
    ([], {SANDBOX: "p-"}, ""),  # not an id either
    ([], {}, '{"annotations": {"io.kubernetes.cri.sandbox-id": "p"}}'),  # not compact
    ([], {}, '{"annotations":{"io.kubernetes.cri.sandbox-id":"p\\u0031"}}'),  # an escape
    ([], {}, '{"annotations":{"io.kubernetes.cri.sandbox-id":"p'),  # cut short
]


@pytest.mark.parametrize("extra,spec,raw", UNUSUAL)
def test_unusual_starts_go_to_python(
    shim: Shim, extra: list[str], spec: dict[str, str], raw: str
) -> None:
    cwd = bundle(shim.tmp / "b", spec, raw)
    args = ["-namespace", NS, "-address", ADDRESS, "-id", "t1", *extra, "start"]
    with contextlib.ExitStack() as stack:  # a live shim for any group it might pick
        for group in {"p", "t1", *spec.values()}:
            stack.enter_context(listening(socket_path(ADDRESS, NS, group)))
        res = shim.launcher(args, cwd)
    assert res.stdout == b"" and len(shim.python_runs()) == 1


@pytest.mark.parametrize(
    "config", ['shim_scope = "pod"\n', '"shim\\u005fscope" = "node"\n'], ids=["named", "escaped"]
)
def test_a_config_naming_the_scope_needs_python_or_the_cache(shim: Shim, config: str) -> None:
    path = shim.tmp / "c.toml"
    path.write_text(config)
    cwd = bundle(shim.tmp / "b", {SANDBOX: "p"})
    with listening(socket_path(ADDRESS, NS, "p")):
        assert shim.launcher(start_args("t"), cwd, options(str(path))).stdout == b""
    assert len(shim.python_runs()) == 1


# -- delete -----------------------------------------------------------------------------


def delete_args(bundle: Path | None) -> list[str]:
    where = ["-bundle", str(bundle)] if bundle else []
    return ["-namespace", NS, "-address", ADDRESS, "-id", "t1", *where, "delete"]


def response(out: bytes) -> shim_pb2.DeleteResponse:
    resp = shim_pb2.DeleteResponse()
    resp.ParseFromString(out)
    return resp


@pytest.mark.parametrize("pid", ["4242", "4242\n", " 17 ", "", None], ids=repr)
@pytest.mark.parametrize("by_flag", [True, False], ids=["-bundle", "cwd"])
def test_delete_of_a_marked_bundle(shim: Shim, pid: str | None, by_flag: bool) -> None:
    results = []
    for name, run in (("fast", shim.launcher), ("slow", shim.python)):
        b = bundle(shim.tmp / name, {SANDBOX: "t1"})
        (b / files.DELETED).write_text("4242 0\n")
        if pid is not None:
            (b / files.INIT_PID).write_text(pid)
        before = contents(b)
        res = run(delete_args(b if by_flag else None), b if not by_flag else shim.tmp)
        assert (res.returncode, res.stderr) == (0, b""), res
        assert contents(b) == before
        results.append(response(res.stdout))
    assert shim.python_runs() == [], "the launcher execed Python"
    fast, slow = results
    assert (fast.pid, fast.exit_status) == (slow.pid, slow.exit_status)
    assert fast.pid == int(pid.strip() or 0 if pid is not None else 0)
    assert fast.exit_status == 137
    at = [r.exited_at.ToNanoseconds() for r in results]
    assert abs(at[0] - at[1]) < 1_000_000_000 and abs(at[0] - time.time_ns()) < 5_000_000_000


@pytest.mark.parametrize("made", [[], [files.DELETED, files.PANIC]], ids=["no-mark", "panic-log"])
def test_other_deletes_go_to_python(shim: Shim, made: list[str]) -> None:
    b = bundle(shim.tmp / "b", {SANDBOX: "t1"})
    for name in made:
        (b / name).write_text("x\n")
    (b / files.INIT_PID).write_text("77")
    res = shim.launcher(delete_args(b), shim.tmp)
    assert (res.returncode, res.stdout) == (0, b"")
    (ran,) = shim.python_runs()
    assert ran == {"argv": delete_args(b), "cwd": str(shim.tmp), "stdin": "", "env": "same"}


# -- finding the Python shim ------------------------------------------------------------


def test_without_the_python_shim_the_launcher_says_so(shim: Shim) -> None:
    lone = shim.tmp / "lone"
    lone.mkdir()
    shutil.copy2(shim.bindir / LAUNCHER, lone / LAUNCHER)
    cwd = bundle(shim.tmp / "b", {SANDBOX: "p"})
    for args in (start_args("t1"), delete_args(cwd)):
        res = subprocess.run([str(lone / LAUNCHER), *args], cwd=cwd, env=shim.env,
                             capture_output=True, timeout=60, check=False)  # fmt: skip
        assert (res.returncode, res.stdout) == (1, b"")
        assert f"cannot find the Python shim {ENTRY}".encode() in res.stderr, res.stderr


def test_the_python_shim_is_also_found_next_to_argv0(shim: Shim) -> None:
    """A symlink to a launcher without its Python shim, next to one: /proc/self/exe names
    the launcher's own directory, argv[0] the symlink's."""
    lone, links = shim.tmp / "lone", shim.tmp / "links"
    lone.mkdir()
    links.mkdir()
    shutil.copy2(shim.bindir / LAUNCHER, lone / LAUNCHER)
    (links / LAUNCHER).symlink_to(lone / LAUNCHER)
    (links / ENTRY).symlink_to(shim.bindir / ENTRY)
    env = dict(shim.env, LAUNCHER_TEST_MARK=str(shim.mark))
    res = subprocess.run([str(links / LAUNCHER), "-v"], env=env, capture_output=True,
                         timeout=60, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [r["argv"] for r in shim.python_runs()] == [["-v"]]


# -- how the Python shim runs itself again ------------------------------------------------


def test_self_command(bindir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(bindir / LAUNCHER)])
    assert spawn.self_command() == [str(bindir / LAUNCHER)]
    # behind the launcher: as python -Pm, which names the module (the entry's name does not)
    monkeypatch.setattr(sys, "argv", [str(bindir / ENTRY)])
    assert spawn.self_command() == [sys.executable, "-Pm", "podshim.shim.main"]


def test_a_daemon_run_as_a_module_takes_the_shims_name() -> None:
    code = "from podshim.shim.spawn import name_process as n; n(); print(open('/proc/self/comm').read())"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout  # fmt: skip
    assert out.strip() == LAUNCHER[:15]
