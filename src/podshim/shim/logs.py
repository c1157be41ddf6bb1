"""Logging for the shim daemon, to containerd's log FIFO (``<bundle>/log`` on fd 2).

containerd copies the FIFO into its own log verbatim, so lines look like its runc shim's
(logrus text: ``time="..." level=info msg="..." key=value``) or JSON, as configured. A
write that fails (containerd restarting, FIFO gone) is dropped: logging never hurts the
shim.
"""

from __future__ import annotations

import datetime
import json
import logging
import os

_LEVELS = {
    "DEBUG": "debug",
    "INFO": "info",
    "WARNING": "warning",
    "ERROR": "error",
    "CRITICAL": "fatal",
}
#: LogRecord attributes that are not user fields
_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-._/:@" for c in value):
        return value
    return json.dumps(value)


class LogrusFormatter(logging.Formatter):
    """``time="<RFC3339Nano>" level=<lvl> msg="<msg>" <field>=<value> ...``."""

    def __init__(self, fields: dict[str, str] | None = None, as_json: bool = False) -> None:
        super().__init__()
        self.fields = dict(fields or {})
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        when = (
            datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat()
            .replace("+00:00", "Z")
        )
        level = _LEVELS.get(record.levelname, record.levelname.lower())
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        extra = {k: str(v) for k, v in record.__dict__.items() if k not in _STD}
        fields = {**self.fields, **extra}
        if self.as_json:
            return json.dumps({"time": when, "level": level, "msg": msg, **fields})
        parts = [f'time="{when}"', f"level={level}", f"msg={json.dumps(msg)}"]
        parts += [f"{k}={_quote(v)}" for k, v in sorted(fields.items())]
        return " ".join(parts)


class FdHandler(logging.Handler):
    """Writes each record with one ``write(2)`` to a fd; failures are swallowed."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, (self.format(record) + "\n").encode(errors="replace"))
        except Exception:  # a log line must never take the shim down
            pass


def setup(fd: int, level: str, fields: dict[str, str], as_json: bool = False) -> None:
    handler = FdHandler(fd)
    handler.setFormatter(LogrusFormatter(fields, as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(
        {"debug": logging.DEBUG, "warn": logging.WARNING}.get(
            level, getattr(logging, level.upper(), logging.INFO)
        )
    )
