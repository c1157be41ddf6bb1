"""Pod lifecycle through CRI: podshim vs ``io.containerd.runc.v2`` on one private containerd.

Both runtimes are CRI handlers of the same private containerd (:mod:`podshim_lab`); their
iterations are interleaved so machine load hits both alike. Per iteration and runtime:

* ``run_pod``:    RunPodSandbox (host network, so CNI time is not in the runtime figure;
  ``--network bridge`` puts it back in),
* ``create_start``: CreateContainer + StartContainer of a busybox ``sleep``,
* ``exec_sync``:  ExecSync ``true``,
* ``stop_remove``: StopPodSandbox + RemovePodSandbox.

Memory: ``--pods`` pods (default 20) of one runtime up at once, each with one ``sleep``
container; the PSS (``/proc/<pid>/smaps_rollup``) of every *runtime* process is summed:
every process under the lab's subreaper except containerd itself and the containers'
own processes. So runc.v2 counts its shims and pause processes; podshim its shims, its
zygote (when enabled) and any ``podshim-init``. Divided by the pod count.

Prints p50/p90 per step and the ratios podshim/runc.v2 (lower is better for all).

Usage: ``.venv/bin/python bench/pod_lifecycle.py [--iterations N] [--pods N]
[--no-zygote] [--network host|bridge] [--json]`` (root).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from podshim_lab.containerd import Containerd
from podshim_lab.cri.client import CriClient
from podshim_lab.procfs import ProcStat, process_table

STEPS = ("run_pod", "create_start", "exec_sync", "stop_remove")
HANDLERS = {"runc.v2": "runc", "podshim": "podshim"}


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def timed(samples: dict[str, list[float]], step: str, fn: Callable[[], object]) -> object:
    t = time.perf_counter()
    out = fn()
    samples[step].append((time.perf_counter() - t) * 1000)
    return out


def one_cycle(
    cri: CriClient,
    handler: str,
    image: str,
    i: int,
    host_net: bool,
    samples: dict[str, list[float]],
) -> None:
    cfg = cri.pod_config(
        f"bench-{handler}-{i}", "bench", f"uid-{handler}-{i}", host_network=host_net
    )
    pod = str(timed(samples, "run_pod", lambda: cri.run_pod_config(cfg, handler)))

    def create_start() -> str:
        cid = cri.create_container(pod, cfg, "c", image, ["sleep", "3600"])
        cri.start_container(cid)
        return cid

    cid = str(timed(samples, "create_start", create_start))
    res = timed(samples, "exec_sync", lambda: cri.exec_sync(cid, ["true"]))
    assert getattr(res, "exit_code", 1) == 0, res

    def stop_remove() -> None:
        cri.stop_pod(pod)
        cri.remove_pod(pod)

    timed(samples, "stop_remove", stop_remove)


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def runtime_processes(lab: Containerd, workload_pids: set[int]) -> list[ProcStat]:
    """Live processes under the lab's subreaper, minus containerd and the workloads."""
    table = process_table()
    root = lab.subreaper_pid

    def under_root(pid: int) -> bool:
        seen: set[int] = set()
        while pid in table and pid not in seen:
            seen.add(pid)
            if table[pid].ppid == root:
                return True
            pid = table[pid].ppid
        return False

    skip = workload_pids | {lab.pid or 0}
    return [p for p in table.values() if p.pid not in skip and p.state != "Z" and under_root(p.pid)]


