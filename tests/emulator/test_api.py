"""Tests for agent.emulator.api through real boto3 clients against a real server (control-plane)."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from urllib.parse import urlsplit

import pytest
import structlog.testing
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from agent.emulator.api import ControlPlaneApi
from agent.emulator.store import (
    REJECT_CAT_INVALID,
    HandshakeRejected,
    StoreEvent,
    TunnelStore,
)
from agent.emulator.validation import encode_next_token

from .conftest import ACCESS_KEY, CREDENTIALS, SCALE, SECRET_KEY


DEST = {"thingName": "dev1", "services": ["SSH"]}


def error_of(exc_info: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    """Return (code, HTTP status) of a ClientError."""
    err = exc_info.value.response
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"]


def send(
    url: str, method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, dict[str, str], bytes]:
    """Send one HTTP request with http.client and return status, headers, body."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def signed_headers(url: str, path: str, target: str | None, body: bytes) -> dict[str, str]:
    """Return the headers of a request signed by botocore's own SigV4 signer."""
    headers = {"Content-Type": "application/x-amz-json-1.1"}
    if target is not None:
        headers["X-Amz-Target"] = target
    request = AWSRequest(method="POST", url=url + path, headers=headers, data=body)
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "IoTSecuredTunneling", "us-east-1").add_auth(
        request
    )
    return dict(request.headers.items())


def raw_call(
    url: str,
    target: str | None,
    body: bytes,
    *,
    method: str = "POST",
    sign: bool = True,
    path: str = "/",
) -> tuple[int, dict[str, str], bytes]:
    """Send one (by default SigV4-signed) request and return status, headers, body."""
    if sign:
        headers = signed_headers(url, path, target, body)
    else:
        headers = {} if target is None else {"X-Amz-Target": target}
    return send(url, method, path, headers, body)


class TestOpenTunnel:
    def test_minimal(self, client, api_store):
        """{} opens a tunnel and returns its id, ARN and one token per mode."""
        r = client.open_tunnel()
        t = api_store.get(r["tunnelId"])

        assert set(r) - {"ResponseMetadata"} == {
            "tunnelId",
            "tunnelArn",
            "sourceAccessToken",
            "destinationAccessToken",
        }
        assert r["tunnelArn"] == f"arn:aws:iot:us-east-1:123456789012:tunnel/{r['tunnelId']}"
        assert (r["sourceAccessToken"], r["destinationAccessToken"]) == (
            t.source.token,
            t.destination.token,
        )
        assert (t.status, t.has_destination_config, t.max_lifetime_minutes) == ("OPEN", False, 720)

    def test_full_input_and_event(self, client, api_store):
        """Every member is stored and the opened event says a destinationConfig came."""
        events: list[StoreEvent] = []
        api_store.listeners.append(events.append)
        r = client.open_tunnel(
            description="Tunnel für dev1",
            tags=[{"key": "team", "value": "ops"}, {"key": "empty", "value": ""}],
            destinationConfig={"thingName": "dev1", "services": ["SSH", "VNC", "HTTP"]},
            timeoutConfig={"maxLifetimeTimeoutMinutes": 30},
        )
        t = api_store.get(r["tunnelId"])

        assert (t.description, t.thing_name, t.services) == (
            "Tunnel für dev1",
            "dev1",
            ("SSH", "VNC", "HTTP"),
        )
        assert t.tags == {"team": "ops", "empty": ""}
        assert t.expires_at == t.created_at + 1800
        assert [(e.kind, e.tunnel.tunnel_id, e.destination_config) for e in events] == [
            ("opened", r["tunnelId"], True)
        ]

    def test_region_from_credential_scope(self, make_client):
        """The ARN carries the region the caller signed for (docs/protocol.md §12.4)."""
        r = make_client(region="eu-west-1").open_tunnel()

        assert r["tunnelArn"].startswith("arn:aws:iot:eu-west-1:123456789012:tunnel/")

    def test_services_limit(self, client, api_store):
        """More than 3 services is LimitExceededException and opens nothing."""
        with pytest.raises(ClientError) as info:
            client.open_tunnel(destinationConfig={"services": ["A", "B", "C", "D"]})

        assert error_of(info) == ("LimitExceededException", 400)
        assert api_store.list_tunnels() == []

    def test_open_tunnel_cap(self, make_client, api_harness):
        """Past the configured cap of open tunnels OpenTunnel fails until one is closed."""
        api = api_harness.start(TunnelStore(max_open_tunnels=2), credentials=CREDENTIALS)
        c = make_client(url=api.url)
        first = c.open_tunnel()["tunnelId"]
        c.open_tunnel()

        with pytest.raises(ClientError) as info:
            c.open_tunnel()
        assert error_of(info) == ("LimitExceededException", 400)
        assert "Tunnel limit exceeded" in str(info.value)
        c.close_tunnel(tunnelId=first)
        assert c.open_tunnel()["tunnelId"]


