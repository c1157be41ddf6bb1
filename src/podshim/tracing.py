"""OpenTelemetry spans for the shim's RPCs and background waits, when asked for.

A shim inherits containerd's environment, so the standard ``OTEL_*`` variables decide:
spans are exported (OTLP over HTTP, protobuf, through a ``BatchSpanProcessor``) only when
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and
neither ``OTEL_TRACES_EXPORTER=none`` nor ``OTEL_SDK_DISABLED=true`` says otherwise (see
:func:`wanted`). OpenTelemetry itself is the optional extra ``podshim[otel]``.

Off (the default), no ``opentelemetry`` module is ever imported, and :func:`span` returns
one shared context manager that does nothing; this module imports only the standard
library, and only the serving daemon imports it (never the ``start`` action).

The API is small::

    tracing.init_from_env("containerd-shim-podshim-v1")   # once, in the daemon
    with tracing.span("container::waitExit", root=True, tid=cid, eid=""):
        ...                                                # or ``async with``
    tracing.set_attribute("key", "value")                 # on the current span
    tracing.set_default_attribute("pod-id", pod_id)       # on every span from now on
    tracing.shutdown(5.0)                                  # flush, then off again

Span names follow the seed (hcsshim): Task RPC spans are named after the method
(``Create``, ``Wait``; other services' ``service/method``) and carry ``tid``/``eid`` from the request's ``id``/``exec_id`` fields;
background waits are named ``podSandboxTask::waitInitExit``, ``container::waitExit``...
An exception leaving a span is recorded on it and sets its status to ERROR
(cancellation does not: a cancelled wait is a normal end).

Only the endpoint and the service name are taken from ``env``; the SDK reads the other
settings (headers, timeout, compression, certificates, sampler, batch sizes, resource
attributes) from the process environment, which is ``env`` in the shim.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Protocol

__all__ = [
    "Span",
    "describe",
    "enabled",
    "init_from_env",
    "init_with_processor",
    "rpc_span",
    "set_attribute",
    "set_default_attribute",
    "shutdown",
    "span",
    "wanted",
]

log = logging.getLogger("podshim.tracing")

AttrValue = str | bool | int | float

#: the service whose calls' spans bear the bare method name
TASK_SERVICE = "containerd.task.v2.Task"

#: the live state, all None while tracing is off
_provider: Any = None
_tracer: Any = None
_endpoint = ""
#: attributes every span gets (``pod-id`` once the shim knows its pod)
_defaults: dict[str, AttrValue] = {}
#: (service, method) -> (request class, has ``id``, has ``exec_id``), or None
_request_fields: dict[tuple[str, str], tuple[Any, bool, bool] | None] = {}


# -- the context manager ---------------------------------------------------------------
class Span:
    """What :func:`span` returns: a context manager for ``with`` and ``async with``.

    This base class is the no-op used while tracing is off."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


_NOOP = Span()


class _LiveSpan(Span):
    """A real span, current (in this task's context) between enter and exit."""

    __slots__ = ("_attrs", "_name", "_parent", "_root", "_span", "_token")

    def __init__(
        self, name: str, attrs: dict[str, AttrValue], *, root: bool = False, parent: Any = None
    ) -> None:
        self._name = name
        self._attrs = attrs
        self._root = root
        self._parent = parent  # an OTel Context (remote parent), or None: the current one
        self._span: Any = None
        self._token: Any = None

    def __enter__(self) -> None:
        from opentelemetry import context, trace

        tracer = _tracer
        if tracer is None:  # shut down meanwhile
            return
        attrs = {**_defaults, **self._attrs}
        links = []
        ctx = self._parent
        if self._root:
            # A background wait outlives the RPC that started it: its own trace, linked.
            current = trace.get_current_span().get_span_context()
            if current.is_valid:
                links.append(trace.Link(current))
            ctx = context.Context()
        self._span = tracer.start_span(
            self._name,
            context=ctx,
            attributes=attrs,
            links=links,
            record_exception=False,
            set_status_on_exception=False,
        )
        self._token = context.attach(trace.set_span_in_context(self._span))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sp = self._span
        if sp is None:
            return
        from opentelemetry import context, trace

        try:
            if isinstance(exc, Exception):
                sp.record_exception(exc)
                sp.set_attribute("error.type", f"{type(exc).__module__}.{type(exc).__qualname__}")
                sp.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        finally:
            context.detach(self._token)
            sp.end()
            self._span = self._token = None


