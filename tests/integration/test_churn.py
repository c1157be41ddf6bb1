"""Pod churn through CRI: ``PODSHIM_CHURN_CYCLES`` (default 100) pod create/delete cycles,
2 containers each, 4 at a time, next to a sentinel pod that lives through the churn and
gets an ExecSync per cycle (:mod:`podshim_lab.churn`). Then nothing of the churned pods
may be left (:mod:`podshim_lab.churncheck`: processes, zombies included; shim sockets,
diag registry entries, namespace pins, runtime state and mounts in podshim's private run
directory; bundles; network namespaces; cgroups), the long-lived processes (the sentinel's
shim; containerd's fds) stay flat within :class:`podshim_lab.churn.Bounds`, and once the
sentinel is removed and the lab closed nothing at all is left.

``bench/churn.py`` runs the same for 1000 cycles and prints the figures.
"""

from __future__ import annotations

import os
import sys

import pytest

from podshim_lab.census import PodshimLab
from podshim_lab.churn import Bounds, churn
from podshim_lab.churncheck import settle_after_churn, teardown_sentinel

CYCLES = int(os.environ.get("PODSHIM_CHURN_CYCLES", "100"))

pytestmark = pytest.mark.timeout(max(600, CYCLES * 6))


def test_churn_leaves_nothing_and_long_lived_processes_stay_flat() -> None:
    if not any(os.path.isfile(p) for p in ("/bin/busybox", "/usr/bin/busybox")):
        pytest.skip("busybox not installed (apt-get install busybox-static)")
    plab = PodshimLab().start()
    problems: list[str] = []
    try:
        result = churn(plab, CYCLES, parallel=4, settle=settle_after_churn)
        print(result.summary(), file=sys.stderr)
        assert len(result.cycle_ms) == CYCLES
        assert {"containerd", "sentinel shim"} <= set(result.long_lived)
        problems += result.problems(Bounds())
        problems += teardown_sentinel(plab, result)
    finally:
        problems += plab.close()
    assert not problems, "churn:\n" + "\n".join(problems)
