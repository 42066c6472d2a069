"""Tar headers: read in every dialect an upload may use, written in one canonical form.

Read: ustar, pax, v7, GNU and star headers, their checksum verified (unsigned or signed sum,
as tar and Go accept), numbers in octal or GNU base-256, and pax extended records. The rules
follow Go's archive/tar, the engine's own reader: a field is octal digits padded with spaces
or NULs and nothing else, the prefix field counts only under the POSIX magic.

Written: ustar only, uid/gid 0 and no user or group names, preceded by a pax `x` header when
a name, link target or size does not fit.
"""

from __future__ import annotations

import dataclasses
import zlib

from builder.server.errors import InvalidContext

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
_NOT_A_TAR = "build context is not a readable tar archive"
_POSIX_MAGIC = b"ustar\x00"
_STAR_TRAILER = b"tar\x00"
_MAX_OCTAL_11 = 8**11 - 1  # size and mtime fields: 11 octal digits
_NAME_FIELD = 100
_PAX_NAME = b"././@PaxHeader"
# Records in one pax header: real ones have a handful (times, ids, names, a few xattrs); a
# 1 MiB header of tiny records would cost 0.16 s of parsing, for each of thousands of entries.
_MAX_PAX_RECORDS = 1024


@dataclasses.dataclass(slots=True)
class Header:
    typeflag: bytes  # one byte
    name: bytes  # with the ustar prefix, if any
    linkname: bytes
    size: int
    mode: int
    mtime: int


def read_header(block: bytes, offset: int) -> Header:
    """A non-zero 512-byte header block at `offset` in the tar stream."""
    stored = _number(block[148:156], offset)
    unsigned = _byte_sum(block) - sum(block[148:156]) + 8 * 0x20
    if stored != unsigned and stored != unsigned - 256 * _high_bytes(block):
        raise InvalidContext(f"{_NOT_A_TAR}: header checksum mismatch at byte {offset}")
    name = _string(block[0:100])
    if block[257:263] == _POSIX_MAGIC:
        # GNU headers keep times and sparse maps where ustar has its prefix; star a shorter prefix.
        prefix = _string(block[345:476] if block[508:512] == _STAR_TRAILER else block[345:500])
        if prefix:
            name = prefix + b"/" + name
    size = _number(block[124:136], offset)
    if size < 0:
        raise InvalidContext(f"{_NOT_A_TAR}: a negative size in the header at byte {offset}")
    return Header(
        typeflag=block[156:157],
        name=name,
        linkname=_string(block[157:257]),
        size=size,
        mode=_number(block[100:108], offset),
        mtime=_number(block[136:148], offset),
    )


def _byte_sum(block: bytes | bytearray) -> int:
    """sum(block) for a 512-byte block, ten times faster: the low half of Adler-32 is 1 + the
    byte sum modulo 65521, exact for 256 bytes (at most 65280)."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def _high_bytes(block: bytes) -> int:
    """Bytes >= 0x80 outside the checksum field: what tells the signed sum from the unsigned one."""
    return sum(1 for byte in block[:148] + block[156:] if byte >= 0x80)


def _string(field: bytes) -> bytes:
    end = field.find(b"\x00")
    return field if end < 0 else field[:end]


def _number(field: bytes, offset: int) -> int:
    if field[0] & 0x80:
        # GNU base-256: big-endian two's complement below the marker bit; 0x40 is the sign.
        first = field[0] & 0x7F
        return int.from_bytes(bytes([first | 0x80 if first & 0x40 else first]) + field[1:], "big", signed=True)
    digits = field.strip(b" \x00")
    # Octal digits only: int() would also take signs, inner spaces and underscores.
    if not digits.translate(None, b"01234567"):
        return int(digits, 8) if digits else 0
    raise InvalidContext(f"{_NOT_A_TAR}: a malformed number in the header at byte {offset}")


def read_pax(data: bytes, offset: int) -> dict[bytes, bytes]:
    """`<length> <key>=<value>\\n` records; a later record of a key wins, as in Go and tar."""
    records: dict[bytes, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        space = data.find(b" ", pos, pos + 21)
        length = data[pos:space]
        stop = pos + int(length) if space > pos and length.isdigit() else -1
        equals = data.find(b"=", space + 1, stop - 1) if space + 1 < stop <= end else -1
        if equals <= space + 1 or data[stop - 1] != 0x0A:
            raise InvalidContext(f"{_NOT_A_TAR}: a malformed pax record in the header at byte {offset}")
        records[data[space + 1 : equals]] = data[equals + 1 : stop - 1]
        pos = stop
        if len(records) > _MAX_PAX_RECORDS:
            raise InvalidContext(
                f"build context has a pax header of more than {_MAX_PAX_RECORDS} records at byte {offset}"
            )
    return records


def write_header(typeflag: bytes, name: bytes, linkname: bytes, size: int, mode: int, mtime: int) -> bytes:
    """The header of one entry as we emit it: ustar, after a pax header for what does not fit."""
    records = []
    if len(name) > _NAME_FIELD:
        records.append(_pax_record(b"path", name))
    if len(linkname) > _NAME_FIELD:
        records.append(_pax_record(b"linkpath", linkname))
    if size > _MAX_OCTAL_11:
        records.append(_pax_record(b"size", b"%d" % size))
    header = _ustar(typeflag, name, linkname, 0 if size > _MAX_OCTAL_11 else size, mode, mtime)
    if not records:
        return header
    pax = b"".join(records)
    return _ustar(b"x", _PAX_NAME, b"", len(pax), 0o644, 0) + pax + ZERO_BLOCK[: -len(pax) % BLOCK] + header


def _pax_record(key: bytes, value: bytes) -> bytes:
    payload = b" %b=%b\n" % (key, value)
    # The length counts its own digits.
    length = len(payload) + 1
    while len(b"%d" % length) + len(payload) != length:
        length = len(b"%d" % length) + len(payload)
    return b"%d%b" % (length, payload)


def _template() -> bytes:
    block = bytearray(BLOCK)
    block[108:124] = b"0000000\x000000000\x00"  # uid, gid
    block[148:156] = b" " * 8  # the checksum counts its own field as spaces
    block[257:265] = _POSIX_MAGIC + b"00"
    block[329:345] = b"0000000\x000000000\x00"  # device major, minor
    return bytes(block)


_TEMPLATE = _template()


def _ustar(typeflag: bytes, name: bytes, linkname: bytes, size: int, mode: int, mtime: int) -> bytes:
    block = bytearray(_TEMPLATE)
    name, linkname = name[:_NAME_FIELD], linkname[:_NAME_FIELD]
    block[0 : len(name)] = name
    block[100:108] = b"%07o\x00" % mode
    block[124:136] = b"%011o\x00" % size
    block[136:148] = b"%011o\x00" % min(max(mtime, 0), _MAX_OCTAL_11)
    block[156:157] = typeflag
    block[157 : 157 + len(linkname)] = linkname
    block[148:156] = b"%06o\x00 " % _byte_sum(block)
    return bytes(block)
