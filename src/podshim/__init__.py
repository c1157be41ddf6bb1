"""podshim: a containerd runtime v2 shim for Kubernetes pods, written in Python.

Importing this package is free: it pulls in no submodule, so the shim's `start`
path (which runs for every pod and container) pays only for what it uses.
"""

__version__ = "0.1.0"
#: podshim's runtime type for containerd (the shim binary's name derives from it)
RUNTIME_TYPE = "io.containerd.podshim.v1"
