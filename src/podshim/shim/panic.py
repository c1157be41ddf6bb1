"""A crashed shim daemon's report: written by the daemon, relayed by ``delete``.

If the shim daemon crashes it leaves ``panic.log`` (its traceback) in the pod sandbox's
bundle, or the first task's for a shim without a pod. The ``delete`` action of that task
relays the first :data:`PANIC_RELAY_LIMIT` bytes to stderr, so containerd logs them as a
"cleanup warnings" line (as runhcs does with its panic.log). Standard library only.
"""

from __future__ import annotations

import os
import sys
import time

from podshim.oci import bundle as files

#: how much of it the delete action relays to containerd
PANIC_RELAY_LIMIT = 1 << 20


def write_panic(bundle: str, exc: BaseException) -> str | None:
    """Append a crash report (time, pid, traceback of ``exc``) to ``<bundle>/panic.log``;
    returns its path, or None when it could not be written (never raises). The ``delete``
    action of the task owning ``bundle`` relays it to containerd."""
    import traceback  # here, not at the top: `delete` imports this module

    from podshim.logs import go_time

    path = os.path.join(bundle, files.PANIC)
    try:
        when = go_time(time.time())
        text = f"podshim shim daemon (pid {os.getpid()}) crashed at {when}:\n"
        text += "".join(traceback.format_exception(exc))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(text.encode(errors="replace"))
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    except Exception:
        return None
    return path



def relay_panic(bundle: str, task_id: str) -> int:
    """Copy the first :data:`PANIC_RELAY_LIMIT` bytes of ``<bundle>/panic.log`` to
    stderr, after a header naming the task; returns how many bytes of it were relayed
    (0 when there is none). The file is left in place."""
    path = os.path.join(bundle, files.PANIC)
    try:
        with open(path, "rb") as f:
            data = f.read(PANIC_RELAY_LIMIT + 1)
    except OSError:
        return 0
    if not data:
        return 0
    cut = len(data) > PANIC_RELAY_LIMIT
    data = data[:PANIC_RELAY_LIMIT]
    head = f"podshim delete {task_id}: the shim serving this task crashed; {path}"
    head += f" (first {PANIC_RELAY_LIMIT} bytes)" if cut else ""
    sys.stderr.flush()
    sys.stderr.buffer.write(
        head.encode() + b":\n" + data + (b"" if data.endswith(b"\n") else b"\n")
    )
    sys.stderr.flush()
    return len(data)
