"""
The emulator's certificate authority and the certificates it issues.

AWS IoT Core authenticates devices with X.509 client certificates; the emulator
plays both sides of that on one machine, so it needs its own CA:

* server certificates for ``127.0.0.1`` / ``localhost`` (control-plane API,
  data-plane relay, MQTT broker);
* one client certificate per thing, with CN = thing name: the broker takes the
  CN as the MQTT identity (``use_identity_as_username``), and its ACL gives a
  thing its own notify topic only (docs/protocol.md §19.3);
* one privileged client certificate for the emulator's own publisher, whose
  CN (:data:`PRIVILEGED_IDENTITY`) contains a ``.``, a character thing names
  cannot hold (docs/protocol.md §14), so no thing can ever share its identity.

Every operation is idempotent on a directory: an existing CA is reused, and an
existing leaf certificate is reused while it still verifies under that CA,
matches its key and requested names, and is not about to expire. Private keys
are written 0600.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.common.files import write_private
from agent.exceptions import ConfigError


if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path


__all__ = [
    "DEFAULT_SERVER_HOSTS",
    "PRIVILEGED_IDENTITY",
    "CertificateAuthority",
    "KeyPair",
    "KeyType",
]

KeyType = Literal["ec", "rsa"]

#: CN of the emulator's own MQTT client; the ``.`` keeps it out of the thing-name space.
PRIVILEGED_IDENTITY = "iot-tunnel-emulator.service"

#: ThingName shape of docs/protocol.md §14.

DEFAULT_SERVER_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")

_CA_LIFETIME = dt.timedelta(days=3650)
_LEAF_LIFETIME = dt.timedelta(days=397)
# Reissue a leaf that would expire within this margin instead of handing it out.
_RENEW_MARGIN = dt.timedelta(days=7)
# Backdate notBefore a little so a peer whose clock lags does not reject a fresh certificate.
_BACKDATE = dt.timedelta(minutes=5)

_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class KeyPair:
    """
    A PEM certificate and its PEM private key on disk.

    Attributes:
        cert: Path of the certificate.
        key: Path of the private key (mode 0600).
    """

    cert: Path
    key: Path


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def _new_key(key_type: KeyType) -> _PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: _PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


class CertificateAuthority:
    """
    A file-backed CA: ``ca.crt`` / ``ca.key`` in one directory.

    Args:
        directory: Where the CA lives; created 0700 when missing.
        key_type: Algorithm for a newly created CA key (EC P-256 by default;
            ``"rsa"`` for a peer that cannot do ECDSA).
        common_name: Subject CN of a newly created CA.
    """

    def __init__(
        self,
        directory: Path,
        *,
        key_type: KeyType = "ec",
        common_name: str = "IoT Tunnel Emulator CA",
    ) -> None:
        """
        Remember the location; nothing is read or written until :meth:`load_or_create`.
        """
        self.directory = directory
        self.cert_file = directory / "ca.crt"
        self.key_file = directory / "ca.key"
        self._key_type: KeyType = key_type
        self._common_name = common_name
        self._cert: x509.Certificate | None = None
        self._key: _PrivateKey | None = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two processes (the running emulator and `emulator add-thing`) may share a directory.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with (self.directory / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load_or_create(self) -> None:
        """
        Load the CA from its directory, creating it first when absent.

        Raises:
            ConfigError: Only one of ``ca.crt`` / ``ca.key`` exists, or they do not match.
        """
        if self._cert is not None:
            return
        with self._locked():
            have_cert, have_key = self.cert_file.exists(), self.key_file.exists()
            if have_cert != have_key:
                raise ConfigError(f"incomplete CA in {self.directory}: need both ca.crt and ca.key")
            if not have_cert:
                self._create()
            cert = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
            key = serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
                raise ConfigError(f"unsupported CA key type in {self.key_file}")
            if cert.public_key() != key.public_key():
                raise ConfigError(f"{self.cert_file} does not match {self.key_file}")
            self._cert, self._key = cert, key

    def _create(self) -> None:
        key = _new_key(self._key_type)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self._common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        write_private(self.key_file, _key_pem(key))
        _write_public(self.cert_file, cert.public_bytes(serialization.Encoding.PEM))

    @property
    def certificate(self) -> x509.Certificate:
        """
        The CA certificate (loading or creating the CA on first use).
        """
        self.load_or_create()
        assert self._cert is not None  # noqa: S101 - set by load_or_create
        return self._cert

    def issue_server(
        self,
        pair: KeyPair,
        *,
        hosts: Sequence[str] = DEFAULT_SERVER_HOSTS,
        key_type: KeyType = "ec",
    ) -> KeyPair:
        """
        Issue (or reuse) a TLS server certificate for ``hosts``.

        Args:
            pair: Where the certificate and key go; parent directories are created.
            hosts: IP addresses and DNS names for the subjectAltName; the first is the CN.
            key_type: Key algorithm for a newly issued key.

        Returns:
            ``pair``, now holding a valid certificate and key.
        """
        if not hosts:
            raise ValueError("a server certificate needs at least one host")
        return self._issue(pair, hosts[0], list(hosts), ExtendedKeyUsageOID.SERVER_AUTH, key_type)

    def issue_client(self, pair: KeyPair, *, common_name: str, key_type: KeyType = "ec") -> KeyPair:
        """
        Issue (or reuse) a TLS client certificate whose CN is the MQTT identity.

        Args:
            pair: Where the certificate and key go; parent directories are created.
            common_name: Subject CN: a thing name, or :data:`PRIVILEGED_IDENTITY`.
            key_type: Key algorithm for a newly issued key.

        Returns:
            ``pair``, now holding a valid certificate and key.
        """
        return self._issue(pair, common_name, [], ExtendedKeyUsageOID.CLIENT_AUTH, key_type)

    def _issue(
        self,
        pair: KeyPair,
        common_name: str,
        hosts: list[str],
        usage: x509.ObjectIdentifier,
        key_type: KeyType,
    ) -> KeyPair:
        self.load_or_create()
        assert self._cert is not None  # noqa: S101 - set by load_or_create
        assert self._key is not None  # noqa: S101
        pair.cert.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pair.key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._reusable(pair, common_name, hosts, usage):
            # Repair a mode loosened by hand: keys are 0600 whatever happened before.
            pair.key.chmod(0o600)
            return pair
        key = _new_key(key_type)
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _LEAF_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    # RSA key exchange encrypts with the certificate key; ECDHE does not.
                    key_encipherment=key_type == "rsa",
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(_san_entries(hosts)), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        write_private(pair.key, _key_pem(key))
        _write_public(pair.cert, cert.public_bytes(serialization.Encoding.PEM))
        return pair

    def _reusable(
        self,
        pair: KeyPair,
        common_name: str,
        hosts: list[str],
        usage: x509.ObjectIdentifier,
    ) -> bool:
        """
        Tell whether an existing leaf at ``pair`` can be handed out again.
        """
        assert self._cert is not None  # noqa: S101
        if not (pair.cert.exists() and pair.key.exists()):
            return False
        try:
            cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
            key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
            cert.verify_directly_issued_by(self._cert)
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            san = (
                set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
                if hosts
                else set()
            )
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            return False
        cns = [attr.value for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        return (
            cns == [common_name]
            and cert.public_key() == key.public_key()
            and cert.not_valid_after_utc - _RENEW_MARGIN > _now()
            and usage in eku
            and san == set(_san_entries(hosts))
        )
