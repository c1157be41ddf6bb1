"""A ttrpc load generator that is not the bottleneck: several client *processes*, each
keeping ``inflight`` identical requests pipelined on one connection.

A client is a blocking socket loop, not asyncio: the request frame is encoded once and
only its stream id changes (odd and increasing, as ttrpc wants), responses are counted
by their frame headers, and as many new requests are sent, in one write, as responses
arrived. So a call costs the client a few µs of Python, far less than it costs any
server, and with a few such processes the server is the limit.

The server's CPU time (``utime + stime`` of its process, all threads, from
``/proc/<pid>/stat``) is read before the clients start and after they all stopped;
divided by the calls answered, it is the server's CPU per call, which does not depend on
how busy the rest of the machine is (calls/s does).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier

from podshim.api.ttrpc import ttrpc_pb2
from podshim.ttrpc.codec import HEADER, TYPE_REQUEST

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    fields = raw[raw.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def request_body(
    service: str, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> bytes:
    req = ttrpc_pb2.Request(service=service, method=method, payload=payload)
    for key, value in metadata:
        req.metadata.add(key=key, value=value)
    return req.SerializeToString()


def check_once(path: str, body: bytes) -> ttrpc_pb2.Response:
    """One call, its decoded response (so a target answers what we think it does)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(HEADER.pack(len(body), 1, TYPE_REQUEST, 0) + body)
        buf = b""
        while len(buf) < HEADER.size or len(buf) < HEADER.size + HEADER.unpack_from(buf)[0]:
            chunk = s.recv(1 << 16)
            if not chunk:
                raise ConnectionError(f"{path}: closed before answering")
            buf += chunk
        length = HEADER.unpack_from(buf)[0]
        return ttrpc_pb2.Response.FromString(buf[HEADER.size : HEADER.size + length])


@dataclass
class ClientResult:
    calls: int
    seconds: float
    cpu_seconds: float
    #: per-call latency in µs (only with one call in flight)
    latencies_us: list[float]


def _client(
    path: str, body: bytes, inflight: int, seconds: float, barrier: Barrier, out: Connection
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    header = HEADER.pack
    size = HEADER.size
    n_body = len(body)
    sid = 1

    def frames(n: int) -> bytes:
        nonlocal sid
        parts = []
        for _ in range(n):
            parts.append(header(n_body, sid, TYPE_REQUEST, 0))
            parts.append(body)
            sid += 2
        return b"".join(parts)

    lat: list[float] = []
    record = inflight == 1
    buf = bytearray()
    done = 0
    barrier.wait()
    cpu0 = time.process_time()
    t0 = sent_at = time.perf_counter()
    end = t0 + seconds
    sock.sendall(frames(inflight))
    now = t0
    while now < end:
        data = sock.recv(1 << 18)
        if not data:
            raise ConnectionError(f"{path}: server closed the connection")
        buf += data
        pos, n = 0, 0
        while len(buf) - pos >= size:
            length = int.from_bytes(buf[pos : pos + 4], "big")
            if len(buf) - pos - size < length:
                break
            pos += size + length
            n += 1
        del buf[:pos]
        if not n:
            continue
        done += n
        now = time.perf_counter()
        if record:
            lat.append((now - sent_at) * 1e6)
            sent_at = now
        if now < end:
            sock.sendall(frames(n))
    result = ClientResult(done, now - t0, time.process_time() - cpu0, lat)
    sock.close()
    out.send(result)
    out.close()


@dataclass
class Load:
    clients: int
    inflight: int
    calls: int
    seconds: float
    calls_per_second: float
    server_cpu_us_per_call: float
    client_cpu_us_per_call: float
    latencies_us: list[float]


def run_load(
    path: str, server_pid: int, body: bytes, clients: int, inflight: int, seconds: float
) -> Load:
    """``clients`` processes x ``inflight`` pipelined calls for ``seconds``."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(clients + 1)
    pipes = [ctx.Pipe(duplex=False) for _ in range(clients)]
    procs = [
        ctx.Process(target=_client, args=(path, body, inflight, seconds, barrier, w), daemon=True)
        for _, w in pipes
    ]
    for p in procs:
        p.start()
    try:
        cpu0 = cpu_seconds(server_pid)
        barrier.wait(timeout=60)
        results: list[ClientResult] = []
        for r, _ in pipes:
            if not r.poll(seconds + 60):
                raise TimeoutError("a load client did not report")
            results.append(r.recv())
        cpu1 = cpu_seconds(server_pid)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    calls = sum(r.calls for r in results)
    elapsed = max(r.seconds for r in results)
    return Load(
        clients,
        inflight,
        calls,
        elapsed,
        calls / elapsed if elapsed else 0.0,
        (cpu1 - cpu0) * 1e6 / max(calls, 1),
        sum(r.cpu_seconds for r in results) * 1e6 / max(calls, 1),
        sorted(x for r in results for x in r.latencies_us),
    )