class TestDescribeTunnel:
    def test_all_members(self, client, api_store, api_clock):
        """Describe returns every member with epoch-second timestamps and connection states."""
        r = client.open_tunnel(
            description="d", tags=[{"key": "k", "value": "v"}], destinationConfig=DEST
        )
        t = api_store.get(r["tunnelId"])
        api_clock.now += 5.25
        api_store.set_connected(t.tunnel_id, "destination", connected=True)
        d = client.describe_tunnel(tunnelId=r["tunnelId"])["tunnel"]

        assert d["tunnelId"] == r["tunnelId"]
        assert d["tunnelArn"] == r["tunnelArn"]
        assert d["status"] == "OPEN"
        assert d["description"] == "d"
        assert d["destinationConfig"] == DEST
        assert d["timeoutConfig"] == {"maxLifetimeTimeoutMinutes": 720}
        assert d["tags"] == [{"key": "k", "value": "v"}]
        assert d["createdAt"].timestamp() == pytest.approx(t.created_at, abs=1e-6)
        assert d["lastUpdatedAt"].timestamp() == pytest.approx(t.created_at, abs=1e-6)
        assert d["sourceConnectionState"]["status"] == "DISCONNECTED"
        assert d["destinationConnectionState"]["status"] == "CONNECTED"
        assert d["destinationConnectionState"]["lastUpdatedAt"].timestamp() == pytest.approx(
            t.created_at + 5.25, abs=1e-6
        )

    def test_absent_members_omitted_timeout_always(self, api_server, client):
        """Optional members are omitted when unset, but timeoutConfig is always there."""
        tunnel_id = client.open_tunnel()["tunnelId"]
        status, _, body = raw_call(
            api_server.url,
            "IoTSecuredTunneling.DescribeTunnel",
            json.dumps({"tunnelId": tunnel_id}).encode(),
        )
        tunnel = json.loads(body)["tunnel"]

        assert status == 200
        assert sorted(tunnel) == [
            "createdAt",
            "destinationConnectionState",
            "lastUpdatedAt",
            "sourceConnectionState",
            "status",
            "timeoutConfig",
            "tunnelArn",
            "tunnelId",
        ]
        assert isinstance(tunnel["createdAt"], float)
        assert tunnel["timeoutConfig"] == {"maxLifetimeTimeoutMinutes": 720}

    def test_timestamps_to_the_millisecond(self, api_server, client, api_store, api_clock):
        """Every timestamp on the wire is epoch seconds with at most 3 decimals, as from AWS."""
        api_clock.now = 1_764_650_000.1234567
        tunnel_id = client.open_tunnel()["tunnelId"]
        api_clock.now = 1_764_650_005.9876543
        api_store.set_connected(tunnel_id, "source", connected=True)
        api_clock.now = 1_764_650_007.4567891
        api_store.set_connected(tunnel_id, "source", connected=False)
        api_clock.now = 1_764_650_009.0004999
        client.close_tunnel(tunnelId=tunnel_id)
        bodies = [
            raw_call(api_server.url, f"IoTSecuredTunneling.{target}", body)[2]
            for target, body in [
                ("DescribeTunnel", json.dumps({"tunnelId": tunnel_id}).encode()),
                ("ListTunnels", b"{}"),
            ]
        ]
        stamps = [
            re.findall(rb'"(createdAt|lastUpdatedAt)": ?(-?[0-9.eE+]+)', body) for body in bodies
        ]

        assert stamps[0] == [
            (b"lastUpdatedAt", b"1764650007.457"),  # sourceConnectionState
            (b"lastUpdatedAt", b"1764650000.123"),  # destinationConnectionState
            (b"createdAt", b"1764650000.123"),
            (b"lastUpdatedAt", b"1764650009.0"),
        ]
        assert stamps[1] == [
            (b"createdAt", b"1764650000.123"),
            (b"lastUpdatedAt", b"1764650009.0"),
        ]

    def test_destination_config_without_thing(self, client):
        """A destinationConfig with services only is returned without thingName."""
        tunnel_id = client.open_tunnel(destinationConfig={"services": ["SSH"]})["tunnelId"]

        d = client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]

        assert d["destinationConfig"] == {"services": ["SSH"]}

    def test_unknown(self, client):
        """An unknown id is ResourceNotFoundException (400)."""
        with pytest.raises(ClientError) as info:
            client.describe_tunnel(tunnelId="0e5f2a6c-0000-4000-8000-000000000000")

        assert error_of(info) == ("ResourceNotFoundException", 400)


class TestCloseTunnel:
    def test_close_keeps_record(self, client, api_store, api_clock):
        """A closed tunnel stays describable as CLOSED with a new lastUpdatedAt."""
        tunnel_id = client.open_tunnel()["tunnelId"]
        api_store.set_connected(tunnel_id, "source", connected=True)
        api_clock.now += 7
        r = client.close_tunnel(tunnelId=tunnel_id)
        d = client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]

        assert set(r) == {"ResponseMetadata"}
        assert d["status"] == "CLOSED"
        assert d["lastUpdatedAt"].timestamp() == pytest.approx(round(api_clock.now, 3), abs=1e-6)
        assert d["sourceConnectionState"]["status"] == "DISCONNECTED"
        assert client.close_tunnel(tunnelId=tunnel_id)["ResponseMetadata"]["HTTPStatusCode"] == 200

    def test_delete(self, client):
        """delete=true removes the tunnel at once."""
        tunnel_id = client.open_tunnel()["tunnelId"]
        client.close_tunnel(tunnelId=tunnel_id, delete=True)

        with pytest.raises(ClientError) as info:
            client.describe_tunnel(tunnelId=tunnel_id)
        assert error_of(info) == ("ResourceNotFoundException", 400)
        assert client.list_tunnels()["tunnelSummaries"] == []

    def test_unknown(self, client):
        """Closing an unknown id is ResourceNotFoundException."""
        with pytest.raises(ClientError) as info:
            client.close_tunnel(tunnelId="nope")

        assert error_of(info) == ("ResourceNotFoundException", 400)


class TestListTunnels:
    def test_order_filter_and_closed(self, client, api_clock):
        """Newest first, thingName exact filter, retained CLOSED tunnels included."""
        ids = []
        for thing in ("a", "b", "a"):
            api_clock.now += 1
            ids.append(
                client.open_tunnel(
                    description=thing, destinationConfig={"thingName": thing, "services": ["S"]}
                )["tunnelId"]
            )
        client.close_tunnel(tunnelId=ids[0])
        everything = client.list_tunnels()
        only_a = client.list_tunnels(thingName="a")

        assert [s["tunnelId"] for s in everything["tunnelSummaries"]] == ids[::-1]
        assert "nextToken" not in everything
        assert [s["tunnelId"] for s in only_a["tunnelSummaries"]] == [ids[2], ids[0]]
        assert [s["status"] for s in only_a["tunnelSummaries"]] == ["OPEN", "CLOSED"]
        assert set(only_a["tunnelSummaries"][0]) == {
            "tunnelId",
            "tunnelArn",
            "status",
            "description",
            "createdAt",
            "lastUpdatedAt",
        }
        assert client.list_tunnels(thingName="zzz")["tunnelSummaries"] == []

    def test_manual_paging(self, client, api_clock):
        """25 tunnels come back as pages of 10, 10, 5 by looping on nextToken."""
        ids = []
        for _ in range(25):
            api_clock.now += 1
            ids.append(client.open_tunnel()["tunnelId"])
        pages: list[list[str]] = []
        kwargs: dict[str, object] = {"maxResults": 10}
        while True:
            page = client.list_tunnels(**kwargs)
            pages.append([s["tunnelId"] for s in page["tunnelSummaries"]])
            if "nextToken" not in page:
                break
            kwargs["nextToken"] = page["nextToken"]

        assert [len(p) for p in pages] == [10, 10, 5]
        assert [i for p in pages for i in p] == ids[::-1]
        assert not client.can_paginate("list_tunnels")

    def test_default_page_size(self, make_client, api_harness):
        """Without maxResults a page holds 100 summaries."""
        store = TunnelStore(max_open_tunnels=200)
        for _ in range(101):
            store.open_tunnel()
        c = make_client(url=api_harness.start(store, credentials=CREDENTIALS).url)

        first = c.list_tunnels()
        second = c.list_tunnels(nextToken=first["nextToken"])

        assert len(first["tunnelSummaries"]) == 100
        assert len(second["tunnelSummaries"]) == 1
        assert "nextToken" not in second

    def test_foreign_token_for_other_filter(self, client):
        """A token valid for the unfiltered listing is refused under a filter that hides it."""
        client.open_tunnel(destinationConfig={"thingName": "x", "services": ["S"]})
        client.open_tunnel()
        token = client.list_tunnels(maxResults=1)["nextToken"]

        with pytest.raises(ClientError) as info:
            client.list_tunnels(thingName="x", nextToken=token)

        assert error_of(info) == ("ValidationException", 400)

    def test_token_of_deleted_tunnel(self, client):
        """A token that points after a since-deleted tunnel is refused."""
        client.open_tunnel()
        newest = client.open_tunnel()["tunnelId"]
        token = client.list_tunnels(maxResults=1)["nextToken"]
        client.close_tunnel(tunnelId=newest, delete=True)

        with pytest.raises(ClientError) as info:
            client.list_tunnels(nextToken=token)

        assert error_of(info) == ("ValidationException", 400)


