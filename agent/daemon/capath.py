"""
A hashed CA directory for proxies that take only one (the AWS C++ localproxy's ``-c``).

OpenSSL looks a directory's CAs up by file name: ``<subject hash>.<n>``, the hash being
the first four bytes (little-endian) of the SHA-1 of the subject name in OpenSSL's
canonical form: every string value re-encoded as UTF8String, ASCII lower-cased, outer
white space removed and inner runs of it collapsed to one space, the relative names
DER-encoded one after another without the outer SEQUENCE. ``c_rehash`` and ``openssl
rehash`` compute it; neither is a dependency of the agent, hence this small DER reader.

The directory is named after the CA file's content and never changed once made, so a
proxy started from it keeps a consistent view even when the file is later replaced.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent.exceptions import ConfigError


if TYPE_CHECKING:
    from collections.abc import Iterator


__all__ = [
    "ca_directory_plan",
    "hashed_ca_directory",
    "needs_ca_directory",
    "pem_certificates",
    "subject_hash",
]

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(?P<body>.*?)-----END CERTIFICATE-----", re.DOTALL)
_SEQUENCE, _SET, _UTF8_STRING = 0x30, 0x31, 0x0C
_CONTEXT_0 = 0xA0  # tbsCertificate's explicit version
# String types OpenSSL canonicalises, with how their bytes become characters.
_CANON: dict[int, str] = {
    0x0C: "utf-8",  # UTF8String
    0x13: "latin-1",  # PrintableString
    0x14: "latin-1",  # T61String (OpenSSL reads it one byte per character)
    0x16: "latin-1",  # IA5String
    0x1A: "latin-1",  # VisibleString
    0x1C: "ucs-4",  # UniversalString
    0x1E: "ucs-2",  # BMPString
}
_SPACE = frozenset(b" \t\n\v\f\r")
_DIGEST_LENGTH = 16


def needs_ca_directory(binary: Literal["bundled"] | Path, ca: Path | None) -> bool:
    """
    Whether the agent must turn ``proxy.ca`` into a hashed directory for the binary.

    Args:
        binary: ``proxy.binary``: only an external binary needs one.
        ca: ``proxy.ca``: a file needs converting, a directory is passed as it is.

    Returns:
        True for an external binary configured with a CA file.
    """
    return isinstance(binary, Path) and ca is not None and not ca.is_dir()


def _tlv(data: bytes, offset: int) -> tuple[int, int, int]:
    """
    Read one DER element at ``offset``: (tag byte, content start, content end).
    """
    try:
        tag = data[offset]
        position = offset + 1
        if tag & 0x1F == 0x1F:  # high tag number: continuation bytes
            while data[position] & 0x80:
                position += 1
            position += 1
        first = data[position]
        position += 1
        if first < 0x80:
            length = first
        elif first == 0x80 or first > 0x84:
            raise ConfigError("not DER: indefinite or oversized length")
        else:
            count = first & 0x7F
            length = int.from_bytes(data[position : position + count], "big")
            position += count
    except IndexError:
        raise ConfigError("not DER: truncated element") from None
    end = position + length
    if end > len(data):
        raise ConfigError("not DER: element runs past its container")
    return tag, position, end


def _children(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """
    Yield (tag, element start, content start, content end) of each element in a range.
    """
    offset = start
    while offset < end:
        tag, content, stop = _tlv(data, offset)
        if stop > end:
            raise ConfigError("not DER: element runs past its container")
        yield tag, offset, content, stop
        offset = stop


def _encode(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = (length.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + length.to_bytes(size, "big") + content


def _code_points(raw: bytes, width: int) -> str:
    if len(raw) % width:
        raise ValueError("truncated character")
    units = (raw[i : i + width] for i in range(0, len(raw), width))
    return "".join(chr(int.from_bytes(unit, "big")) for unit in units)


def _text(tag: int, raw: bytes) -> str:
    encoding = _CANON[tag]
    try:
        # OpenSSL reads BMPString and UniversalString as plain code points (no surrogate pairing).
        if encoding == "ucs-2":
            return _code_points(raw, 2)
        if encoding == "ucs-4":
            return _code_points(raw, 4)
        return raw.decode(encoding)
    except (UnicodeDecodeError, ValueError):
        raise ConfigError("a subject name holds an invalid string") from None


def _canonical_value(tag: int, raw: bytes) -> bytes:
    text = _text(tag, raw).encode("utf-8", "surrogatepass")
    out = bytearray()
    pending_space = False
    for byte in text.strip(bytes(_SPACE)):
        if byte in _SPACE:
            pending_space = True
            continue
        if pending_space:
            out.append(0x20)
            pending_space = False
        out.append(byte + 32 if 0x41 <= byte <= 0x5A else byte)
    return _encode(_UTF8_STRING, bytes(out))


def _canonical_name(data: bytes, start: int, end: int) -> bytes:
    encoded = bytearray()
    for rdn_tag, _, rdn_start, rdn_end in _children(data, start, end):
        if rdn_tag != _SET:
            raise ConfigError("not a certificate: malformed subject name")
        attributes = []
        for atv_tag, _, atv_start, atv_end in _children(data, rdn_start, rdn_end):
            parts = list(_children(data, atv_start, atv_end))
            if atv_tag != _SEQUENCE or len(parts) != 2:
                raise ConfigError("not a certificate: malformed subject attribute")
            (_, oid_at, _, oid_end), (value_tag, value_at, value_start, value_end) = parts
            value = (
                _canonical_value(value_tag, data[value_start:value_end])
                if value_tag in _CANON
                else data[value_at:value_end]
            )
            attributes.append(_encode(_SEQUENCE, data[oid_at:oid_end] + value))
        # DER orders the members of a SET OF by their encodings.
        encoded += _encode(_SET, b"".join(sorted(attributes)))
    return bytes(encoded)


def subject_hash(certificate: bytes) -> str:
    """
    Compute OpenSSL's subject name hash of a DER certificate (``openssl x509 -hash``).

    Args:
        certificate: One DER-encoded X.509 certificate.

    Returns:
        Eight lower-case hexadecimal digits.

    Raises:
        ConfigError: The bytes are not a certificate.
    """
    tag, start, end = _tlv(certificate, 0)
    if tag != _SEQUENCE:
        raise ConfigError("not a certificate")
    tbs_tag, _, tbs_start, tbs_end = next(_children(certificate, start, end), (0, 0, 0, 0))
    if tbs_tag != _SEQUENCE:
        raise ConfigError("not a certificate")
    fields = list(_children(certificate, tbs_start, tbs_end))
    if fields and fields[0][0] == _CONTEXT_0:
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject
    if len(fields) < 5 or fields[4][0] != _SEQUENCE:
        raise ConfigError("not a certificate: no subject name")
    _, _, name_start, name_end = fields[4]
    digest = hashlib.sha1(_canonical_name(certificate, name_start, name_end)).digest()  # noqa: S324 - OpenSSL's name hash, not a security use
    return f"{int.from_bytes(digest[:4], 'little'):08x}"


def pem_certificates(data: bytes) -> list[bytes]:
    """
    Extract the DER certificates of a PEM file, in order.

    Args:
        data: The file's content.

    Returns:
        One DER certificate per ``BEGIN CERTIFICATE`` block (none if there is none).

    Raises:
        ConfigError: A block is not valid base64.
    """
    certificates = []
    for match in _PEM.finditer(data):
        try:
            certificates.append(base64.b64decode(b"".join(match["body"].split()), validate=True))
        except binascii.Error:
            raise ConfigError("a PEM certificate block is not valid base64") from None
    return certificates


def _pem(certificate: bytes) -> bytes:
    body = base64.encodebytes(certificate).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"


def _read(ca_file: Path) -> tuple[bytes, list[bytes], list[str]]:
    """
    Read a CA file: its bytes, its DER certificates and their subject hashes.
    """
    try:
        data = ca_file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"proxy.ca = '{ca_file}': cannot read ({exc.strerror})") from None
    try:
        certificates = pem_certificates(data)
        names = [subject_hash(certificate) for certificate in certificates]
    except ConfigError as exc:
        raise ConfigError(f"proxy.ca = '{ca_file}': {exc}") from None
    if not certificates:
        raise ConfigError(f"proxy.ca = '{ca_file}': no PEM certificate in the file")
    return data, certificates, names


def _directory(parent: Path, data: bytes) -> Path:
    return parent / hashlib.sha256(data).hexdigest()[:_DIGEST_LENGTH]


def ca_directory_plan(ca_file: Path, parent: Path) -> Path:
    """
    Check a CA file as :func:`hashed_ca_directory` would, without making anything.

    Args:
        ca_file: The PEM file (``proxy.ca``).
        parent: Where the directory would be made.

    Returns:
        The directory :func:`hashed_ca_directory` would return.

    Raises:
        ConfigError: The file cannot be read or holds no valid certificate.
    """
    data, _, _ = _read(ca_file)
    return _directory(parent, data)


def hashed_ca_directory(ca_file: Path, parent: Path) -> Path:
    """
    Make (or reuse) the hashed CA directory for a PEM file of one or more CA certificates.

    Each certificate becomes ``<subject hash>.<n>`` (``n`` counting certificates that share
    a hash, as ``c_rehash`` does) in ``parent/<content digest>/``. The directory appears
    whole (built aside, then renamed), so a concurrent reader never sees it half made.

    Args:
        ca_file: The PEM file (``proxy.ca``).
        parent: Where such directories live (``<runtime dir>/ca``); created 0700 if missing.

    Returns:
        The directory to pass as ``-c``.

    Raises:
        ConfigError: The file cannot be read or holds no valid certificate.
        OSError: ``parent`` cannot be written.
    """
    data, certificates, names = _read(ca_file)
    directory = _directory(parent, data)
    if directory.is_dir():
        return directory
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=parent, prefix=".building-"))
    try:
        seen: dict[str, int] = {}
        for name, certificate in zip(names, certificates, strict=True):
            index = seen[name] = seen.get(name, -1) + 1
            (building / f"{name}.{index}").write_bytes(_pem(certificate))
        try:
            building.rename(directory)
        except OSError:
            # Another agent process made the same directory first: theirs is identical.
            if not directory.is_dir():
                raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(building)
    return directory
