"""``podshim demo``: a smoke run of podshim against a private, embedded containerd.

:func:`run` starts a throw-away containerd (:mod:`podshim_lab`: own root, state, socket
and config; the machine's own containerd is never touched) whose PATH holds the
``containerd-shim-podshim-v1`` installed next to the running Python, imports a busybox
image built locally, and then shows, step by step:

1. podshim's ttrpc client forwarding a ``/tasks/exit`` event to containerd's ttrpc
   events service, as ``ctr events`` prints it;
2. ``ctr run --rm --runtime io.containerd.podshim.v1`` of a busybox shell: podshim runs the
   container through runc, and its output, exit code and task events come back;
3. ``Connect``/``State`` through podshim's ttrpc client on the socket of the podshim shim
   serving a detached ``sleep`` task, then kill and delete of that task;

4. a pod with two containers through containerd's CRI plugin on a bridge network, run by
   podshim: shared namespaces, hostname, sysctls, localhost traffic, no pause process
   (``demo_pod.py``);

and finally tears everything down and checks that nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from podshim import __version__, rundir
from podshim import errors as errdefs
from podshim.api.events import task_pb2 as events_task_pb2
from podshim.api.services.ttrpc.events.v1 import events_pb2
from podshim.api.task.v2 import shim_pb2
from podshim.api.types import task_pb2 as types_pb2
from podshim.oci.runtime import RuntimeConfig
from podshim.task.events import EVENTS_SERVICE, NAMESPACE_METADATA_KEY, envelope_for
from podshim.ttrpc.client import call_sync
from podshim_lab import Containerd, LabError, WaitTimeout, wait_for
from podshim_lab.events import forward_sync
from podshim_lab.procfs import read_stat

__all__ = ["DemoError", "run"]

RUNTIME = "io.containerd.podshim.v1"
SHIM_BINARY = "containerd-shim-podshim-v1"
NAMESPACE = "podshim-demo"
TASK_SERVICE = shim_pb2.DESCRIPTOR.services_by_name["Task"].full_name
TASK_DIR = "io.containerd.runtime.v2.task"
DEADLINE = 30.0
CALL_TIMEOUT = 10.0
STEPS = 7

M = TypeVar("M", bound=Message)


class DemoError(Exception):
    """A demo step did not show what it should; the message says what went wrong."""


# -- output -------------------------------------------------------------------------------


def _say(text: str = "") -> None:
    print(text, flush=True)


def _info(text: str) -> None:
    for line in text.splitlines() or [""]:
        _say(f"      {line}")


class _Step:
    """Prints ``[n/N] title`` and, when the step ends, how long it took."""

    def __init__(self) -> None:
        self.number = 0
        self.title = ""
        self.started = 0.0

    def __call__(self, title: str) -> None:
        self.number += 1
        self.title = title
        self.started = time.monotonic()
        _say(f"[{self.number}/{STEPS}] {title}")

    def done(self, what: str = "ok") -> None:
        _info(f"=> {what} ({time.monotonic() - self.started:.1f} s)")


# -- ttrpc --------------------------------------------------------------------------------


def _call(
    path: str,
    service: str,
    method: str,
    request: Message,
    response_type: type[M],
    *,
    namespace: str | None = None,
) -> M:
    """One unary call with podshim's ttrpc client, on a fresh connection."""
    metadata = ((NAMESPACE_METADATA_KEY, namespace),) if namespace else ()
    return call_sync(
        path, service, method, request, response_type, metadata=metadata, timeout=CALL_TIMEOUT
    )


def _forward(lab: Containerd, event: Message) -> None:
    forward_sync(lab.ttrpc_address, envelope_for(event, lab.namespace), timeout=CALL_TIMEOUT)


# -- ctr events ---------------------------------------------------------------------------


