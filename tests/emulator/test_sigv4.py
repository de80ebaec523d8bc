"""Tests for agent.emulator.sigv4: SigV4 verification against botocore-signed requests."""

from __future__ import annotations

import calendar
import time

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from agent.emulator.sigv4 import SignatureRejected, SignatureVerifier, region_from_authorization


KEY, SECRET = "AKIATESTKEY000000001", "s3cr3t/with+chars"
HOST = "127.0.0.1:8443"
BODY = b'{"maxResults":5}'


def sign(
    *,
    key: str = KEY,
    secret: str = SECRET,
    region: str = "us-east-1",
    service: str = "IoTSecuredTunneling",
    path: str = "/",
    body: bytes = BODY,
    extra: dict[str, str] | None = None,
) -> list[tuple[str, str]]:
    """Return the headers botocore sends for a signed POST, plus the Host it implies."""
    request = AWSRequest(
        method="POST",
        url=f"http://{HOST}{path}",
        headers={"X-Amz-Target": "IoTSecuredTunneling.ListTunnels", **(extra or {})},
        data=body,
    )
    SigV4Auth(Credentials(key, secret), service, region).add_auth(request)
    return [("Host", HOST), *request.headers.items()]


def verify(headers, *, body: bytes = BODY, path: str = "/", clock=time.time) -> str:
    verifier = SignatureVerifier({KEY: SECRET}, clock=clock)
    return verifier.verify(method="POST", host=HOST, raw_path=path, headers=headers, body=body)


def code_of(headers, **kwargs) -> tuple[str, int]:
    with pytest.raises(SignatureRejected) as info:
        verify(headers, **kwargs)
    return info.value.code, info.value.status


class TestVerify:
    @pytest.mark.parametrize("region", ["us-east-1", "eu-central-1", "cn-north-1"])
    def test_valid_returns_scope_region(self, region):
        """A correctly signed request verifies and yields the credential-scope region."""
        headers = sign(region=region)

        assert verify(headers) == region

    def test_path_and_query_are_signed(self):
        """The path prefix and query string take part in the signature."""
        headers = sign(path="/prefix/x?b=2&a=1")

        assert verify(headers, path="/prefix/x?b=2&a=1") == "us-east-1"
        assert code_of(headers, path="/prefix/x?b=2&a=3") == ("InvalidSignatureException", 403)

    def test_unsigned_extra_headers_are_ignored(self):
        """Headers added after signing (proxies, User-Agent) do not break the check."""
        headers = [*sign(), ("User-Agent", "x"), ("X-Forwarded-For", "10.0.0.1")]

        assert verify(headers) == "us-east-1"

    def test_signed_header_changed(self):
        """Changing a signed header's value is an InvalidSignatureException."""
        headers = [
            (n, "IoTSecuredTunneling.OpenTunnel" if n == "X-Amz-Target" else v) for n, v in sign()
        ]

        assert code_of(headers) == ("InvalidSignatureException", 403)

    @pytest.mark.parametrize(
        ("kwargs", "expected"),
        [
            ({"secret": "other"}, ("InvalidSignatureException", 403)),
            ({"key": "AKIAOTHER00000000000"}, ("UnrecognizedClientException", 403)),
            ({"service": "iot"}, ("InvalidSignatureException", 403)),
        ],
    )
    def test_wrong_credentials(self, kwargs, expected):
        """Another secret, an unknown key or another service's scope are refused."""
        assert code_of(sign(**kwargs)) == expected

    def test_body_changed(self):
        """A different body than the signed one is refused."""
        assert code_of(sign(), body=b"{}") == ("InvalidSignatureException", 403)

    def test_content_sha_header_must_match_body(self):
        """A signed X-Amz-Content-SHA256 that does not describe the body is refused."""
        headers = sign(extra={"X-Amz-Content-SHA256": "0" * 64})

        assert code_of(headers) == ("InvalidSignatureException", 403)

    def test_clock_skew(self):
        """A signature older or newer than 15 minutes is expired."""
        headers = sign()
        amz_date = dict(headers)["X-Amz-Date"]
        signed_at = calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))

        assert verify(headers, clock=lambda: signed_at + 900) == "us-east-1"
        assert code_of(headers, clock=lambda: signed_at + 901) == (
            "InvalidSignatureException",
            403,
        )
        assert code_of(headers, clock=lambda: signed_at - 901)[0] == "InvalidSignatureException"

    def test_scope_date_must_match(self):
        """A credential-scope date other than X-Amz-Date's day is refused."""
        headers = sign()
        date = dict(headers)["Authorization"].split("/")[1]
        forged = [
            (n, v.replace(f"/{date}/", "/19990101/") if n == "Authorization" else v)
            for n, v in headers
        ]

        assert code_of(forged) == ("InvalidSignatureException", 403)

    def test_missing_authorization(self):
        """No Authorization header is MissingAuthenticationTokenException."""
        headers = [(n, v) for n, v in sign() if n != "Authorization"]

        assert code_of(headers) == ("MissingAuthenticationTokenException", 403)

    @pytest.mark.parametrize(
        "mutate",
        [
            lambda h: [(n, v) for n, v in h if n != "X-Amz-Date"],
            lambda h: [(n, "Basic dXNlcjpwYXNz" if n == "Authorization" else v) for n, v in h],
            lambda h: [
                (
                    n,
                    v.replace("SignedHeaders=host;", "SignedHeaders=")
                    if n == "Authorization"
                    else v,
                )
                for n, v in h
            ],
            lambda h: [(n, v[:-1] if n == "Authorization" else v) for n, v in h],
        ],
        ids=["no-date", "not-sigv4", "host-unsigned", "short-signature"],
    )
    def test_malformed(self, mutate):
        """Malformed SigV4 headers are 400 IncompleteSignatureException."""
        assert code_of(mutate(sign())) == ("IncompleteSignatureException", 400)


class TestRegionFromAuthorization:
    def test_region(self):
        """The region is read from a SigV4 header without verifying it."""
        auth = dict(sign(region="sa-east-1", secret="whatever"))["Authorization"]

        assert region_from_authorization(auth) == "sa-east-1"
        assert region_from_authorization(None) is None
        assert region_from_authorization("Basic abc") is None
