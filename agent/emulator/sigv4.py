"""
SigV4 verification for the emulator's HTTP APIs, recomputed with botocore's own signer.

Reusing ``botocore.auth.SigV4Auth`` (on a reconstructed request, with the client's
``X-Amz-Date`` and exactly the headers named in ``SignedHeaders``) means the emulator cannot
drift from what the SDKs and the CLI compute. The region is taken from the credential scope
(docs/protocol.md §12.4), so one emulator serves clients configured for any region.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from typing import TYPE_CHECKING

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from agent.emulator.store import StoreError


if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping


__all__ = [
    "DATA_SIGNING_NAME",
    "SIGNING_NAME",
    "SignatureRejected",
    "SignatureVerifier",
    "region_from_authorization",
]

SIGNING_NAME = "IoTSecuredTunneling"
#: The credential-scope service of the AWS IoT data plane (botocore's ``iot-data`` model).
DATA_SIGNING_NAME = "iotdata"

_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+"
    r"Credential=(?P<key>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)/(?P<service>[^/,\s]+)"
    r"/aws4_request\s*,\s*"
    r"SignedHeaders=(?P<headers>[a-z0-9;_.-]+)\s*,\s*"
    r"Signature=(?P<signature>[0-9a-f]{64})\s*",
    re.ASCII,
)
_AMZ_DATE_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z", re.ASCII)
_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. Check your "
    "AWS Secret Access Key and signing method. Consult the service documentation for details."
)


class SignatureRejected(StoreError):
    """
    The request is not authenticated; AWS answers 403 (or 400 for a malformed header).
    """

    def __init__(self, code: str, status: int, message: str) -> None:
        """
        Record the AWS error code and HTTP status.
        """
        super().__init__(message)
        self.code = code  # type: ignore[misc] # per instance: one class for the whole family
        self.status = status


def region_from_authorization(authorization: str | None) -> str | None:
    """
    Return the region of a SigV4 credential scope, or None when the header is not SigV4.
    """
    match = _AUTH_RE.fullmatch(authorization.strip()) if authorization else None
    return match["region"] if match else None


class SignatureVerifier:
    """
    Checks SigV4 ``Authorization`` headers against a set of static credentials.
    """

    def __init__(
        self,
        credentials: Mapping[str, str],
        *,
        signing_name: str = SIGNING_NAME,
        max_skew_seconds: float = 15 * 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """
        Configure the accepted credentials.

        Args:
            credentials: Access key id -> secret access key.
            signing_name: The service name every credential scope must carry
                (docs/protocol.md §12.1).
            max_skew_seconds: Largest accepted distance of ``X-Amz-Date`` from now (AWS: 15 min).
            clock: Epoch-seconds clock.
        """
        self._credentials = dict(credentials)
        self._signing_name = signing_name
        self._max_skew = max_skew_seconds
        self._clock = clock

    def verify(
        self,
        *,
        method: str,
        host: str,
        raw_path: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
    ) -> str:
        """
        Verify one request and return the region of its credential scope.

        Args:
            method: The HTTP method.
            host: Scheme-less ``host[:port]`` used to rebuild the URL.
            raw_path: Path and query exactly as received.
            headers: Every header as received (repeats allowed).
            body: The raw body.

        Returns:
            The region named in the credential scope.

        Raises:
            SignatureRejected: Missing, malformed, unknown key, expired or wrong signature.
        """
        received: dict[str, list[str]] = {}
        for name, value in headers:
            received.setdefault(name.lower(), []).append(value)
        authorization = received.get("authorization", [""])[0]
        if not authorization:
            raise SignatureRejected(
                "MissingAuthenticationTokenException", 403, "Missing Authentication Token"
            )
        match = _AUTH_RE.fullmatch(authorization.strip())
        amz_date = received.get("x-amz-date", [""])[0]
        signed = match["headers"].split(";") if match else []
        if match is None or not _AMZ_DATE_RE.fullmatch(amz_date) or "host" not in signed:
            raise SignatureRejected(
                "IncompleteSignatureException",
                400,
                "Authorization header requires Credential, SignedHeaders, Signature, "
                "a signed Host header and X-Amz-Date",
            )
        secret = self._credentials.get(match["key"])
        if secret is None:
            raise SignatureRejected(
                "UnrecognizedClientException",
                403,
                "The security token included in the request is invalid.",
            )
        if match["service"] != self._signing_name:
            raise SignatureRejected(
                "InvalidSignatureException",
                403,
                f"Credential should be scoped to correct service: '{self._signing_name}'.",
            )
        if match["date"] != amz_date[:8]:
            raise SignatureRejected(
                "InvalidSignatureException",
                403,
                "Date in Credential scope does not match YYYYMMDD from X-Amz-Date.",
            )
        signed_at = calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
        if abs(self._clock() - signed_at) > self._max_skew:
            raise SignatureRejected("InvalidSignatureException", 403, "Signature expired")
        content_sha = received.get("x-amz-content-sha256", [None])[0]
        if content_sha is not None and not hmac.compare_digest(
            content_sha, hashlib.sha256(body).hexdigest()
        ):
            raise SignatureRejected("InvalidSignatureException", 403, _MISMATCH)
        expected = self._compute(
            key=match["key"],
            secret=secret,
            region=match["region"],
            amz_date=amz_date,
            request=AWSRequest(
                method=method,
                url=f"http://{host}{raw_path}",
                # Only what the client signed, joined as SigV4 canonicalises repeats.
                headers={h: ",".join(received.get(h, [])) for h in signed},
                data=body,
            ),
        )
        if not hmac.compare_digest(expected, match["signature"]):
            raise SignatureRejected("InvalidSignatureException", 403, _MISMATCH)
        return match["region"]

    def _compute(
        self, *, key: str, secret: str, region: str, amz_date: str, request: AWSRequest
    ) -> str:
        signer = SigV4Auth(Credentials(key, secret), self._signing_name, region)
        request.context["timestamp"] = amz_date
        canonical = signer.canonical_request(request)
        return str(signer.signature(signer.string_to_sign(request, canonical), request))
