"""Operator actions on a node: ``podshim check``, ``podshim install`` / ``uninstall``.

This layer sits between the command line and the shim: it may read the shim's paths and
podshim's config, and nothing below imports it.
"""
