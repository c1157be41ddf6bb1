"""The shim daemon: task service, process supervision and event publishing."""
