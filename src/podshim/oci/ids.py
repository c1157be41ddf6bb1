"""Identifiers and the annotations podshim reads, as containerd and CRI define them.

Standard library only and no imports at all: used on the ``start`` path.
"""

from __future__ import annotations

#: Annotation grouping tasks into one shim (like runc's ``io.containerd.runc.v2.group``).
GROUP_ANNOTATION = "io.containerd.podshim.v1.group"
#: CRI: the pod sandbox a task belongs to (the sandbox's own id on the sandbox).
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
#: CRI: ``sandbox`` or ``container``.
CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
#: CRI: the container's name in its pod.
CONTAINER_NAME_ANNOTATION = "io.kubernetes.cri.container-name"

MAX_ID_LEN = 76
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def valid_id(value: str) -> bool:
    """containerd's identifier rule (pkg/identifiers): alphanumerics joined by single
    ``.``, ``_`` or ``-``, at most 76 characters; so never ``/``, ``..`` or spaces.
    (No ``re``: this module is on the ``start`` path.)"""
    if not value or len(value) > MAX_ID_LEN:
        return False
    after_sep = True  # must start with an alphanumeric
    for c in value:
        if c in _ALNUM:
            after_sep = False
        elif c in "._-" and not after_sep:
            after_sep = True
        else:
            return False
    return not after_sep
