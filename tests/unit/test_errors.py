"""The one mapping between podshim errors and ttrpc status codes."""

from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from podshim import errors as errdefs
from podshim.errors import Code


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errdefs.NotFound("task x"), Code.NOT_FOUND),
        (errdefs.AlreadyExists("x"), Code.ALREADY_EXISTS),
        (errdefs.FailedPrecondition("x"), Code.FAILED_PRECONDITION),
        (errdefs.InvalidArgument("x"), Code.INVALID_ARGUMENT),
        (errdefs.NotImplemented("x"), Code.UNIMPLEMENTED),
        (errdefs.Unavailable("x"), Code.UNAVAILABLE),
        (errdefs.DeadlineExceeded("x"), Code.DEADLINE_EXCEEDED),
        (FileNotFoundError(errno.ENOENT, "no such file"), Code.NOT_FOUND),
        (FileExistsError(errno.EEXIST, "exists"), Code.ALREADY_EXISTS),
        (PermissionError(errno.EPERM, "nope"), Code.PERMISSION_DENIED),
        (TimeoutError(), Code.DEADLINE_EXCEEDED),
        (asyncio.CancelledError(), Code.CANCELLED),
    ],
)
def test_to_status_kinds(exc: BaseException, code: Code) -> None:
    assert errdefs.to_status(exc)[0] == code


def test_message_is_kept() -> None:
    assert errdefs.to_status(errdefs.NotFound("task abc: not found")) == (
        Code.NOT_FOUND,
        "task abc: not found",
    )


def test_unexpected_exception_is_unknown_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="podshim.errors"):
        code, msg = errdefs.to_status(ZeroDivisionError("division by zero"))
    assert code == Code.UNKNOWN
    assert msg == "division by zero"
    assert caplog.records and caplog.records[0].exc_info is not None


@pytest.mark.parametrize("cls", [errdefs.NotFound, errdefs.FailedPrecondition, errdefs.Unavailable])
def test_round_trip(cls: type[errdefs.ShimError]) -> None:
    code, msg = errdefs.to_status(cls("boom"))
    back = errdefs.from_status(code, msg)
    assert type(back) is cls
    assert str(back) == "boom"


def test_codes_without_a_class_become_unknown_keeping_the_name() -> None:
    err = errdefs.from_status(Code.OUT_OF_RANGE, "EOF")
    assert type(err) is errdefs.Unknown
    assert "OUT_OF_RANGE" in str(err)
    assert type(errdefs.from_status(99, "x")) is errdefs.Unknown
