"""
Real certificates and keys for the tests of the device's checks (check-config parses them).

``cryptography`` is imported inside the functions: the device's tests must collect without it
(tests/test_fixture_imports.py), and only the tests that write credentials need it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from pathlib import Path


DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Credentials:
    """The files of one device: its certificate and key, and the CA that signed it."""

    cert: Path
    key: Path
    ca: Path


def _pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def new_key() -> Any:
    """A fresh EC P-256 private key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def write_key(path: Path, key: Any = None, *, password: bytes | None = None) -> Any:
    """Write ``key`` (a new one by default) as PKCS#8 PEM, mode 0600; return it."""
    from cryptography.hazmat.primitives import serialization

    key = key or new_key()
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    path.chmod(0o600)
    return key


def certificate(
    key: Any,
    *,
    name: str,
    issuer: tuple[Any, str] | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Any:
    """A certificate for ``key``, self-signed or signed by ``issuer`` (its key, its name)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    signing_key, issuer_name = issuer or (key, name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - DAY)
        .not_valid_after(not_after or now + 365 * DAY)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    return builder.sign(signing_key, hashes.SHA256())


def write_certificate(path: Path, cert: Any) -> None:
    """Write one certificate as PEM."""
    path.write_bytes(_pem(cert))


def write_credentials(
    directory: Path,
    *,
    thing: str = "dev-1",
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    names: tuple[str, str, str] = ("cert.pem", "key.pem", "ca.pem"),
) -> Credentials:
    """
    Write a CA, and a device certificate and key it signed, into ``directory``.

    Args:
        directory: Where the three files go (created).
        thing: The device certificate's common name.
        not_before: Start of the device certificate's validity (default: yesterday).
        not_after: End of its validity (default: in a year).
        names: File names of the certificate, the key and the CA.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path, ca_path = (directory / name for name in names)
    ca_key = new_key()
    write_certificate(ca_path, certificate(ca_key, name="Test Root CA"))
    key = write_key(key_path)
    write_certificate(
        cert_path,
        certificate(
            key,
            name=thing,
            issuer=(ca_key, "Test Root CA"),
            not_before=not_before,
            not_after=not_after,
        ),
    )
    return Credentials(cert=cert_path, key=key_path, ca=ca_path)