class TestRotate:
    @pytest.mark.parametrize(
        ("mode", "rotated"),
        [
            ("SOURCE", {"source"}),
            ("DESTINATION", {"destination"}),
            ("ALL", {"source", "destination"}),
        ],
    )
    def test_rotate_modes(self, client, api_store, api_clock, mode, rotated):
        """Only rotated tokens are returned; old ones are refused, new ones work, expiry kept."""
        r = client.open_tunnel(timeoutConfig={"maxLifetimeTimeoutMinutes": 60})
        t = api_store.get(r["tunnelId"])
        old = {"source": r["sourceAccessToken"], "destination": r["destinationAccessToken"]}
        expires = t.expires_at
        api_clock.now += 1200
        out = client.rotate_tunnel_access_token(tunnelId=r["tunnelId"], clientMode=mode)
        returned = {m for m in ("source", "destination") if f"{m}AccessToken" in out}
        d = client.describe_tunnel(tunnelId=r["tunnelId"])["tunnel"]

        assert out["tunnelArn"] == r["tunnelArn"]
        assert returned == rotated
        assert t.expires_at == expires
        assert d["lastUpdatedAt"].timestamp() == pytest.approx(round(api_clock.now, 3), abs=1e-6)
        for m in ("source", "destination"):
            if m in rotated:
                assert out[f"{m}AccessToken"] != old[m]
                with pytest.raises(HandshakeRejected) as info:
                    api_store.authenticate(mode=m, token=old[m], client_token=None)
                assert (info.value.status, info.value.message) == (400, REJECT_CAT_INVALID)
                assert (
                    api_store.authenticate(mode=m, token=out[f"{m}AccessToken"], client_token=None)
                    is t
                )
            else:
                assert api_store.authenticate(mode=m, token=old[m], client_token=None) is t

    def test_destination_config_replaces(self, client, api_store):
        """DESTINATION with a destinationConfig stores it and flags the rotated event."""
        events: list[StoreEvent] = []
        api_store.listeners.append(events.append)
        tunnel_id = client.open_tunnel()["tunnelId"]
        client.rotate_tunnel_access_token(
            tunnelId=tunnel_id,
            clientMode="DESTINATION",
            destinationConfig={"thingName": "dev9", "services": ["SSH"]},
        )

        d = client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]

        assert d["destinationConfig"] == {"thingName": "dev9", "services": ["SSH"]}
        assert (events[-1].kind, events[-1].modes, events[-1].destination_config) == (
            "rotated",
            ("destination",),
            True,
        )

    def test_destination_config_with_source(self, client):
        """DestinationConfig with clientMode SOURCE is a ValidationException."""
        tunnel_id = client.open_tunnel()["tunnelId"]

        with pytest.raises(ClientError) as info:
            client.rotate_tunnel_access_token(
                tunnelId=tunnel_id, clientMode="SOURCE", destinationConfig=DEST
            )

        assert error_of(info) == ("ValidationException", 400)
        assert "You can not use DestinationConfig with source clientMode" in str(info.value)

    def test_closed_and_unknown(self, client):
        """Rotating a CLOSED tunnel is ValidationException; an unknown one ResourceNotFound."""
        tunnel_id = client.open_tunnel()["tunnelId"]
        client.close_tunnel(tunnelId=tunnel_id)

        with pytest.raises(ClientError) as closed:
            client.rotate_tunnel_access_token(tunnelId=tunnel_id, clientMode="ALL")
        with pytest.raises(ClientError) as unknown:
            client.rotate_tunnel_access_token(tunnelId="nope", clientMode="ALL")

        assert error_of(closed) == ("ValidationException", 400)
        assert error_of(unknown) == ("ResourceNotFoundException", 400)


