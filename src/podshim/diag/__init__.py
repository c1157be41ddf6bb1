"""podshim diagnostics: the ``podshim.diag.v1.Diag`` service every shim serves next to
its Task service, the registry of live shims, and the ``podshim diag`` command line
(hcsshim's shimdiag, for Linux pods).

* :mod:`podshim.diag.service`: the Diag RPCs (exec in the pod host, stacks, tasks,
  share, pid, stats);
* :mod:`podshim.diag.registry`: ``/run/podshim/shims/<sha256(socket)>.json``, one entry
  per serving shim, and how the command line finds a shim by pod id prefix;
* :mod:`podshim.host.control`: per-call options and signal/resize of an exec in a pod
  host (what ``Host.exec_in_host``'s signature does not carry);
* :mod:`podshim.diag.shim`: the glue the shim daemon calls;
* :mod:`podshim.diag.cli` and :mod:`podshim.diag.execcli`: ``podshim diag ...``.

This package's ``__init__`` imports nothing: the pod host imports
:mod:`podshim.host.control` on the shim's hot path.
"""
