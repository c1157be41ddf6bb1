"""Control of one exec in a pod host: its options and, once it runs, signal and resize.

``Host.exec_in_host(args, stdin, stdout, stderr, terminal, control)`` takes one
explicitly. The Diag service has more to say than the arguments (an exec id,
environment, working directory, the initial terminal size) and must reach the running
process later (SignalExecInHost, ResizeExecInHost): it makes an :class:`ExecControl`,
passes it to the host, and signals or resizes through it. The host attaches the process
once it started (:meth:`ExecControl.attach`) and detaches it when it ended; signals and
resizes that arrive before are kept and delivered then.

Standard library only: imported by the pod host on the shim's hot path.
"""

from __future__ import annotations

from collections.abc import Callable

from podshim import errors as errdefs


class ExecControl:
    """Options of one exec in a pod host and, while it runs, its signal/resize hooks.

    Args:
        exec_id: the caller's handle ("" when it will never signal or resize).
        workdir: working directory of the process ("" for ``/``).
        env: ``KEY=VALUE`` entries added to (or replacing) the host's default environment.
        width, height: the initial terminal size (0 leaves the kernel's default).
    """

    def __init__(
        self,
        exec_id: str = "",
        *,
        workdir: str = "",
        env: tuple[str, ...] = (),
        width: int = 0,
        height: int = 0,
    ) -> None:
        self.exec_id = exec_id
        self.workdir = workdir or "/"
        self.env = env
        self.width, self.height = width, height
        #: host pid of the running process (0 before it started and after it exited)
        self.pid = 0
        self._signal: Callable[[int], None] | None = None
        self._resize: Callable[[int, int], None] | None = None
        self._done = False
        #: what arrived before the process started, delivered by :meth:`attach`
        self._early_signals: list[int] = []
        self._early_size: tuple[int, int] | None = None

    @property
    def what(self) -> str:
        return f"exec {self.exec_id} in the pod host" if self.exec_id else "exec in the pod host"

    def attach(
        self, pid: int, signal: Callable[[int], None], resize: Callable[[int, int], None]
    ) -> None:
        """The host started the process: from now on signal and resize reach it, and
        what arrived while it was starting is delivered now."""
        self.pid, self._signal, self._resize = pid, signal, resize
        early, self._early_signals = self._early_signals, []
        for sig in early:
            signal(sig)
        if self._early_size is not None:
            resize(*self._early_size)
            self._early_size = None

    def detach(self) -> None:
        """The process exited (or never started): signal and resize are refused."""
        self.pid, self._signal, self._resize, self._done = 0, None, None, True

    def signal(self, signal: int) -> None:
        """Signal the process; before it started, as soon as it does (its output can
        reach the client before the host has attached). FailedPrecondition once it
        has exited."""
        if self._signal is not None:
            self._signal(signal)
        elif self._done:
            raise errdefs.FailedPrecondition(f"{self.what} is not running")
        else:
            self._early_signals.append(signal)

    def resize(self, width: int, height: int) -> None:
        """Resize its terminal (the last size asked before it started is applied when
        it does). FailedPrecondition once it has exited; the host's own error when it
        has no terminal."""
        if self._resize is not None:
            self._resize(width, height)
        elif self._done:
            raise errdefs.FailedPrecondition(f"{self.what} is not running")
        else:
            self._early_size = (width, height)