class TestTags:
    def test_tag_list_untag(self, client):
        """Open tags, TagResource overwrite/insert and UntagResource show in both views."""
        r = client.open_tunnel(tags=[{"key": "a", "value": "1"}])
        arn = r["tunnelArn"]
        client.tag_resource(
            resourceArn=arn, tags=[{"key": "a", "value": "2"}, {"key": "b", "value": "3"}]
        )
        after_tag = client.list_tags_for_resource(resourceArn=arn)["tags"]
        client.untag_resource(resourceArn=arn, tagKeys=["a", "missing"])

        assert after_tag == [{"key": "a", "value": "2"}, {"key": "b", "value": "3"}]
        assert client.list_tags_for_resource(resourceArn=arn)["tags"] == [
            {"key": "b", "value": "3"}
        ]
        assert client.describe_tunnel(tunnelId=r["tunnelId"])["tunnel"]["tags"] == [
            {"key": "b", "value": "3"}
        ]
        client.untag_resource(resourceArn=arn, tagKeys=["b"])
        assert client.list_tags_for_resource(resourceArn=arn)["tags"] == []
        assert "tags" not in client.describe_tunnel(tunnelId=r["tunnelId"])["tunnel"]

    def test_tag_limit_per_tunnel(self, client):
        """TagResource counts existing tags: a tunnel never holds more than 200 (as OpenTunnel)."""
        r = client.open_tunnel(tags=[{"key": f"open{i}", "value": "v"} for i in range(150)])
        arn = r["tunnelArn"]
        client.tag_resource(
            resourceArn=arn, tags=[{"key": f"tag{i}", "value": "v"} for i in range(50)]
        )
        # Overwriting existing keys does not add to the count.
        client.tag_resource(resourceArn=arn, tags=[{"key": "open0", "value": "new"}])

        with pytest.raises(ClientError) as one_more:
            client.tag_resource(resourceArn=arn, tags=[{"key": "extra", "value": "v"}])
        with pytest.raises(ClientError) as many_more:
            client.tag_resource(
                resourceArn=arn, tags=[{"key": f"more{i}", "value": "v"} for i in range(101)]
            )

        message = one_more.value.response["Error"]["Message"]
        assert error_of(one_more) == ("ValidationException", 400)
        assert error_of(many_more) == ("ValidationException", 400)
        assert f"resource {arn} would have 201 tags, the limit is 200" in message
        tags = client.list_tags_for_resource(resourceArn=arn)["tags"]
        assert len(tags) == 200
        assert {"key": "open0", "value": "new"} in tags
        assert all(t["key"] not in ("extra", "more0") for t in tags)

    @pytest.mark.parametrize(
        ("operation", "params"),
        [
            ("tag_resource", {"tags": [{"key": "a", "value": "b"}]}),
            ("untag_resource", {"tagKeys": ["a"]}),
            ("list_tags_for_resource", {}),
        ],
    )
    def test_unknown_arn(self, client, operation, params):
        """Every tag operation on an unknown ARN is ResourceNotFoundException."""
        arn = "arn:aws:iot:us-east-1:123456789012:tunnel/nope"

        with pytest.raises(ClientError) as info:
            getattr(client, operation)(resourceArn=arn, **params)

        assert error_of(info) == ("ResourceNotFoundException", 400)


LONG_ARN = "arn:aws:iot:us-east-1:123456789012:tunnel/" + "x" * 1000
TAGS_201 = [{"key": f"k{i}", "value": "v"} for i in range(201)]
VALIDATION_CASES = [
    # (operation, params, the member named in the message)
    ("open_tunnel", {"description": ""}, "description"),
    ("open_tunnel", {"description": "x" * 2049}, "description"),
    ("open_tunnel", {"description": "nul\x00"}, "description"),
    ("open_tunnel", {"description": "line\nbreak"}, "description"),
    ("open_tunnel", {"description": "zero\u200bwidth"}, "description"),
    ("open_tunnel", {"description": "private\ue000"}, "description"),
    ("open_tunnel", {"description": "unassigned\u0378"}, "description"),
    (
        "open_tunnel",
        {"destinationConfig": {"thingName": "bad name", "services": ["S"]}},
        "thingName",
    ),
    (
        "open_tunnel",
        {"destinationConfig": {"thingName": "x" * 129, "services": ["S"]}},
        "thingName",
    ),
    ("open_tunnel", {"destinationConfig": {"thingName": "", "services": ["S"]}}, "thingName"),
    ("open_tunnel", {"destinationConfig": {"thingName": "t"}}, "services"),
    ("open_tunnel", {"destinationConfig": {"services": []}}, "services"),
    ("open_tunnel", {"destinationConfig": {"services": ["S/H"]}}, "services"),
    ("open_tunnel", {"destinationConfig": {"services": [""]}}, "services"),
    ("open_tunnel", {"destinationConfig": {"services": ["x" * 129]}}, "services"),
    ("open_tunnel", {"destinationConfig": {"services": ["SSH", "SSH"]}}, "services"),
    ("open_tunnel", {"timeoutConfig": {"maxLifetimeTimeoutMinutes": 0}}, "maxLifetime"),
    ("open_tunnel", {"timeoutConfig": {"maxLifetimeTimeoutMinutes": 721}}, "maxLifetime"),
    ("open_tunnel", {"tags": []}, "tags"),
    ("open_tunnel", {"tags": TAGS_201}, "tags"),
    ("open_tunnel", {"tags": [{"key": "", "value": "v"}]}, "key"),
    ("open_tunnel", {"tags": [{"key": "k" * 129, "value": "v"}]}, "key"),
    ("open_tunnel", {"tags": [{"key": "bad#key", "value": "v"}]}, "key"),
    ("open_tunnel", {"tags": [{"key": "k", "value": "v" * 257}]}, "value"),
    ("open_tunnel", {"tags": [{"key": "k", "value": "bad*value"}]}, "value"),
    ("open_tunnel", {"tags": [{"key": "k"}]}, "value"),
    ("open_tunnel", {"tags": [{"value": "v"}]}, "key"),
    ("open_tunnel", {"tags": [{"key": "aws:owner", "value": "v"}]}, "aws:"),
    ("open_tunnel", {"tags": [{"key": "k", "value": "1"}, {"key": "k", "value": "2"}]}, "key"),
    ("close_tunnel", {}, "tunnelId"),
    ("close_tunnel", {"tunnelId": ""}, "tunnelId"),
    ("close_tunnel", {"tunnelId": "bad id!"}, "tunnelId"),
    ("close_tunnel", {"tunnelId": "x" * 129}, "tunnelId"),
    ("describe_tunnel", {"tunnelId": "a/b"}, "tunnelId"),
    ("list_tunnels", {"maxResults": 0}, "maxResults"),
    ("list_tunnels", {"maxResults": 101}, "maxResults"),
    ("list_tunnels", {"thingName": "bad thing"}, "thingName"),
    ("list_tunnels", {"thingName": "x" * 129}, "thingName"),
    ("list_tunnels", {"nextToken": ""}, "nextToken"),
    ("list_tunnels", {"nextToken": "bad token!"}, "nextToken"),
    ("list_tunnels", {"nextToken": "x" * 4097}, "nextToken"),
    ("list_tunnels", {"nextToken": "abcd"}, "nextToken"),
    ("list_tunnels", {"nextToken": "Zm9vOmJhcg=="}, "nextToken"),
    ("list_tunnels", {"nextToken": encode_next_token("no-such-tunnel")}, "nextToken"),
    ("rotate_tunnel_access_token", {"tunnelId": "t"}, "clientMode"),
    ("rotate_tunnel_access_token", {"tunnelId": "t", "clientMode": "BOTH"}, "clientMode"),
    ("rotate_tunnel_access_token", {"tunnelId": "t", "clientMode": "source"}, "clientMode"),
    ("rotate_tunnel_access_token", {"tunnelId": "t", "clientMode": ""}, "clientMode"),
    ("rotate_tunnel_access_token", {"tunnelId": "t t", "clientMode": "ALL"}, "tunnelId"),
    (
        "rotate_tunnel_access_token",
        {"tunnelId": "t", "clientMode": "ALL", "destinationConfig": {"services": ["A", "A"]}},
        "services",
    ),
    ("tag_resource", {"resourceArn": "", "tags": [{"key": "k", "value": "v"}]}, "resourceArn"),
    (
        "tag_resource",
        {"resourceArn": LONG_ARN, "tags": [{"key": "k", "value": "v"}]},
        "resourceArn",
    ),
    ("tag_resource", {"resourceArn": "arn", "tags": []}, "tags"),
    ("tag_resource", {"resourceArn": "arn"}, "tags"),
    ("tag_resource", {"resourceArn": "arn", "tags": TAGS_201}, "tags"),
    ("tag_resource", {"resourceArn": "arn", "tags": [{"key": "AWS:x", "value": "v"}]}, "aws:"),
    ("untag_resource", {"resourceArn": "arn", "tagKeys": ["k"] * 201}, "tagKeys"),
    ("untag_resource", {"resourceArn": "arn", "tagKeys": ["k" * 129]}, "tagKey"),
    ("untag_resource", {"resourceArn": "arn", "tagKeys": ["bad#"]}, "tagKey"),
    ("untag_resource", {"resourceArn": "arn", "tagKeys": [""]}, "tagKey"),
    ("untag_resource", {"resourceArn": "arn"}, "tagKeys"),
    ("untag_resource", {"resourceArn": LONG_ARN, "tagKeys": []}, "resourceArn"),
    ("list_tags_for_resource", {"resourceArn": ""}, "resourceArn"),
    ("list_tags_for_resource", {"resourceArn": LONG_ARN}, "resourceArn"),
]


