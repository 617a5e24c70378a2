"""PROXY protocol version 2 headers: tell a backend who called, before the caller's first byte.

The layout follows HAProxy's ``proxy-protocol.txt`` (section 2.2). Besides the caller's address,
the header carries the TLS facts of the session as the standard ``PP2_TYPE_SSL`` TLV and sub-TLVs
(version, cipher, subject CN), and two TLVs of the range reserved for private use (0xE0-0xEF):
the caller's SPIFFE ID and its certificate serial. Backends that do not know those types skip
them, as the specification requires. Pure: bytes out, no I/O.
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_COMMAND_PROXY = 0x21  # version 2, command PROXY
VERSION_COMMAND_LOCAL = 0x20

AF_UNSPEC = 0x00
TCP_OVER_IPV4 = 0x11
TCP_OVER_IPV6 = 0x21

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

# Private-use types (0xE0-0xEF): ours.
PP2_TYPE_S2SGW_SPIFFE_ID = 0xE0  # the caller's SPIFFE ID, UTF-8
PP2_TYPE_S2SGW_SERIAL = 0xE1  # the caller's certificate serial, lowercase hex ASCII

_MAX_TLV_VALUE = 0xFFFF


@attrs.frozen
class CallerInfo:
    """What the backend learns about one admitted connection."""

    source: tuple[str, int] | None  # the caller's (peer gateway's) TCP address
    destination: tuple[str, int] | None  # our listening address the caller reached
    tls_version: str = ""  # e.g. "TLSv1.3"
    cipher: str = ""  # e.g. "TLS_AES_256_GCM_SHA384"
    spiffe_id: str = ""
    serial: int | None = None
    common_name: str = ""  # subject CN of the caller's certificate, if any
    unique_id: bytes = b""  # PP2_TYPE_UNIQUE_ID (at most 128 bytes), if wanted


def tlv(kind: int, value: bytes) -> bytes:
    """One type-length-value record."""
    if len(value) > _MAX_TLV_VALUE:
        raise ValueError(f"TLV 0x{kind:02x} value of {len(value)} bytes is too long")
    return struct.pack("!BH", kind, len(value)) + value


def _ssl_tlv(info: CallerInfo) -> bytes:
    subs = b""
    if info.tls_version:
        subs += tlv(PP2_SUBTYPE_SSL_VERSION, info.tls_version.encode("ascii", "replace"))
    if info.common_name:
        subs += tlv(PP2_SUBTYPE_SSL_CN, info.common_name.encode("utf-8"))
    if info.cipher:
        subs += tlv(PP2_SUBTYPE_SSL_CIPHER, info.cipher.encode("ascii", "replace"))
    client = PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
    verify = 0  # 0: the client certificate was verified (chain, identity, status)
    return tlv(PP2_TYPE_SSL, struct.pack("!BI", client, verify) + subs)


def _addresses(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> tuple[int, bytes]:
    if source is None or destination is None:
        return AF_UNSPEC, b""
    try:
        src = ipaddress.ip_address(source[0].split("%", 1)[0])
        dst = ipaddress.ip_address(destination[0].split("%", 1)[0])
    except ValueError:
        return AF_UNSPEC, b""
    ports = struct.pack("!HH", source[1], destination[1])
    if src.version == dst.version == 4:
        return TCP_OVER_IPV4, src.packed + dst.packed + ports
    # Mixed families: express both as IPv6 (IPv4-mapped), as a dual-stack socket would.
    src6 = src if src.version == 6 else ipaddress.IPv6Address(f"::ffff:{src}")
    dst6 = dst if dst.version == 6 else ipaddress.IPv6Address(f"::ffff:{dst}")
    return TCP_OVER_IPV6, src6.packed + dst6.packed + ports


def encode_v2(info: CallerInfo) -> bytes:
    """The complete PROXY v2 header (command PROXY) for ``info``.

    Without usable TCP addresses (a unix listener) the family is AF_UNSPEC: the receiver keeps
    its own idea of the addresses but still reads the TLVs.
    """
    family, addresses = _addresses(info.source, info.destination)
    tlvs = _ssl_tlv(info)
    if info.spiffe_id:
        tlvs += tlv(PP2_TYPE_S2SGW_SPIFFE_ID, info.spiffe_id.encode("utf-8"))
    if info.serial is not None:
        tlvs += tlv(PP2_TYPE_S2SGW_SERIAL, f"{info.serial:x}".encode("ascii"))
    if info.unique_id:
        if len(info.unique_id) > 128:
            raise ValueError("PP2_TYPE_UNIQUE_ID is at most 128 bytes")
        tlvs += tlv(PP2_TYPE_UNIQUE_ID, info.unique_id)
    body = addresses + tlvs
    if len(body) > _MAX_TLV_VALUE:
        raise ValueError("PROXY v2 header too long")
    return SIGNATURE + struct.pack("!BBH", VERSION_COMMAND_PROXY, family, len(body)) + body
