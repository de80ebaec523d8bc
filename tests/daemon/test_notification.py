"""Tests for agent.daemon.notification: the pure notify-payload parser."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agent.daemon.notification import (
    MAX_PAYLOAD_SIZE,
    TunnelRequest,
    parse_notification,
)
from agent.exceptions import InvalidNotification
from agent.protocol.ids import MAX_TOKEN_LENGTH
from tests.fakes import notification


TOKEN = "AQGAAXiSecretTunnelAccessToken_0123456789-abc=="
ALLOWED = {"SSH": "22", "HTTP": "8080", "VNC": "5900"}


def reason(payload: bytes, **kwargs) -> str:
    with pytest.raises(InvalidNotification) as info:
        parse_notification(payload, **kwargs)
    return str(info.value)


class TestValid:
    def test_device_client_payload(self):
        """The exact payload of docs/protocol.md §17.2 parses into a request."""
        payload = (
            b'{"clientAccessToken":"' + TOKEN.encode() + b'","clientMode":"destination",'
            b'"region":"us-east-1","services":["SSH"]}'
        )

        request = parse_notification(payload, allowed_services=ALLOWED)

        assert request.token.get_secret_value() == TOKEN
        assert request.region == "us-east-1"
        assert request.services == ("SSH",)

    def test_three_services_keep_order(self):
        """Up to three services are accepted, in the notification's order."""
        request = parse_notification(notification(TOKEN, ["VNC", "SSH", "HTTP"]))

        assert request.services == ("VNC", "SSH", "HTTP")

    @pytest.mark.parametrize(
        "region", ["us-east-1", "eu-west-3", "us-gov-west-1", "cn-north-1", "us-isob-east-1"]
    )
    def test_partition_regions(self, region):
        """Regions of every AWS partition are accepted."""
        assert parse_notification(notification(TOKEN, region=region)).region == region

    def test_unknown_keys_ignored(self):
        """Extra keys are ignored, for forward compatibility."""
        payload = json.loads(notification(TOKEN)) | {"tunnelId": "abc", "extra": [1, 2]}

        request = parse_notification(json.dumps(payload).encode())

        assert request.services == ("SSH",)

    def test_repr_hides_token(self):
        """Neither repr nor str of the request shows the token."""
        request = parse_notification(notification(TOKEN))

        assert TOKEN not in repr(request)
        assert TOKEN not in str(request)
        assert "**********" in repr(request)

    def test_equal_requests(self):
        """Two parses of the same bytes are equal (dedupe compares by value)."""
        assert parse_notification(notification(TOKEN)) == parse_notification(notification(TOKEN))
        assert isinstance(parse_notification(notification(TOKEN)), TunnelRequest)

    def test_max_token_length(self):
        """A token of exactly 4096 characters is accepted."""
        request = parse_notification(notification("A" * MAX_TOKEN_LENGTH))

        assert len(request.token.get_secret_value()) == MAX_TOKEN_LENGTH