class TestValidation:
    @pytest.mark.parametrize(
        ("operation", "params", "member"),
        VALIDATION_CASES,
        ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(VALIDATION_CASES)],
    )
    def test_constraint(self, raw_client, api_store, operation, params, member):
        """Each docs/protocol.md §14 constraint gets a server-side 400 ValidationException."""
        with pytest.raises(ClientError) as info:
            getattr(raw_client, operation)(**params)

        message = info.value.response["Error"]["Message"]
        assert error_of(info) == ("ValidationException", 400)
        assert member in message
        assert "Value '...'" not in message
        assert api_store.list_tunnels() == []

    @pytest.mark.parametrize(
        ("operation", "params", "message"),
        [
            (
                "open_tunnel",
                {"destinationConfig": {"services": ["SSH", "VNC", "SSH"]}},
                (
                    "Value 'SSH' at 'destinationConfig.services.3.member' failed to satisfy "
                    "constraint: Member must be unique in the list"
                ),
            ),
            (
                "rotate_tunnel_access_token",
                {
                    "tunnelId": "t",
                    "clientMode": "ALL",
                    "destinationConfig": {"services": ["A", "A"]},
                },
                "Value 'A' at 'destinationConfig.services.2.member' failed",
            ),
            (
                "open_tunnel",
                {"destinationConfig": {"services": ["SSH", "S/H"]}},
                "Value 'S/H' at 'destinationConfig.services.2.member' failed",
            ),
            (
                "open_tunnel",
                {"tags": [{"key": "k", "value": "1"}, {"key": "k", "value": "2"}]},
                (
                    "Value 'k' at 'tags.2.member.key' failed to satisfy constraint: "
                    "Member must be unique in the list"
                ),
            ),
            (
                "open_tunnel",
                {"tags": [{"key": "ok", "value": "v"}, {"key": "aws:owner", "value": "v"}]},
                (
                    "Value 'aws:owner' at 'tags.2.member.key' failed to satisfy constraint: "
                    "Tag keys starting with 'aws:' are reserved"
                ),
            ),
            (
                "open_tunnel",
                {"tags": [{"key": "k", "value": "bad*value"}]},
                "Value 'bad*value' at 'tags.1.member.value' failed",
            ),
            ("open_tunnel", {"tags": []}, "Value '[]' at 'tags' failed"),
            (
                "open_tunnel",
                {"tags": TAGS_201},
                (
                    "Value '[{key=k0, value=v}, {key=k1, value=v}, {key=k2, value=v}, "
                    "{key=k3, value=v}, {key=k4, value=v}, ... (201 items)]' at 'tags' failed to "
                    "satisfy constraint: Member must have length less than or equal to 200"
                ),
            ),
            (
                "open_tunnel",
                {"description": "x" * 2049},
                f"Value '{'x' * 64}...' at 'description' failed",
            ),
            (
                "open_tunnel",
                {"timeoutConfig": {"maxLifetimeTimeoutMinutes": 721}},
                "Value '721' at 'timeoutConfig.maxLifetimeTimeoutMinutes' failed",
            ),
            (
                "close_tunnel",
                {},
                "Value null at 'tunnelId' failed to satisfy constraint: Member must not be null",
            ),
            (
                "untag_resource",
                {"resourceArn": "arn", "tagKeys": ["ok", "bad#"]},
                "Value 'bad#' at 'tagKeys.2.member' failed",
            ),
            (
                "untag_resource",
                {"resourceArn": "arn", "tagKeys": ["k"] * 201},
                "Value '[k, k, k, k, k, ... (201 items)]' at 'tagKeys' failed",
            ),
            (
                "rotate_tunnel_access_token",
                {"tunnelId": "t", "clientMode": "BOTH"},
                (
                    "Value 'BOTH' at 'clientMode' failed to satisfy constraint: "
                    "Member must satisfy enum value set: [SOURCE, DESTINATION, ALL]"
                ),
            ),
            (
                "list_tunnels",
                {"nextToken": "Zm9vOmJhcg=="},
                "Invalid nextToken 'Zm9vOmJhcg==': not issued by ListTunnels",
            ),
        ],
    )
    def test_message_names_the_value(self, raw_client, operation, params, message):
        """A ValidationException quotes the offending value and where it is, never a stand-in."""
        with pytest.raises(ClientError) as info:
            getattr(raw_client, operation)(**params)

        assert error_of(info) == ("ValidationException", 400)
        assert message in info.value.response["Error"]["Message"]

    def test_next_token_of_deleted_tunnel_is_quoted(self, client):
        """A token whose tunnel is gone is refused with the token in the message."""
        for _ in range(2):
            client.open_tunnel()
        token = client.list_tunnels(maxResults=1)["nextToken"]
        client.close_tunnel(
            tunnelId=client.list_tunnels()["tunnelSummaries"][0]["tunnelId"], delete=True
        )

        with pytest.raises(ClientError) as info:
            client.list_tunnels(nextToken=token)

        assert error_of(info) == ("ValidationException", 400)
        assert info.value.response["Error"]["Message"] == (
            f"Invalid nextToken '{token}': its tunnel is gone"
        )

    @pytest.mark.parametrize(
        "params",
        [
            {"description": "Ünïcödé ✓ 日本語 emoji 🚀"},
            {"description": "x" * 2048},
            {"destinationConfig": {"thingName": "a:b_c-D9" + "x" * 120, "services": ["a:b_c-D"]}},
            {"timeoutConfig": {"maxLifetimeTimeoutMinutes": 1}},
            {"timeoutConfig": {"maxLifetimeTimeoutMinutes": 720}},
            {"tags": [{"key": "Name é 1_.:/=+-@", "value": ""}]},
            {"tags": [{"key": "k" * 128, "value": "v" * 256}]},
            {"tags": [{"key": f"k{i}", "value": "v"} for i in range(200)]},
        ],
    )
    def test_boundaries_accepted(self, raw_client, params):
        """Values at the edge of each constraint are accepted."""
        r = raw_client.open_tunnel(**params)

        assert r["ResponseMetadata"]["HTTPStatusCode"] == 200

    def test_existing_tunnel_id_patterns(self, raw_client):
        """Ids with every allowed character class reach the lookup (ResourceNotFound)."""
        with pytest.raises(ClientError) as info:
            raw_client.describe_tunnel(tunnelId="aZ09_-+=:" + "x" * 119)

        assert error_of(info) == ("ResourceNotFoundException", 400)


