"""
Small pieces every part uses.

Retry backoff (:mod:`.retry`), private files (:mod:`.files`) and the event-loop
choice (:mod:`.loop`). Nothing here imports another part of the package.
"""

from __future__ import annotations


__all__: list[str] = []
