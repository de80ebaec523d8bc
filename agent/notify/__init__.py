"""
Notification-source registry (docs/architecture.md §5.1): names -> import strings, resolved lazily.

The daemon receives an instance and never imports an SDK itself (docs/architecture.md §5.1);
only the chosen implementation's module is imported, once, at load.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Literal


if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from agent.notify.base import NotificationSource


__all__ = ["NOTIFICATION_SOURCES", "NotifyKind", "load_source_class", "resolve_kind"]

NotifyKind = Literal["auto", "mqtt", "greengrass"]

NOTIFICATION_SOURCES: Mapping[str, str] = {
    "mqtt": "agent.notify.mqtt:MqttNotificationSource",
    "greengrass": "agent.notify.greengrass:GreengrassNotificationSource",
}

# Set by the Greengrass nucleus for its components' IPC (docs/architecture.md §5.1).
_GREENGRASS_ENV = ("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", "SVCUID")


def resolve_kind(kind: NotifyKind, environ: Mapping[str, str] | None = None) -> str:
    """
    Turn ``"auto"`` into a concrete source name by looking at the environment.

    Args:
        kind: The configured choice.
        environ: Environment to inspect; defaults to :data:`os.environ`.

    Returns:
        ``"greengrass"`` or ``"mqtt"``.
    """
    if kind != "auto":
        return kind
    env = os.environ if environ is None else environ
    return "greengrass" if all(env.get(name) for name in _GREENGRASS_ENV) else "mqtt"


def load_source_class(
    kind: NotifyKind, environ: Mapping[str, str] | None = None
) -> Callable[..., NotificationSource]:
    """
    Import and return the class implementing the chosen notification source.

    Args:
        kind: ``"auto"``, ``"mqtt"`` or ``"greengrass"``.
        environ: Environment for ``"auto"``; defaults to :data:`os.environ`.

    Returns:
        The class named in :data:`NOTIFICATION_SOURCES`.

    Raises:
        ImportError: The implementation's module or attribute does not exist.
    """
    module_name, _, attr = NOTIFICATION_SOURCES[resolve_kind(kind, environ)].partition(":")
    cls: Callable[..., NotificationSource] = getattr(importlib.import_module(module_name), attr)
    return cls
