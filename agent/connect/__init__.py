"""
The operator's side: `tunnel-agent connect` opens a tunnel and runs a source proxy.

Needs boto3 (the ``[operator]`` extra); the device's daemon never imports it.
"""

from __future__ import annotations


__all__: list[str] = []
