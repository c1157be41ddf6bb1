"""Fault hooks for tests, loaded into a shim daemon by its composition root.

A shim started with ``PODSHIM_HOOKS=podshim_lab.faults:crash_after_create`` (set in the
environment of the containerd the tests start) calls :func:`crash_after_create` after
every Create. It does nothing unless ``PODSHIM_TEST_CRASH`` names the created task id
or CRI container name; then, shortly after that Create has been answered, a job of the
daemon's own group fails: the daemon's crash path (``panic.log``, exit 2) runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from podshim.oci.ids import CONTAINER_NAME_ANNOTATION
from podshim.service.tasks import TaskService

#: the module:function to put in ``PODSHIM_HOOKS``
HOOK = "podshim_lab.faults:crash_after_create"
#: names the task id or CRI container name whose Create crashes the shim
CRASH_ENV = "PODSHIM_TEST_CRASH"

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
