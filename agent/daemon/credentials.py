"""
The device's certificate, private key and CA files, checked with the standard library only.

A device has no ``cryptography`` package, so OpenSSL is reached through :mod:`ssl`:
``load_verify_locations(cadata=...)`` parses each certificate, ``load_cert_chain`` parses
the key and refuses one that does not belong to the certificate. Neither looks at dates,
so the validity period is read from the DER encoding by the few lines below (the fifth
field of an X.509 ``tbsCertificate``).

Every check returns ``field = 'path': why`` lines, empty when all is well. The dates are a
check of their own: ``check-config`` refuses a certificate outside its validity period,
the daemon only warns (a device without a real-time clock may boot in the past, and
a certificate may be renewed while the agent retries).
"""

from __future__ import annotations

import binascii
import datetime as dt
import re
import ssl
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from pathlib import Path


__all__ = ["certificate_dates", "certificate_problems", "date_problems", "key_problems"]

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL)
_PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")
# OpenSSL's reasons for a key that is not the certificate's: another key of the same type,
# another type (RSA key, EC certificate), which leaves no certificate assigned.
_MISMATCH = frozenset({"KEY_VALUES_MISMATCH", "KEY_TYPE_MISMATCH", "NO_CERTIFICATE_ASSIGNED"})
_SEQUENCE, _UTC_TIME, _GENERALIZED_TIME, _VERSION = 0x30, 0x17, 0x18, 0xA0


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """The DER element at ``pos``: (tag, start of its content, end of its content)."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4 or pos + size > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + size], "big")
        pos += size
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _time(tag: int, text: bytes) -> dt.datetime:
    value = text.decode("ascii")
    if tag == _UTC_TIME and len(value) == 13:
        year = int(value[:2])
        # X.509's UTCTime: YY >= 50 is 19YY, below is 20YY.
        value = ("19" if year >= 50 else "20") + value
    elif tag != _GENERALIZED_TIME or len(value) != 15:
        raise ValueError("not a DER time")
    if not value.endswith("Z"):
        raise ValueError("not UTC")
    return dt.datetime.strptime(value, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)


def certificate_dates(der: bytes) -> tuple[dt.datetime, dt.datetime]:
    """
    Read the validity period of a DER certificate.

    Args:
        der: One X.509 certificate, DER-encoded.

    Returns:
        (not before, not after), timezone-aware UTC.

    Raises:
        ValueError: ``der`` is not shaped like a certificate.
    """
    tag, start, _ = _tlv(der, 0)
    tag_tbs, pos, _ = _tlv(der, start)
    if tag != _SEQUENCE or tag_tbs != _SEQUENCE:
        raise ValueError("not a certificate")
    # version (optional, [0]), serialNumber, signature, issuer, then validity.
    tag, _, end = _tlv(der, pos)
    if tag == _VERSION:
        pos = end
    for _ in range(3):
        _, _, pos = _tlv(der, pos)
    tag, pos, _ = _tlv(der, pos)
    if tag != _SEQUENCE:
        raise ValueError("no validity")
    tag, start, end = _tlv(der, pos)
    not_before = _time(tag, der[start:end])
    tag, start, end = _tlv(der, end)
    return not_before, _time(tag, der[start:end])


def _certificates(field: str, path: Path) -> tuple[list[bytes], list[str]]:
    """The DER certificates of a PEM file, or the one line saying why there are none."""
    data = path.read_bytes()
    where = f"{field} = '{path}'"
    if not data.strip():
        return [], [f"{where}: empty file, expected a PEM certificate"]
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        return [], [f"{where}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file"]
    ders: list[bytes] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for block in blocks:
        try:
            der = ssl.PEM_cert_to_DER_cert(block.decode("ascii"))
            context.load_verify_locations(cadata=der)  # OpenSSL parses the whole certificate
            certificate_dates(der)
        except (ValueError, binascii.Error, ssl.SSLError):
            return [], [f"{where}: not a valid PEM certificate (damaged or truncated)"]
        ders.append(der)
    return ders, []


def certificate_problems(field: str, path: Path) -> list[str]:
    """
    Check that a file holds parseable PEM certificates (a device certificate or a CA bundle).

    Args:
        field: The setting's name, for the message.
        path: A readable file.
    """
    return _certificates(field, path)[1]


def _dates_line(where: str, der: bytes, now: dt.datetime) -> str | None:
    not_before, not_after = certificate_dates(der)
    if now > not_after:
        return f"{where}: certificate expired on {not_after:%Y-%m-%d %H:%M} UTC"
    if now < not_before:
        return (
            f"{where}: certificate not valid before {not_before:%Y-%m-%d %H:%M} UTC "
            "(is the clock right?)"
        )
    return None


def date_problems(field: str, path: Path, now: dt.datetime, *, bundle: bool = False) -> list[str]:
    """
    Check the validity period of the certificates in a file at ``now``.

    A file :func:`certificate_problems` refuses yields nothing here: it is reported once.

    Args:
        field: The setting's name, for the message.
        path: A readable file.
        now: The time to check at.
        bundle: A CA file: only when every certificate is outside its period is it a
            problem (a bundle may keep an expired root beside current ones); else only the
            first certificate, the device's own, counts.
    """
    ders, problems = _certificates(field, path)
    if problems:
        return []
    lines = [_dates_line(f"{field} = '{path}'", der, now) for der in ders[: None if bundle else 1]]
    invalid = [line for line in lines if line is not None]
    if len(invalid) < len(lines):
        return []
    others = len(lines) - 1
    return [invalid[0] + (f" (as are the {others} others)" if others else "")]


def key_problems(key_field: str, key: Path, cert_field: str, cert: Path | None) -> list[str]:
    """
    Check a private key: a parseable, unencrypted PEM key belonging to the certificate.

    Args:
        key_field: The key setting's name.
        key: A readable file.
        cert_field: The certificate setting's name.
        cert: A certificate that passed :func:`certificate_problems`, or ``None``.
    """
    where = f"{key_field} = '{key}'"
    data = key.read_bytes()
    if not data.strip():
        return [f"{where}: empty file, expected a PEM private key"]
    if not _PEM_KEY.search(data):
        return [f"{where}: no PEM private key (-----BEGIN ... PRIVATE KEY-----) in the file"]
    if cert is None:
        return []
    line = _pair_problem(where, key, f"{cert_field} = '{cert}'", cert)
    return [line] if line else []


def _pair_problem(where: str, key: Path, cert_where: str, cert: Path) -> str | None:
    asked: list[bool] = []

    def password() -> bytes:
        # Called only for an encrypted key: refuse rather than prompt on a terminal.
        asked.append(True)
        return b""

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=password)
    except ssl.SSLError as exc:
        if asked:
            return f"{where}: encrypted with a passphrase; the agent needs an unencrypted key"
        if exc.reason in _MISMATCH:
            return f"{where}: does not belong to the certificate {cert_where}"
        return f"{where}: not a valid PEM private key (damaged or truncated)"
    return None
