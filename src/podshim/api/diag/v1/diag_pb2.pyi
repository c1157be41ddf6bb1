from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExecInHostRequest(_message.Message):
    __slots__ = ("args", "workdir", "terminal", "stdin", "stdout", "stderr", "env", "exec_id", "width", "height")
    ARGS_FIELD_NUMBER: _ClassVar[int]
    WORKDIR_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    args: _containers.RepeatedScalarFieldContainer[str]
    workdir: str
    terminal: bool
    stdin: str
    stdout: str
    stderr: str
    env: _containers.RepeatedScalarFieldContainer[str]
    exec_id: str
    width: int
    height: int
    def __init__(self, args: _Optional[_Iterable[str]] = ..., workdir: _Optional[str] = ..., terminal: bool = ..., stdin: _Optional[str] = ..., stdout: _Optional[str] = ..., stderr: _Optional[str] = ..., env: _Optional[_Iterable[str]] = ..., exec_id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ExecInHostResponse(_message.Message):
    __slots__ = ("exit_code",)
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    def __init__(self, exit_code: _Optional[int] = ...) -> None: ...

class SignalExecInHostRequest(_message.Message):
    __slots__ = ("exec_id", "signal")
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    exec_id: str
    signal: int
    def __init__(self, exec_id: _Optional[str] = ..., signal: _Optional[int] = ...) -> None: ...

class ResizeExecInHostRequest(_message.Message):
    __slots__ = ("exec_id", "width", "height")
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    exec_id: str
    width: int
    height: int
    def __init__(self, exec_id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class StacksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StacksResponse(_message.Message):
    __slots__ = ("stacks", "host_stacks", "modules")
    STACKS_FIELD_NUMBER: _ClassVar[int]
    HOST_STACKS_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    stacks: str
    host_stacks: str
    modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stacks: _Optional[str] = ..., host_stacks: _Optional[str] = ..., modules: _Optional[_Iterable[str]] = ...) -> None: ...

class TasksRequest(_message.Message):
    __slots__ = ("execs",)
    EXECS_FIELD_NUMBER: _ClassVar[int]
    execs: bool
    def __init__(self, execs: bool = ...) -> None: ...

class TasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[DiagTask]
    def __init__(self, tasks: _Optional[_Iterable[_Union[DiagTask, _Mapping]]] = ...) -> None: ...

class DiagTask(_message.Message):
    __slots__ = ("id", "kind", "state", "pid", "execs", "bundle", "exit_status", "host")
    class HostEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXECS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    state: str
    pid: int
    execs: _containers.RepeatedCompositeFieldContainer[DiagExec]
    bundle: str
    exit_status: int
    host: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[str] = ..., pid: _Optional[int] = ..., execs: _Optional[_Iterable[_Union[DiagExec, _Mapping]]] = ..., bundle: _Optional[str] = ..., exit_status: _Optional[int] = ..., host: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DiagExec(_message.Message):
    __slots__ = ("id", "state", "pid", "exit_status")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    pid: int
    exit_status: int
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., pid: _Optional[int] = ..., exit_status: _Optional[int] = ...) -> None: ...

class ShareRequest(_message.Message):
    __slots__ = ("host_path", "pod_path", "read_only", "container")
    HOST_PATH_FIELD_NUMBER: _ClassVar[int]
    POD_PATH_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    host_path: str
    pod_path: str
    read_only: bool
    container: str
    def __init__(self, host_path: _Optional[str] = ..., pod_path: _Optional[str] = ..., read_only: bool = ..., container: _Optional[str] = ...) -> None: ...

class ShareResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PidRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PidResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("stats", "tasks")
    STATS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    stats: _any_pb2.Any
    tasks: _containers.RepeatedCompositeFieldContainer[TaskStats]
    def __init__(self, stats: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., tasks: _Optional[_Iterable[_Union[TaskStats, _Mapping]]] = ...) -> None: ...

class TaskStats(_message.Message):
    __slots__ = ("id", "stats")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    id: str
    stats: _any_pb2.Any
    def __init__(self, id: _Optional[str] = ..., stats: _Optional[_Union[_any_pb2.Any, _Mapping]] = ...) -> None: ...