def memory(
    cri: CriClient, lab: Containerd, handler: str, image: str, pods: int, host_net: bool
) -> tuple[float, int]:
    made: list[str] = []
    workload: set[int] = set()
    try:
        for i in range(pods):
            cfg = cri.pod_config(
                f"mem-{handler}-{i}", "bench", f"mem-{handler}-{i}", host_network=host_net
            )
            pod = cri.run_pod_config(cfg, handler)
            made.append(pod)
            cid = cri.create_container(pod, cfg, "c", image, ["sleep", "3600"])
            cri.start_container(cid)
            workload.add(cri.container_status(cid).pid)
        time.sleep(1.0)  # let the shims settle after their last call
        procs = runtime_processes(lab, workload)
        total = sum(pss_kb(p.pid) for p in procs)
        return total / pods / 1024, len(procs)
    finally:
        for pod in made:
            cri.stop_pod(pod)
            cri.remove_pod(pod)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--pods", type=int, default=20)
    ap.add_argument("--no-zygote", action="store_true")
    ap.add_argument("--network", choices=("host", "bridge"), default="host")
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args(argv)
    host_net = ns.network == "host"
    tmp = Path(tempfile.mkdtemp(prefix="podshim-bench-"))
    cfg = tmp / "podshim.toml"
    cfg.write_text(f"zygote = {'false' if ns.no_zygote else 'true'}\n")
    runtimes = {"podshim": ("io.containerd.podshim.v1", {"ConfigPath": str(cfg)})}
    shim_dir = str(Path(sys.executable).parent)
    results: dict[str, dict[str, list[float]]] = {r: {s: [] for s in STEPS} for r in HANDLERS}
    mem: dict[str, tuple[float, int]] = {}
    with Containerd(cri=True, runtimes=runtimes, extra_path=[shim_dir], log_level="info") as lab:
        lab.ensure_pause()
        image = lab.ensure_busybox(namespace="k8s.io")
        with CriClient(lab.address) as cri:
            for h in HANDLERS.values():  # warm-up: first pod of each pays one-off costs
                one_cycle(cri, h, image, -1, host_net, {s: [] for s in STEPS})
            for i in range(ns.iterations):
                order = list(HANDLERS.items()) if i % 2 == 0 else list(HANDLERS.items())[::-1]
                for r, h in order:
                    one_cycle(cri, h, image, i, host_net, results[r])
                log(f"iteration {i + 1}/{ns.iterations}")
            for r, h in HANDLERS.items():
                mem[r] = memory(cri, lab, h, image, ns.pods, host_net)
                log(f"memory {r}: {mem[r][0]:.2f} MB/pod over {mem[r][1]} processes")
    steps = {
        s: {r: {"p50": pct(results[r][s], 0.5), "p90": pct(results[r][s], 0.9)} for r in HANDLERS}
        for s in STEPS
    }
    out = {
        "iterations": ns.iterations,
        "pods": ns.pods,
        "zygote": not ns.no_zygote,
        "network": ns.network,
        "steps": steps,
        "memory_mb_per_pod": {r: mem[r][0] for r in HANDLERS},
        "runtime_processes": {r: mem[r][1] for r in HANDLERS},
    }
    if ns.json:
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"pod lifecycle through CRI, {ns.iterations} interleaved iterations, network={ns.network}, zygote={not ns.no_zygote}"
    )
    print(
        f"{'step':<14}{'runc.v2 p50':>12}{'p90':>9}{'podshim p50':>13}{'p90':>9}{'ratio p50':>11}{'ratio p90':>11}"
    )
    for s in STEPS:
        a, b = steps[s]["runc.v2"], steps[s]["podshim"]
        print(
            f"{s:<14}{a['p50']:>10.1f}ms{a['p90']:>7.1f}ms{b['p50']:>11.1f}ms{b['p90']:>7.1f}ms{b['p50'] / a['p50']:>11.2f}{b['p90'] / a['p90']:>11.2f}"
        )
    ma, mb = mem["runc.v2"][0], mem["podshim"][0]
    print(
        f"{'memory/pod':<14}{ma:>10.2f}MB{'':>9}{mb:>11.2f}MB{'':>9}{mb / ma:>11.2f}   (PSS, {ns.pods} pods up; lower is better)"
    )
    print("ratios are podshim/runc.v2: below 1 means podshim is better")
    return 0


if __name__ == "__main__":
    sys.exit(main())
