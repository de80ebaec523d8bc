"""
The device's awscrt MQTT5 client: construction with mutual TLS.

awscrt runs its own event-loop threads and calls back on them; the callers forward
every callback to their loop with :func:`agent.common.loop.call_in_loop`.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING

from awscrt import http as crt_http, mqtt5
from awsiot import mqtt5_client_builder

from agent.exceptions import ConfigError


if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


__all__ = ["build_client", "proxy_options"]


def proxy_options(url: str) -> crt_http.HttpProxyOptions:
    """
    Turn ``http://[user:password@]host:port`` into awscrt proxy options (CONNECT tunnel).

    Args:
        url: The proxy URL. Only plain ``http`` proxies are supported: TLS to the
            broker runs inside the CONNECT tunnel either way.

    Returns:
        Options for :class:`awscrt.mqtt5.ClientOptions`.

    Raises:
        ConfigError: Unsupported scheme, missing host, or a bad port. The message
            never repeats the URL, which may carry a password.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError("mqtt.http_proxy: invalid URL (bad port?)") from exc
    if parts.scheme != "http":
        raise ConfigError("mqtt.http_proxy: only http:// proxies are supported")
    if not parts.hostname:
        raise ConfigError("mqtt.http_proxy: no host in the URL")
    options = crt_http.HttpProxyOptions(
        host_name=parts.hostname,
        port=port or 80,
        connection_type=crt_http.HttpProxyConnectionType.Tunneling,
    )
    if parts.username is not None:
        options.auth_type = crt_http.HttpProxyAuthenticationType.Basic
        options.auth_username = urllib.parse.unquote(parts.username)
        options.auth_password = urllib.parse.unquote(parts.password or "")
    return options


def build_client(  # noqa: PLR0913 - one knob per MQTT5 client option we set
    *,
    endpoint: str,
    port: int,
    cert: Path,
    key: Path,
    ca: Path | None,
    client_id: str,
    session_expiry: int = 0,
    keep_alive: int = 1200,
    min_reconnect_delay: float = 1.0,
    max_reconnect_delay: float = 20.0,
    reconnect_reset_after: float = 10.0,
    receive_maximum: int | None = None,
    http_proxy: str | None = None,
    on_publish: Callable[[mqtt5.PublishReceivedData], None] | None = None,
    on_success: Callable[[mqtt5.LifecycleConnectSuccessData], None] | None = None,
    on_failure: Callable[[mqtt5.LifecycleConnectFailureData], None] | None = None,
    on_disconnect: Callable[[mqtt5.LifecycleDisconnectData], None] | None = None,
    on_stopped: Callable[[mqtt5.LifecycleStoppedData], None] | None = None,
) -> mqtt5.Client:
    """
    Build an awscrt MQTT5 client with mutual TLS from PEM files.

    Args:
        endpoint: Broker host name or address.
        port: Broker port.
        cert: Client certificate (its CN is the thing name on AWS IoT and the emulator).
        key: Client private key.
        ca: Trust anchor; ``None`` uses the system store.
        client_id: MQTT client id.
        session_expiry: Seconds the broker keeps the session after a disconnect; a
            non-zero value also asks to rejoin the session on every connect
            (``REJOIN_ALWAYS``), zero asks for a clean session.
        keep_alive: PINGREQ interval in seconds.
        min_reconnect_delay: First reconnect delay, seconds.
        max_reconnect_delay: Cap of the exponential reconnect delay, seconds.
        reconnect_reset_after: Seconds a connection must last before the reconnect
            delay starts again from the minimum.
        receive_maximum: Unacknowledged QoS 1 messages the broker may have out at
            once (CONNECT Receive Maximum); ``None`` leaves it unlimited.
        http_proxy: Optional ``http://host:port`` proxy for the TCP connection.
        on_publish: Called on a CRT thread for each received PUBLISH.
        on_success: Called on a CRT thread on each CONNACK success.
        on_failure: Called on a CRT thread for each failed connection attempt.
        on_disconnect: Called on a CRT thread when a live connection drops.
        on_stopped: Called on a CRT thread once the client has stopped.

    Returns:
        The client, not yet started.

    Raises:
        ConfigError: The proxy URL is invalid.
    """
    behavior = (
        mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS
        if session_expiry
        else mqtt5.ClientSessionBehaviorType.CLEAN
    )
    return mqtt5_client_builder.mtls_from_path(
        cert_filepath=str(cert),
        pri_key_filepath=str(key),
        endpoint=endpoint,
        port=port,
        ca_filepath=None if ca is None else str(ca),
        client_id=client_id,
        session_behavior=behavior,
        session_expiry_interval_sec=session_expiry or None,
        keep_alive_interval_sec=keep_alive,
        receive_maximum=receive_maximum,
        # Decorrelated jitter spreads a fleet's reconnects after a broker outage
        # without the near-zero delays full jitter allows (AWS IoT Core accepts one
        # CONNECT per second per client id).
        retry_jitter_mode=mqtt5.ExponentialBackoffJitterMode.DECORRELATED,
        min_reconnect_delay_ms=max(1, int(min_reconnect_delay * 1000)),
        max_reconnect_delay_ms=max(1, int(max_reconnect_delay * 1000)),
        min_connected_time_to_reset_reconnect_delay_ms=max(1, int(reconnect_reset_after * 1000)),
        # QoS 1 publishes issued while offline wait for the next connection.
        offline_queue_behavior=mqtt5.ClientOperationQueueBehaviorType.FAIL_NON_QOS1_PUBLISH_ON_DISCONNECT,
        http_proxy_options=None if http_proxy is None else proxy_options(http_proxy),
        # AWS IoT Core's client-side limits: topic shape, 100 publishes/s.
        extended_validation_and_flow_control_options=(
            mqtt5.ExtendedValidationAndFlowControlOptions.AWS_IOT_CORE_DEFAULTS
        ),
        enable_metrics_collection=False,
        on_publish_received=on_publish,
        on_lifecycle_connection_success=on_success,
        on_lifecycle_connection_failure=on_failure,
        on_lifecycle_disconnection=on_disconnect,
        on_lifecycle_stopped=on_stopped,
    )
