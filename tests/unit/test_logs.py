"""The shim's logs: logrus text and JSON, task fields, level from config vs ``-debug``,
and a log write that fails never hurting the shim."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import any_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from podshim import errors as errdefs
from podshim import logs
from podshim.api.runtimeoptions.v1 import api_pb2 as ro_pb2
from podshim.api.task.v2 import shim_pb2 as pb
from podshim.linux.reaper import Reaper
from podshim.service.tasks import TaskService
from podshim.task.contract import ShimContext
from tests.unit.fakes import RecordingPublisher

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z"


def record(msg: str, level: int = logging.INFO, /, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("podshim.test", level, __file__, 1, msg, None, None)
    rec.__dict__.update(extra)
    return rec


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, restored (handlers, level, logs' own state) afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logs.reset()


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        yield r, w
    finally:
        for fd in (r, w):
            try:
                os.close(fd)
            except OSError:
                pass


def drain(fd: int) -> list[str]:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data.decode().splitlines()


# -- formats -------------------------------------------------------------------------------


def test_text_is_logrus_fixed_keys_then_sorted_fields() -> None:
    fmt = logs.LogrusFormatter({"runtime": "io.containerd.podshim.v1"})
    line = fmt.format(record("created", tid="c1", **{"pod-id": "p1"}, eid="e1"))
    assert re.fullmatch(
        rf'time="{TIME}" level=info msg=created eid=e1 pod-id=p1 '
        r"runtime=io.containerd.podshim.v1 tid=c1",
        line,
    ), line


def test_text_quotes_like_go() -> None:
    fmt = logs.LogrusFormatter()
    line = fmt.format(record('a "b"\nc\té\x01', logging.WARNING, path="/x/y", odd="a b:c"))
    assert ' level=warning msg="a \\"b\\"\\nc\\té\\x01" ' in line, line
    assert 'odd="a b:c"' in line and "path=/x/y" in line
    # a field named like a fixed key does not replace it
    line = logs.LogrusFormatter({"msg": "shadow"}).format(record("real"))
    assert " msg=real " in line and line.endswith("fields.msg=shadow")


def test_json_is_compact_sorted_and_keeps_fixed_keys() -> None:
    fmt = logs.LogrusFormatter({"runtime": "rt", "level": "x"}, as_json=True)
    line = fmt.format(record("kill signal 9", logging.DEBUG, tid="c1", **{"pod-id": "p1"}))
    data = json.loads(line)
    assert data == {
        "time": data["time"],
        "level": "debug",
        "msg": "kill signal 9",
        "tid": "c1",
        "pod-id": "p1",
        "runtime": "rt",
        "fields.level": "x",
    }
    assert re.fullmatch(TIME, data["time"])
    assert line == json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def test_levels_and_exceptions() -> None:
    fmt = logs.LogrusFormatter()
    for level, name in ((logging.ERROR, "error"), (logging.CRITICAL, "fatal")):
        assert f" level={name} " in fmt.format(record("x", level))
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, "f", 1, "failed", None, sys.exc_info())
    line = fmt.format(rec)
    assert "\n" not in line and "Traceback (most recent call last):\\n" in line
    assert "ValueError: boom" in line


def test_task_logger_merges_fields_and_drops_empty_ones(
    root_logger: logging.Logger, pipe: tuple[int, int]
) -> None:
    r, w = pipe
    logs.setup(w, "info", {"runtime": "rt"})
    tl = logs.TaskLogger(logging.getLogger("podshim.test"), pod_id="p1", tid="c1")
    tl.info("exited status %d", 137, extra={"eid": "e1"})
    tl.info("init exited", extra={"eid": ""})
    standalone = logs.TaskLogger(logging.getLogger("podshim.test"), tid="solo")
    standalone.warning("no pod")
    one, two, three = drain(r)
    assert one.endswith('msg="exited status 137" eid=e1 pod-id=p1 runtime=rt tid=c1'), one
    assert two.endswith('msg="init exited" pod-id=p1 runtime=rt tid=c1'), two
    assert "pod-id" not in three and three.endswith("runtime=rt tid=solo"), three
    assert logs.task_fields("", "t", "") == {"tid": "t"}


# -- level and format: -debug vs the config ---------------------------------------------------


@pytest.mark.parametrize(
    ("debug", "config_level", "expected"),
    [
        (False, "warn", logging.WARNING),
        (False, "error", logging.ERROR),
        (False, "debug", logging.DEBUG),
        (True, "warn", logging.DEBUG),
        (True, "error", logging.DEBUG),
    ],
)
def test_level_from_config_unless_debug(
    root_logger: logging.Logger,
    pipe: tuple[int, int],
    debug: bool,
    config_level: str,
    expected: int,
) -> None:
    r, w = pipe
    logs.setup(w, "info", {}, debug=debug)
    assert root_logger.level == (logging.DEBUG if debug else logging.INFO)
    logs.apply_config(config_level, "text")
    assert root_logger.level == expected
    logging.getLogger("podshim.test").debug("debug line")
    logging.getLogger("podshim.test").warning("warning line")
    lines = drain(r)
    assert any("warning line" in x for x in lines) == (expected <= logging.WARNING)
    assert any("debug line" in x for x in lines) == (expected <= logging.DEBUG)


def test_apply_config_switches_format_and_keeps_fields(
    root_logger: logging.Logger, pipe: tuple[int, int]
) -> None:
    r, w = pipe
    logs.setup(w, "info", {"runtime": "rt"})
    logging.getLogger("podshim.test").info("before")
    logs.apply_config("info", "json")
    logging.getLogger("podshim.test").info("after", extra={"tid": "t1"})
    before, after = drain(r)
    assert before.startswith('time="')
    data = json.loads(after)
    assert (data["msg"], data["runtime"], data["tid"]) == ("after", "rt", "t1")


def test_apply_config_without_setup_is_a_no_op(root_logger: logging.Logger) -> None:
    handlers, level = list(root_logger.handlers), root_logger.level
    logs.apply_config("error", "json")
    assert root_logger.handlers == handlers and root_logger.level == level


def test_first_create_applies_the_config(
    root_logger: logging.Logger, pipe: tuple[int, int], tmp_path: Path
) -> None:
    """The daemon logs before any Create; the config's level and format apply from the
    first Create on (even one that then fails), with the task's fields."""
    r, w = pipe
    logs.setup(w, "info", {"runtime": "rt"})
    config = tmp_path / "podshim.toml"
    config.write_text('log_level = "warn"\nlog_format = "json"\n')
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")  # no process: InvalidArgument
    options = any_pb2.Any(
        type_url="runtimeoptions.v1.Options",
        value=ro_pb2.Options(config_path=str(config)).SerializeToString(),
    )

    async def main() -> None:
        service = TaskService(ShimContext("k8s.io", Reaper(), RecordingPublisher()), lambda: None)
        req = pb.CreateTaskRequest(id="t1", bundle=str(bundle), options=options)
        with pytest.raises(errdefs.InvalidArgument):
            await service.Create(req, None)  # type: ignore[arg-type]
        assert service.config is not None and service.config.log_format == "json"

    logging.getLogger("podshim.test").info("text before")
    asyncio.run(main())
    assert root_logger.level == logging.WARNING
    logging.getLogger("podshim.test").warning("json after", extra=logs.task_fields("p", "t1"))
    lines = drain(r)
    assert lines[0].startswith('time="') and "text before" in lines[0]
    data = json.loads(lines[-1])
    assert (data["msg"], data["level"], data["pod-id"], data["tid"]) == (
        "json after",
        "warning",
        "p",
        "t1",
    )
    # the failed Create's own info line was below the configured level
    assert not any("create task t1 failed" in x for x in lines)


