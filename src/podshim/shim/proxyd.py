"""``podshim daemon``: the resident sandbox controller of a containerd 2.x proxy plugin.

containerd's config names it (``[proxy_plugins.<name>] type = "sandbox" address =
"<socket>"``) and a CRI runtime handler picks it with ``sandboxer = "<name>"``. Nothing
execs it (no ``start`` runs on this path): a service manager or the node installer runs
``podshim daemon --address <containerd's address>``, one per containerd. It serves, in
one process, for every pod of that containerd:

* ``containerd.services.sandbox.v1.Controller`` over gRPC (:mod:`podshim.shim.grpcctl`)
  on a private socket, behind the public ``--socket`` whose front door refuses clients
  that are not root (:mod:`podshim.shim.frontdoor`);
* ``containerd.task.v3.Task`` over ttrpc on ``<home>/task.sock``, the address every
  pod's Start returns (version 3): containerd creates the pods' containers there and
  execs no shim binary at all, per pod or per container (:mod:`podshim.service.taskv3`
  over the node router, :class:`~podshim.service.router.NodeService`).

It is the composition root of that process, as ``podshim.shim.daemon`` is of a shim: the
reaper, one event publisher per containerd namespace (to ``<address>.ttrpc``), the OCI
driver factory, the job group, one Task service per pod (made by the Controller's
Create; the tests' fault hooks from ``PODSHIM_HOOKS`` observe their Creates).

containerd runs no ``delete`` for tasks it reached at such an address when the daemon
dies, so the daemon reports what it lost itself: before it serves, it runs podshim's
``delete`` action on every task and pod its predecessor recorded
(:class:`~podshim.service.proxystate.ProxyState`; runtime state, rootfs mounts, the
pods' pins, cgroups and init), publishes ``/tasks/exit`` (status 137) for each task and
answers the Controller for each lost pod as exited with 137. Stopping the daemon
(SIGTERM) leaves its pods running unmanaged; its next start reports and cleans them up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from typing import IO, Any

from podshim import RUNTIME_TYPE, logs, rundir
from podshim.api.events import task_pb2 as ev
from podshim.jobs import JobGroup
from podshim.linux.reaper import Reaper, set_child_subreaper
from podshim.oci import runc
from podshim.service import taskv3
from podshim.service.config import Config, load_file
from podshim.service.controller import Controller
from podshim.service.proxystate import ProxyState, TaskRecord, home_dir
from podshim.service.publisher import ForwardPublisher, publisher_from_env
from podshim.service.router import NodeService
from podshim.service.tasks import TaskService
from podshim.shim.daemon import HOOKS_ENV, load_hooks
from podshim.task.contract import ShimContext, timestamp
from podshim.task.events import NullPublisher
from podshim.ttrpc.server import Server

log = logging.getLogger("podshim.proxyd")

#: the exit status reported for what a dead daemon lost (as containerd reports the tasks
#: of a dead shim; what was left of them was SIGKILLed by the cleanup)
LOST_STATUS = 128 + 9
#: how long one ``delete`` action of the recovery may take
DELETE_TIMEOUT = 60.0
TASK_SOCKET = "task.sock"
GRPC_SOCKET = "grpc.sock"
LOCK = "daemon.lock"
NEEDS_GRPC = "podshim daemon needs grpcio: pip install 'podshim[daemon]' (or grpcio)"


def default_socket() -> str:
    return os.path.join(rundir.run_dir(), "sandbox.sock")


def _delete_action(address: str, namespace: str, tid: str, bundle: str) -> list[str]:
    """podshim's ``delete`` action on ``bundle`` (what containerd runs after a shim
    died); what it could not clean up (``[]`` when all went)."""
    argv = [sys.executable, "-m", "podshim.shim.main", "-namespace", namespace,
            "-address", address, "-id", tid, "-bundle", bundle, "delete"]  # fmt: skip
    try:
        res = subprocess.run(argv, capture_output=True, timeout=DELETE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"delete {tid}: {exc}"]
    problems = res.stderr.decode(errors="replace").strip()
    if problems:
        log.warning("cleanup of %s/%s: %s", namespace, tid, problems)
    return [problems or f"delete exited {res.returncode}"] if res.returncode != 0 else []


def _delete_container(rec: TaskRecord) -> None:
    """``<runtime> delete --force`` of a lost task whose runtime state is still there."""
    if not rec.runtime or not rec.runtime_root:
        return
    root = os.path.join(rec.runtime_root, rec.namespace)
    if not os.path.exists(os.path.join(root, rec.id)):
        return
    argv = [rec.runtime, "--root", root, "delete", "--force", rec.id]
    try:
        res = subprocess.run(argv, capture_output=True, timeout=DELETE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cleanup of %s/%s: %s", rec.namespace, rec.id, exc)
        return
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip()
        log.warning("cleanup of %s/%s: %s delete: %s", rec.namespace, rec.id, rec.runtime, err)


def recover(state: ProxyState, address: str) -> list[tuple[str, ev.TaskExit]]:
    """Clean up every task and pod a previous daemon recorded (it is dead: we hold the
    lock); the ``/tasks/exit`` events to publish, by namespace."""
    exits: list[tuple[str, ev.TaskExit]] = []
    for rec in state.tasks():
        if rec.bundle and os.path.isdir(rec.bundle):  # runtime state, rootfs mount
            _delete_action(address, rec.namespace, rec.id, rec.bundle)
        _delete_container(rec)  # containerd may have removed the bundle already
        log.warning("task %s/%s was lost with the previous daemon", rec.namespace, rec.id)
        exits.append((rec.namespace, ev.TaskExit(
            container_id=rec.id, id=rec.id, pid=rec.pid, exit_status=LOST_STATUS,
            exited_at=timestamp(time.time()),
        )))  # fmt: skip
        state.forget_task(rec.namespace, rec.id)
    for ns, sid in state.sandboxes():
        lost = state.lost(ns, sid)
        if lost and not lost.get("left"):
            continue  # cleaned up by an earlier start; Shutdown removes it
        left = _delete_action(address, ns, sid, state.sandbox_dir(ns, sid))
        log.warning("pod %s/%s was lost with the previous daemon", ns, sid)
        state.mark_lost(ns, sid, LOST_STATUS, left)
    return exits


async def _serve(args: argparse.Namespace, cfg: Config, state: ProxyState,
                 exits: list[tuple[str, ev.TaskExit]]) -> None:  # fmt: skip
    from podshim.shim import grpcctl
    from podshim.shim.frontdoor import FrontDoor

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fatal: list[BaseException] = []

    def on_fatal(exc: BaseException, job: str) -> None:
        fatal.append(exc)
        stop.set()

    jobs = JobGroup("proxy-daemon", on_failure=on_fatal)
    reaper = Reaper()
    reaper.start()
    publishers: dict[str, ForwardPublisher | NullPublisher] = {}
    observers = load_hooks(os.environ.get(HOOKS_ENV, ""))

    def publisher(ns: str) -> ForwardPublisher | NullPublisher:
        pub = publishers.get(ns)
        if pub is None:
            pub = publishers[ns] = publisher_from_env(ns)
        return pub

    def make_service(ns: str, _group: str) -> TaskService:
        ctx = ShimContext(ns, reaper, publisher(ns), oci=runc.factory(ns, reaper), jobs=jobs)
        return TaskService(ctx, lambda: None, observers=observers)

    node = NodeService("default", make_service)
    for ns, exit_event in exits:
        publisher(ns).publish(exit_event)
    task_sock = os.path.join(state.home, TASK_SOCKET)
    grpc_sock = os.path.join(state.home, GRPC_SOCKET)
    for path in (task_sock, grpc_sock):
        _remove_socket(path)
    controller = Controller(node, make_service, state, f"ttrpc+unix://{task_sock}",
                            name=args.name, config=cfg)  # fmt: skip
    controller.load_lost()
    tasks = Server(taskv3.bindings(node, state))
    await tasks.serve_path(task_sock, mode=0o600)
    grpc_server: Any = await grpcctl.start(controller, grpc_sock)
    door = FrontDoor(args.socket or default_socket(), grpc_sock)
    await door.start()
    log.info("serving the sandbox controller on %s, Task v3 on %s (%d lost pods)",
             door.path, task_sock, len(controller.lost))  # fmt: skip
    try:
        await stop.wait()
    finally:
        log.info("shutting down (%d pods left running)", len(controller.pods))
        await door.close()
        await grpc_server.stop(1.0)
        await tasks.shutdown(grace=1.0)
        await asyncio.gather(*(p.close(timeout=5.0) for p in publishers.values()))
        await jobs.aclose()
        reaper.stop()
        for path in (task_sock, grpc_sock):
            _remove_socket(path)
    if fatal:
        raise fatal[0]


def _remove_socket(path: str) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def _lock(home: str) -> IO[str] | None:
    f = open(os.path.join(home, LOCK), "a")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def run(args: argparse.Namespace) -> int:
    """The ``podshim daemon`` command (see the module doc)."""
    # before grpc is first imported: no fork handlers (the pods' forked children only
    # make namespaces and exec; they never touch grpc)
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    try:
        import grpc  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
    except ImportError:
        print(NEEDS_GRPC, file=sys.stderr)
        return 2
    address = os.path.abspath(args.address)
    rundir.bind_instance(address)
    home = home_dir(address)
    os.makedirs(home, mode=0o700, exist_ok=True)
    lock = _lock(home)
    if lock is None:
        print(f"podshim daemon: another daemon serves containerd at {address}", file=sys.stderr)
        return 1
    if args.log:
        fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
    logs.setup(2, "info", {"runtime": RUNTIME_TYPE}, debug=args.debug)
    try:
        cfg = load_file(args.config) if args.config else Config()
    except Exception as exc:
        log.error("%s", exc)
        return 2
    logs.apply_config(cfg.log_level, cfg.log_format)
    os.environ.setdefault("TTRPC_ADDRESS", address + ".ttrpc")  # events: containerd's ttrpc
    set_child_subreaper()  # the pods' inits and containers are ours to reap
    state = ProxyState(home)
    exits = recover(state, address)  # before the reaper: its children are waited here
    try:
        asyncio.run(_serve(args, cfg, state, exits))
    except KeyboardInterrupt:
        pass
    except BaseException:
        log.critical("podshim daemon crashed", exc_info=True)
        lock.close()
        return 2
    state.remove_if_empty(keep=(LOCK,))  # no pod left: nothing for a successor to do
    lock.close()
    return 0