class TestWireProtocol:
    def test_any_path_is_accepted(self, make_client, api_server):
        """An endpoint_url with a path prefix still reaches the API (docs/protocol.md §12.1)."""
        c = make_client(url=api_server.url + "/some/prefix")

        assert c.list_tunnels()["tunnelSummaries"] == []

    @pytest.mark.parametrize(
        "target",
        [None, "IoTSecuredTunneling.DeleteTunnel", "IoTSecureTunneling.ListTunnels", "ListTunnels"],
    )
    def test_unknown_operation(self, api_server, target):
        """A missing or unknown X-Amz-Target is 400 UnknownOperationException."""
        status, headers, body = raw_call(api_server.url, target, b"{}")

        assert status == 400
        assert json.loads(body)["__type"] == "UnknownOperationException"
        assert headers["Content-Type"] == "application/x-amz-json-1.1"

    @pytest.mark.parametrize(
        "body",
        [
            b"{",
            b"[]",
            b'"x"',
            b"\xff\xfe",
            b'{"maxResults": NaN}',
            b'{"maxResults": "10"}',
            b'{"maxResults": true}',
            b'{"thingName": 5}',
            b'{"nextToken": ["x"]}',
        ],
    )
    def test_serialization_errors(self, api_server, body):
        """Unparsable bodies and members of the wrong JSON type are SerializationException."""
        status, _, raw = raw_call(api_server.url, "IoTSecuredTunneling.ListTunnels", body)

        assert (status, json.loads(raw)["__type"]) == (400, "SerializationException")

    @pytest.mark.parametrize(
        ("target", "body"),
        [
            ("OpenTunnel", {"tags": {"k": "v"}}),
            ("OpenTunnel", {"tags": ["k"]}),
            ("OpenTunnel", {"destinationConfig": "dev1"}),
            ("OpenTunnel", {"destinationConfig": {"services": "SSH"}}),
            ("OpenTunnel", {"timeoutConfig": {"maxLifetimeTimeoutMinutes": 1.5}}),
            ("OpenTunnel", {"description": 7}),
            ("CloseTunnel", {"tunnelId": "t", "delete": "yes"}),
        ],
    )
    def test_wrong_member_types(self, api_server, api_store, target, body):
        """Nested members of the wrong type are SerializationException and change nothing."""
        status, _, raw = raw_call(
            api_server.url, f"IoTSecuredTunneling.{target}", json.dumps(body).encode()
        )

        assert (status, json.loads(raw)["__type"]) == (400, "SerializationException")
        assert api_store.list_tunnels() == []

    def test_wrong_type_message(self, api_server):
        """A SerializationException names the member, the expected and the received type."""
        body = json.dumps({"tags": [{"key": "k", "value": 5}]}).encode()

        status, _, raw = raw_call(api_server.url, "IoTSecuredTunneling.OpenTunnel", body)

        assert status == 400
        assert json.loads(raw) == {
            "__type": "SerializationException",
            "message": "Expected string for 'tags.1.member.value', got integer",
        }

    def test_empty_body_and_unknown_members(self, api_server):
        """An empty body counts as {} and unknown members are ignored."""
        s1, h1, b1 = raw_call(api_server.url, "IoTSecuredTunneling.ListTunnels", b"")
        s2, _, b2 = raw_call(
            api_server.url, "IoTSecuredTunneling.ListTunnels", b'{"futureMember": 1}'
        )

        assert (s1, json.loads(b1)) == (200, {"tunnelSummaries": []})
        assert (s2, json.loads(b2)) == (200, {"tunnelSummaries": []})
        assert h1["Content-Type"] == "application/x-amz-json-1.1"
        assert len(h1["x-amzn-RequestId"]) == 36

    def test_oversized_body(self, api_server):
        """A body over the 1 MiB cap is refused with 413 before any parsing."""
        body = b'{"description": "' + b"x" * (1024 * 1024) + b'"}'

        status, _, raw = raw_call(api_server.url, "IoTSecuredTunneling.OpenTunnel", body)

        assert (status, json.loads(raw)["__type"]) == (413, "SerializationException")

    def test_request_id_reaches_boto(self, client):
        """x-amzn-RequestId becomes ResponseMetadata.RequestId."""
        meta = client.list_tunnels()["ResponseMetadata"]

        assert meta["RequestId"] == meta["HTTPHeaders"]["x-amzn-requestid"]

    def test_get_is_refused(self, api_server):
        """Only POST is served."""
        status, _, body = raw_call(api_server.url, None, b"", method="GET", sign=False)

        assert (status, json.loads(body)["__type"]) == (405, "UnknownOperationException")


