"""The PNG: PSS per pod against the number of pods up, and the CDFs of pod start
latency (RunPodSandbox + CreateContainer + StartContainer of the sequential pods, all
runs pooled), one panel per network. matplotlib with the Agg backend (no display)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from podbench.report import NETWORK_NAMES, Json

COLORS = {"runc": "black", "pod": "tab:blue", "node": "tab:green", "null": "tab:gray",
          "null-pod": "tab:orange", "sb": "tab:purple", "proxy": "tab:red"}  # fmt: skip


def plot(summary: Json, columns: Sequence[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(summary)
    pss_nets = [net for net in nets if summary[net]["pss_mb_per_pod"]]
    fig, axes = plt.subplots(1, 1 + len(nets), figsize=(5.5 * (1 + len(nets)), 4.5))
    ax = axes[0]
    for net in pss_nets:
        style = "-" if net == pss_nets[0] else "--"
        for c in columns:
            points = sorted(
                (int(k), mb)
                for k, mb in summary[net]["pss_mb_per_pod"].get(c, {}).items()
                if not math.isnan(mb)
            )
            if points:
                label = c if len(pss_nets) == 1 else f"{c} ({net})"
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    style,
                    marker="o",
                    color=COLORS.get(c),
                    label=label,
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    counts = sorted(
        {int(k) for net in nets for c in summary[net]["pss_mb_per_pod"].values() for k in c}
    )
    ax.set_xticks(counts, [str(k) for k in counts])
    ax.minorticks_off()
    ax.set_xlabel("pods up")
    ax.set_ylabel("PSS per pod, MB (runtime processes)")
    ax.set_title(
        "memory per pod" + (f", {NETWORK_NAMES[pss_nets[0]]}" if len(pss_nets) == 1 else "")
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    for ax, net in zip(axes[1:], nets, strict=True):
        for c in columns:
            xs = sorted(summary[net]["samples"].get(c, {}).get("pod_up", []))
            if xs:
                ys = [0.0] + [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(
                    [xs[0], *xs], ys, where="post", color=COLORS.get(c), label=f"{c} (n={len(xs)})"
                )
        ax.set_xlabel("pod up: RunPodSandbox + create + start, ms")
        ax.set_ylabel("fraction of pods")
        ax.set_title(f"start latency CDF, {NETWORK_NAMES.get(net, net)}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
