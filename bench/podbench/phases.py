"""The measurements, each run for every column of a :class:`~podbench.lab.Bench`.

* :func:`sequential`: pods one after another, columns interleaved (the order rotates
  every pod), timing each CRI step of a pod with one busybox ``sleep`` container.
* :func:`burst`: ``n`` pods brought up at once by ``n`` threads (one gRPC channel: the
  client waits on the network, so it is not the bottleneck), wall time from the first
  request to the last container running.
* :func:`pss_ramp`: pods brought up to each count in turn; at each, the PSS of every
  runtime process of the column (:func:`podbench.lab.footprint`) once it is steady.

A column that fails a CRI call is recorded in :class:`Errors` and left out of the rest
of that measurement; the others go on.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from podbench.lab import Bench, Footprint, footprint
from podshim_lab.cri.client import CriClient, CriError

STEPS = ("run_pod", "create_start", "pod_up", "exec_sync", "stop_remove")
#: pods brought up (and torn down) at once by the memory ramp and by cleanups
RAMP_PARALLEL = 4
SETTLE_MIN = 0.75  # s: podshim trims its heap after 0.5 s without changes
SETTLE_MAX = 8.0
EXEC_COMMAND = ("true",)

Samples = dict[str, dict[str, list[float]]]  # column -> step -> ms


@dataclass
class Errors:
    """What failed, per column (the message of the first failure of each phase)."""

    by_column: dict[str, list[str]] = field(default_factory=dict)

    def add(self, column: str, what: str, exc: BaseException) -> None:
        self.by_column.setdefault(column, []).append(f"{what}: {exc}")


@dataclass(frozen=True)
class PodRef:
    pod: str
    container: str
    pid: int  # the container's pid as CRI reports it


class Driver:
    """Brings pods of one network mode up and down through CRI."""

    def __init__(
        self, bench: Bench, cri: CriClient, host_net: bool, tag: str, label: str = ""
    ) -> None:
        self.bench = bench
        #: where errors say they happened (run and network)
        self.label = label or tag
        self.cri = cri
        self.host_net = host_net
        self.tag = f"{tag}-{secrets.token_hex(3)}"
        self._n = 0
        self._lock = threading.Lock()

    def _name(self, column: str) -> str:
        with self._lock:
            self._n += 1
            return f"b-{column}-{self.tag}-{self._n}"

    def up(self, column: str) -> tuple[PodRef, float, float]:
        """RunPodSandbox, then CreateContainer + StartContainer; (ref, ms, ms)."""
        name = self._name(column)
        cfg = self.cri.pod_config(name, "bench", f"uid-{name}", host_network=self.host_net)
        t0 = time.perf_counter()
        pod = self.cri.run_pod_config(cfg, self.bench.handler(column))
        t1 = time.perf_counter()
        try:
            cid = self.cri.create_container(pod, cfg, "c", self.bench.image, ["sleep", "3600"])
            self.cri.start_container(cid)
        except BaseException:
            self.down_quietly(pod)
            raise
        t2 = time.perf_counter()
        return PodRef(pod, cid, 0), (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def with_pid(self, ref: PodRef) -> PodRef:
        return PodRef(ref.pod, ref.container, self.cri.container_status(ref.container).pid)

    def down(self, pod: str) -> float:
        t0 = time.perf_counter()
        self.cri.stop_pod(pod)
        self.cri.remove_pod(pod)
        return (time.perf_counter() - t0) * 1e3

    def down_quietly(self, pod: str) -> None:
        try:
            self.down(pod)
        except CriError:
            pass

    def down_all(self, pods: Sequence[str]) -> None:
        with ThreadPoolExecutor(RAMP_PARALLEL) as pool:
            list(pool.map(self.down_quietly, pods))


def rotated(columns: Sequence[str], i: int) -> list[str]:
    k = i % len(columns)
    return [*columns[k:], *columns[:k]]


def cycle(driver: Driver, column: str) -> dict[str, float]:
    """One pod's life: every step's time in ms."""
    ref, run_ms, create_ms = driver.up(column)
    try:
        t0 = time.perf_counter()
        res = driver.cri.exec_sync(ref.container, EXEC_COMMAND, timeout=30)
        exec_ms = (time.perf_counter() - t0) * 1e3
        if res.exit_code != 0:
            raise RuntimeError(f"ExecSync {EXEC_COMMAND} exited {res.exit_code}: {res.stderr}")
    except BaseException:
        driver.down_quietly(ref.pod)
        raise
    stop_ms = driver.down(ref.pod)
    return {
        "run_pod": run_ms,
        "create_start": create_ms,
        "pod_up": run_ms + create_ms,
        "exec_sync": exec_ms,
        "stop_remove": stop_ms,
    }


def sequential(
    driver: Driver,
    columns: Sequence[str],
    pods: int,
    errors: Errors,
    progress: Callable[[str], None],
) -> Samples:
    """``pods`` pod lifecycles per column, interleaved, after one warm-up pod each."""
    samples: Samples = {c: {s: [] for s in STEPS} for c in columns}
    live = list(columns)
    for i in range(-1, pods):
        for column in rotated(live, max(i, 0)):
            if column not in live:
                continue
            try:
                one = cycle(driver, column)
            except (CriError, RuntimeError) as exc:
                errors.add(column, f"{driver.label}, sequential pod {i + 1}", exc)
                live.remove(column)
                continue
            if i >= 0:  # the first pod of each column pays one-off costs
                for step, ms in one.items():
                    samples[column][step].append(ms)
        if i >= 0 and (i + 1) % 5 == 0:
            progress(f"sequential {i + 1}/{pods}")
    return samples


@dataclass
class BurstResult:
    wall_s: float
    pod_up_ms: list[float]


def _collect(futures: Sequence[Future[PodRef]]) -> tuple[list[PodRef], BaseException | None]:
    """Every pod that came up, and the first failure (so nothing made is lost)."""
    refs: list[PodRef] = []
    failure: BaseException | None = None
    for fut in futures:
        try:
            refs.append(fut.result())
        except BaseException as exc:
            failure = failure or exc
    return refs, failure


def burst(driver: Driver, column: str, n: int) -> BurstResult:
    """``n`` pods at once: each thread waits at a barrier, then brings one pod up."""
    barrier = threading.Barrier(n + 1)
    done: list[float] = []
    latencies: list[float] = []

    def one() -> PodRef:
        barrier.wait()
        ref, run_ms, create_ms = driver.up(column)
        done.append(time.perf_counter())
        latencies.append(run_ms + create_ms)
        return ref

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one) for _ in range(n)]
        barrier.wait()
        t0 = time.perf_counter()
        refs, failure = _collect(futures)
    driver.down_all([r.pod for r in refs])
    if failure is not None:
        raise failure
    return BurstResult(max(done) - t0, latencies)


def settle(sample: Callable[[], Footprint]) -> Footprint:
    """Sample until two samples 0.5 s apart agree within 1 % (or SETTLE_MAX passes)."""
    time.sleep(SETTLE_MIN)
    last = sample()
    end = time.monotonic() + SETTLE_MAX
    while time.monotonic() < end:
        time.sleep(0.5)
        now = sample()
        if abs(now.pss_kib - last.pss_kib) <= 0.01 * max(last.pss_kib, 1):
            return now
        last = now
    return last


def pss_ramp(driver: Driver, column: str, counts: Sequence[int]) -> dict[int, Footprint]:
    """PSS of the column's runtime processes with 1, ..., max(counts) pods up."""
    refs: list[PodRef] = []
    out: dict[int, Footprint] = {}
    try:
        with ThreadPoolExecutor(RAMP_PARALLEL) as pool:
            for target in sorted(set(counts)):
                futures = [
                    pool.submit(lambda: driver.up(column)[0]) for _ in range(target - len(refs))
                ]
                made, failure = _collect(futures)
                refs += made
                if failure is not None:
                    raise failure
                refs = [driver.with_pid(r) if not r.pid else r for r in refs]
                workloads = {r.pid for r in refs}
                out[target] = settle(partial(footprint, driver.bench, column, workloads))
    finally:
        driver.down_all([r.pod for r in refs])
    return out