def exchange(
    port: int, *parts: bytes, pause: float = 0.0
) -> tuple[int, dict[str, str], dict[str, str]]:
    """Send ``parts`` on a raw TCP socket, ``pause`` s apart, and read one response.

    Returns the status, the lower-cased headers and the JSON body, read up to Content-Length
    as an HTTP client does (the server may keep the socket open a while to drain the request).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10 * SCALE) as sock:
        for i, part in enumerate(parts):
            if i:
                time.sleep(pause)
            sock.sendall(part)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"closed without a response: {received!r}"
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        while len(body) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            assert chunk, f"closed inside the body: {received!r}"
            body += chunk
    return int(status_line.split()[1]), headers, json.loads(body)


SIGNED_PREFIX = b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: IoTSecuredTunneling.ListTunnels\r\n"
MALFORMED = [
    # (request bytes, words the message must contain)
    (bytes(range(256)) * 4, "Malformed HTTP request"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, "HTTPS traffic"),
    (b"POST\r\n\r\n", "Expected space after method"),
    (b"POST / HTTP/9.Z\r\nHost: x\r\n\r\n", "Invalid minor version"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n", "8190 bytes"),
    (
        b"POST / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
        "Too many headers",
    ),
    (SIGNED_PREFIX + b"Content-Length: abc\r\n\r\n{}", "Content-Length"),
    (SIGNED_PREFIX + b"Content-Length: -2\r\n\r\n{}", "Content-Length"),
    (SIGNED_PREFIX + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", "Duplicate"),
    (
        SIGNED_PREFIX + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        "Transfer-Encoding",
    ),
    (SIGNED_PREFIX + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", "chunk size"),
    (SIGNED_PREFIX + b"X-Nul: a\x00b\r\n\r\n", "header value"),
    (
        SIGNED_PREFIX + b"Content-Encoding: gzip\r\nContent-Length: 4\r\n\r\nnope",
        "Malformed HTTP request body",
    ),
]


class TestMalformedHttp:
    @pytest.mark.parametrize(("request_bytes", "words"), MALFORMED, ids=[w for _, w in MALFORMED])
    def test_json_error_body(self, api_server, request_bytes, words):
        """A request aiohttp cannot parse gets an AWS JSON error, not a plain-text 400."""
        status, headers, body = exchange(api_server.port, request_bytes)

        assert status == 400
        assert headers["content-type"] == "application/x-amz-json-1.1"
        assert headers["x-amzn-errortype"] == "SerializationException"
        assert len(headers["x-amzn-requestid"]) == 36
        assert set(body) == {"__type", "message"}
        assert body["__type"] == "SerializationException"
        assert words in body["message"]
        assert "^" not in body["message"]

    def test_server_still_serves(self, api_server, client):
        """After garbage on one connection the API answers the next request normally."""
        exchange(api_server.port, b"\x00" * 100)

        assert client.list_tunnels()["tunnelSummaries"] == []

    def test_bad_chunk_after_good_ones(self, api_harness, api_store):
        """A body that breaks midway is answered with a JSON 408 once the body timeout passes."""
        api = api_harness.start(api_store, body_timeout=0.5 * SCALE)
        status, headers, body = exchange(
            api.port,
            SIGNED_PREFIX + b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n",
            b"zz\r\n}\r\n0\r\n\r\n",
            pause=0.2 * SCALE,
        )

        assert status == 408
        assert headers["content-type"] == "application/x-amz-json-1.1"
        assert body["__type"] == "RequestTimeoutException"
        assert body["message"] == f"Request body not received within {0.5 * SCALE:g} s"

    def test_client_leaving_mid_body_is_no_failure(self, api_server):
        """A client closing before its body is complete is not logged as our failure."""
        with structlog.testing.capture_logs() as logs:
            with socket.create_connection(("127.0.0.1", api_server.port)) as sock:
                sock.sendall(SIGNED_PREFIX + b"Content-Length: 100\r\n\r\n{")
            deadline = time.monotonic() + 5 * SCALE
            while not any(e["event"] == "api_error" for e in logs):
                assert time.monotonic() < deadline, logs
                time.sleep(0.01)

        assert [e["code"] for e in logs if e["event"] == "api_error"] == ["SerializationException"]
        assert not [e for e in logs if e["log_level"] in ("error", "exception")]


class TestSignatures:
    def test_wrong_secret(self, make_client):
        """A request signed with another secret key is 403 InvalidSignatureException."""
        c = make_client(secret_key="not-the-secret")

        with pytest.raises(ClientError) as info:
            c.list_tunnels()

        assert error_of(info) == ("InvalidSignatureException", 403)

    def test_unknown_key(self, make_client, api_store):
        """An unknown access key is 403 UnrecognizedClientException and opens nothing."""
        c = make_client(access_key="AKIAUNKNOWN000000000")

        with pytest.raises(ClientError) as info:
            c.open_tunnel()

        assert error_of(info) == ("UnrecognizedClientException", 403)
        assert api_store.list_tunnels() == []

    def test_unsigned(self, api_server):
        """A request without Authorization is 403 MissingAuthenticationTokenException."""
        status, _, body = raw_call(
            api_server.url, "IoTSecuredTunneling.ListTunnels", b"{}", sign=False
        )

        assert (status, json.loads(body)["__type"]) == (403, "MissingAuthenticationTokenException")

    def test_tampered_body(self, api_server, api_store):
        """A body changed after signing fails the signature check."""
        headers = signed_headers(api_server.url, "/", "IoTSecuredTunneling.OpenTunnel", b"{}")

        status, _, body = send(api_server.url, "POST", "/", headers, b'{"description":"x"}')

        assert (status, json.loads(body)["__type"]) == (403, "InvalidSignatureException")
        assert api_store.list_tunnels() == []

    def test_check_disabled(self, make_client, api_harness, api_store):
        """With no credentials configured any signer is accepted; region still comes from scope."""
        api = api_harness.start(api_store, credentials=None)
        c = make_client(url=api.url, access_key="anything", secret_key="x", region="ap-south-1")

        arn = c.open_tunnel()["tunnelArn"]
        status, _, body = raw_call(api.url, "IoTSecuredTunneling.ListTunnels", b"{}", sign=False)

        assert arn.startswith("arn:aws:iot:ap-south-1:")
        assert (status, len(json.loads(body)["tunnelSummaries"])) == (200, 1)


class TestLifecycle:
    def test_expiry_with_injected_clock(self, client, api_store, api_clock):
        """At maxLifetimeTimeoutMinutes the tunnel closes and its tokens stop working."""
        events: list[StoreEvent] = []
        api_store.listeners.append(events.append)
        r = client.open_tunnel(timeoutConfig={"maxLifetimeTimeoutMinutes": 2})
        start = api_clock.now

        assert api_store.next_expiry() == pytest.approx(start + 120)
        api_clock.now = start + 119
        assert client.describe_tunnel(tunnelId=r["tunnelId"])["tunnel"]["status"] == "OPEN"
        api_clock.now = start + 120
        d = client.describe_tunnel(tunnelId=r["tunnelId"])["tunnel"]
        assert d["status"] == "CLOSED"
        assert d["lastUpdatedAt"].timestamp() == pytest.approx(round(start + 120, 3), abs=1e-6)
        assert [e.kind for e in events] == ["opened", "closed"]
        assert api_store.next_expiry() is None
        with pytest.raises(HandshakeRejected):
            api_store.authenticate(
                mode="destination", token=r["destinationAccessToken"], client_token=None
            )

    def test_timer_driven_expiry(self, make_client, api_harness, api_clock):
        """With lazy expiry off, only store.expire_due (the app's timer) closes tunnels."""
        store = TunnelStore(clock=api_clock)
        c = make_client(
            url=api_harness.start(store, credentials=CREDENTIALS, lazy_expiry=False).url
        )
        tunnel_id = c.open_tunnel(timeoutConfig={"maxLifetimeTimeoutMinutes": 1})["tunnelId"]
        api_clock.now += 61

        assert c.describe_tunnel(tunnelId=tunnel_id)["tunnel"]["status"] == "OPEN"
        assert [t.tunnel_id for t in store.expire_due()] == [tunnel_id]
        assert c.describe_tunnel(tunnelId=tunnel_id)["tunnel"]["status"] == "CLOSED"

    def test_retention_purge(self, make_client, api_harness, api_clock):
        """A closed tunnel disappears once the retention period has passed."""
        store = TunnelStore(clock=api_clock, retention_seconds=60)
        c = make_client(url=api_harness.start(store, credentials=CREDENTIALS).url)
        tunnel_id = c.open_tunnel()["tunnelId"]
        c.close_tunnel(tunnelId=tunnel_id)
        api_clock.now += 60

        with pytest.raises(ClientError) as info:
            c.describe_tunnel(tunnelId=tunnel_id)

        assert error_of(info) == ("ResourceNotFoundException", 400)


class TestPersistence:
    def test_restart_keeps_state(self, make_client, api_harness, api_clock, state_file):
        """Tunnels, tags and tokens survive a restart of store and server."""
        first = api_harness.start(
            TunnelStore(clock=api_clock, state_file=state_file), credentials=CREDENTIALS
        )
        c1 = make_client(url=first.url)
        r = c1.open_tunnel(
            description="keep", tags=[{"key": "k", "value": "v"}], destinationConfig=DEST
        )
        closed = c1.open_tunnel()["tunnelId"]
        c1.close_tunnel(tunnelId=closed)
        before = c1.describe_tunnel(tunnelId=r["tunnelId"])["tunnel"]
        api_harness.stop(first)

        store = TunnelStore(clock=api_clock, state_file=state_file)
        c2 = make_client(url=api_harness.start(store, credentials=CREDENTIALS).url)
        after = c2.describe_tunnel(tunnelId=r["tunnelId"])["tunnel"]

        assert after == before
        assert [s["tunnelId"] for s in c2.list_tunnels()["tunnelSummaries"]] == [
            closed,
            r["tunnelId"],
        ]
        assert c2.list_tags_for_resource(resourceArn=r["tunnelArn"])["tags"] == [
            {"key": "k", "value": "v"}
        ]
        assert (
            store.authenticate(
                mode="source", token=r["sourceAccessToken"], client_token=None
            ).tunnel_id
            == r["tunnelId"]
        )
        assert state_file.stat().st_mode & 0o777 == 0o600


class TestServer:
    def test_port_and_url(self, api_server):
        """After start the bound port is known and the URL points at loopback."""
        assert api_server.port > 0
        assert api_server.url == f"http://127.0.0.1:{api_server.port}"

    def test_busy_port(self, api_harness, api_server, api_store):
        """Starting on a port in use raises OSError and leaves nothing running."""
        other = ControlPlaneApi(api_store, port=api_server.port)

        with pytest.raises(OSError):
            api_harness.thread.run(other.start())

        assert other._runner is None

    def test_internal_failure_hides_details(self, client, api_store, monkeypatch):
        """An unexpected exception is a 500 InternalFailure without its text."""

        def broken(**_kwargs):
            raise RuntimeError("secret detail")

        monkeypatch.setattr(api_store, "list_tunnels", broken)

        with pytest.raises(ClientError) as info:
            client.list_tunnels()

        assert error_of(info) == ("InternalFailure", 500)
        assert "secret detail" not in str(info.value.response)

    def test_no_token_in_logs(self, client):
        """Tokens from Open and Rotate never appear in log events (docs/architecture.md §7.4)."""
        with structlog.testing.capture_logs() as logs:
            r = client.open_tunnel(destinationConfig=DEST)
            rotated = client.rotate_tunnel_access_token(tunnelId=r["tunnelId"], clientMode="ALL")
        text = repr(logs)

        assert {e["event"] for e in logs} >= {"tunnel_opened", "tunnel_rotated"}
        for token in (
            r["sourceAccessToken"],
            r["destinationAccessToken"],
            rotated["sourceAccessToken"],
            rotated["destinationAccessToken"],
        ):
            assert token not in text
