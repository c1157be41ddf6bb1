"""The one error of the admin commands: a message for the operator, nothing changed."""

from __future__ import annotations


class AdminError(Exception):
    """``podshim install/uninstall/check`` cannot go on; the message says why and what to
    do. Raised before anything is changed (or after what was changed is undone)."""
