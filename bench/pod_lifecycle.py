"""Pod lifecycle through CRI: runc.v2, podshim (pod and node scope; on containerd 2.x also
its two Sandbox API front doors) and a do-nothing shim on one private containerd.

Every runtime is a CRI handler of the same private containerd (:mod:`podshim_lab`; the
columns are listed in :mod:`podbench.lab`); their pods are interleaved so the machine's
load hits all alike. The do-nothing shim (``bench/nullshim``) answers every Task call at
once without running anything: containerd's own floor (plus a Python shim's start-up),
so the ratios can be read against what is physically possible.

Per network (``--networks``: ``pod`` = the CNI bridge, ``host`` = host network), each run
measures, for every column:

* ``--pods`` (20) sequential pods after one warm-up pod, each with one busybox ``sleep``:
  ``run_pod`` (RunPodSandbox), ``create_start`` (CreateContainer + StartContainer),
  ``pod_up`` (the two together), ``exec_sync`` (ExecSync ``true``), ``stop_remove``
  (StopPodSandbox + RemovePodSandbox); p50 and p90;
* ``--bursts`` (10 and 30) pods brought up at once, by as many threads: wall time from
  the first request to every container running;
* on the ``--pss-networks`` (default: the pod network only; memory does not depend on the
  network), the PSS of every runtime process of the column (shims, node daemons, zygote,
  pause, podshim-init; not the containers) divided by the pods up, with 1, 10, 20, 50
  and 100 pods (``--quick``: 1, 10, 20).

With ``--runs N`` every figure is the median of the N runs' figures. Prints a table with
the ratios column / runc.v2 (below 1 is better), or ``--json``; ``--plot out.png`` draws
PSS per pod against pods up and the CDFs of pod start latency. Exit status 1 when a
column failed a step (the table says which; the others are still measured).

podshim's node scope is selected by ``shim_scope = "node"`` in its ConfigPath TOML; where
podshim does not implement it yet, the ``node`` column simply runs with the key set.

``--containerd 1.6|1.7|2.1`` (default 1.6, the system package) chooses the containerd
that every column runs on. On 2.x two more columns: ``sb`` (``sandboxer = "shim"``: CRI
drives the pod through the ttrpc Sandbox service of the pod's shim) and ``proxy`` (the
proxy plugin: the resident ``podshim daemon``, started by the bench before containerd and
stopped after it, serves the sandbox Controller and Task v3 for every pod; its PSS is the
column's). ``pod`` on 2.x is the default ``podsandbox`` sandboxer (podshim's sandbox task).

``vm`` (``default_host = "uvm"``, after ``podshim uvm prepare``): a utility VM per pod.
A VM pod costs ~100 MB, so measure it with small counts, e.g. ``--runtimes runc,vm
--networks pod --bursts "" --pss-counts 1,5 --pods 10``; its ``create_start`` is the
time from RunPodSandbox's return to the first container running.

Usage (root): ``.venv/bin/python bench/pod_lifecycle.py [--runs 3] [--containerd 2.1]
[--runtimes runc,pod,node,null,sb,proxy,vm] [--networks pod,host] [--pods 20]
[--bursts 10,30] [--quick] [--pss-counts 1,10,20,50,100] [--podshim-set zygote=true]
[--json] [--json-out FILE] [--plot out.png]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from podbench.lab import (
    COLUMNS,
    CONTAINERDS,
    DEFAULT_COLUMNS,
    V2_COLUMNS,
    Bench,
    open_bench,
    parse_setting,
)
from podbench.phases import Driver, Errors, burst, pss_ramp, rotated, sequential
from podbench.report import Json, ratios, render, summarize

from podshim_lab.cri.client import CriClient, CriError

COLUMN_HELP = {
    "runc": "io.containerd.runc.v2",
    "pod": "podshim, shim_scope=pod",
    "node": "podshim, shim_scope=node",
    "null": "do-nothing shim, node scope",
    "null-pod": "do-nothing shim, one daemon per pod",
    "sb": 'podshim, sandboxer="shim" (ttrpc Sandbox service)',
    "proxy": "podshim daemon, proxy-plugin sandboxer (Task v3)",
    "vm": "podshim, default_host=uvm (a QEMU utility VM per pod)",
}
FULL_COUNTS = (1, 10, 20, 50, 100)
QUICK_COUNTS = (1, 10, 20)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"positive integers expected: {text!r}")
    return values


def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}: {text!r}")
        return names

    return parse


def one_run(bench: Bench, cri: CriClient, ns: argparse.Namespace, run: int, errors: Errors) -> Json:
    """Everything once, for every column and network."""
    out: Json = {}
    for net in ns.networks:
        label = f"run {run + 1}, {net} network"
        driver = Driver(bench, cri, host_net=net == "host", tag=f"r{run}{net[0]}", label=label)
        columns = rotated(bench.columns, run)  # who goes first changes from run to run

        def progress(msg: str, net: str = net) -> None:
            log(f"run {run + 1}/{ns.runs}, {net} network: {msg}")

        steps = sequential(driver, columns, ns.pods, errors, progress)
        bursts: Json = {}
        for n in ns.bursts:
            bursts[str(n)] = {}
            for column in rotated(columns, n):
                try:
                    res = burst(driver, column, n)
                except (CriError, RuntimeError) as exc:
                    errors.add(column, f"{label}, {n} pods at once", exc)
                    continue
                bursts[str(n)][column] = {"wall_s": res.wall_s, "pod_up_ms": res.pod_up_ms}
                progress(f"{n} pods at once on {column}: {res.wall_s:.2f} s")
        pss: Json = {}
        if net in ns.pss_networks:
            for column in columns:
                try:
                    ramp = pss_ramp(driver, column, ns.pss_counts)
                except (CriError, RuntimeError) as exc:
                    errors.add(column, f"{label}, memory", exc)
                    continue
                pss[column] = {
                    str(k): {
                        "mb_per_pod": fp.pss_kib / 1024 / k,
                        "processes": fp.processes,
                        "kinds": dict(fp.kinds),
                        "mb_per_pod_by_kind": {
                            kind: kib / 1024 / k for kind, kib in sorted(fp.pss_by_kind.items())
                        },
                    }
                    for k, fp in ramp.items()
                }
                top = max(ramp)
                progress(
                    f"memory {column}: {pss[column][str(top)]['mb_per_pod']:.2f} MB/pod at {top}"
                )
                for k, fp in sorted(ramp.items()):
                    parts = ", ".join(
                        f"{kind} {kib / 1024 / k:.1f}"
                        for kind, kib in sorted(fp.pss_by_kind.items(), key=lambda x: -x[1])
                    )
                    progress(f"memory {column} at {k} pods, MB/pod by process: {parts}")
        out[net] = {"steps": steps, "bursts": bursts, "pss": pss}
    return out


def _no_nan(value: Any) -> Any:
    """NaN is not JSON: null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1, help="interleaved runs; medians (default 1)")
    ap.add_argument("--containerd", choices=CONTAINERDS, default="1.6",
                    help="the containerd build every column runs on (default 1.6)")  # fmt: skip
    ap.add_argument("--runtimes", type=_names(COLUMNS), default=list(DEFAULT_COLUMNS),
                    help=f"columns, from {','.join(COLUMNS)} (default {','.join(DEFAULT_COLUMNS)})")  # fmt: skip
    ap.add_argument("--networks", type=_names(("pod", "host")), default=["pod", "host"])
    ap.add_argument("--pss-networks", type=_names(("pod", "host")), default=["pod"])
    ap.add_argument("--pods", type=int, default=20, help="sequential pods per column")
    ap.add_argument("--bursts", type=_ints, default=[10, 30], help="pods at once (10,30)")
    ap.add_argument("--pss-counts", type=_ints, default=None, help="pods up for PSS")
    ap.add_argument("--quick", action="store_true", help="PSS at 1,10,20 pods only")
    ap.add_argument("--podshim-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a key of the podshim columns' config TOML, the proxy daemon's "
                    "too, not sb's (repeatable)")  # fmt: skip
    ap.add_argument("--log-level", default="warn", help="containerd's log level")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--json-out", metavar="FILE", help="also write the JSON there")
    ap.add_argument("--plot", metavar="PNG", help="write the plot there (matplotlib)")
    ns = ap.parse_args(argv)
    if ns.pss_counts is None:
        ns.pss_counts = list(QUICK_COUNTS if ns.quick else FULL_COUNTS)
    if ns.runs < 1 or ns.pods < 1:
        ap.error("--runs and --pods must be >= 1")
    ns.pss_networks = [n for n in ns.pss_networks if n in ns.networks]
    try:
        ns.settings = dict(parse_setting(s) for s in ns.podshim_set)
    except ValueError as exc:
        ap.error(str(exc))
    v2_only = [c for c in ns.runtimes if c in V2_COLUMNS]
    if v2_only and not ns.containerd.startswith("2."):
        ap.error(f"{','.join(v2_only)}: containerd 2.x only (--containerd 2.1)")
    if "runc" not in ns.runtimes:
        ns.runtimes.insert(0, "runc")  # the reference of every ratio
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    if os.geteuid() != 0:
        log("needs root (containerd, runc, CNI)")
        return 2
    loadavg = [round(x, 2) for x in os.getloadavg()]
    errors = Errors()
    runs: list[Json] = []
    started = time.monotonic()
    with (
        open_bench(ns.runtimes, ns.settings, ns.log_level, ns.containerd) as bench,
        CriClient(bench.lab.address, timeout=60) as cri,
    ):
        containerd_version = bench.lab_version()
        for run in range(ns.runs):
            runs.append(one_run(bench, cri, ns, run, errors))
    summary = summarize(runs, ns.runtimes)
    rat = ratios(summary, ns.runtimes)
    meta: Json = {
        "runs": ns.runs,
        "containerd": containerd_version,
        "columns": ns.runtimes,
        "column_help": COLUMN_HELP,
        "networks": ns.networks,
        "pss_networks": ns.pss_networks,
        "sequential_pods": ns.pods,
        "bursts": ns.bursts,
        "pss_counts": ns.pss_counts,
        "podshim_settings": ns.settings,
        "cpus": os.cpu_count(),
        "loadavg": loadavg,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.monotonic() - started, 1),
        "errors": errors.by_column,
    }
    if ns.plot:
        from podbench.plot import plot

        plot(
            summary,
            ns.runtimes,
            ns.plot,
            f"containerd {containerd_version}, {ns.runs} run(s), {os.cpu_count()} CPUs, "
            f"load {loadavg}",
        )
        log(f"plot written to {ns.plot}")
    doc = {"meta": meta, "summary": summary, "ratios_to_runc": rat, "runs": runs}
    if ns.json_out:
        with open(ns.json_out, "w") as f:
            json.dump(_no_nan(doc), f, indent=1)
    if ns.json:
        print(json.dumps(_no_nan(doc), indent=1))
    else:
        print(render(summary, rat, ns.runtimes, meta))
    return 1 if errors.by_column else 0


if __name__ == "__main__":
    sys.exit(main())
