"""Pods: the sandbox task with its fake init, the pod host, and the pod's workloads."""