class TestInvalid:
    @pytest.mark.parametrize(
        ("payload", "expected"),
        [
            (b"", "not valid JSON"),
            (b"{", "not valid JSON"),
            (b"\xff\xfe", "not UTF-8"),
            (b"[]", "JSON list, not an object"),
            (b'"x"', "JSON str, not an object"),
            (b"null", "JSON NoneType, not an object"),
            (b'{"a": NaN}', "non-JSON constant NaN"),
            (b'{"a": Infinity}', "non-JSON constant Infinity"),
            (b"[" * 8000 + b"]" * 8000, "not valid JSON"),
        ],
    )
    def test_not_a_json_object(self, payload, expected):
        """Anything but a JSON object is refused with the reason."""
        assert expected in reason(payload)

    def test_size_bound(self):
        """A payload over 16 KiB is refused before parsing."""
        payload = notification(TOKEN) + b" " * (MAX_PAYLOAD_SIZE)

        assert reason(payload) == f"payload is {len(payload)} bytes, more than {MAX_PAYLOAD_SIZE}"

    def test_one_megabyte(self):
        """A 1 MB payload is refused by size."""
        assert "more than 16384" in reason(b"{" + b" " * 1_000_000 + b"}")

    def test_duplicate_keys(self):
        """A repeated key is refused: two parsers must not disagree on the token."""
        payload = b'{"clientMode":"destination","clientMode":"destination"}'

        assert reason(payload) == "payload repeats a key (10 characters, sha256 04a2d7)"

    @pytest.mark.parametrize(
        ("mode", "expected"),
        [
            ("source", "clientMode is not 'destination' (6 characters, sha256 41cf67)"),
            ("DESTINATION", "clientMode is not 'destination' (11 characters, sha256 27a4be)"),
            ("Destination", "clientMode is not 'destination' (11 characters, sha256 293d40)"),
        ],
    )
    def test_client_mode(self, mode, expected):
        """The clientMode must be exactly lowercase destination (docs/protocol.md §17.2)."""
        assert reason(notification(TOKEN, mode=mode)) == expected

    def test_client_mode_missing(self):
        """A missing clientMode is refused."""
        payload = json.loads(notification(TOKEN))
        del payload["clientMode"]

        assert reason(json.dumps(payload).encode()) == "clientMode is not 'destination' (null)"

    @pytest.mark.parametrize(
        "region",
        [
            "",
            "US-EAST-1",
            "us-east-1.evil.example",
            "evil.example/us-east-1",
            "us-east-1:443",
            "us-east",
            "us-east-123",
            "127.0.0.1",
            "us-east-1\n",
        ],
    )
    def test_region_injection(self, region):
        """A region that is not an AWS region (e.g. a host name) is refused."""
        assert "does not look like an AWS region" in reason(notification(TOKEN, region=region))

    def test_region_type(self):
        """A non-string region is refused by type."""
        payload = json.loads(notification(TOKEN)) | {"region": 1}

        assert reason(json.dumps(payload).encode()) == "region is missing or not a string"

    @pytest.mark.parametrize(
        ("token", "expected"),
        [
            ("", "clientAccessToken is empty"),
            ("A" * 4097, "clientAccessToken is 4097 characters, more than 4096"),
            ("abc def", "clientAccessToken contains characters outside the URL-safe set"),
            ("abc\x00def", "clientAccessToken contains characters outside the URL-safe set"),
            ("abc\ndef", "clientAccessToken contains characters outside the URL-safe set"),
            ("tökén", "clientAccessToken contains characters outside the URL-safe set"),
        ],
    )
    def test_token_shape(self, token, expected):
        """Empty, oversized or non-URL-safe tokens are refused."""
        assert reason(notification(token)) == expected

    def test_token_type(self):
        """A non-string token is refused by type."""
        payload = json.loads(notification(TOKEN)) | {"clientAccessToken": ["x"]}

        assert (
            reason(json.dumps(payload).encode()) == "clientAccessToken is missing or not a string"
        )

    @pytest.mark.parametrize(
        ("services", "expected"),
        [
            ([], "services has 0 entries, expected 1 to 3"),
            (["A", "B", "C", "D"], "services has 4 entries, expected 1 to 3"),
            ("SSH", "services is missing or not a list"),
            ([22], "services[0] does not match [a-zA-Z0-9:_-]{1,128} (a JSON number)"),
            (["S S H"], "services[0] does not match [a-zA-Z0-9:_-]{1,128} (5 characters"),
            (["X" * 129], "does not match [a-zA-Z0-9:_-]{1,128}"),
            (["SSH:1"], "services[0] contains ':', which a local proxy cannot map"),
            (["SSH", "SSH"], "services[1] repeats services[0]"),
        ],
    )
    def test_services_shape(self, services, expected):
        """Service lists of the wrong size, type, charset or with duplicates are refused."""
        assert expected in reason(notification(TOKEN, services))

    def test_unknown_service_named(self):
        """One unknown service refuses the whole notification; the message lists what is offered."""
        message = reason(notification(TOKEN, ["SSH", "RDP"]), allowed_services=ALLOWED)

        assert message == (
            "services[1] is not in the services map (this device offers: HTTP, SSH, VNC)"
        )

    def test_empty_map_denies_all(self):
        """With an empty services map every notification is refused (deny by default)."""
        assert "not in the services map" in reason(notification(TOKEN), allowed_services={})

    def test_token_in_wrong_field_not_echoed(self):
        """A token sent in the region field never appears in the error message."""
        message = reason(notification(TOKEN, region=TOKEN))

        assert TOKEN not in message
        assert TOKEN[:8] not in message
        assert message.startswith("region does not look like an AWS region such as us-east-1 (")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4)
    ),
    max_leaves=12,
)
near_valid = st.fixed_dictionaries(
    {},
    optional={
        # A marker prefix, so a hit in an error message can only be the token itself.
        "clientAccessToken": st.text(min_size=5, max_size=60).map(lambda s: "Zq9~" + s)
        | json_values,
        "clientMode": st.sampled_from(["destination", "source", "DESTINATION", ""]) | json_values,
        "region": st.sampled_from(["us-east-1", "us-gov-west-1", "x"]) | st.text(max_size=20),
        "services": st.lists(
            st.sampled_from(["SSH", "HTTP", "a:b", "", "SSH"]) | json_values, max_size=5
        )
        | json_values,
    },
)


@pytest.mark.slow
class TestFuzz:
    """10,000 generated payloads in all."""

    @settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=300))
    def test_random_bytes(self, payload):
        """Random bytes raise nothing but InvalidNotification."""
        with contextlib.suppress(InvalidNotification):
            parse_notification(payload, allowed_services=ALLOWED)

    @settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(json_values)
    def test_random_json(self, document):
        """Random JSON documents raise nothing but InvalidNotification."""
        with contextlib.suppress(InvalidNotification):
            parse_notification(json.dumps(document).encode(), allowed_services=ALLOWED)

    @settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(near_valid)
    def test_near_valid_never_leaks_token(self, document):
        """Near-valid payloads raise only InvalidNotification, never quoting the token."""
        token = document.get("clientAccessToken")
        request, message = None, ""
        try:
            request = parse_notification(json.dumps(document).encode(), allowed_services=ALLOWED)
        except InvalidNotification as exc:
            message = str(exc)

        if request is None and isinstance(token, str) and token.startswith("Zq9~"):
            assert token[:8] not in message
        if request is not None:
            assert request.token.get_secret_value() == token
            assert set(request.services) <= set(ALLOWED)
