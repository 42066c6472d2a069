"""The protobuf wire format, the little of it BuildKit's messages need (pure).

Messages are written from their field numbers, not generated: a reader takes the
fields it knows and skips the rest, so newer engines that add fields keep working.
"""

from __future__ import annotations

from collections.abc import Iterator

VARINT = 0
FIXED64 = 1
LENGTH = 2
FIXED32 = 5


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    try:
        byte = data[pos]
    except IndexError:
        raise WireError("truncated varint") from None
    if byte < 0x80:
        return byte, pos + 1  # most keys and small values: one byte
    result = byte & 0x7F
    shift = 7
    while True:
        pos += 1
        try:
            byte = data[pos]
        except IndexError:
            raise WireError("truncated varint") from None
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos + 1
        shift += 7
        if shift >= 64:
            raise WireError("varint longer than 64 bits")


def tag(number: int, wire_type: int) -> int:
    """A field's key as it appears on the wire (read as a varint): decoders dispatch on it."""
    return number << 3 | wire_type


def skip(data: bytes | memoryview, pos: int, wire_type: int) -> int:
    """The position after a field's value: a field this reader does not know."""
    if wire_type == VARINT:
        return read_varint(data, pos)[1]
    if wire_type == LENGTH:
        length, pos = read_varint(data, pos)
        return pos + length
    if wire_type == FIXED64:
        return pos + 8
    if wire_type == FIXED32:
        return pos + 4
    raise WireError(f"unsupported wire type {wire_type}")


def fields(data: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field: an int, or the bytes of a LENGTH field."""
    view = memoryview(data)
    pos, end = 0, len(view)
    while pos < end:
        key, pos = read_varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            value, pos = read_varint(view, pos)
            yield number, wire_type, value
        elif wire_type == LENGTH:
            length, pos = read_varint(view, pos)
            if pos + length > end:
                raise WireError("length-delimited field runs past the message")
            yield number, wire_type, view[pos : pos + length]
            pos += length
        elif wire_type == FIXED64:
            if pos + 8 > end:
                raise WireError("truncated fixed64")
            yield number, wire_type, int.from_bytes(view[pos : pos + 8], "little")
            pos += 8
        elif wire_type == FIXED32:
            if pos + 4 > end:
                raise WireError("truncated fixed32")
            yield number, wire_type, int.from_bytes(view[pos : pos + 4], "little")
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire_type}")


def varint(value: int) -> bytes:
    """`value` (non-negative) as a varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_bytes(number: int, value: bytes) -> bytes:
    """A LENGTH field: strings, bytes and embedded messages."""
    return varint(number << 3 | LENGTH) + varint(len(value)) + value


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3 | VARINT) + varint(value)


def last_bytes(data: bytes | memoryview, number: int) -> bytes:
    """The LENGTH field `number` (a string or bytes), b"" when absent; as proto3 wants, the last one wins."""
    found = b""
    for field_number, wire_type, value in fields(data):
        if field_number == number and wire_type == LENGTH:
            assert isinstance(value, memoryview)
            found = bytes(value)
    return found
