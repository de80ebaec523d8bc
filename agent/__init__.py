"""On-device agent for AWS IoT Secure Tunneling."""

from __future__ import annotations


__all__ = ["__version__"]

__version__ = "0.1.0"
