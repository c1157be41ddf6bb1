"""Fault hooks for tests, loaded into a shim daemon by its composition root.

A shim started with ``PODSHIM_HOOKS=podshim_lab.faults:crash_after_create`` (set in the
environment of the containerd the tests start) calls :func:`crash_after_create` after
every Create. It does nothing unless ``PODSHIM_TEST_CRASH`` names the created task id
or CRI container name; then, shortly after that Create has been answered, a job of the
daemon's own group fails: the daemon's crash path (``panic.log``, exit 2) runs.

:func:`shrink_event_queue` (``PODSHIM_HOOKS=podshim_lab.faults:shrink_event_queue``)
bounds the event publisher's queue of the shims of CRI pods whose name starts with
``PODSHIM_TEST_QUEUE_POD`` to ``PODSHIM_TEST_QUEUE_LEN`` events, so a test can fill it
(while containerd is down) with a handful of real events instead of thousands.

Faults outside the shim (a runtime call that blocks or fails, containerd kept down)
are in :mod:`podshim_lab.gates`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from podshim.oci.ids import CONTAINER_NAME_ANNOTATION
from podshim.service.publisher import ForwardPublisher
from podshim.service.tasks import TaskService

#: the module:function to put in ``PODSHIM_HOOKS``
HOOK = "podshim_lab.faults:crash_after_create"
QUEUE_HOOK = "podshim_lab.faults:shrink_event_queue"
#: names the task id or CRI container name whose Create crashes the shim
CRASH_ENV = "PODSHIM_TEST_CRASH"
#: CRI pod name prefix and queue length of :func:`shrink_event_queue`
QUEUE_POD_ENV = "PODSHIM_TEST_QUEUE_POD"
QUEUE_LEN_ENV = "PODSHIM_TEST_QUEUE_LEN"
SANDBOX_NAME_ANNOTATION = "io.kubernetes.cri.sandbox-name"

log = logging.getLogger("podshim_lab.faults")


class DeliberateCrash(RuntimeError):
    """The deliberate crash of :func:`crash_after_create`."""


def crash_env(target: str) -> dict[str, str]:
    """The environment entries that arm the hook for ``target``."""
    return {"PODSHIM_HOOKS": HOOK, CRASH_ENV: target}


def crash_after_create(service: TaskService, tid: str, spec: dict[str, Any]) -> None:
    target = os.environ.get(CRASH_ENV, "")
    if not target:
        return
    ann = spec.get("annotations")
    name = str(ann.get(CONTAINER_NAME_ANNOTATION, "")) if isinstance(ann, dict) else ""
    if target not in (tid, name):
        return
    log.warning("fault hook: crashing the shim after Create of %s", tid)

    async def crash() -> None:
        await asyncio.sleep(0.2)  # let the Create response go out first
        raise DeliberateCrash(f"deliberate crash after Create of task {tid} ({CRASH_ENV})")

    service.ctx.jobs.spawn(crash(), "podshim-test-crash")


def queue_env(pod_prefix: str, maxlen: int) -> dict[str, str]:
    """The environment entries that arm :func:`shrink_event_queue`."""
    return {QUEUE_POD_ENV: pod_prefix, QUEUE_LEN_ENV: str(maxlen)}


def shrink_event_queue(service: TaskService, tid: str, spec: dict[str, Any]) -> None:
    prefix = os.environ.get(QUEUE_POD_ENV, "")
    ann = spec.get("annotations")
    pod = str(ann.get(SANDBOX_NAME_ANNOTATION, "")) if isinstance(ann, dict) else ""
    publisher = service.ctx.publisher
    if not prefix or not pod.startswith(prefix) or not isinstance(publisher, ForwardPublisher):
        return
    maxlen = int(os.environ.get(QUEUE_LEN_ENV, "1"))
    if publisher.maxlen != maxlen:
        log.warning("fault hook: event queue of pod %s bounded to %d", pod, maxlen)
        publisher.maxlen = maxlen
