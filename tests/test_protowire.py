"""The protobuf wire format primitives the decoders build on (pure)."""

from __future__ import annotations

import pytest

from builder.server.engines.protowire import (
    FIXED32,
    FIXED64,
    LENGTH,
    VARINT,
    WireError,
    field_bytes,
    field_varint,
    read_varint,
    skip,
    tag,
    varint,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32, 2**64 - 1])
def test_read_varint_reads_what_varint_writes(value: int) -> None:
    data = b"\xff" + varint(value) + b"\x01"
    assert read_varint(data, 1) == (value, len(data) - 1)


@pytest.mark.parametrize("data", [b"", b"\x80", b"\xff\xff", b"\xff" * 10 + b"\x01"])
def test_read_varint_rejects_truncated_and_overlong_varints(data: bytes) -> None:
    with pytest.raises(WireError):
        read_varint(data, 0)


def test_tag_is_the_key_on_the_wire() -> None:
    assert field_varint(4, 1)[:1] == bytes([tag(4, VARINT)])
    assert field_bytes(3, b"x")[:1] == bytes([tag(3, LENGTH)])


@pytest.mark.parametrize(
    ("wire_type", "value"),
    [
        (VARINT, varint(2**40)),
        (LENGTH, varint(3) + b"abc"),
        (FIXED64, bytes(8)),
        (FIXED32, bytes(4)),
    ],
)
def test_skip_steps_over_a_value_of_each_wire_type(wire_type: int, value: bytes) -> None:
    assert skip(value + b"next", 0, wire_type) == len(value)


def test_skip_refuses_groups() -> None:
    with pytest.raises(WireError):
        skip(b"\x00", 0, 3)
