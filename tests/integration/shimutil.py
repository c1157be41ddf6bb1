"""Shared helpers for the podshim integration tests (``test_shim_*.py``).

Everything here drives the *real* pieces: a private lab containerd
(:class:`podshim_lab.Containerd`) whose PATH holds ``containerd-shim-podshim-v1``,
``ctr``, runc and the shim's own ttrpc socket. Every wait is a poll with a generous
deadline, never a fixed sleep, so the tests stay deterministic on a loaded machine.

Each lab gets its own containerd namespace, so the host-global things keyed by
namespace (podshim's runc root ``/run/podshim/runc/<ns>``, the cgroups ``/<ns>/<id>``
that ``ctr`` asks for, the socket hashes) never collide with another lab running at
the same time.

The ``ctr events`` stream, the pty for ``ctr -t`` and direct ttrpc calls to a shim are
in ``shimio``.

The fixtures here are taken by a test module under the names its tests use, e.g.::

    lab = su.module_lab  # or su.fresh_lab
    ids = su.ids
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from podshim import rundir
from podshim.oci import ids as oci_ids
from podshim.shim import paths as shim_paths
from podshim_lab import Containerd, wait_for
from podshim_lab.cleanup import mounts_under
from podshim_lab.procfs import ZYGOTE_COMM, ProcStat, descendants, read_stat

if TYPE_CHECKING:
    from tests.integration.matrix import matrix_version
else:  # pytest puts this directory (it has no __init__.py) on sys.path
    from matrix import matrix_version

RUNTIME = "io.containerd.podshim.v1"
SHIM_BINARY = "containerd-shim-podshim-v1"
GROUP_ANNOTATION = oci_ids.GROUP_ANNOTATION
#: where the venv's console scripts (the shim binary) live
BIN_DIR = str(Path(sys.executable).parent)
#: podshim's defaults (src/podshim/rundir.py)
SOCKET_DIR = rundir.sockets_dir()
TASK_DIR = "io.containerd.runtime.v2.task"
CGROUP_ROOT = Path("/sys/fs/cgroup")

#: generous deadline for anything that should happen "soon" on a loaded 2-core box
DEADLINE = 90.0


# -- the lab -----------------------------------------------------------------------------


def unique_namespace(prefix: str = "psh") -> str:
    """A fresh containerd namespace name (valid identifier, short)."""
    return f"{prefix}{secrets.token_hex(3)}"


def open_lab(**kwargs: Any) -> Containerd:
    """Start a private containerd with the podshim binary on its PATH, in a namespace
    of its own, with the busybox image imported. Close it with :func:`close_lab`."""
    kwargs.setdefault("namespace", unique_namespace())
    kwargs.setdefault("extra_path", [BIN_DIR])
    kwargs.setdefault("version", matrix_version())
    lab = Containerd(**kwargs)
    try:
        lab.start()
        lab.ensure_busybox()
    except BaseException:
        with contextlib.suppress(Exception):
            close_lab(lab)
        raise
    return lab


def runc_root(lab: Containerd, root: str = "") -> str:
    """The OCI runtime's ``--root`` podshim uses for this lab's namespace (by default:
    the runtime root of this containerd instance)."""
    return os.path.join(root or rundir.runtime_root(lab.address), lab.namespace)


def runc_ids(lab: Containerd, root: str = "") -> set[str]:
    """Container ids ``runc --root <root>/<ns> list -q`` knows."""
    res = subprocess.run(
        ["runc", "--root", runc_root(lab, root), "list", "-q"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, f"runc list failed: {res.stderr}"
    return set(res.stdout.split())


def runc_state_dirs(lab: Containerd, root: str = "") -> set[str]:
    """Entries of runc's state dir for this lab's namespace."""
    try:
        return set(os.listdir(runc_root(lab, root)))
    except FileNotFoundError:
        return set()


def shim_log_problems(lab: Containerd) -> list[str]:
    """podshim log lines (they reach containerd's log through the bundle's log FIFO) at
    level error/fatal, and any Python traceback."""
    try:
        text = lab.log_path.read_text(errors="replace")
    except OSError:
        return []
    return [
        line[:2000]
        for line in text.splitlines()
        if "Traceback" in line
        or (f"runtime={RUNTIME}" in line and re.search(r"level=(error|fatal)", line))
    ]


def close_lab(lab: Containerd) -> None:
    """Close ``lab`` and assert nothing of it is left, podshim's traces included.

    The shim must not have logged errors or tracebacks. The lab itself checks processes,
    mounts, its dirs and the sockets of bundles still present at close. podshim keeps
    runc state below ``/run/podshim/runc/<instance>/<ns>``, which the lab does not know: anything
    left there is reported (and force-deleted), then the empty namespace dir is removed;
    the same for cgroups below ``/<ns>``.
    """
    errors: list[str] = [f"shim log: {line}" for line in shim_log_problems(lab)]
    try:
        lab.close()
    except Exception as exc:
        errors.append(f"close() failed: {exc}")
    errors += [f"{lab.paths.token}: {what}" for what in lab.leftovers()]
    ns_root = runc_root(lab)
    left = sorted(runc_state_dirs(lab))
    if left:
        errors.append(f"runc state left in {ns_root}: {left}")
        for cid in left:
            subprocess.run(
                ["runc", "--root", ns_root, "delete", "--force", cid],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=60,
                check=False,
            )
            with contextlib.suppress(OSError):
                shutil.rmtree(os.path.join(ns_root, cid))
    with contextlib.suppress(OSError):
        os.rmdir(ns_root)
        os.rmdir(os.path.dirname(ns_root))  # this containerd instance's, if now empty
    for hierarchy in cgroup_hierarchies():
        parent = hierarchy / lab.namespace
        if parent.is_dir():
            kids = [p.name for p in parent.iterdir() if p.is_dir()]
            if kids:
                errors.append(f"cgroups left in {parent}: {kids}")
            for kid in kids:
                with contextlib.suppress(OSError):
                    (parent / kid).rmdir()
            with contextlib.suppress(OSError):
                parent.rmdir()
    assert not errors, "podshim lab teardown left things behind:\n" + "\n".join(errors)


# -- fixtures ------------------------------------------------------------------------------


def _lab_fixture() -> Iterator[Containerd]:
    lab = open_lab()
    try:
        yield lab
    finally:
        close_lab(lab)


@pytest.fixture(scope="module")
def module_lab() -> Iterator[Containerd]:
    """One lab (:func:`open_lab`) for a whole test module; :func:`close_lab` at its end."""
    yield from _lab_fixture()


@pytest.fixture
def fresh_lab() -> Iterator[Containerd]:
    """A new lab for each test, so process and fd counts start clean."""
    yield from _lab_fixture()


@pytest.fixture
def ids(lab: Containerd) -> Iterator[list[str]]:
    """Container ids a test creates; removed (kill, delete, rm) even if it fails."""
    with containers(lab) as created:
        yield created


# -- ctr -----------------------------------------------------------------------------------


def ctr_argv(lab: Containerd, *args: str) -> list[str]:
    """The full ``ctr`` command line :meth:`Containerd.ctr` would run (FIFOs in the
    lab's fifo dir), for commands the test has to run itself (in a pty, in background)."""
    argv = list(args)
    for prefix in (("run",), ("task", "exec"), ("tasks", "exec"), ("task", "start")):
        if tuple(argv[: len(prefix)]) == prefix and "--fifo-dir" not in argv:
            argv[len(prefix) : len(prefix)] = ["--fifo-dir", str(lab.paths.fifo_dir)]
    return [lab.ctr_bin, "--address", lab.address, "--namespace", lab.namespace, *argv]


def image(lab: Containerd) -> str:
    return lab.ensure_busybox()


def run(
    lab: Containerd,
    cid: str,
    *cmd: str,
    opts: Sequence[str] = (),
    input: str | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """``ctr run --rm --runtime io.containerd.podshim.v1 [opts] <busybox> cid cmd...``
    (never raises on a non-zero exit: the test looks at it)."""
    return lab.ctr(
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        *opts,
        image(lab),
        cid,
        *cmd,
        check=False,
        input=input,
        timeout=timeout,
    )


def group_opts(group: str) -> list[str]:
    return ["--annotation", f"{GROUP_ANNOTATION}={group}"]


def task_status(lab: Containerd, cid: str) -> str | None:
    """STATUS of the task in ``ctr task ls`` (None when not listed)."""
    entry = lab.tasks().get(cid)
    return entry[1] if entry else None


def task_pid(lab: Containerd, cid: str) -> int:
    entry = lab.tasks().get(cid)
    assert entry is not None, f"task {cid} not listed"
    return entry[0]


def wait_status(lab: Containerd, cid: str, status: str | None, timeout: float = DEADLINE) -> None:
    """Poll ``ctr task ls`` until ``cid`` shows ``status`` (None: not listed)."""
    last: list[str | None] = []

    def check() -> bool:
        now = task_status(lab, cid)
        last[:] = [now]
        return now == status

    wait_for(
        check,
        timeout=timeout,
        interval=0.1,
        message=lambda: f"task {cid} status {status} (now {last})\n{lab.log_tail(30)}",
    )


def run_detached(
    lab: Containerd,
    cid: str,
    *cmd: str,
    opts: Sequence[str] = (),
    timeout: float = 120.0,
) -> int:
    """``ctr run -d`` a podshim container; wait until RUNNING; return its pid."""
    lab.ctr("run", "-d", "--runtime", RUNTIME, *opts, image(lab), cid, *cmd, timeout=timeout)
    wait_status(lab, cid, "RUNNING")
    return task_pid(lab, cid)


def remove_container(lab: Containerd, cid: str) -> None:
    """Best effort: kill, delete the task, remove the container (for ``finally``)."""
    if not lab.running:
        return
    with contextlib.suppress(Exception):
        if task_status(lab, cid) is not None:
            lab.ctr("task", "kill", "-a", "-s", "SIGKILL", cid, check=False, timeout=60)
            with contextlib.suppress(AssertionError):
                wait_for(
                    lambda: task_status(lab, cid) in (None, "STOPPED"),
                    timeout=30,
                    interval=0.1,
                )
            lab.ctr("task", "delete", "-f", cid, check=False, timeout=60)
    with contextlib.suppress(Exception):
        lab.ctr("container", "rm", cid, check=False, timeout=60)


@contextlib.contextmanager
def containers(lab: Containerd) -> Iterator[list[str]]:
    """Yield a list; every container id appended to it is removed at the end."""
    ids: list[str] = []
    try:
        yield ids
    finally:
        for cid in reversed(ids):
            remove_container(lab, cid)


def delete_exit_code(result: subprocess.CompletedProcess[str]) -> int:
    """The exit code ``ctr task delete`` reports (it warns ``... exit code N``)."""
    m = re.search(r"exit with non-zero exit code (\d+)", result.stderr)
    return int(m.group(1)) if m else 0


# -- bundles, shims, host traces ------------------------------------------------------------


def bundle_dir(lab: Containerd, cid: str) -> Path:
    return lab.state / TASK_DIR / lab.namespace / cid


def shim_address(lab: Containerd, cid: str) -> str:
    """The ``unix://`` address podshim's start wrote into the task's bundle."""
    return (bundle_dir(lab, cid) / "address").read_text().strip()


def socket_for(lab: Containerd, group: str) -> str:
    """The socket path podshim uses for ``group`` (or a lone task id) in this lab."""
    return shim_paths.socket_path(lab.address, lab.namespace, group)


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def shim_daemons(lab: Containerd) -> dict[int, list[str]]:
    """Live serving podshim daemons of ``lab`` (not ``start``/``delete`` runs, not the
    zygote; a daemon the zygote forked keeps its argv, ``... zygote``): pid -> argv."""
    pid = lab.subreaper_pid
    if pid is None:
        return {}
    found: dict[int, list[str]] = {}
    for st in descendants(pid):
        if st.state == "Z" or st.comm == ZYGOTE_COMM:
            continue
        argv = cmdline(st.pid)
        if not any(a.endswith(SHIM_BINARY) or a == "podshim.shim.main" for a in argv):
            continue
        if argv and argv[-1] in ("start", "delete"):
            continue
        found[st.pid] = argv
    return found


def the_shim(lab: Containerd) -> int:
    """The pid of the lab's only podshim daemon (waits until exactly one exists)."""

    def one() -> int | None:
        d = shim_daemons(lab)
        return next(iter(d)) if len(d) == 1 else None

    return wait_for(one, timeout=DEADLINE, message=lambda: f"one shim: {shim_daemons(lab)}")


def alive(stat: ProcStat) -> bool:
    """That very process (same start time) still exists and is not a zombie."""
    now = read_stat(stat.pid)
    return now is not None and now.starttime == stat.starttime and now.state != "Z"


def exists(stat: ProcStat) -> bool:
    """That very process (same start time) is still in the process table, even as a
    zombie nobody reaped."""
    now = read_stat(stat.pid)
    return now is not None and now.starttime == stat.starttime


def wait_gone(pid: int, timeout: float = DEADLINE, what: str = "process") -> None:
    """Poll until ``pid`` has exited *and* been reaped (a zombie does not count as gone:
    its reaper, the shim or the lab's subreaper, must collect it)."""
    first = read_stat(pid)
    if first is None:
        return
    wait_for(
        lambda: not exists(first),
        timeout=timeout,
        interval=0.1,
        message=lambda: f"{what} {pid} ({first.comm}) to exit; now {read_stat(pid)}",
    )


def fd_targets(pid: int) -> list[str]:
    """What each open fd of ``pid`` points to (sorted)."""
    out: list[str] = []
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            out.append(os.readlink(f"{base}/{name}"))
        except OSError:
            continue
    return sorted(out)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def lab_mounts(lab: Containerd) -> list[str]:
    """Mount points below the lab's own dirs (bundle rootfs, snapshots, ...)."""
    return sorted(mounts_under([str(d) for d in lab.paths.owned_dirs()]))


def cgroup_hierarchies() -> list[Path]:
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    try:
        return sorted(p for p in CGROUP_ROOT.iterdir() if p.is_dir())
    except OSError:
        return []


def lab_cgroups(lab: Containerd) -> set[str]:
    """``<hierarchy>/<id>`` of every cgroup below ``/<namespace>`` (ctr's cgroupsPath
    is ``/<namespace>/<id>``)."""
    found: set[str] = set()
    for h in cgroup_hierarchies():
        parent = h / lab.namespace
        with contextlib.suppress(OSError):
            found |= {f"{h.name}/{p.name}" for p in parent.iterdir() if p.is_dir()}
    return found


def cgroup_mode() -> str:
    """``unified``, ``hybrid`` or ``legacy``, from the filesystem types mounted."""
    types: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split()[4]
            types[point] = right.split()[0]
    if types.get("/sys/fs/cgroup") == "cgroup2":
        return "unified"
    if types.get("/sys/fs/cgroup/unified") == "cgroup2":
        return "hybrid"
    return "legacy"