class _Events:
    """A running ``ctr events``; a thread collects its output lines."""

    def __init__(self, lab: Containerd) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self.proc = subprocess.Popen(
            [lab.ctr_bin, "--address", lab.address, "events"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))

    def _pull(self) -> list[str]:
        while True:
            try:
                self.lines.append(self._queue.get_nowait())
            except queue.Empty:
                return self.lines

    def wait(
        self,
        match: Callable[[str], bool],
        timeout: float,
        poke: Callable[[], None] | None = None,
    ) -> str | None:
        """The first line ``match`` accepts (``None`` on timeout); ``poke`` between polls."""

        def found() -> str | None:
            for line in self._pull():
                if match(line):
                    return line
            if self.proc.poll() is not None and self._queue.empty():
                raise DemoError(f"ctr events exited with {self.proc.returncode}")
            if poke is not None:
                poke()
            return None

        try:
            return wait_for(found, timeout, interval=0.05, message="a ctr events line")
        except WaitTimeout:
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._thread.join(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _parse(line: str) -> tuple[str, dict[str, object]]:
    """``(topic, event)`` of a ``ctr events`` line (``<time> <ns> <topic> <json>``)."""
    fields = line.split(" ", 6)
    if len(fields) < 6:
        return "", {}
    try:
        event = json.loads(fields[6]) if len(fields) > 6 else {}
    except ValueError:
        event = {}
    return fields[5], event if isinstance(event, dict) else {}


def _about(topic: str, container: str) -> Callable[[str], bool]:
    def match(line: str) -> bool:
        got_topic, event = _parse(line)
        return got_topic == topic and event.get("container_id") == container

    return match


# -- the demo -----------------------------------------------------------------------------


def _preflight(shim_dir: Path) -> str | None:
    """Why the demo cannot run here, or ``None``."""
    if os.geteuid() != 0:
        return "the demo needs root (containerd, runc, mounts): run it with sudo"
    missing = [b for b in ("containerd", "ctr", "runc") if shutil.which(b) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install containerd runc)"
    if not any(Path(p).is_file() for p in ("/bin/busybox", "/usr/bin/busybox")):
        return "busybox is not installed (apt-get install busybox-static)"
    if not (shim_dir / SHIM_BINARY).is_file():
        return f"{SHIM_BINARY} not found in {shim_dir} (is podshim installed in this venv?)"
    return None


def _forward_shown(lab: Containerd, events: _Events, step: _Step) -> None:
    step("podshim ttrpc client -> containerd Events/Forward -> `ctr events`")
    _info(f"subscriber: ctr --address {lab.address} events")
    probes = 0

    def probe() -> None:
        nonlocal probes
        probes += 1
        _forward(lab, events_task_pb2.TaskOOM(container_id="demo-probe"))

    if events.wait(_about("/tasks/oom", "demo-probe"), DEADLINE, probe) is None:
        raise DemoError("ctr events never showed a forwarded probe event")
    _info(f"subscribed (after {probes} probe event(s) on /tasks/oom)")
    exit_event = events_task_pb2.TaskExit(
        container_id="demo-exit", id="demo-exit", pid=4242, exit_status=137
    )
    exit_event.exited_at.GetCurrentTime()
    _info(f"Forward /tasks/exit on {lab.ttrpc_address} (TaskExit pid 4242, exit_status 137)")
    _forward(lab, exit_event)
    line = events.wait(_about("/tasks/exit", "demo-exit"), DEADLINE)
    if line is None:
        raise DemoError("the forwarded /tasks/exit event never reached ctr events")
    _, event = _parse(line)
    if (event.get("pid"), event.get("exit_status")) != (4242, 137):
        raise DemoError(f"ctr events decoded something else: {line}")
    _info("ctr events printed:")
    _info(f"  {line}")
    try:
        bad = envelope_for(exit_event, lab.namespace, topic="tasks/exit")
        _call(
            lab.ttrpc_address,
            EVENTS_SERVICE,
            "Forward",
            events_pb2.ForwardRequest(envelope=bad),
            empty_pb2.Empty,
            namespace=lab.namespace,
        )
    except errdefs.InvalidArgument as exc:
        _info(f'a bad topic ("tasks/exit") is refused: InvalidArgument: {exc}')
    else:
        raise DemoError("containerd accepted the topic 'tasks/exit' (no leading slash)")
    step.done()


def _run_rm_shown(lab: Containerd, events: _Events, image: str, step: _Step) -> None:
    script = "echo hello from podshim; exit 3"
    step(f"ctr run --rm --runtime {RUNTIME} busybox demo1 sh -c '{script}'")
    argv = ["run", "--rm", "--runtime", RUNTIME, image, "demo1", "sh", "-c", script]
    result = lab.ctr(*argv, check=False, timeout=DEADLINE)
    _info(f"stdout: {result.stdout.strip()!r}")
    if result.stderr.strip():
        _info(f"stderr: {result.stderr.strip()!r}")
    _info(f"exit code: {result.returncode}")
    if result.returncode != 3 or result.stdout.strip() != "hello from podshim":
        raise DemoError(
            f"expected 'hello from podshim' and exit code 3, got {result.returncode}: "
            f"{result.stdout!r} {result.stderr!r}"
        )
    delete = events.wait(_about("/tasks/delete", "demo1"), 10.0)
    topics = []
    for line in events.lines:
        topic, event = _parse(line)
        if topic.startswith("/tasks/") and event.get("container_id") == "demo1":
            detail = f" exit_status={event.get('exit_status', 0)}" if topic == "/tasks/exit" else ""
            topics.append(topic + detail)
    _info("task events podshim published for demo1: " + (" -> ".join(topics) or "none"))
    if delete is None:
        _info("(warning: no /tasks/delete event for demo1 within 10 s)")
    step.done()


def _shim_shown(lab: Containerd, image: str, step: _Step) -> list[Path]:
    """Returns the host paths the podshim shim of the task used (gone once it exits)."""
    tid = "demo2"
    step(f"Connect/State through podshim's ttrpc client on the podshim shim of '{tid}'")
    lab.ctr("run", "-d", "--runtime", RUNTIME, image, tid, "sleep", "1000", timeout=DEADLINE)
    listed = lab.tasks().get(tid)
    _info(f"ctr run -d --runtime {RUNTIME} busybox {tid} sleep 1000 -> ctr task ls: {listed}")
    if listed is None or listed[1] != "RUNNING":
        raise DemoError(f"task {tid} is not RUNNING: {lab.tasks()}")
    address = (lab.state / TASK_DIR / lab.namespace / tid / "address").read_text().strip()
    path = address.removeprefix("unix://")
    _info(f"shim socket (bundle's address file): {address}")
    connect = _call(
        path, TASK_SERVICE, "Connect", shim_pb2.ConnectRequest(id=tid), shim_pb2.ConnectResponse
    )
    shim = read_stat(connect.shim_pid)
    _info(
        f"Connect: shim_pid={connect.shim_pid} ({shim.comm if shim else 'gone!'}), "
        f"task_pid={connect.task_pid}, version={connect.version!r}"
    )
    if connect.task_pid != listed[0]:
        raise DemoError(f"Connect task_pid {connect.task_pid} != ctr's pid {listed[0]}")
    if shim is None or not shim.comm.startswith("containerd-shim"):
        raise DemoError(f"Connect shim_pid {connect.shim_pid} is not a live shim: {shim}")
    state = _call(
        path, TASK_SERVICE, "State", shim_pb2.StateRequest(id=tid), shim_pb2.StateResponse
    )
    status = types_pb2.Status.Name(state.status)
    _info(f"State: id={state.id} pid={state.pid} status={status} bundle={state.bundle}")
    if state.status != types_pb2.RUNNING or state.pid != listed[0]:
        raise DemoError(f"unexpected State answer: {state}")
    try:
        _call(path, TASK_SERVICE, "State", shim_pb2.StateRequest(id="nope"), shim_pb2.StateResponse)
    except errdefs.NotFound as exc:
        _info(f"State of an unknown task: NotFound: {exc}")
    else:
        raise DemoError("State of an unknown task did not fail with NotFound")

    lab.ctr("task", "kill", "-s", "9", tid, timeout=DEADLINE)
    wait_for(
        lambda: lab.tasks().get(tid, (0, ""))[1] == "STOPPED",
        DEADLINE,
        message=lambda: f"{tid} STOPPED in {lab.tasks()}",
    )
    state = _call(
        path, TASK_SERVICE, "State", shim_pb2.StateRequest(id=tid), shim_pb2.StateResponse
    )
    _info(
        f"ctr task kill -s 9 {tid} -> State: status={types_pb2.Status.Name(state.status)} "
        f"exit_status={state.exit_status}"
    )
    lab.ctr("task", "rm", tid, timeout=DEADLINE)
    lab.ctr("c", "rm", tid, timeout=DEADLINE)
    _info(f"ctr task rm {tid}; ctr c rm {tid}")
    step.done()
    return [Path(path), Path(RuntimeConfig().root, lab.namespace, tid)]


def _all_gone(lab: Containerd, step: _Step, traces: list[Path]) -> None:
    step("waiting for every shim and container process to exit")
    wait_for(
        lambda: lab.descendants() == [],
        DEADLINE,
        message=lambda: f"no processes below containerd, have {lab.descendants()}",
    )
    left = lab.ctr("containers", "ls", "-q").stdout.split()
    if left:
        raise DemoError(f"containers left: {left}")
    _info("no shim or container process is left below containerd (descendants: [])")
    present = [str(p) for p in traces if os.path.lexists(p)]
    if present:
        raise DemoError(f"the podshim shim left behind: {present}")
    _info("the podshim shim removed its socket and runc state: " + ", ".join(map(str, traces)))
    step.done()


def _server_version(lab: Containerd) -> str:
    """containerd's version as ``ctr version`` reports it for the server."""
    server = lab.ctr("version").stdout.partition("Server:")[2]
    for line in server.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Version":
            return value.strip()
    return "(unknown version)"


def _demo(lab: Containerd, shim_dir: Path, step: _Step) -> None:
    step("starting a private containerd")
    lab.start()
    _info(f"containerd {_server_version(lab)} at {lab.address}")
    _info(f"state {lab.state}, shim PATH += {shim_dir} ({SHIM_BINARY})")
    image = lab.ensure_busybox()
    _info(f"imported {image} (built from the host's busybox) into namespace {lab.namespace}")
    step.done()

    events = _Events(lab)
    try:
        _forward_shown(lab, events, step)
        _run_rm_shown(lab, events, image, step)
    finally:
        events.close()
    traces = _shim_shown(lab, image, step)
    _all_gone(lab, step, traces)
    step("a pod with two containers through Kubernetes CRI (runtime handler 'podshim')")
    from podshim_lab.demo_pod import PodDemoError, show_pod

    try:
        show_pod(lab, _info)
    except PodDemoError as exc:
        raise DemoError(str(exc)) from None
    step.done()


def _podshim_host_dirs(namespace: str) -> list[Path]:
    """Host-global dirs podshim shims create on demand (outside the lab's own dirs)."""
    run_dir = Path(rundir.run_dir())
    runc_root = Path(RuntimeConfig().root)
    return [run_dir, Path(rundir.sockets_dir()), runc_root, runc_root / namespace]


def _tidy(created: list[Path]) -> list[str]:
    """rmdir the dirs the demo's shims created (deepest first), only where empty.

    Another podshim user may have started to use one meanwhile: a non-empty dir stays and
    is not reported; only the demo's own namespace dir must be gone.
    """
    for directory in sorted(created, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            directory.rmdir()
    own = Path(RuntimeConfig().root) / NAMESPACE
    return [f"dir {own}"] if own in created and own.exists() else []


def run() -> int:
    """Run the demo; 0 on success, 1 if a step failed, 2 if it cannot run here."""
    shim_dir = Path(sys.executable).parent
    problem = _preflight(shim_dir)
    if problem is not None:
        print(f"podshim demo: cannot run: {problem}", file=sys.stderr)
        return 2
    began = time.monotonic()
    _say(f"podshim {__version__} demo: podshim against a private, embedded containerd")
    step = _Step()
    host_dirs = [d for d in _podshim_host_dirs(NAMESPACE) if not d.exists()]
    lab = Containerd(
        namespace=NAMESPACE,
        extra_path=[shim_dir],
        cri=True,
        runtimes={"podshim": (RUNTIME, {})},
    )
    failure: str | None = None
    try:
        _demo(lab, shim_dir, step)
    except DemoError as exc:
        failure = f"step {step.number} ({step.title}): {exc}"
    except Exception as exc:  # the demo's top level: report any failure clearly
        failure = f"step {step.number} ({step.title}): {type(exc).__name__}: {exc}"
    except BaseException:  # interrupted: still tear everything down
        with contextlib.suppress(Exception):
            lab.close()
        _tidy(host_dirs)
        raise
    if failure is not None:
        _say(f"FAILED at {failure}")
        _say("last lines of the private containerd's log:")
        _info(lab.log_tail(25))

    step("tearing everything down")
    try:
        lab.close()
    except LabError as exc:
        failure = failure or f"teardown: {exc}"
        _info(f"teardown problem: {exc}")
    left = lab.leftovers() + _tidy(host_dirs)
    if left:
        failure = failure or "teardown left things behind"
        _info("left behind: " + "; ".join(left))
    else:
        _info("nothing is left: no process, mount, directory, shim socket or runc state")
        _info("(lab.leftovers() == [], the private dirs are gone, and the podshim dirs the")
        _info(" demo's shims created under /run/podshim were removed again)")
    step.done("ok" if not left else "FAILED")

    if failure is not None:
        print(f"podshim demo: FAILED: {failure}", file=sys.stderr)
        return 1
    _say(f"podshim demo: all {STEPS} steps passed in {time.monotonic() - began:.1f} s")
    return 0
