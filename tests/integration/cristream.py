"""A WebSocket client of containerd's CRI streaming server, for ``test_cri_streaming.py``.

CRI's Exec, Attach and PortForward answer with a one-time URL of the streaming server
containerd runs (the lab binds it to 127.0.0.1, plain HTTP). containerd 1.6's server
(``pkg/cri/streaming``, kubelet's code) accepts a WebSocket upgrade besides SPDY; with the
``v4.channel.k8s.io`` subprotocol every binary message starts with one channel byte:

* exec / attach: 0 stdin (client to server), 1 stdout, 2 stderr, 3 error (the server
  writes one JSON ``metav1.Status`` when the process ends: ``Success``, or ``Failure``
  with reason ``NonZeroExitCode`` and the exit code as a cause), 4 resize (client to
  server, JSON ``{"Width": w, "Height": h}``);
* port-forward (the ports come from the PortForwardRequest): per port a data channel
  ``2i`` (both ways) and an error channel ``2i+1``; the first two bytes the server writes
  on each are the port, little-endian.

The v4 protocol cannot half-close stdin: a client ends its input by closing the
connection.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from types import TracebackType
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

PROTOCOL = "v4.channel.k8s.io"
STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)


def ws_url(url: str) -> str:
    """The WebSocket URL of a streaming-server URL (``http://`` becomes ``ws://``)."""
    if url.startswith("http://"):
        return "ws://" + url.removeprefix("http://")
    raise ValueError(f"not a plain-HTTP streaming URL: {url!r}")


class Channels:
    """One streaming session: what arrived per channel, and a way to send.

    ``ports=True`` (port-forward) strips the 2-byte port prefix the server writes first
    on every channel.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, ports: bool = False) -> None:
        self.url = url
        self.data: dict[int, bytearray] = defaultdict(bytearray)
        self.closed = False
        self._ports = ports
        self._prefix_left: dict[int, int] = defaultdict(lambda: 2 if ports else 0)
        self._conn: ClientConnection = connect(
            ws_url(url),
            subprotocols=[Subprotocol(PROTOCOL)],
            open_timeout=timeout,
            close_timeout=timeout,
            compression=None,
            max_size=None,
            legacy=True,  # the connection itself: closed by close()
        )
        if self._conn.subprotocol != PROTOCOL:
            raise AssertionError(f"{url}: server chose subprotocol {self._conn.subprotocol!r}")

    def __enter__(self) -> Channels:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (ends stdin for the server)."""
        self._conn.close()

    def send(self, channel: int, payload: bytes) -> None:
        self._conn.send(bytes([channel]) + payload)

    def resize(self, width: int, height: int) -> None:
        self.send(RESIZE, json.dumps({"Width": width, "Height": height}).encode())

    def text(self, channel: int) -> str:
        return self.data[channel].decode(errors="replace")

    def _pump(self, timeout: float) -> bool:
        """Receive one message (False once the server closed the connection)."""
        if self.closed:
            return False
        try:
            message = self._conn.recv(timeout=timeout)
        except TimeoutError:
            return True
        except ConnectionClosed:
            self.closed = True
            return False
        raw = message.encode() if isinstance(message, str) else message
        if not raw:
            return True
        channel, payload = raw[0], raw[1:]
        skip = min(self._prefix_left[channel], len(payload))
        self._prefix_left[channel] -= skip
        self.data[channel] += payload[skip:]
        return True

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Receive until ``condition()`` holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0 or (not self._pump(min(left, 0.5)) and not condition()):
                raise AssertionError(
                    f"{what} ({'closed' if self.closed else 'timed out'}): "
                    f"received {dict(self.data)!r}"
                )

    def until_closed(self, timeout: float) -> None:
        """Receive until the server closes the connection."""
        self.wait(lambda: self.closed, timeout, "the server to close the stream")

    def status(self) -> dict[str, Any]:
        """The v4 exit status (channel 3) as JSON; {} if none arrived."""
        raw = bytes(self.data[ERROR])
        return dict(json.loads(raw)) if raw else {}

    def exit_code(self) -> int:
        """The process's exit code from the v4 status (0 for ``Success``)."""
        status = self.status()
        if status.get("status") == "Success":
            return 0
        if status.get("reason") == "NonZeroExitCode":
            for cause in status.get("details", {}).get("causes", []):
                if cause.get("reason") == "ExitCode":
                    return int(cause["message"])
        raise AssertionError(f"{self.url}: no exit status in {status!r}")
