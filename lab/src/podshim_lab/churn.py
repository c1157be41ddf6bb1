"""Pod churn through CRI: create and delete pods, then count what is left.

:func:`churn` runs ``cycles`` pod lifecycles on a :class:`~podshim_lab.census.PodshimLab`,
``parallel`` at a time (threads sharing one gRPC channel: the CRI client waits on the
network, so it is not the bottleneck; containerd and the shims are). One cycle is what
kubelet does for a pod with two containers:

    RunPodSandbox -> CreateContainer x2 -> StartContainer x2 -> StopPodSandbox
    -> RemovePodSandbox

odd cycles share the pod's PID namespace (podshim-init), even ones do not. A *sentinel*
pod lives through the whole churn and gets one ExecSync per cycle, so its shim is a
long-lived podshim process doing work all along: its fds and private memory (USS) are measured after a
warm-up and at the end, as are containerd's fds and the zygote's (when one runs).

:class:`ChurnResult` holds the timings, the errors, the per-cycle fd count of each
pod's shim (sampled with both containers running) and the samples of the long-lived
processes; :meth:`ChurnResult.problems` turns them into failures against the stated
bounds, and the caller adds the census (:func:`podshim_lab.census.snapshot`) afterwards.
"""

from __future__ import annotations

import secrets
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from podshim_lab.census import (
    PODSHIM,
    PodshimLab,
    fd_count,
    netns_paths,
    shim_of,
    uss_kib,
)
from podshim_lab.cri.client import CriClient, CriError, api

__all__ = ["Bounds", "ChurnResult", "Sample", "churn"]

SENTINEL = "churn-sentinel"


@dataclass(frozen=True)
class Bounds:
    """How much long-lived processes may grow over a churn, at most."""

    #: growth of a long-lived podshim process's private memory (USS: the sentinel's shim,
    #: the zygote); PSS would move with the other shims that share its pages
    uss_kib: int = 2048
    #: fd growth of a long-lived podshim process
    podshim_fds: int = 0
    #: fd growth of containerd (its gRPC/ttrpc connections come and go with the load)
    containerd_fds: int = 8
    #: how much a churn pod's shim may hold more fds late in the churn than early
    shim_fd_drift: int = 0
    #: StopPodSandbox "ttrpc: closed" failures that a retry cleared, per 1000 cycles (an
    #: open race, measured at about 1 per 1000; more than this fails the churn)
    retried_per_1000: int = 3


@dataclass(frozen=True)
class Sample:
    """fds and private memory of one long-lived process at one moment."""

    pid: int
    fds: int
    uss_kib: int