# -- a failing write never hurts ----------------------------------------------------------------


def test_write_to_a_pipe_without_reader_is_dropped(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.close(r)  # containerd gone: EPIPE (Python ignores SIGPIPE)
    handler = logs.FdHandler(w)
    handler.setFormatter(logs.LogrusFormatter())
    handler.handle(record("nobody listens"))
    handler.handle(record("still nobody"))
    assert handler.dropped == 2


def test_write_to_a_closed_fd_is_dropped(root_logger: logging.Logger) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    logs.setup(w, "info", {})  # the FIFO's fd is gone altogether: EBADF
    logging.getLogger("podshim.test").error("lost")
    logging.getLogger("podshim.test").info("lost too %s", "with args")
    handler = root_logger.handlers[0]
    assert isinstance(handler, logs.FdHandler) and handler.dropped == 2


def test_a_bad_format_call_is_dropped_not_raised(pipe: tuple[int, int]) -> None:
    _, w = pipe
    handler = logs.FdHandler(w)
    handler.setFormatter(logs.LogrusFormatter())
    handler.handle(record("%d items"))  # no args: formatting is fine, message literal
    bad = logging.LogRecord("x", logging.INFO, "f", 1, "%d items", ("x",), None)
    handler.handle(bad)  # TypeError while formatting: dropped
    assert handler.dropped == 1


def test_a_long_line_is_written_whole(pipe: tuple[int, int]) -> None:
    r, w = pipe
    handler = logs.FdHandler(w)
    handler.setFormatter(logs.LogrusFormatter())
    text = "x" * 20000  # several PIPE_BUFs, still below the pipe's capacity
    handler.handle(record(text))
    (line,) = drain(r)
    assert text in line and handler.dropped == 0


@settings(max_examples=500)
@given(st.text())
def test_fast_paths_answer_as_the_character_by_character_rules(value: str) -> None:
    assert logs.go_quote(value) == logs._go_quote_each(value)
    bare = all(c in logs._BARE for c in value)
    assert logs._value(value) == (value if bare else logs._go_quote_each(value))
