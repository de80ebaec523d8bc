"""
The Secure Tunneling service on one machine: control plane, relay, broker (tests, demo, dev).
"""

from __future__ import annotations


__all__: list[str] = []
