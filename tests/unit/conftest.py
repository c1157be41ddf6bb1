"""Fixtures shared by several unit-test modules (defined beside their helpers)."""

from tests.unit.uvm_agent_util import agent, agent_binary

__all__ = ["agent", "agent_binary"]
