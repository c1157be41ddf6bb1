"""One error vocabulary for podshim, and the one place it meets ttrpc status codes.

The classes mirror containerd's ``errdefs`` (``ErrNotFound``, ``ErrAlreadyExists``, ...).
Code deep inside the shim raises them with a message naming the cause; the ttrpc server
turns any exception into a status with :func:`to_status`, and the client turns a status
back into an exception with :func:`from_status`. Nothing else maps codes.

Import this module as ``from podshim import errors as errdefs`` and write
``raise errdefs.NotFound(f"task {tid}")``, the way Go code writes ``errdefs.ErrNotFound``.
"""

from __future__ import annotations

import enum
import errno
import logging
import sys
from typing import ClassVar

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Canceled",
    "Code",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "NotImplemented",
    "PermissionDenied",
    "ResourceExhausted",
    "ShimError",
    "Unavailable",
    "Unknown",
    "from_status",
    "to_status",
]

log = logging.getLogger("podshim.errors")


class Code(enum.IntEnum):
    """gRPC status codes, as ttrpc carries them in ``google.rpc.Status.code``."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ShimError(Exception):
    """Base of every error that carries a containerd error kind.

    ``str(err)`` is the message sent on the wire; it should name the cause
    (the task or exec id, the state, the failing command).
    """

    code: ClassVar[Code] = Code.UNKNOWN

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message or self.code.name.lower().replace("_", " ")


class Unknown(ShimError):
    code = Code.UNKNOWN


class Canceled(ShimError):
    code = Code.CANCELLED


class InvalidArgument(ShimError):
    code = Code.INVALID_ARGUMENT


class DeadlineExceeded(ShimError):
    code = Code.DEADLINE_EXCEEDED


class NotFound(ShimError):
    code = Code.NOT_FOUND


class AlreadyExists(ShimError):
    code = Code.ALREADY_EXISTS


class PermissionDenied(ShimError):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(ShimError):
    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(ShimError):
    code = Code.FAILED_PRECONDITION


class Aborted(ShimError):
    code = Code.ABORTED


class NotImplemented(ShimError):
    code = Code.UNIMPLEMENTED


class Internal(ShimError):
    code = Code.INTERNAL


class Unavailable(ShimError):
    code = Code.UNAVAILABLE


_BY_CODE: dict[Code, type[ShimError]] = {
    cls.code: cls
    for cls in (
        Unknown,
        Canceled,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        NotImplemented,
        Internal,
        Unavailable,
    )
}

_ERRNO_CODES = {
    errno.ENOENT: Code.NOT_FOUND,
    errno.ESRCH: Code.NOT_FOUND,
    errno.EEXIST: Code.ALREADY_EXISTS,
    errno.EPERM: Code.PERMISSION_DENIED,
    errno.EACCES: Code.PERMISSION_DENIED,
    errno.EINVAL: Code.INVALID_ARGUMENT,
}


def to_status(exc: BaseException) -> tuple[Code, str]:
    """Map any exception raised by a handler to a ttrpc status ``(code, message)``.

    This is the only place in podshim where exceptions become status codes. A
    :class:`ShimError` keeps its kind; OS and asyncio errors get the kind containerd's
    Go server would give them; anything else is a bug, so it is logged with its
    traceback and answered UNKNOWN.
    """
    if isinstance(exc, ShimError):
        return exc.code, str(exc)
    aio = sys.modules.get("asyncio")  # not imported here: `delete` must not pay for asyncio
    if aio is not None and isinstance(exc, aio.CancelledError):
        return Code.CANCELLED, "context canceled"
    if isinstance(exc, TimeoutError):
        return Code.DEADLINE_EXCEEDED, "context deadline exceeded"
    if isinstance(exc, OSError) and exc.errno in _ERRNO_CODES:
        return _ERRNO_CODES[exc.errno], str(exc)
    log.error("unexpected error: %r", exc, exc_info=exc)
    return Code.UNKNOWN, str(exc) or type(exc).__name__


def from_status(code: int, message: str) -> ShimError:
    """Turn a status received from a peer into the matching exception.

    Codes without a class of their own (OUT_OF_RANGE, DATA_LOSS, ...) become
    :class:`Unknown`, as containerd's ``errdefs.FromGRPC`` does; the message keeps
    the original code name so nothing is lost.
    """
    try:
        kind = Code(code)
    except ValueError:
        return Unknown(f"code {code}: {message}")
    cls = _BY_CODE.get(kind)
    if cls is None:
        return Unknown(f"{kind.name}: {message}")
    return cls(message)
