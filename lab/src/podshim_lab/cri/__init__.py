"""A small CRI (``runtime.v1``) client for the lab: tests, the demo and benchmarks.

Generated from our own ``api.proto`` subset (real field numbers) by ``gen.py``; needs
grpcio (a development dependency)."""
