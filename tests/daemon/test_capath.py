"""Tests for agent.daemon.capath: OpenSSL subject hashes and the hashed CA directory."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from agent.daemon.capath import (
    ca_directory_plan,
    hashed_ca_directory,
    needs_ca_directory,
    pem_certificates,
    subject_hash,
)
from agent.emulator.pki import CertificateAuthority, KeyPair
from agent.exceptions import ConfigError


OPENSSL = shutil.which("openssl")
SYSTEM_CERTS = Path("/etc/ssl/certs")
KEY = ec.generate_private_key(ec.SECP256R1())


def self_signed(name: x509.Name) -> bytes:
    """A self-signed certificate with this exact subject (encodings kept), as PEM."""
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(KEY, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def openssl_hash(pem: bytes) -> str:
    assert OPENSSL is not None
    result = subprocess.run(
        [OPENSSL, "x509", "-hash", "-noout"], input=pem, capture_output=True, check=True
    )
    return result.stdout.decode().strip()


def attr(oid: x509.ObjectIdentifier, value: str, kind: _ASN1Type | None = None):
    return x509.NameAttribute(oid, value) if kind is None else x509.NameAttribute(oid, value, kind)


NAMES = {
    "mixed case and spaces": x509.Name(
        [attr(NameOID.COMMON_NAME, "  My   Device\tCA  "), attr(NameOID.ORGANIZATION_NAME, "ACME")]
    ),
    "printable string": x509.Name(
        [
            attr(NameOID.COUNTRY_NAME, "DE", _ASN1Type.PrintableString),
            attr(NameOID.COMMON_NAME, "Root CA X1", _ASN1Type.PrintableString),
        ]
    ),
    "bmp string": x509.Name([attr(NameOID.COMMON_NAME, "Ünïcode Róot", _ASN1Type.BMPString)]),
    "universal string": x509.Name(
        [attr(NameOID.COMMON_NAME, "Wide CA \u00e9", _ASN1Type.UniversalString)]
    ),
    "ia5 and t61": x509.Name(
        [
            attr(NameOID.EMAIL_ADDRESS, "CA@Example.COM", _ASN1Type.IA5String),
            attr(NameOID.ORGANIZATIONAL_UNIT_NAME, "Ops Team", _ASN1Type.T61String),
        ]
    ),
    "non-ascii utf8": x509.Name([attr(NameOID.COMMON_NAME, "Zürich CA ÄÖÜ")]),
    "multi-valued rdn": x509.Name(
        [
            x509.RelativeDistinguishedName(
                [attr(NameOID.COMMON_NAME, "Zeta"), attr(NameOID.ORGANIZATION_NAME, "Alpha Org")]
            ),
            x509.RelativeDistinguishedName([attr(NameOID.COUNTRY_NAME, "US")]),
        ]
    ),
    # Lower-casing reorders this SET: "B" < "a" as given, "a" < "b" canonically.
    "multi-valued rdn, reordered": x509.Name(
        [
            x509.RelativeDistinguishedName(
                [attr(NameOID.COMMON_NAME, "B"), attr(NameOID.COMMON_NAME, "a")]
            )
        ]
    ),
    "numeric string (not canonicalised)": x509.Name(
        [
            attr(NameOID.SERIAL_NUMBER, "00 12", _ASN1Type.NumericString),
            attr(NameOID.COMMON_NAME, "Serial CA"),
        ]
    ),
    "long name": x509.Name([attr(NameOID.COMMON_NAME, "C" * 64)] * 3),
}


class TestSubjectHash:
    @pytest.mark.skipif(not SYSTEM_CERTS.is_dir(), reason="no /etc/ssl/certs")
    def test_matches_the_system_store(self):
        """Every <hash>.0 link in /etc/ssl/certs is named by the hash we compute."""
        links = sorted(SYSTEM_CERTS.glob("*.0"))
        if not links:
            pytest.skip("no hashed links in /etc/ssl/certs")
        computed = {
            link.name[:-2]: subject_hash(pem_certificates(link.read_bytes())[0]) for link in links
        }

        assert len(computed) > 10
        assert {name for name, value in computed.items() if name != value} == set()

    @pytest.mark.skipif(OPENSSL is None, reason="no openssl command")
    @pytest.mark.parametrize("name", NAMES.values(), ids=NAMES.keys())
    def test_matches_openssl(self, name):
        """Case, white space, string types, multi-valued RDNs: the hash equals OpenSSL's."""
        pem = self_signed(name)

        assert subject_hash(pem_certificates(pem)[0]) == openssl_hash(pem)

    def test_case_and_space_insensitive(self):
        """Names differing only in case and white space hash alike (OpenSSL's canonical form)."""
        one = self_signed(x509.Name([attr(NameOID.COMMON_NAME, "Device CA")]))
        two = self_signed(x509.Name([attr(NameOID.COMMON_NAME, "  device   ca ")]))
        other = self_signed(x509.Name([attr(NameOID.COMMON_NAME, "Device CB")]))

        hashes_ = [subject_hash(pem_certificates(pem)[0]) for pem in (one, two, other)]

        assert hashes_[0] == hashes_[1] != hashes_[2]

    @pytest.mark.parametrize(
        "der", [b"", b"\x30", b"\x02\x01\x00", b"\x30\x03\x30\x01", b"\x30\x82\xff\xff\x00"]
    )
    def test_not_a_certificate(self, der):
        """Truncated or foreign DER is a ConfigError, not an IndexError."""
        with pytest.raises(ConfigError):
            subject_hash(der)


