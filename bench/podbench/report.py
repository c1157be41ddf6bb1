"""Statistics over runs and the printed table.

One *run* measures everything once for every column (interleaved); with several runs
each figure is the median of the runs' figures (of their p50s, of their p90s, of their
burst walls, of their PSS per pod). Ratios are column / runc of those medians.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from podbench.phases import STEPS

NETWORK_NAMES = {"pod": "pod network (CNI bridge)", "host": "host network"}

Json = dict[str, Any]


def pct(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no samples."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def summarize(runs: Sequence[Json], columns: Sequence[str]) -> Json:
    """``{network: {"steps": {step: {column: {p50, p90}}}, "bursts": {n: {column: wall_s}},
    "pss_mb_per_pod": {column: {N: MB}}, "samples": {column: {step: [ms, all runs]}}}}``."""
    out: Json = {}
    networks = list(dict.fromkeys(net for run in runs for net in run))
    for net in networks:
        per_run = [run[net] for run in runs if net in run]
        steps: Json = {}
        pooled: Json = {c: {s: [] for s in STEPS} for c in columns}
        for step in STEPS:
            steps[step] = {}
            for c in columns:
                xs = [r["steps"].get(c, {}).get(step, []) for r in per_run]
                for x in xs:
                    pooled[c][step] += x
                steps[step][c] = {
                    "p50": median([pct(x, 0.5) for x in xs]),
                    "p90": median([pct(x, 0.9) for x in xs]),
                }
        bursts: Json = {}
        for r in per_run:
            for n in r["bursts"]:
                bursts.setdefault(n, {})
        for n in bursts:
            for c in columns:
                walls = [r["bursts"].get(n, {}).get(c, {}).get("wall_s", math.nan) for r in per_run]
                lat = [
                    pct(r["bursts"].get(n, {}).get(c, {}).get("pod_up_ms", []), 0.5)
                    for r in per_run
                ]
                bursts[n][c] = {"wall_s": median(walls), "pod_up_p50_ms": median(lat)}
        pss: Json = {}
        for c in columns:
            counts = sorted({int(k) for r in per_run for k in r["pss"].get(c, {})})
            if counts:
                pss[c] = {
                    str(k): median(
                        [
                            r["pss"].get(c, {}).get(str(k), {}).get("mb_per_pod", math.nan)
                            for r in per_run
                        ]
                    )
                    for k in counts
                }
        out[net] = {"steps": steps, "bursts": bursts, "pss_mb_per_pod": pss, "samples": pooled}
    return out


def ratios(summary: Json, columns: Sequence[str], base: str = "runc") -> Json:
    """Every figure of every column divided by the base column's."""

    def div(a: float, b: float) -> float:
        return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan

    out: Json = {}
    for net, s in summary.items():
        r: Json = {}
        for c in columns:
            if c == base:
                continue
            r[c] = {
                "steps": {
                    step: {q: div(v[c][q], v[base][q]) for q in ("p50", "p90")}
                    for step, v in s["steps"].items()
                },
                "bursts": {
                    n: div(v[c]["wall_s"], v[base]["wall_s"]) for n, v in s["bursts"].items()
                },
                "pss": {
                    k: div(mb, s["pss_mb_per_pod"].get(base, {}).get(k, math.nan))
                    for k, mb in s["pss_mb_per_pod"].get(c, {}).items()
                },
            }
        out[net] = r
    return out


def _cell(value: float, ratio: float | None, unit: str = "") -> str:
    if math.isnan(value):
        return "-"
    text = f"{value:.2f}{unit}" if value < 10 else f"{value:.1f}{unit}"
    if ratio is not None and not math.isnan(ratio):
        text += f" ({ratio:.2f}x)"
    return text


def render(
    summary: Json, rat: Json, columns: Sequence[str], meta: Mapping[str, Any], base: str = "runc"
) -> str:
    """The table: per network, rows of figures, one column per runtime; in brackets
    the ratio to ``base`` (below 1: better than runc.v2)."""
    width = 22

    def row(
        label: str, values: Mapping[str, float], ratio_of: Mapping[str, float], unit: str
    ) -> None:
        cells = [
            _cell(values.get(c, math.nan), ratio_of.get(c) if c != base else None, unit)
            for c in columns
        ]
        lines.append(f"{label:<22}" + "".join(f"{x:>{width}}" for x in cells))

    lines = [
        f"pod lifecycle through CRI on one private containerd {meta.get('containerd', '')}; "
        f"columns interleaved; "
        f"medians of {meta['runs']} run(s); load average {meta['loadavg']} (1/5/15 min, "
        f"before; the machine may be shared)",
    ]
    helps = meta["column_help"]
    lines.append("columns: " + "; ".join(f"{c} = {helps[c]}" for c in columns))
    for net, s in summary.items():
        lines += ["", f"== {NETWORK_NAMES.get(net, net)} ==", ""]
        lines.append(f"{'':<22}" + "".join(f"{c:>{width}}" for c in columns))

        r = rat.get(net, {})
        for q in ("p50", "p90"):
            for step in STEPS:
                row(
                    f"{step} {q}",
                    {c: s["steps"][step][c][q] for c in columns},
                    {c: r[c]["steps"][step][q] for c in r},
                    " ms",
                )
        for n, v in s["bursts"].items():
            row(f"{n} at once, wall", {c: v[c]["wall_s"] for c in columns},
                {c: r[c]["bursts"][n] for c in r}, " s")  # fmt: skip
        counts = sorted({int(k) for c in s["pss_mb_per_pod"].values() for k in c})
        for k in counts:
            row(f"PSS/pod, {k} pods", {c: s["pss_mb_per_pod"].get(c, {}).get(str(k), math.nan)
                for c in columns}, {c: r[c]["pss"].get(str(k), math.nan) for c in r}, " MB")  # fmt: skip
    lines += [
        "",
        "ms and s: latency (lower is better); PSS: MB per pod of every runtime process of",
        "the column (shims, daemons, zygote, pause, podshim-init; not the containers).",
        f"(N.NNx): the column / {base} in the same runs; below 1 is better than {base}.",
    ]
    errors = meta.get("errors") or {}
    for c, msgs in errors.items():
        for m in msgs:
            lines.append(f"error: {c}: {m}")
    return "\n".join(lines)
