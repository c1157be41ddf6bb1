"""podshim_lab: a private, real containerd (plus images and helpers) for tests.

* :class:`Containerd` starts containerd below a child-subreaper, drives ``ctr``,
  restarts containerd alone and tears everything down again.
* :func:`build_busybox_image` / :func:`build_pause_image` write OCI archives
  built from the host's static busybox, no registry needed.
* :func:`wait_for` polls a condition with a deadline.
"""

from podshim_lab.config import LabPaths, RuntimeHandler
from podshim_lab.containerd import Containerd, CtrError, LabError
from podshim_lab.images import (
    DEFAULT_BUSYBOX_REF,
    DEFAULT_PAUSE_REF,
    build_busybox_image,
    build_pause_image,
)
from podshim_lab.poll import WaitTimeout, wait_for

__all__ = [
    "DEFAULT_BUSYBOX_REF",
    "DEFAULT_PAUSE_REF",
    "Containerd",
    "CtrError",
    "LabError",
    "LabPaths",
    "RuntimeHandler",
    "WaitTimeout",
    "build_busybox_image",
    "build_pause_image",
    "wait_for",
]