def write_bundle(path: Path, *pems: bytes) -> Path:
    path.write_bytes(b"# a comment OpenSSL ignores\n" + b"\n".join(pems))
    return path


class TestDirectory:
    def test_files_named_by_hash(self, tmp_path):
        """Each certificate of the file is <hash>.<n>; equal subjects count up."""
        first = self_signed(x509.Name([attr(NameOID.COMMON_NAME, "Root A")]))
        second = self_signed(x509.Name([attr(NameOID.COMMON_NAME, "Root B")]))
        renewed = self_signed(x509.Name([attr(NameOID.COMMON_NAME, "root a")]))
        ca = write_bundle(tmp_path / "ca.pem", first, second, renewed)

        directory = hashed_ca_directory(ca, tmp_path / "run" / "ca")

        hash_a = openssl_hash(first) if OPENSSL else subject_hash(pem_certificates(first)[0])
        hash_b = subject_hash(pem_certificates(second)[0])
        assert sorted(p.name for p in directory.iterdir()) == sorted(
            [f"{hash_a}.0", f"{hash_a}.1", f"{hash_b}.0"]
        )
        assert pem_certificates((directory / f"{hash_a}.1").read_bytes()) == pem_certificates(
            renewed
        )
        assert directory.parent == tmp_path / "run" / "ca"
        assert directory.parent.stat().st_mode & 0o777 == 0o700
        assert [p.name for p in directory.parent.iterdir()] == [directory.name]

    def test_reused_for_same_content_new_for_new(self, tmp_path):
        """The same file gives the same directory; a changed file a new one, the old kept."""
        first_ca = self_signed(x509.Name([attr(NameOID.COMMON_NAME, "A")]))
        ca = write_bundle(tmp_path / "ca.pem", first_ca)
        parent = tmp_path / "ca"

        first = hashed_ca_directory(ca, parent)
        planned = ca_directory_plan(ca, parent)
        again = hashed_ca_directory(ca, parent)
        write_bundle(ca, self_signed(x509.Name([attr(NameOID.COMMON_NAME, "B")])))
        changed = hashed_ca_directory(ca, parent)

        assert first == again == planned
        assert changed != first
        assert first.is_dir()
        assert changed.is_dir()

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            (b"", "no PEM certificate"),
            (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no PEM certif"),
            (b"-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n", "not valid base64"),
            (b"-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n", "certificate"),
        ],
    )
    def test_unusable_file(self, tmp_path, content, message):
        """A file without a usable certificate is a ConfigError naming proxy.ca; nothing made."""
        ca = tmp_path / "ca.pem"
        ca.write_bytes(content)

        with pytest.raises(ConfigError, match=f"proxy.ca = '{ca}': .*{message}"):
            hashed_ca_directory(ca, tmp_path / "ca")
        assert not (tmp_path / "ca").exists()

    def test_missing_file(self, tmp_path):
        """A missing file is a ConfigError too."""
        with pytest.raises(ConfigError, match="cannot read"):
            ca_directory_plan(tmp_path / "nope.pem", tmp_path / "ca")

    def test_needs_directory(self, tmp_path):
        """Only an external binary with a CA *file* needs one."""
        ca = write_bundle(tmp_path / "ca.pem", b"x")
        binary = Path("/usr/bin/localproxy")

        assert needs_ca_directory(binary, ca) is True
        assert needs_ca_directory(binary, tmp_path) is False
        assert needs_ca_directory(binary, None) is False
        assert needs_ca_directory("bundled", ca) is False


def serve_tls_once(context: ssl.SSLContext) -> tuple[int, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello over verified TLS\n")
            except (ssl.SSLError, OSError):
                pass  # the client refused us: that is its test's business

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


class TestOpenSslAcceptsIt:
    @pytest.fixture
    def server(self, tmp_path):
        """A CA (the emulator's PKI), a server certificate for localhost signed by it."""
        ca = CertificateAuthority(tmp_path / "pki")
        ca.load_or_create()
        pair = ca.issue_server(
            KeyPair(tmp_path / "server.pem", tmp_path / "server.key"), hosts=["localhost"]
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert, pair.key)
        return ca.cert_file, context

    def connect(self, capath: Path, port: int) -> bytes:
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_verify_locations(capath=str(capath))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            return tls.recv(100)

    def test_verifies_with_the_directory(self, tmp_path, server):
        """A TLS client given only the directory (capath) verifies the server."""
        ca_file, context = server
        other = self_signed(x509.Name([attr(NameOID.COMMON_NAME, "Unrelated Root")]))
        bundle = write_bundle(tmp_path / "bundle.pem", other, ca_file.read_bytes())
        directory = hashed_ca_directory(bundle, tmp_path / "run" / "ca")
        port, thread = serve_tls_once(context)

        received = self.connect(directory, port)
        thread.join(5)

        assert received == b"hello over verified TLS\n"

    def test_fails_without_it(self, tmp_path, server):
        """The same client with a directory lacking the CA fails verification (the control)."""
        _, context = server
        other = self_signed(x509.Name([attr(NameOID.COMMON_NAME, "Unrelated Root")]))
        directory = hashed_ca_directory(write_bundle(tmp_path / "o.pem", other), tmp_path / "ca")
        port, thread = serve_tls_once(context)

        with pytest.raises(ssl.SSLCertVerificationError):
            self.connect(directory, port)
        thread.join(5)
