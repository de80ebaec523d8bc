"""Tests for agent.daemon.credentials: certificates and keys parsed with the stdlib only."""

from __future__ import annotations

import datetime as dt

import pytest

from agent.daemon.credentials import (
    certificate_dates,
    certificate_problems,
    date_problems,
    key_problems,
)
from tests.certs import DAY, certificate, new_key, write_certificate, write_credentials, write_key


NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def der(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.DER)


class TestDates:
    @pytest.mark.parametrize(
        ("not_before", "not_after"),
        [
            # UTCTime (years before 2050), both sides of the 1950/2049 pivot.
            (dt.datetime(1999, 12, 31, 23, 59, 58, tzinfo=dt.UTC), NOW + DAY),
            (NOW - DAY, dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)),
            # GeneralizedTime (2050 and later).
            (NOW - DAY, dt.datetime(2051, 6, 1, 12, 0, 0, tzinfo=dt.UTC)),
        ],
    )
    def test_reads_the_validity(self, not_before, not_after):
        """The DER reader returns what cryptography wrote, for both time encodings."""
        cert = certificate(new_key(), name="d", not_before=not_before, not_after=not_after)

        assert certificate_dates(der(cert)) == (not_before, not_after)
        assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (not_before, not_after)

    def test_an_rsa_ca_certificate(self):
        """A certificate with a longer encoding (RSA key, long-form lengths) reads the same."""
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(65537, 2048)
        cert = certificate(key, name="Root", not_before=NOW - DAY, not_after=NOW + 9 * DAY)

        assert certificate_dates(der(cert)) == (NOW - DAY, NOW + 9 * DAY)

    @pytest.mark.parametrize("cut", [0, 1, 3, 40, -1])
    def test_truncated(self, cut):
        """A truncated or emptied certificate is a ValueError, never an IndexError."""
        data = der(certificate(new_key(), name="d"))

        with pytest.raises(ValueError):
            certificate_dates(data[:cut])


class TestCertificate:
    def test_good(self, tmp_path):
        """A PEM certificate within its period has no problem."""
        files = write_credentials(tmp_path)

        assert certificate_problems("mqtt.cert", files.cert) == []
        assert date_problems("mqtt.cert", files.cert, NOW) == []

    @pytest.mark.parametrize(
        ("content", "why"),
        [
            (b"", "empty file, expected a PEM certificate"),
            (b"\n  \n", "empty file, expected a PEM certificate"),
            (b"certificate\n", "no PEM certificate (-----BEGIN CERTIFICATE-----) in the file"),
            (
                b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
                "not a valid PEM certificate (damaged or truncated)",
            ),
            (
                b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
                "not a valid PEM certificate (damaged or truncated)",
            ),
        ],
    )
    def test_bad_pem(self, tmp_path, content, why):
        """Empty, text and damaged files each give their own reason."""
        path = tmp_path / "cert.pem"
        path.write_bytes(content)

        assert certificate_problems("mqtt.cert", path) == [f"mqtt.cert = '{path}': {why}"]
        assert date_problems("mqtt.cert", path, NOW) == []

    def test_truncated_pem(self, tmp_path):
        """A real certificate with lines cut out of its middle is damaged."""
        files = write_credentials(tmp_path)
        lines = files.cert.read_bytes().splitlines()
        files.cert.write_bytes(b"\n".join([*lines[:3], lines[-1]]) + b"\n")

        assert certificate_problems("mqtt.cert", files.cert) == [
            f"mqtt.cert = '{files.cert}': not a valid PEM certificate (damaged or truncated)"
        ]

    def test_expired(self, tmp_path):
        """An expired certificate says when it expired."""
        files = write_credentials(tmp_path, not_before=NOW - 9 * DAY, not_after=NOW - DAY)

        assert date_problems("mqtt.cert", files.cert, NOW) == [
            f"mqtt.cert = '{files.cert}': certificate expired on {NOW - DAY:%Y-%m-%d %H:%M} UTC"
        ]
        assert date_problems("mqtt.cert", files.cert, NOW - 2 * DAY) == []

    def test_not_yet_valid(self, tmp_path):
        """A certificate from the future points at the clock."""
        files = write_credentials(tmp_path, not_before=NOW + DAY, not_after=NOW + 9 * DAY)

        assert date_problems("mqtt.cert", files.cert, NOW) == [
            (
                f"mqtt.cert = '{files.cert}': certificate not valid before "
                f"{NOW + DAY:%Y-%m-%d %H:%M} UTC (is the clock right?)"
            )
        ]


