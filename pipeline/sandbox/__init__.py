"""Untrusted-code execution: the harness (runs inside the sandbox) and the executor (host side)."""