# -- the API -----------------------------------------------------------------------------
def enabled() -> bool:
    """Whether spans are being recorded."""
    return _tracer is not None


def span(name: str, /, *, root: bool = False, **attrs: AttrValue) -> Span:
    """A span named ``name`` with ``attrs`` (``tid=..., eid=...``), current while entered.

    ``root=True`` starts a trace of its own (linked to the current span), for background
    waits that outlive the call which started them. Off, this returns a shared no-op.
    Attribute names that are not identifiers go through a dict: ``**{"pod-id": pid}``.
    """
    if _tracer is None:
        return _NOOP
    return _LiveSpan(name, attrs, root=root)


def rpc_span(
    service: str, method: str, payload: bytes, metadata: Iterable[tuple[str, str]] = ()
) -> Span:
    """The span of one ttrpc call, with ``tid``/``eid`` read from the request's
    ``id``/``exec_id`` fields when its type has them (``eid`` may be empty: the init), and
    a W3C ``traceparent`` in the metadata as its parent.

    Task service calls are named after the method (``Create``), as in the seed; calls to
    any other service (diagnostics...) are named ``service/method``, so that a ``Stats``
    is never ambiguous."""
    if _tracer is None:
        return _NOOP
    attrs: dict[str, AttrValue] = {
        "rpc.system": "ttrpc",
        "rpc.service": service,
        "rpc.method": method,
    }
    attrs.update(_request_ids(service, method, payload))
    name = method if service == TASK_SERVICE else f"{service}/{method}"
    return _LiveSpan(name, attrs, parent=_remote_parent(metadata))


class _Request(Protocol):
    @property
    def service(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def metadata(self) -> Iterable[tuple[str, str]]: ...


async def rpc_interceptor(req: _Request, proceed: Callable[[], Awaitable[bytes]]) -> bytes:
    """A ttrpc server interceptor giving every call its :func:`rpc_span`; the daemon
    plugs it in when tracing is on (the ttrpc layer itself knows nothing of tracing)."""
    with rpc_span(req.service, req.method, req.payload, req.metadata):
        return await proceed()


def set_attribute(key: str, value: AttrValue) -> None:
    """Set ``key`` on the current span (no-op when off or outside any span)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attribute(key, value)


def set_default_attribute(key: str, value: AttrValue) -> None:
    """Give every span started from now on ``key`` (e.g. ``pod-id``), and the current one
    (no-op when off: it is forgotten, not kept for a later :func:`init_from_env`)."""
    if _tracer is None:
        return
    _defaults[key] = value
    set_attribute(key, value)


def describe() -> str:
    """One phrase for the startup log line: is tracing on, and where do spans go."""
    if _tracer is not None:
        return f"on (OTLP/HTTP to {_endpoint})" if _endpoint else "on"
    if any(m == "opentelemetry" or m.startswith("opentelemetry.") for m in sys.modules):
        return "off"
    return "off (opentelemetry not imported)"


def wanted(env: Mapping[str, str] = os.environ) -> str | None:
    """The OTLP/HTTP traces endpoint ``env`` asks spans to be sent to, or None.

    Asked for: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as is) or
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (``/v1/traces`` appended) is set. Not when
    ``OTEL_SDK_DISABLED=true``, ``OTEL_TRACES_EXPORTER`` is ``none`` or names no ``otlp``,
    or the OTLP protocol asked for is not ``http/protobuf`` (the only one podshim ships).
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if not endpoint:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        if not base:
            return None
        endpoint = base.rstrip("/") + "/v1/traces"
    exporters = {
        e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()
    }
    if "none" in exporters:
        return None
    if exporters and "otlp" not in exporters:
        log.warning("tracing: OTEL_TRACES_EXPORTER=%s: only otlp is supported", ",".join(exporters))
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
    )
    if protocol and protocol != "http/protobuf":
        log.warning("tracing: OTLP protocol %s: only http/protobuf is supported", protocol)
        return None
    return endpoint


