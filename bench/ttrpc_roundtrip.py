"""Unary ttrpc round trips: the Go runc shim vs podshim's own ttrpc server.

One run starts a private containerd (:mod:`podshim_lab`), runs a busybox ``sleep`` task
on ``io.containerd.runc.v2`` and then measures ``containerd.task.v2.Task/State`` with
the same client code (:class:`podshim.ttrpc.client.Client`) against

1. ``go``: the task's ``containerd-shim-runc-v2`` socket, and
2. ``podshim``: a :class:`podshim.ttrpc.server.Server` in a separate process (this script
   re-executed with ``--serve``) whose ``State`` returns a copy of the Go shim's answer.

Per target: p50/p90 latency of sequential calls on one connection, calls/s with 32
concurrent calls on one connection, and calls/s with 8 connections x 8 concurrent calls.
Each measurement runs ``--seconds`` (default 3) or until ``--calls`` calls are done.
The client runs in this process on one asyncio loop, so on a small machine the client
itself is often the bottleneck: the CPU columns show where the time went.

Usage: ``.venv/bin/python bench/ttrpc_roundtrip.py [--calls N] [--seconds S] [--json]``
(root; containerd, ctr, runc and busybox-static installed).
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from podshim import errors as errdefs
from podshim.api.task.v2 import shim_pb2
from podshim.ttrpc.client import Client
from podshim.ttrpc.services import CallContext

TASK_SERVICE = "containerd.task.v2.Task"
TASK_ID = "bench-go"
TASK_DIR = "io.containerd.runtime.v2.task"
CALL_TIMEOUT = 30.0
WARMUP_CALLS = 50
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -- the podshim server (child process) ---------------------------------------------------


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
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--serve",
            path,
            "--canned",
            canned.SerializeToString().hex(),
        ]
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


# -- measuring ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (all its threads), from /proc."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


@dataclass
class Measurement:
    calls: int
    seconds: float
    client_cpu_us_per_call: float
    server_cpu_us_per_call: float

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


@dataclass
class TargetResult:
    name: str
    description: str
    server_pid: int
    p50_us: float = 0.0
    p90_us: float = 0.0
    p99_us: float = 0.0
    mean_us: float = 0.0
    max_us: float = 0.0
    sequential: dict[str, float] = field(default_factory=dict)
    concurrent_32: dict[str, float] = field(default_factory=dict)
    connections_8x8: dict[str, float] = field(default_factory=dict)


def _summary(m: Measurement) -> dict[str, float]:
    return {
        "calls": m.calls,
        "seconds": round(m.seconds, 3),
        "calls_per_second": round(m.calls_per_second, 1),
        "client_cpu_us_per_call": round(m.client_cpu_us_per_call, 1),
        "server_cpu_us_per_call": round(m.server_cpu_us_per_call, 1),
        # fraction of one core the client process used (>= ~0.9: the client is the limit)
        "client_cpu_load": round(m.client_cpu_us_per_call * m.calls_per_second / 1e6, 2),
    }


class Bench:
    def __init__(self, request: shim_pb2.StateRequest, seconds: float, max_calls: int) -> None:
        self.request = request
        self.seconds = seconds
        self.max_calls = max_calls

    async def _state(self, client: Client) -> shim_pb2.StateResponse:
        return await client.call(TASK_SERVICE, "State", self.request, shim_pb2.StateResponse)

    async def _warm(self, client: Client) -> None:
        for _ in range(WARMUP_CALLS):
            await self._state(client)

    def _measure_cpu(
        self, server_pid: int, calls: int, cpu0: tuple[float, float]
    ) -> tuple[float, float]:
        client = (time.process_time() - cpu0[0]) * 1e6 / max(calls, 1)
        server = (cpu_seconds(server_pid) - cpu0[1]) * 1e6 / max(calls, 1)
        return client, server

    async def sequential(self, path: str, server_pid: int) -> tuple[list[float], Measurement]:
        """Latencies (µs, ascending) of back-to-back calls on one connection."""
        latencies: list[float] = []
        async with Client(path, timeout=CALL_TIMEOUT) as client:
            await self._warm(client)
            cpu0 = (time.process_time(), cpu_seconds(server_pid))
            start = time.perf_counter()
            end = start + self.seconds
            now = start
            while now < end and (not self.max_calls or len(latencies) < self.max_calls):
                t0 = time.perf_counter()
                await self._state(client)
                now = time.perf_counter()
                latencies.append((now - t0) * 1e6)
            elapsed = now - start
        client_cpu, server_cpu = self._measure_cpu(server_pid, len(latencies), cpu0)
        latencies.sort()
        return latencies, Measurement(len(latencies), elapsed, client_cpu, server_cpu)

    async def throughput(
        self, path: str, server_pid: int, connections: int, per_connection: int
    ) -> Measurement:
        """Completed calls/s with ``per_connection`` callers on each of ``connections``."""
        clients = [Client(path, timeout=CALL_TIMEOUT) for _ in range(connections)]
        done = 0
        issued = 0

        async def worker(client: Client, end: float) -> None:
            nonlocal done, issued
            while time.perf_counter() < end and (not self.max_calls or issued < self.max_calls):
                issued += 1
                await self._state(client)
                done += 1

        try:
            await asyncio.gather(*(self._warm(c) for c in clients))
            cpu0 = (time.process_time(), cpu_seconds(server_pid))
            start = time.perf_counter()
            end = start + self.seconds
            await asyncio.gather(*(worker(c, end) for c in clients for _ in range(per_connection)))
            elapsed = time.perf_counter() - start
            client_cpu, server_cpu = self._measure_cpu(server_pid, done, cpu0)
        finally:
            for c in clients:
                await c.close()
        return Measurement(done, elapsed, client_cpu, server_cpu)

    async def run(self, targets: Sequence[tuple[TargetResult, str]]) -> None:
        """Every measurement kind for every target, interleaving targets per kind
        (so slow drifts of the machine's load hit both alike)."""
        for target, path in targets:
            log(f"{target.name}: sequential, 1 connection")
            latencies, seq = await self.sequential(path, target.server_pid)
            target.p50_us = round(percentile(latencies, 50), 1)
            target.p90_us = round(percentile(latencies, 90), 1)
            target.p99_us = round(percentile(latencies, 99), 1)
            target.mean_us = round(sum(latencies) / max(len(latencies), 1), 1)
            target.max_us = round(latencies[-1] if latencies else 0.0, 1)
            target.sequential = _summary(seq)
        for target, path in targets:
            log(f"{target.name}: 32 concurrent calls, 1 connection")
            target.concurrent_32 = _summary(await self.throughput(path, target.server_pid, 1, 32))
        for target, path in targets:
            log(f"{target.name}: 8 connections x 8 concurrent calls")
            target.connections_8x8 = _summary(await self.throughput(path, target.server_pid, 8, 8))


# -- the run ------------------------------------------------------------------------------


async def _connect_and_state(path: str) -> tuple[shim_pb2.ConnectResponse, bytes]:
    async with Client(path, timeout=CALL_TIMEOUT) as client:
        connect = await client.call(
            TASK_SERVICE, "Connect", shim_pb2.ConnectRequest(id=TASK_ID), shim_pb2.ConnectResponse
        )
        raw = await client.call_raw(
            TASK_SERVICE, "State", shim_pb2.StateRequest(id=TASK_ID).SerializeToString()
        )
    return connect, raw


async def _state_raw(path: str) -> bytes:
    async with Client(path, timeout=CALL_TIMEOUT) as client:
        return await client.call_raw(
            TASK_SERVICE, "State", shim_pb2.StateRequest(id=TASK_ID).SerializeToString()
        )


def run_bench(seconds: float, max_calls: int) -> dict[str, object]:
    from podshim_lab import Containerd

    results: dict[str, object] = {}
    tmp = tempfile.mkdtemp(prefix="podshim-bench-")
    server: ServerProcess | None = None
    try:
        log("starting a private containerd")
        with Containerd() as lab:
            ref = lab.ensure_busybox()
            lab.ctr(
                "run", "-d", "--runtime", "io.containerd.runc.v2", ref, TASK_ID, "sleep", "1000"
            )
            address_file = lab.state / TASK_DIR / lab.namespace / TASK_ID / "address"
            go_path = address_file.read_text().strip().removeprefix("unix://")
            connect, go_raw = asyncio.run(_connect_and_state(go_path))
            go_state = shim_pb2.StateResponse.FromString(go_raw)
            log(f"go shim pid {connect.shim_pid} at {go_path}; task pid {connect.task_pid}")

            our_path = os.path.join(tmp, "task.sock")
            server = ServerProcess(our_path, go_state)
            server.wait_ready()
            our_raw = asyncio.run(_state_raw(our_path))
            our_state = shim_pb2.StateResponse.FromString(our_raw)
            if our_state != go_state:
                raise RuntimeError(f"canned answer differs:\n{our_state}\nvs go:\n{go_state}")
            log(f"podshim server pid {server.pid} at {our_path}")

            bench = Bench(shim_pb2.StateRequest(id=TASK_ID), seconds, max_calls)
            go = TargetResult("go", "containerd-shim-runc-v2 (Go ttrpc)", connect.shim_pid)
            ours = TargetResult("podshim", "podshim.ttrpc.server.Server (asyncio)", server.pid)
            load_before = os.getloadavg()
            asyncio.run(bench.run([(go, go_path), (ours, our_path)]))

            results = {
                "method": f"{TASK_SERVICE}/State",
                "client": "podshim.ttrpc.client.Client (asyncio, one event loop)",
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "loadavg_1min_before_after": [
                    round(load_before[0], 2),
                    round(os.getloadavg()[0], 2),
                ],
                "seconds_per_measurement": seconds,
                "max_calls_per_measurement": max_calls or None,
                "response_bytes": {"go": len(go_raw), "podshim": len(our_raw)},
                "targets": {t.name: asdict(t) for t in (go, ours)},
                "ratios_podshim_over_go": ratios(go, ours),
            }
            server.stop()
            server = None
            log("tearing down the private containerd")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _ratio(ours: float, go: float) -> float:
    return round(ours / go, 2) if go else float("nan")


def ratios(go: TargetResult, ours: TargetResult) -> dict[str, float]:
    return {
        "p50_latency": _ratio(ours.p50_us, go.p50_us),
        "p90_latency": _ratio(ours.p90_us, go.p90_us),
        "concurrent_32_calls_per_second": _ratio(
            ours.concurrent_32["calls_per_second"], go.concurrent_32["calls_per_second"]
        ),
        "connections_8x8_calls_per_second": _ratio(
            ours.connections_8x8["calls_per_second"], go.connections_8x8["calls_per_second"]
        ),
    }


def _rate(summary: dict[str, float]) -> str:
    mark = "*" if summary["client_cpu_load"] >= 0.75 else " "
    return f"{summary['calls_per_second']:>7.0f}{mark}"


def render_table(results: dict[str, object]) -> str:
    targets = results["targets"]
    ratio = results["ratios_podshim_over_go"]
    assert isinstance(targets, dict) and isinstance(ratio, dict)
    kinds = ("sequential", "concurrent_32", "connections_8x8")
    head = (
        f"{'':<9} {'p50 µs':>8} {'p90 µs':>8} {'p99 µs':>8} {'seq/s':>8} {'c32/s':>8} {'8x8/s':>8}"
    )
    lines = [
        f"ttrpc unary {results['method']}",
        f"client: {results['client']}; python {results['python']}, {results['cpus']} CPUs, "
        f"load {results['loadavg_1min_before_after']} (1 min, before/after)",
        f"{results['seconds_per_measurement']} s per measurement; response bytes "
        f"{results['response_bytes']}",
        "",
        head,
    ]
    for name in ("go", "podshim"):
        t = targets[name]
        lines.append(
            f"{name:<9} {t['p50_us']:>8.0f} {t['p90_us']:>8.0f} {t['p99_us']:>8.0f} "
            + " ".join(_rate(t[k]) for k in kinds)
        )
    lines.append(
        f"{'podshim/go':<9}{ratio['p50_latency']:>8.2f} {ratio['p90_latency']:>8.2f} "
        f"{'':>8} {'':>8} {ratio['concurrent_32_calls_per_second']:>8.2f} "
        f"{ratio['connections_8x8_calls_per_second']:>8.2f}"
    )
    lines += [
        "",
        "p50/p90/p99: latency of sequential calls on 1 connection (LOWER is better; a",
        "  podshim/go ratio > 1 means podshim is slower). seq/s: those calls per second.",
        "c32/s: calls/s, 32 concurrent calls on 1 connection; 8x8/s: calls/s, 8 connections",
        "  x 8 concurrent calls each (HIGHER is better; a ratio < 1 means podshim is slower).",
        "*: the client process used >= 75% of a core: the shared client, not the server, was",
        "  (near) the limit, so compare the servers' CPU per call below rather than calls/s.",
        "",
        f"{'CPU µs/call':<12} {'server seq':>10} {'c32':>6} {'8x8':>6}   "
        f"{'client seq':>10} {'c32':>6} {'8x8':>6}",
    ]
    for name in ("go", "podshim"):
        t = targets[name]
        server = " ".join(
            f"{t[k]['server_cpu_us_per_call']:>{w}.0f}"
            for k, w in zip(kinds, (10, 6, 6), strict=True)
        )
        client = " ".join(
            f"{t[k]['client_cpu_us_per_call']:>{w}.0f}"
            for k, w in zip(kinds, (10, 6, 6), strict=True)
        )
        lines.append(f"{name:<12} {server}   {client}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="ttrpc State round trips: Go runc shim vs podshim's server, same client."
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="duration of each measurement (default 3)"
    )
    parser.add_argument(
        "--calls",
        type=int,
        default=0,
        help="stop each measurement after N calls (default: no limit)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    parser.add_argument("--canned", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve_main(args.serve, args.canned or "")
    if args.seconds <= 0 or args.calls < 0:
        parser.error("--seconds must be > 0 and --calls >= 0")
    if os.geteuid() != 0:
        print("bench: needs root (containerd, runc)", file=sys.stderr)
        return 2
    try:
        results = run_bench(args.seconds, args.calls)
    except Exception as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(render_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
