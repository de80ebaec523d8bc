"""Tests for the emulator's certificate authority (agent/emulator/pki.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import stat
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.emulator.pki import (
    PRIVILEGED_IDENTITY,
    CertificateAuthority,
    KeyPair,
)
from agent.exceptions import ConfigError
from agent.protocol.ids import THING_NAME


if TYPE_CHECKING:
    from pathlib import Path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _pair(tmp_path: Path, name: str) -> KeyPair:
    return KeyPair(tmp_path / "out" / f"{name}.crt", tmp_path / "out" / f"{name}.key")


class TestAuthority:
    def test_creates_ca_with_private_key_0600(self, tmp_path):
        """A new CA is a self-signed EC P-256 CA certificate with a 0600 key in a 0700 dir."""
        ca = CertificateAuthority(tmp_path / "pki")
        ca.load_or_create()

        cert = _load(ca.cert_file)
        key = serialization.load_pem_private_key(ca.key_file.read_bytes(), password=None)
        assert _mode(ca.key_file) == 0o600
        assert _mode(tmp_path / "pki") == 0o700
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"
        assert cert.issuer == cert.subject
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
        cert.verify_directly_issued_by(cert)

    def test_reuses_existing_ca(self, tmp_path):
        """A second authority on the same directory loads the same CA instead of a new one."""
        first = CertificateAuthority(tmp_path / "pki")
        first.load_or_create()
        before = (first.cert_file.read_bytes(), first.key_file.read_bytes())

        second = CertificateAuthority(tmp_path / "pki")
        second.load_or_create()

        assert (second.cert_file.read_bytes(), second.key_file.read_bytes()) == before
        assert second.certificate.fingerprint(hashes.SHA256()) == first.certificate.fingerprint(
            hashes.SHA256()
        )

    def test_rsa_ca(self, tmp_path):
        """key_type="rsa" creates a 2048-bit RSA CA for peers that cannot do ECDSA."""
        ca = CertificateAuthority(tmp_path / "pki", key_type="rsa")
        ca.load_or_create()

        key = serialization.load_pem_private_key(ca.key_file.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == 2048

    def test_incomplete_ca_is_a_config_error(self, tmp_path):
        """A ca.crt without its ca.key is refused rather than silently replaced."""
        ca = CertificateAuthority(tmp_path / "pki")
        ca.load_or_create()
        ca.key_file.unlink()

        with pytest.raises(ConfigError, match="incomplete CA"):
            CertificateAuthority(tmp_path / "pki").load_or_create()

    def test_mismatched_ca_is_a_config_error(self, tmp_path):
        """A ca.key that does not belong to ca.crt is refused."""
        CertificateAuthority(tmp_path / "a").load_or_create()
        CertificateAuthority(tmp_path / "b").load_or_create()
        (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())

        with pytest.raises(ConfigError, match="does not match"):
            CertificateAuthority(tmp_path / "a").load_or_create()


class TestServerCertificate:
    def test_names_and_usage(self, tmp_path):
        """A server certificate carries 127.0.0.1 (IP) and localhost (DNS) with serverAuth."""
        ca = CertificateAuthority(tmp_path / "pki")
        pair = ca.issue_server(_pair(tmp_path, "broker"))

        cert = _load(pair.cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
        assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
        assert _mode(pair.key) == 0o600
        cert.verify_directly_issued_by(ca.certificate)

    @pytest.mark.parametrize("server_name", ["127.0.0.1", "localhost"])
    async def test_tls_handshake_verifies(self, tmp_path, server_name):
        """Python's ssl accepts the server certificate for both names, hostname checked."""
        ca = CertificateAuthority(tmp_path / "pki")
        pair = ca.issue_server(_pair(tmp_path, "api"))
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(pair.cert, pair.key)
        client_ctx = ssl.create_default_context(cafile=str(ca.cert_file))
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT

        async def handle(reader, writer):
            writer.write(await reader.readexactly(5))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=server_name
            )
            writer.write(b"hello")
            echoed = await reader.readexactly(5)
            peer_cn = writer.get_extra_info("peercert")["subject"][0][0][1]
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()

        assert echoed == b"hello"
        assert peer_cn == "127.0.0.1"

    def test_changed_hosts_reissue(self, tmp_path):
        """Asking for other host names replaces the certificate instead of reusing it."""
        ca = CertificateAuthority(tmp_path / "pki")
        pair = ca.issue_server(_pair(tmp_path, "relay"))
        before = pair.cert.read_bytes()

        ca.issue_server(pair, hosts=["127.0.0.1", "localhost", "::1"])

        san = _load(pair.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert pair.cert.read_bytes() != before
        assert ipaddress.ip_address("::1") in san.value.get_values_for_type(x509.IPAddress)

    def test_needs_a_host(self, tmp_path):
        """A server certificate without any host name is a programming error."""
        ca = CertificateAuthority(tmp_path / "pki")

        with pytest.raises(ValueError, match="at least one host"):
            ca.issue_server(_pair(tmp_path, "x"), hosts=[])


class TestClientCertificate:
    def test_common_name_is_thing_name(self, tmp_path):
        """A thing certificate has CN = thing name, clientAuth, and a 0600 key."""
        ca = CertificateAuthority(tmp_path / "pki")
        pair = ca.issue_client(_pair(tmp_path, "thing1"), common_name="thing1")

        cert = _load(pair.cert)
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert [a.value for a in cns] == ["thing1"]
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert _mode(pair.key) == 0o600
        cert.verify_directly_issued_by(ca.certificate)

    def test_reused_while_valid(self, tmp_path):
        """Issuing the same identity twice keeps the certificate and key bytes."""
        ca = CertificateAuthority(tmp_path / "pki")
        pair = ca.issue_client(_pair(tmp_path, "thing1"), common_name="thing1")
        before = (pair.cert.read_bytes(), pair.key.read_bytes())

        CertificateAuthority(tmp_path / "pki").issue_client(pair, common_name="thing1")

        assert (pair.cert.read_bytes(), pair.key.read_bytes()) == before

    def test_loosened_key_mode_is_repaired(self, tmp_path):
        """A reused key whose mode was loosened by hand is set back to 0600."""
        ca = CertificateAuthority(tmp_path / "pki")
        pair = ca.issue_client(_pair(tmp_path, "thing1"), common_name="thing1")
        pair.key.chmod(0o644)

        ca.issue_client(pair, common_name="thing1")

        assert _mode(pair.key) == 0o600

    def test_other_ca_or_name_reissues(self, tmp_path):
        """A certificate from another CA, or with another CN, is replaced on issue."""
        pair = CertificateAuthority(tmp_path / "old").issue_client(
            _pair(tmp_path, "thing1"), common_name="thing1"
        )
        ca = CertificateAuthority(tmp_path / "pki")

        ca.issue_client(pair, common_name="thing1")
        issued_by_new = _load(pair.cert)
        ca.issue_client(pair, common_name="thing2")
        renamed = _load(pair.cert)

        issued_by_new.verify_directly_issued_by(ca.certificate)
        assert renamed.subject.rfc4514_string() == "CN=thing2"

    def test_expiring_certificate_reissued(self, tmp_path):
        """A certificate expiring within the renewal margin is replaced."""
        ca = CertificateAuthority(tmp_path / "pki")
        pair = _pair(tmp_path, "thing1")
        ca.issue_client(pair, common_name="thing1")
        ca_key = serialization.load_pem_private_key(ca.key_file.read_bytes(), password=None)
        old = _load(pair.cert)
        now = dt.datetime.now(dt.UTC)
        short = (
            x509.CertificateBuilder(
                issuer_name=old.issuer,
                subject_name=old.subject,
                public_key=old.public_key(),
                serial_number=x509.random_serial_number(),
                not_valid_before=now - dt.timedelta(days=1),
                not_valid_after=now + dt.timedelta(days=1),
                extensions=list(old.extensions),
            ).sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        pair.cert.write_bytes(short.public_bytes(serialization.Encoding.PEM))

        ca.issue_client(pair, common_name="thing1")

        assert _load(pair.cert).not_valid_after_utc > now + dt.timedelta(days=300)

    def test_garbage_file_reissued(self, tmp_path):
        """An unreadable certificate file is replaced rather than crashing."""
        ca = CertificateAuthority(tmp_path / "pki")
        pair = _pair(tmp_path, "thing1")
        ca.issue_client(pair, common_name="thing1")
        pair.cert.write_text("not a certificate")

        ca.issue_client(pair, common_name="thing1")

        assert _load(pair.cert).subject.rfc4514_string() == "CN=thing1"

    def test_rsa_leaf(self, tmp_path):
        """key_type="rsa" issues an RSA leaf whose key usage allows key encipherment."""
        ca = CertificateAuthority(tmp_path / "pki")
        pair = ca.issue_client(_pair(tmp_path, "t"), common_name="t", key_type="rsa")

        cert = _load(pair.cert)
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert isinstance(cert.public_key(), rsa.RSAPublicKey)
        assert usage.key_encipherment is True


class TestNames:
    def test_privileged_identity_is_not_a_thing_name(self):
        """No thing can be named like the emulator's privileged MQTT identity."""
        assert THING_NAME.fullmatch(PRIVILEGED_IDENTITY) is None
        assert THING_NAME.fullmatch("thing-1:a_b") is not None
