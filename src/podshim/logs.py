"""Logging for the shim daemon, to containerd's log FIFO (``<bundle>/log`` on fd 2).

containerd copies the FIFO into its own log verbatim, so lines look like its runc shim's:

* ``text`` (the default), logrus's text formatter::

      time="2024-05-01T10:00:00.123456789Z" level=info msg="task started" pid=42 tid=abc

  fixed keys ``time``, ``level``, ``msg`` first, then the fields sorted by name; a value
  is written bare when it is made of ``[A-Za-z0-9-._/@^+]`` only, else quoted as Go's
  ``%q`` does;
* ``json``, logrus's JSON formatter: one compact object per line with sorted keys
  (a field named ``time``, ``level`` or ``msg`` becomes ``fields.<name>``, as logrus
  does).

Fields come from :func:`setup` (shim-wide, e.g. ``runtime``) and from each record: pass
``extra={"tid": ...}`` or log through a :class:`TaskLogger`, which adds ``pod-id``,
``tid`` and ``eid`` (exec id) where they are known. :func:`task_fields` builds them.

The level: ``-debug`` (containerd's own level is debug) forces ``debug``; otherwise the
podshim config's ``log_level``. The daemon calls :func:`setup` before any task exists,
and the service applies the config (``log_level``, ``log_format``) with
:func:`apply_config` at the first Create.

A write that fails (containerd restarting, the FIFO gone, a closed fd) is dropped:
logging never hurts the shim.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = [
    "FdHandler",
    "LogrusFormatter",
    "TaskLogger",
    "apply_config",
    "level_number",
    "setup",
    "task_fields",
]

_LEVELS = {
    "DEBUG": "debug",
    "INFO": "info",
    "WARNING": "warning",
    "ERROR": "error",
    "CRITICAL": "fatal",
}
#: config/flag level names -> logging levels
_NUMBERS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}
#: LogRecord attributes that are not user fields
_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
#: logrus's fixed keys; a field of the same name is renamed ``fields.<name>``
_FIXED = ("time", "level", "msg")
_BARE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._/@^+")
#: str.translate table deleting every bare character: what is left needs quoting
_DROP_BARE = {ord(c): None for c in _BARE}
_GO_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
}


def level_number(name: str) -> int:
    """The :mod:`logging` level for a config/flag level name (unknown: INFO)."""
    return _NUMBERS.get(name.lower(), logging.INFO)


def go_quote(value: str) -> str:
    """``value`` as Go's ``%q`` writes it (printable non-ASCII is kept as is)."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'  # the common case: nothing to escape
    return _go_quote_each(value)


def _go_quote_each(value: str) -> str:
    """:func:`go_quote`, character by character."""
    out = ['"']
    for ch in value:
        esc = _GO_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def _value(value: str) -> str:
    """A logrus text value: bare if every character is safe, else quoted."""
    if not value.translate(_DROP_BARE):
        return value
    return go_quote(value)


def go_time(created: float) -> str:
    """RFC 3339 with nanoseconds, in UTC (containerd's ``RFC3339NanoFixed``)."""
    ns = round(created * 1e9)
    secs, frac = divmod(ns, 1_000_000_000)
    when = datetime.datetime.fromtimestamp(secs, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def task_fields(pod_id: str = "", tid: str = "", eid: str = "") -> dict[str, str]:
    """The ``pod-id``/``tid``/``eid`` fields that are known (empty ones are left out)."""
    fields = {"pod-id": pod_id, "tid": tid, "eid": eid}
    return {k: v for k, v in fields.items() if v}


class LogrusFormatter(logging.Formatter):
    """Formats a record as logrus does: text (see the module doc) or JSON."""

    def __init__(self, fields: Mapping[str, str] | None = None, as_json: bool = False) -> None:
        super().__init__()
        self.fields = dict(fields or {})
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        level = _LEVELS.get(record.levelname, record.levelname.lower())
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            msg += "\n" + self.formatStack(record.stack_info)
        extra = {
            k: str(v) for k, v in record.__dict__.items() if k not in _STD and v not in (None, "")
        }
        fields = {**self.fields, **extra}
        if self.as_json:
            data: dict[str, str] = {}
            for k, v in fields.items():
                data[f"fields.{k}" if k in _FIXED else k] = v
            data.update(time=go_time(record.created), level=level, msg=msg)
            return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        parts = [
            f"time={_value(go_time(record.created))}",
            f"level={_value(level)}",
            f"msg={_value(msg)}",
        ]
        for k in sorted(fields):
            key = f"fields.{k}" if k in _FIXED else k
            parts.append(f"{key}={_value(fields[k])}")
        return " ".join(parts)


class FdHandler(logging.Handler):
    """Writes each record, newline-terminated, to a fd; every failure is swallowed
    (EPIPE once containerd is gone, EBADF for a closed fd, anything else)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        #: how many records could not be written
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode(errors="replace")
            view = memoryview(data)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except Exception:  # a log line must never take the shim down
            self.dropped += 1

    def handleError(self, record: logging.LogRecord) -> None:  # pragma: no cover
        """Never print "--- Logging error ---" to stderr (which is the FIFO itself)."""
        self.dropped += 1


class TaskLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger adding a task's fields (``pod-id``, ``tid``) to every record, merged
    with the call's own ``extra`` (e.g. ``extra={"eid": exec_id}``); empty values are
    left out."""

    def __init__(self, logger: logging.Logger, pod_id: str = "", tid: str = "") -> None:
        super().__init__(logger, task_fields(pod_id, tid))

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        own = {k: v for k, v in (kwargs.get("extra") or {}).items() if v not in (None, "")}
        kwargs["extra"] = {**(self.extra or {}), **own}
        return msg, kwargs


class _State:
    """What :func:`setup` installed, for :func:`apply_config`."""

    handler: FdHandler | None = None
    debug = False


def setup(
    fd: int,
    level: str,
    fields: Mapping[str, str],
    as_json: bool = False,
    *,
    debug: bool = False,
) -> FdHandler:
    """Send the root logger to ``fd`` (replacing its handlers) at ``level``.

    ``debug`` is the ``-debug`` flag: it forces level debug now and whatever
    :func:`apply_config` is later given.
    """
    handler = FdHandler(fd)
    handler.setFormatter(LogrusFormatter(fields, as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else level_number(level))
    _State.handler = handler
    _State.debug = debug
    return handler


def apply_config(log_level: str, log_format: str) -> None:
    """Re-configure the handler :func:`setup` installed: ``log_format`` (``text`` or
    ``json``) and ``log_level`` (``-debug`` still wins). A no-op when :func:`setup` was
    never called (a shim service run in-process, e.g. by the tests)."""
    handler = _State.handler
    if handler is None or handler not in logging.getLogger().handlers:
        return
    old = handler.formatter
    fields = old.fields if isinstance(old, LogrusFormatter) else {}
    handler.setFormatter(LogrusFormatter(fields, as_json=log_format == "json"))
    logging.getLogger().setLevel(logging.DEBUG if _State.debug else level_number(log_level))


def reset() -> None:
    """Forget what :func:`setup` installed (tests)."""
    _State.handler = None
    _State.debug = False
