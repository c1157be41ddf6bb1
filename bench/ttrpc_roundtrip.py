"""ttrpc ``containerd.task.v2.Task/State`` under load: the Go runc shim vs podshim.

One private containerd (:mod:`podshim_lab`) runs a busybox ``sleep`` task on each of

1. ``go``: ``io.containerd.runc.v2`` (Debian's ``containerd-shim-runc-v2``, started by
   containerd as for any task: the Go shim needs a containerd to start, and the lab's is
   one), and
2. ``podshim``: ``io.containerd.podshim.v1`` (the real shim daemon, pod scope: State
   goes through its Task service to the container), and
3. ``node``: the same runtime with a podshim config of ``shim_scope = "node"`` (``ctr
   run --runtime-config-path``): the resident node daemon, where State goes through
   :class:`podshim.service.router.NodeService` (by the call's namespace metadata) to the
   pod's Task service;

and a fourth target is podshim's ttrpc stack alone:

4. ``server``: a :class:`podshim.ttrpc.server.Server` in a child process (this script
   with ``--serve``) whose ``State`` returns a copy of the Go shim's answer.

Each target is driven by the load generator of :mod:`podbench.ttrpcload`: ``--clients``
processes (default 3), each pipelining ``--inflight`` (16) State requests on one
connection, for ``--seconds`` (3); and, for latency, one process with one call at a time.
Reported: calls/s, the **server's CPU per call** (its process's utime + stime before and
after, divided by the calls answered: independent of the machine's other load, unlike
calls/s) and the latency percentiles; targets are interleaved per measurement and each
figure is the median of ``--rounds`` (3) rounds. The clients' own CPU per call is shown
so one can see they were not the limit. calls/s also depends on the CPU share the
scheduler gives each server: with ``kernel.sched_autogroup_enabled`` the shims (Go and
podshim, each in its own session) compete as groups with the rest of the machine, while
the ``server`` child shares the bench's session; CPU per call is the figure to compare.

Usage (root): ``.venv/bin/python bench/ttrpc_roundtrip.py [--seconds 3] [--clients 3]
[--inflight 16] [--rounds 3] [--targets go,podshim,node,server] [--json]``
(``go`` is always measured: every ratio is to it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from podbench.ttrpcload import Load, check_once, request_body, run_load

from podshim import errors as errdefs
from podshim.api.task.v2 import shim_pb2
from podshim.ttrpc.client import Client
from podshim.ttrpc.services import CallContext

TASK_SERVICE = "containerd.task.v2.Task"
TASK_DIR = "io.containerd.runtime.v2.task"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
PODSHIM_RUNTIME = "io.containerd.podshim.v1"
TARGETS = ("go", "podshim", "node", "server")
CALL_TIMEOUT = 30.0
WARMUP_SECONDS = 0.5


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -- the server-only target (child process) -----------------------------------------------


class CannedTask:
    """``containerd.task.v2.Task`` with only ``State``: a fixed answer for one task id."""

    def __init__(self, canned: shim_pb2.StateResponse) -> None:
        self.canned = canned

    async def State(self, req: shim_pb2.StateRequest, ctx: CallContext) -> shim_pb2.StateResponse:
        if req.id != self.canned.id or req.exec_id:
            raise errdefs.NotFound(f"task {req.id}: not found")
        return self.canned


async def _serve(path: str, canned: shim_pb2.StateResponse) -> None:
    from podshim.ttrpc.server import Server
    from podshim.ttrpc.services import bind

    server = Server(
        [bind(shim_pb2.DESCRIPTOR.services_by_name["Task"], CannedTask(canned), partial=True)]
    )
    await server.serve_path(path)
    print("ready", flush=True)
    # Serve until the parent closes our stdin (or dies).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    await server.shutdown(1.0)


def serve_main(path: str, canned_hex: str) -> int:
    """Entry point of the ``--serve`` child."""
    canned = shim_pb2.StateResponse.FromString(bytes.fromhex(canned_hex))
    try:
        asyncio.run(_serve(path, canned))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return 0


class ServerProcess:
    """The ``--serve`` child: started, waited for, stopped by closing its stdin."""

    def __init__(self, path: str, canned: shim_pb2.StateResponse) -> None:
        self.path = path
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", path]
        cmd += ["--canned", canned.SerializeToString().hex()]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"podshim server did not start (exit {self.proc.returncode})")

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- targets and measurements -------------------------------------------------------------


@dataclass
class Target:
    name: str
    description: str
    path: str
    pid: int
    task_id: str
    loads: list[Load] = field(default_factory=list)
    sequential: list[Load] = field(default_factory=list)


async def _connect_and_state(path: str, task_id: str, ns: str) -> tuple[int, bytes]:
    meta = ((NAMESPACE_KEY, ns),)
    async with Client(path, timeout=CALL_TIMEOUT, metadata=meta) as client:
        connect = await client.call(
            TASK_SERVICE, "Connect", shim_pb2.ConnectRequest(id=task_id), shim_pb2.ConnectResponse
        )
        raw = await client.call_raw(
            TASK_SERVICE, "State", shim_pb2.StateRequest(id=task_id).SerializeToString()
        )
    return connect.shim_pid, raw


def _run_task(
    lab: Any, runtime: str, task_id: str, image: str, config: str = ""
) -> tuple[str, int, bytes]:
    """A busybox ``sleep`` on ``runtime`` (with the runtime config file ``config``); its
    shim's socket, pid (the daemon's, from Connect) and State answer."""
    options = ["--runtime-config-path", config] if config else []
    lab.ctr("run", "-d", "--runtime", runtime, *options, image, task_id, "sleep", "100000")
    address = (lab.state / TASK_DIR / lab.namespace / task_id / "address").read_text()
    path = address.strip().removeprefix("unix://")
    pid, raw = asyncio.run(_connect_and_state(path, task_id, lab.namespace))
    return path, pid, raw


def _median(values: Sequence[float]) -> float:
    return round(statistics.median(values), 1) if values else float("nan")


def _pct(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarize(t: Target) -> dict[str, Any]:
    loads, seqs = t.loads, t.sequential
    return {
        "description": t.description,
        "server_pid": t.pid,
        "pipelined": {
            "calls_per_second": _median([x.calls_per_second for x in loads]),
            "server_cpu_us_per_call": _median([x.server_cpu_us_per_call for x in loads]),
            "client_cpu_us_per_call": _median([x.client_cpu_us_per_call for x in loads]),
            "calls": [x.calls for x in loads],
        },
        "one_at_a_time": {
            "p50_us": _median([_pct(x.latencies_us, 0.5) for x in seqs]),
            "p90_us": _median([_pct(x.latencies_us, 0.9) for x in seqs]),
            "p99_us": _median([_pct(x.latencies_us, 0.99) for x in seqs]),
            "calls_per_second": _median([x.calls_per_second for x in seqs]),
            "server_cpu_us_per_call": _median([x.server_cpu_us_per_call for x in seqs]),
        },
    }


def measure(targets: Sequence[Target], ns: argparse.Namespace, lab_ns: str) -> None:
    bodies = {
        t.name: request_body(
            TASK_SERVICE,
            "State",
            shim_pb2.StateRequest(id=t.task_id).SerializeToString(),
            ((NAMESPACE_KEY, lab_ns),),
        )
        for t in targets
    }
    for t in targets:
        resp = check_once(t.path, bodies[t.name])
        if resp.status.code:
            raise RuntimeError(f"{t.name}: State answered {resp.status.code} {resp.status.message}")
        run_load(t.path, t.pid, bodies[t.name], ns.clients, ns.inflight, WARMUP_SECONDS)
    for r in range(ns.rounds):
        order = list(targets) if r % 2 == 0 else list(targets)[::-1]
        for t in order:
            load = run_load(t.path, t.pid, bodies[t.name], ns.clients, ns.inflight, ns.seconds)
            t.loads.append(load)
            log(
                f"round {r + 1}: {t.name} {ns.clients}x{ns.inflight}: "
                f"{load.calls_per_second:.0f} calls/s, server {load.server_cpu_us_per_call:.1f} "
                f"µs/call"
            )
        for t in order:
            t.sequential.append(run_load(t.path, t.pid, bodies[t.name], 1, 1, ns.seconds))


def run_bench(ns: argparse.Namespace) -> dict[str, Any]:
    from podshim_lab import Containerd

    tmp = tempfile.mkdtemp(prefix="psb-ttrpc-", dir="/run")
    server: ServerProcess | None = None
    try:
        log("starting a private containerd")
        with Containerd(
            extra_path=[str(Path(sys.executable).parent)],
            extra_env={"PODSHIM_RUN_DIR": tmp},
            log_level="warn",
        ) as lab:
            image = lab.ensure_busybox()
            go_path, go_pid, go_raw = _run_task(lab, "io.containerd.runc.v2", "bench-go", image)
            targets = [
                Target("go", "containerd-shim-runc-v2 (Go ttrpc)", go_path, go_pid, "bench-go")
            ]
            if "podshim" in ns.targets:
                path, pid, _ = _run_task(lab, PODSHIM_RUNTIME, "bench-podshim", image)
                targets.append(Target("podshim", "podshim shim daemon", path, pid, "bench-podshim"))
            if "node" in ns.targets:
                config = os.path.join(tmp, "podshim-node.toml")
                with open(config, "w") as f:
                    f.write('# podshim, node scope (bench)\nshim_scope = "node"\n')
                path, pid, _ = _run_task(lab, PODSHIM_RUNTIME, "bench-node", image, config)
                targets.append(
                    Target("node", "podshim node daemon (router)", path, pid, "bench-node")
                )
            if "server" in ns.targets:
                go_state = shim_pb2.StateResponse.FromString(go_raw)
                server = ServerProcess(os.path.join(tmp, "server.sock"), go_state)
                server.wait_ready()
                targets.append(
                    Target(
                        "server", "podshim.ttrpc.server alone", server.path, server.pid, "bench-go"
                    )
                )
            load_before = os.getloadavg()
            measure(targets, ns, lab.namespace)
            results: dict[str, Any] = {
                "method": f"{TASK_SERVICE}/State",
                "load": f"{ns.clients} client processes x {ns.inflight} pipelined calls",
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "rounds": ns.rounds,
                "seconds_per_measurement": ns.seconds,
                "loadavg_1min_before_after": [
                    round(load_before[0], 2),
                    round(os.getloadavg()[0], 2),
                ],
                "targets": {t.name: summarize(t) for t in targets},
                "raw": {
                    t.name: [asdict(x) | {"latencies_us": []} for x in t.loads] for t in targets
                },
            }
            if server is not None:
                server.stop()
                server = None
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    go = results["targets"]["go"]
    results["ratios_to_go"] = {
        name: ratios(t, go) for name, t in results["targets"].items() if name != "go"
    }
    return results


def _ratio(ours: float, go: float) -> float:
    return round(ours / go, 2) if go else float("nan")


def ratios(t: dict[str, Any], go: dict[str, Any]) -> dict[str, float]:
    p, gp = t["pipelined"], go["pipelined"]
    return {
        "server_cpu_per_call": _ratio(p["server_cpu_us_per_call"], gp["server_cpu_us_per_call"]),
        "calls_per_second": _ratio(p["calls_per_second"], gp["calls_per_second"]),
        "p50_latency": _ratio(t["one_at_a_time"]["p50_us"], go["one_at_a_time"]["p50_us"]),
    }


def render_table(results: dict[str, Any]) -> str:
    targets, ratios = results["targets"], results["ratios_to_go"]
    lines = [
        f"ttrpc {results['method']}; {results['load']}; python {results['python']}, "
        f"{results['cpus']} CPUs, load {results['loadavg_1min_before_after']} (1 min, "
        f"before/after; the machine may be shared)",
        f"medians of {results['rounds']} rounds of {results['seconds_per_measurement']} s",
        "",
        f"{'':<9}{'calls/s':>10}{'server µs/call':>16}{'client µs/call':>16}"
        f"{'1-at-a-time p50 µs':>20}{'p90':>8}{'p99':>8}{'server µs/call':>16}",
    ]
    for name, t in targets.items():
        p, s = t["pipelined"], t["one_at_a_time"]
        lines.append(
            f"{name:<9}{p['calls_per_second']:>10.0f}{p['server_cpu_us_per_call']:>16.1f}"
            f"{p['client_cpu_us_per_call']:>16.1f}{s['p50_us']:>20.0f}{s['p90_us']:>8.0f}"
            f"{s['p99_us']:>8.0f}{s['server_cpu_us_per_call']:>16.1f}"
        )
    for name, r in ratios.items():
        lines.append(
            f"{name + '/go':<9}{r['calls_per_second']:>10.2f}{r['server_cpu_per_call']:>16.2f}"
            f"{'':>16}{r['p50_latency']:>20.2f}"
        )
    lines += [
        "",
        "calls/s: all clients together (higher is better); server µs/call: the server",
        "process's CPU time per call (lower is better; what the server costs, whatever",
        "else the machine does); client µs/call: CPU of all client processes per call.",
        "1-at-a-time: one client process, one call in flight (latency, lower is better).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ttrpc State under load: Go shim vs podshim.")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement (3)")
    parser.add_argument("--clients", type=int, default=3, help="client processes (3)")
    parser.add_argument("--inflight", type=int, default=16, help="pipelined per client (16)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians (3)")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated, of {','.join(TARGETS)} (all; go is always measured)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    parser.add_argument("--canned", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve_main(args.serve, args.canned or "")
    if args.seconds <= 0 or min(args.clients, args.inflight, args.rounds) < 1:
        parser.error("--seconds must be > 0, --clients, --inflight and --rounds >= 1")
    args.targets = {t.strip() for t in args.targets.split(",") if t.strip()} | {"go"}
    if not args.targets <= set(TARGETS):
        parser.error(f"--targets: unknown {sorted(args.targets - set(TARGETS))}")
    if os.geteuid() != 0:
        print("bench: needs root (containerd, runc)", file=sys.stderr)
        return 2
    results = run_bench(args)
    print(json.dumps(results, indent=2) if args.json else render_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
