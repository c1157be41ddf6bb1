"""The census after a churn (:mod:`podshim_lab.churn`): nothing of the churned pods may
be left, and once the sentinel pod is gone too, nothing at all.

Both checks poll (containerd removes a pod's shim, bundles and cgroups asynchronously
after RemovePodSandbox returns; the zygote leaves after 30 s without a child) with a
generous deadline, then report what is still there.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from podshim.diag.registry import entry_name
from podshim_lab.census import CRI_NAMESPACE, PodshimLab, netns_paths, shim_of, snapshot
from podshim_lab.churn import ChurnResult
from podshim_lab.cri.client import CriClient, CriError
from podshim_lab.poll import WaitTimeout, wait_for
from podshim_lab.procfs import descendants, process_table

__all__ = ["settle_after_churn", "teardown_sentinel"]

#: how long containerd and the shims get to finish removing what a churn left
SETTLE_SECONDS = 180.0


def _sentinel_items(
    plab: PodshimLab, pod: str, cids: list[str], shim: int, netns: list[str]
) -> set[str]:
    """The census items that belong to the sentinel pod (it is still running)."""
    mine: set[str] = set()
    table = process_table()
    tree = {shim, *(s.pid for s in descendants(shim, table))} if shim in table else set()
    socket = os.path.join(
        plab.run_dir,
        "s",
        hashlib.sha256(f"{plab.lab.address}/{CRI_NAMESPACE}/{pod}".encode()).hexdigest(),
    )
    names = (pod, *cids, socket, entry_name(socket), *netns)
    for item in snapshot(plab):
        if item.startswith("process "):
            if int(item.split()[1]) in tree:
                mine.add(item)
        elif any(n in item for n in names):
            mine.add(item)
    return mine


def _wait_clean(
    what: str, left: Callable[[], set[str]], timeout: float = SETTLE_SECONDS
) -> list[str]:
    try:
        wait_for(lambda: not left(), timeout=timeout, interval=0.25, message=what)
    except WaitTimeout:
        return [f"{what}: left {item}" for item in sorted(left())]
    return []


def _sentinel(result: ChurnResult) -> tuple[str, list[str]]:
    return result.ids[0], result.ids[1:3]


def settle_after_churn(plab: PodshimLab, result: ChurnResult) -> list[str]:
    """Wait until nothing but the sentinel pod is left; what is left past the deadline
    (pass it as :func:`~podshim_lab.churn.churn`'s ``settle``)."""
    if len(result.ids) < 3:
        return []
    pod, cids = _sentinel(result)
    churned = result.ids[3:]
    with CriClient(plab.lab.address) as cri:
        info = cri.pod_status(pod)
    shim = shim_of(info.pid)
    if shim is None:
        return [f"the sentinel pod {pod} has no shim any more"]
    netns = netns_paths(info.info)

    def left() -> set[str]:
        now = snapshot(plab, churned, result.netns)
        return now - _sentinel_items(plab, pod, cids, shim.pid, netns)

    return _wait_clean("after the churn", left)


def teardown_sentinel(plab: PodshimLab, result: ChurnResult) -> list[str]:
    """Stop and remove the sentinel pod; wait until nothing at all is left."""
    pod, _ = _sentinel(result)
    errors: list[str] = []
    with CriClient(plab.lab.address) as cri:
        for step in (cri.stop_pod, cri.remove_pod):
            try:
                step(pod)
            except CriError as exc:
                errors.append(f"sentinel teardown: {exc}")
    return errors + _wait_clean(
        "after the sentinel's removal", lambda: snapshot(plab, result.ids, result.netns)
    )