class TestCaBundle:
    def test_one_expired_root_among_current_ones(self, tmp_path):
        """A bundle keeping an expired root beside a current one is fine."""
        old = certificate(new_key(), name="Old", not_before=NOW - 9 * DAY, not_after=NOW - DAY)
        current = certificate(new_key(), name="Current")
        path = tmp_path / "ca.pem"
        write_certificate(path, old)
        path.write_bytes(path.read_bytes() + der_to_pem(current))

        assert certificate_problems("mqtt.ca", path) == []
        assert date_problems("mqtt.ca", path, NOW, bundle=True) == []

    def test_every_root_expired(self, tmp_path):
        """A bundle of expired roots only is reported, counting the others."""
        old = [
            certificate(new_key(), name=f"Old {n}", not_before=NOW - 9 * DAY, not_after=NOW - DAY)
            for n in range(3)
        ]
        path = tmp_path / "ca.pem"
        path.write_bytes(b"".join(der_to_pem(c) for c in old))

        assert date_problems("mqtt.ca", path, NOW, bundle=True) == [
            (
                f"mqtt.ca = '{path}': certificate expired on {NOW - DAY:%Y-%m-%d %H:%M} UTC "
                "(as are the 2 others)"
            )
        ]


def der_to_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


class TestKey:
    def test_matching_key(self, tmp_path):
        """The certificate's own key has no problem."""
        files = write_credentials(tmp_path)

        assert key_problems("mqtt.key", files.key, "mqtt.cert", files.cert) == []

    def test_another_key(self, tmp_path):
        """A key of the same type that is not the certificate's is named as such."""
        files = write_credentials(tmp_path)
        write_key(files.key)

        assert key_problems("mqtt.key", files.key, "mqtt.cert", files.cert) == [
            (
                f"mqtt.key = '{files.key}': does not belong to the certificate "
                f"mqtt.cert = '{files.cert}'"
            )
        ]

    def test_key_of_another_type(self, tmp_path):
        """An RSA key for an EC certificate does not belong to it either."""
        from cryptography.hazmat.primitives.asymmetric import rsa

        files = write_credentials(tmp_path)
        write_key(files.key, rsa.generate_private_key(65537, 2048))

        assert key_problems("mqtt.key", files.key, "mqtt.cert", files.cert) == [
            (
                f"mqtt.key = '{files.key}': does not belong to the certificate "
                f"mqtt.cert = '{files.cert}'"
            )
        ]

    def test_encrypted_key(self, tmp_path):
        """A passphrase-protected key is refused without prompting on the terminal."""
        files = write_credentials(tmp_path)
        key = new_key()
        write_certificate(files.cert, certificate(key, name="dev-1"))
        write_key(files.key, key, password=b"secret")

        assert key_problems("mqtt.key", files.key, "mqtt.cert", files.cert) == [
            (
                f"mqtt.key = '{files.key}': encrypted with a passphrase; the agent needs an "
                "unencrypted key"
            )
        ]

    @pytest.mark.parametrize(
        ("content", "why"),
        [
            (b"", "empty file, expected a PEM private key"),
            (b"key\n", "no PEM private key (-----BEGIN ... PRIVATE KEY-----) in the file"),
            (
                b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "not a valid PEM private key (damaged or truncated)",
            ),
        ],
    )
    def test_bad_pem(self, tmp_path, content, why):
        """Empty, text and damaged key files each give their own reason."""
        files = write_credentials(tmp_path)
        files.key.write_bytes(content)

        assert key_problems("mqtt.key", files.key, "mqtt.cert", files.cert) == [
            f"mqtt.key = '{files.key}': {why}"
        ]

    def test_without_a_usable_certificate(self, tmp_path):
        """Without a certificate to compare with, only the PEM shape is checked."""
        files = write_credentials(tmp_path)

        assert key_problems("mqtt.key", files.key, "mqtt.cert", None) == []
