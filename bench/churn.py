"""Pod churn through CRI on podshim, then a census of everything left (a script, not a test).

Starts a private CRI containerd whose ``podshim`` handler keeps all of podshim's host
state in a private run directory (:class:`podshim_lab.census.PodshimLab`), runs
``--cycles`` pod lifecycles (2 containers each, ``--parallel`` at a time; see
:mod:`podshim_lab.churn`) next to a sentinel pod that lives through the churn, and then
checks:

* nothing of the churned pods is left once containerd has removed them (processes,
  zombies included, below the lab; files and mounts in podshim's run directory: shim
  sockets, diag registry entries, namespace pins, runtime state; bundles; network
  namespaces; cgroups);
* fds and private memory (USS) of the long-lived processes (the sentinel's shim, the zygote
  unless ``--no-zygote``) and containerd's fds are flat within :class:`podshim_lab.churn.Bounds`;
* after the sentinel is removed and the lab closed, nothing at all is left.

Prints the timings and the figures, then ``churn: OK`` or every problem (exit 1).
The integration test ``tests/integration/test_churn.py`` runs the same with
``PODSHIM_CHURN_CYCLES`` (default 100) cycles.

Usage: ``.venv/bin/python bench/churn.py [--cycles 1000] [--parallel 4] [--no-zygote]`` (root).
"""

from __future__ import annotations

import argparse
import sys
import time

from podshim_lab.census import PodshimLab
from podshim_lab.churn import Bounds, ChurnResult, churn
from podshim_lab.churncheck import settle_after_churn, teardown_sentinel


def log(msg: str) -> None:
    print(f"churn: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument(
        "--no-zygote", action="store_true", help="spawn each shim (the zygote is the default)"
    )
    args = parser.parse_args(argv)

    config = {"zygote": False} if args.no_zygote else {}
    plab = PodshimLab(config=config)
    plab.start()
    problems: list[str] = []
    result: ChurnResult | None = None
    started = time.monotonic()
    try:
        step = max(1, args.cycles // 20)

        def progress(done: int) -> None:
            if done % step == 0:
                log(f"{done}/{args.cycles} cycles, {time.monotonic() - started:.0f} s")

        result = churn(
            plab, args.cycles, args.parallel, progress=progress, settle=settle_after_churn
        )
        problems += result.problems(Bounds())
        problems += teardown_sentinel(plab, result)
    finally:
        problems += plab.close()
    if result is not None:
        print(result.summary())
    print(f"churn: total {time.monotonic() - started:.0f} s including setup and teardown")
    if problems:
        print("churn: FAILED")
        for p in problems:
            print(f"  {p}")
        return 1
    print("churn: OK (nothing left, long-lived processes flat)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
