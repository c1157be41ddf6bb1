"""The ``uvm`` pod host kind: one QEMU utility VM per pod (see ARCHITECTURE.md)."""
