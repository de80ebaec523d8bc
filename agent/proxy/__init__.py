"""
The bundled local proxy (``tunnel-localproxy``): source and destination, protocol V1 to V3.
"""

from __future__ import annotations


__all__: list[str] = []