@dataclass
class ChurnResult:
    cycles: int
    parallel: int
    seconds: float = 0.0
    cycle_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: StopPodSandbox calls that failed with "ttrpc: closed" and succeeded when retried, as
    #: kubelet retries them (an open race, see README; counted, bounded, never hidden)
    retried: list[str] = field(default_factory=list)
    #: (cycle, fds of that pod's shim with both containers running)
    shim_fds: list[tuple[int, int]] = field(default_factory=list)
    #: name -> (after warm-up, at the end)
    long_lived: dict[str, tuple[Sample, Sample]] = field(default_factory=dict)
    #: every pod and container id made, and the pods' network namespace paths
    ids: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)

    def problems(self, bounds: Bounds) -> list[str]:
        found = list(self.errors)
        if len(self.retried) > bounds.retried_per_1000 * max(self.cycles, 1000) // 1000:
            found += [f"retried: {r}" for r in self.retried]
        if len(self.ids) < 3:
            return [*found, "the sentinel pod was never made"]
        for name, (before, after) in self.long_lived.items():
            if after.pid != before.pid:
                found.append(f"{name}: pid {before.pid} was replaced by {after.pid}")
                continue
            limit = bounds.containerd_fds if name == "containerd" else bounds.podshim_fds
            if after.fds - before.fds > limit:
                found.append(f"{name}: fds {before.fds} -> {after.fds} (bound +{limit})")
            if name != "containerd" and after.uss_kib - before.uss_kib > bounds.uss_kib:
                found.append(
                    f"{name}: USS {before.uss_kib} -> {after.uss_kib} KiB "
                    f"(bound +{bounds.uss_kib} KiB)"
                )
        if len(self.shim_fds) >= 10:
            ordered = [n for _, n in sorted(self.shim_fds)]
            tenth = max(1, len(ordered) // 10)
            early, late = max(ordered[:tenth]), max(ordered[-tenth:])
            if late - early > bounds.shim_fd_drift:
                found.append(f"pod shims hold more fds late in the churn: {early} -> {late}")
        return found

    def summary(self) -> str:
        ms = sorted(self.cycle_ms) or [0.0]
        p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
        lines = [
            f"churn: {self.cycles} cycles (2 containers each), {self.parallel} at a time, "
            f"{self.seconds:.1f} s ({self.cycles / max(self.seconds, 1e-9):.2f} pods/s); "
            f"cycle p50 {statistics.median(ms):.0f} ms, p95 {p95:.0f} ms; "
            f"{len(self.errors)} failed calls, {len(self.retried)} StopPodSandbox retried"
        ]
        lines += [f"  retried: {r}" for r in self.retried]
        if self.shim_fds:
            fds = [n for _, n in self.shim_fds]
            lines.append(f"pod shim fds with 2 containers: min {min(fds)}, max {max(fds)}")
        for name, (a, b) in sorted(self.long_lived.items()):
            pss = f", USS {a.uss_kib} -> {b.uss_kib} KiB" if name != "containerd" else ""
            lines.append(f"{name} (pid {a.pid}): fds {a.fds} -> {b.fds}{pss}")
        return "\n".join(lines)


def _sample(pid: int) -> Sample:
    return Sample(pid, fd_count(pid), uss_kib(pid))


class _Churner:
    def __init__(self, plab: PodshimLab, cri: CriClient, result: ChurnResult) -> None:
        self.plab = plab
        self.cri = cri
        self.result = result
        self.lock = threading.Lock()
        self.token = secrets.token_hex(3)
        self.sentinel = ""

    def config(self, name: str, shared_pid: bool) -> api.PodSandboxConfig:
        return self.cri.pod_config(
            f"{name}-{self.token}",
            "churn",
            f"uid-{name}-{self.token}",
            hostname=name[-40:],
            pid_mode="POD" if shared_pid else "CONTAINER",
        )

    def pod(self, name: str, shared_pid: bool) -> tuple[str, list[str]]:
        """A running pod with two ``sleep`` containers; (pod id, container ids)."""
        config = self.config(name, shared_pid)
        pod = self.cri.run_pod_config(config, PODSHIM)
        with self.lock:
            self.result.ids.append(pod)
        cids = []
        for c in ("a", "b"):
            cid = self.cri.create_container(pod, config, c, self.plab.busybox, ["sleep", "3600"])
            with self.lock:
                self.result.ids.append(cid)
            cids.append(cid)
        for cid in cids:
            self.cri.start_container(cid)
        return pod, cids

    def cycle(self, i: int) -> None:
        t = time.perf_counter()
        pod = ""
        try:
            pod, _ = self.pod(f"churn-{i}", shared_pid=bool(i % 2))
            info = self.cri.pod_status(pod)
            shim = shim_of(info.pid)
            with self.lock:
                self.result.netns += netns_paths(info.info)
                if shim is not None:
                    self.result.shim_fds.append((i, fd_count(shim.pid)))
            if self.sentinel:
                res = self.cri.exec_sync(self.sentinel, ["true"], timeout=30)
                if res.exit_code != 0:
                    raise CriError("ExecSync", "EXIT", f"true exited {res.exit_code}")
        except CriError as exc:
            with self.lock:
                self.result.errors.append(f"cycle {i}: {exc}")
        finally:
            for step in (self.cri.stop_pod, self.cri.remove_pod):
                if not pod:
                    break
                try:
                    step(pod)
                except CriError as exc:
                    if step == self.cri.stop_pod and "ttrpc: closed" in str(exc):
                        try:  # as kubelet does; the first failure is kept in `retried`
                            step(pod)
                        except CriError as again:
                            exc = again
                        else:
                            with self.lock:
                                self.result.retried.append(f"cycle {i}: {exc}")
                            continue
                    with self.lock:
                        self.result.errors.append(f"cycle {i} teardown: {exc}")
        with self.lock:
            self.result.cycle_ms.append((time.perf_counter() - t) * 1000)


def churn(
    plab: PodshimLab,
    cycles: int,
    parallel: int = 4,
    warmup: int = 8,
    progress: Callable[[int], None] | None = None,
    settle: Callable[[PodshimLab, ChurnResult], list[str]] | None = None,
) -> ChurnResult:
    """Run the churn (see the module docstring); the sentinel pod is left running (its
    id is the first of :attr:`ChurnResult.ids`) for the caller's census and teardown.

    The long-lived processes are sampled when things are quiet: after the ``warmup``
    cycles and after the last one, each time once ``settle`` (which waits until the
    churned pods are gone and returns what is left past its deadline) has returned."""
    result = ChurnResult(cycles, parallel)
    cri = CriClient(plab.lab.address)
    ch = _Churner(plab, cri, result)
    try:
        sentinel_pod, (ch.sentinel, _) = ch.pod(SENTINEL, shared_pid=True)
        done = 0

        def run(indices: range) -> None:
            nonlocal done
            with ThreadPoolExecutor(parallel, thread_name_prefix="churn") as pool:
                for _ in pool.map(ch.cycle, indices):
                    done += 1
                    if progress is not None:
                        progress(done)

        def quiet() -> None:
            if settle is not None:
                result.errors.extend(settle(plab, result))

        start = time.perf_counter()
        warm = min(warmup, cycles)
        run(range(warm))
        quiet()
        long_lived = _long_lived(plab, cri, sentinel_pod)
        before = {name: _sample(pid) for name, pid in long_lived.items()}
        run(range(warm, cycles))
        result.seconds = time.perf_counter() - start
        quiet()
        after_pids = _long_lived(plab, cri, sentinel_pod)
        for name, first in before.items():
            result.long_lived[name] = (first, _sample(after_pids.get(name, first.pid)))
    finally:
        cri.close()
    return result


def _long_lived(plab: PodshimLab, cri: CriClient, sentinel_pod: str) -> dict[str, int]:
    found: dict[str, int] = {}
    if plab.lab.pid is not None:
        found["containerd"] = plab.lab.pid
    shim = shim_of(cri.pod_status(sentinel_pod).pid)
    if shim is not None:
        found["sentinel shim"] = shim.pid
    for stat in plab.processes():
        if stat.comm == "podshim-zygote":
            found["zygote"] = stat.pid
    return found