def init_from_env(service_name: str, env: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on if ``env`` asks for it (see :func:`wanted`); True when on.

    The service name is ``OTEL_SERVICE_NAME`` from ``env``, else ``service_name``. When
    the ``otel`` extra is not installed this logs a warning and stays off.
    """
    global _endpoint
    if _tracer is not None:
        return True
    endpoint = wanted(env)
    if endpoint is None:
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning("tracing: OTEL_* asks for traces but podshim[otel] is not installed: %s", exc)
        return False
    name = env.get("OTEL_SERVICE_NAME", "").strip() or service_name
    try:
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
    except Exception as exc:  # a bad setting must not stop the shim
        log.warning("tracing: cannot export to %s: %s", endpoint, exc)
        return False
    init_with_processor(processor, name)
    _endpoint = endpoint
    log.info("tracing: on, service %s, OTLP/HTTP to %s", name, endpoint)
    return True


def init_with_processor(processor: Any, service_name: str = "podshim") -> None:
    """Turn tracing on with an SDK ``SpanProcessor`` of the caller's (tests: an
    in-memory exporter behind a ``SimpleSpanProcessor``). Replaces any previous set-up."""
    global _provider, _tracer
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    if _provider is not None:
        shutdown(1.0)
    # The SDK and its HTTP stack log every request at debug level, and the shim's log
    # level is containerd's: keep only their warnings.
    for noisy in ("opentelemetry", "urllib3", "requests"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    resource = Resource.create({"service.name": service_name, "process.pid": os.getpid()})
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    _defaults.clear()
    provider.add_span_processor(processor)
    _provider = provider
    _tracer = provider.get_tracer("podshim")


def shutdown(timeout: float = 5.0) -> None:
    """Flush what is buffered (waiting at most ``timeout`` s) and turn tracing off."""
    global _provider, _tracer, _endpoint
    provider = _provider
    _provider = _tracer = None
    _endpoint = ""
    _defaults.clear()
    if provider is None:
        return
    # The SDK's own timeouts are not all bounded: flush in a thread we stop waiting for.
    done = threading.Thread(target=_flush_and_close, args=(provider,), daemon=True)
    done.start()
    done.join(max(timeout, 0.0))
    if done.is_alive():
        log.warning("tracing: spans not flushed within %.1fs: dropped", timeout)


def _flush_and_close(provider: Any) -> None:
    try:
        provider.shutdown()  # flushes the batch processor, then stops it
    except Exception as exc:
        log.warning("tracing: shutdown: %s", exc)


# -- helpers ----------------------------------------------------------------------------
def _request_ids(service: str, method: str, payload: bytes) -> dict[str, AttrValue]:
    key = (service, method)
    try:
        fields = _request_fields[key]
    except KeyError:
        fields = _request_fields[key] = _lookup_request(service, method)
    if fields is None:
        return {}
    cls, has_id, has_exec_id = fields
    msg = cls()
    try:
        msg.ParseFromString(payload)
    except Exception:
        return {}  # the handler answers it
    out: dict[str, AttrValue] = {}
    if has_id:
        out["tid"] = msg.id
    if has_exec_id:
        out["eid"] = msg.exec_id
    return out


def _lookup_request(service: str, method: str) -> tuple[Any, bool, bool] | None:
    from google.protobuf import descriptor, descriptor_pool, message_factory

    try:
        svc = descriptor_pool.Default().FindServiceByName(service)  # type: ignore[no-untyped-call]
        m = svc.FindMethodByName(method)
    except KeyError:
        return None
    if m is None:
        return None
    fields = m.input_type.fields_by_name

    def is_string(name: str) -> bool:
        f = fields.get(name)
        return f is not None and f.type == descriptor.FieldDescriptor.TYPE_STRING

    has_id, has_exec_id = is_string("id"), is_string("exec_id")
    if not (has_id or has_exec_id):
        return None
    return message_factory.GetMessageClass(m.input_type), has_id, has_exec_id


def _remote_parent(metadata: Iterable[tuple[str, str]]) -> Any:
    carrier: dict[str, str] = {}
    for k, v in metadata:
        k = k.lower()
        if k in ("traceparent", "tracestate") and k not in carrier:
            carrier[k] = v
    if "traceparent" not in carrier:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier)
