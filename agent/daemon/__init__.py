"""
The agent daemon (`tunnel-agent run`): from a tunnel notification to a supervised proxy process.

One concept per module: :mod:`.lifecycle` (start, run, stop, signals), :mod:`.settings`,
:mod:`.notification` (payload -> request, pure), :mod:`.tunnels` (the tunnel manager),
:mod:`.supervisor` (one proxy process), :mod:`.status` (the status file) and
:mod:`.sdnotify` (systemd). See docs/architecture.md.
"""

from __future__ import annotations


__all__: list[str] = []
