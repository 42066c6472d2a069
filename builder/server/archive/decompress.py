"""An upload's tar stream, whatever its compression: known by magic bytes, as the engine does.

Every stream of the upload is read, one after the other, as the engine's readers do: all
gzip members, all bzip2 and xz streams, all zstd frames (skippable ones dropped). After
the last stream only zero bytes may follow (tape padding); anything else is refused, so
that no part of an upload goes unread. Output comes in pieces of at most `STEP` bytes:
a small bomb never inflates in one call.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from typing import Protocol

import zstandard

from builder.server.errors import InvalidContext

STEP = 1 << 20  # most bytes of output per pull()
# Most compressed bytes handed to a decompressor at once. zlib hands back what it could not
# take as a new bytes object, so bigger slices would be copied over and over by a bomb (at
# most 1/4 of its output here); smaller ones cost gzip -1 throughput (0.84 of zlib at 64 KiB).
_SLICE = 256 << 10
# Memory a stream may ask for (xz dictionary, zstd window): the zstd CLI's own default limit.
_MAX_WINDOW = 1 << 27
_MAGIC_BYTES = 6  # enough to tell every format apart
# Streams in one upload: each costs a few microseconds to set up, so a 2 GiB upload of empty
# 9-byte zstd frames would cost an hour. Tools that cut their output into streams (pbzip2,
# pzstd, bgzip) make one per 64 KiB at the least: a million is a 64 GiB archive.
_MAX_STREAMS = 1 << 20

_GZIP = b"\x1f\x8b\x08"
_BZIP2 = b"BZh"
_XZ = b"\xfd7zXZ\x00"
_ZSTD = b"\x28\xb5\x2f\xfd"
_ZSTD_SKIPPABLE = b"\x2a\x4d\x18"  # bytes 1-3 of a skippable frame; byte 0 is 0x50-0x5f
_CODEC_ERRORS = (zlib.error, OSError, EOFError, lzma.LZMAError, zstandard.ZstdError)


class _Codec(Protocol):
    """One compressed stream: a gzip member, a bzip2 or xz stream, a zstd frame."""

    @property
    def eof(self) -> bool: ...

    @property
    def pending(self) -> bool:
        """It has output to give before it needs more input."""

    @property
    def unused(self) -> int:
        """After eof: how many of the bytes it was given lie past the end of the stream."""

    def decompress(self, data: memoryview) -> bytes:
        """At most STEP bytes; `data` is empty when `pending`."""


class _Zlib:
    def __init__(self) -> None:
        self._inner = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip wrapper only
        self.pending = False

    @property
    def eof(self) -> bool:
        return self._inner.eof

    @property
    def unused(self) -> int:
        return len(self._inner.unused_data)

    def decompress(self, data: memoryview) -> bytes:
        # zlib keeps no input: what it could not take comes back in unconsumed_tail.
        out = self._inner.decompress(data or self._inner.unconsumed_tail, STEP)
        self.pending = not self._inner.eof and (bool(self._inner.unconsumed_tail) or len(out) == STEP)
        return out


class _Buffering:
    """bz2 and lzma keep the input they could not take yet inside."""

    def __init__(self, inner: bz2.BZ2Decompressor | lzma.LZMADecompressor) -> None:
        self._inner = inner

    @property
    def eof(self) -> bool:
        return self._inner.eof

    @property
    def pending(self) -> bool:
        return not self._inner.eof and not self._inner.needs_input

    @property
    def unused(self) -> int:
        return len(self._inner.unused_data)

    def decompress(self, data: memoryview) -> bytes:
        return self._inner.decompress(data, STEP)


class _ZstdFrame:
    """One zstd frame. python-zstandard's decompressobj has no output bound, but one block
    inflates to at most 128 KiB: so the frame is handed on a block at a time, cut where its
    own block headers say. A skippable frame is read over and dropped."""

    def __init__(self, head: bytes, decompressor: zstandard.ZstdDecompressor) -> None:
        self._skippable = head[:4] != _ZSTD
        self._inner = decompressor.decompressobj()
        self._held = memoryview(b"")  # given, not handed on yet
        self._head = bytearray()  # the frame or block header being read
        self._need = 8 if self._skippable else 5  # magic and size, or magic and frame descriptor
        self._body = 0  # bytes of block, checksum or skippable content still to hand on
        self._framed = False  # the frame header has been read
        self._in_block = False
        self._last = False
        self._checksum = False
        self.eof = False
        self.unused = 0

    @property
    def pending(self) -> bool:
        return bool(self._held)

    def decompress(self, data: memoryview) -> bytes:
        held = data or self._held
        pos = 0
        block_ended = False
        while pos < len(held) and not self.eof and not block_ended:
            if self._body:
                taken = min(self._body, len(held) - pos)
                pos += taken
                self._body -= taken
                block_ended = not self._body and self._end_of_body()
            else:
                taken = min(self._need - len(self._head), len(held) - pos)
                self._head += held[pos : pos + taken]
                pos += taken
                if len(self._head) == self._need:
                    block_ended = self._read_head()
        out = b"" if self._skippable or not pos else self._inner.decompress(held[:pos])
        self._held = held[pos:]
        if self.eof:
            if not self._skippable and not self._inner.eof:
                raise zstandard.ZstdError("the frame ends before its last block")
            self.unused, self._held = len(self._held), memoryview(b"")
        return out

    def _read_head(self) -> bool:
        """A header is complete; True when that ends a block (an empty one) or the frame."""
        head = self._head
        if self._skippable:
            self._body = int.from_bytes(head[4:8], "little")
            self.eof = not self._body
            return self.eof
        if not self._framed:
            if len(head) == 5:
                descriptor = head[4]
                single_segment = descriptor & 0x20
                self._checksum = bool(descriptor & 0x04)
                window = 0 if single_segment else 1
                dictionary = (0, 1, 2, 4)[descriptor & 3]
                content_size = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
                self._need = 5 + window + dictionary + content_size
                return False
            self._framed = True
            head.clear()
            self._need = 3
            return False
        header = int.from_bytes(head[:3], "little")
        head.clear()
        kind, size = (header >> 1) & 3, header >> 3
        if kind == 3:
            raise zstandard.ZstdError("reserved block type")
        self._last = bool(header & 1)
        self._in_block = True
        self._body = 1 if kind == 1 else size  # an RLE block holds one byte, repeated `size` times
        return not self._body and self._end_of_body()

    def _end_of_body(self) -> bool:
        """The block, checksum or skippable content handed on is complete: what comes next."""
        if self._in_block:
            self._in_block = False
            if not self._last:
                return True
            if self._checksum:
                self._body = 4
                return True
        self.eof = True
        return True


def _zstd_frames() -> Callable[[bytes], _Codec]:
    # One decompression context for all the frames of an upload: making one costs 10 µs.
    decompressor = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
    return lambda head: _ZstdFrame(head, decompressor)


# (name, magic or None for zstd's two, a maker of codecs for the streams of one upload)
_Format = tuple[str, bytes | None, Callable[[], Callable[[bytes], _Codec]]]
_FORMATS: tuple[_Format, ...] = (
    ("gzip", _GZIP, lambda: lambda head: _Zlib()),
    ("bzip2", _BZIP2, lambda: lambda head: _Buffering(bz2.BZ2Decompressor())),
    ("xz", _XZ, lambda: lambda head: _Buffering(lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=_MAX_WINDOW))),
    ("zstd", None, _zstd_frames),
)


def _starts(magic: bytes | None, head: bytes) -> bool | None:
    """Whether a stream of this format begins with `head` (None: too few bytes to tell)."""
    if magic is not None:
        magics = [magic]
    else:  # zstd: a frame, or a skippable frame (magic 0x184D2A50-5F, little-endian)
        magics = [_ZSTD] + ([head[:1] + _ZSTD_SKIPPABLE] if 0x50 <= head[0] <= 0x5F else [])
    if any(head.startswith(each) for each in magics):
        return True
    return None if any(each.startswith(head) for each in magics) else False


class _Plain:
    name = "tar"

    def __init__(self) -> None:
        self._data = b""

    def push(self, data: bytes) -> None:
        self._data = data

    def pull(self) -> bytes:
        data, self._data = self._data, b""
        return data

    def end(self) -> None:
        pass


class _Streams:
    """One compression format, whose streams may follow one another."""

    def __init__(self, name: str, magic: bytes | None, new: Callable[[bytes], _Codec]) -> None:
        self.name = name
        self._magic = magic
        self._new = new
        self._codec: _Codec | None = None
        self._input = memoryview(b"")
        self._pos = 0
        self._padding = False
        self._streams = 0

    def push(self, data: bytes) -> None:
        # What is left is at most the start of a next stream too short to tell (a few bytes).
        rest = self._input[self._pos :]
        self._input = memoryview(bytes(rest) + data if rest else data)
        self._pos = 0

    def pull(self) -> bytes:
        try:
            while True:
                codec = self._codec
                if codec is None:
                    if not self._next_stream():
                        return b""
                    continue
                if codec.pending:
                    out = codec.decompress(memoryview(b""))
                elif self._pos < len(self._input):
                    end = min(self._pos + _SLICE, len(self._input))
                    out = codec.decompress(self._input[self._pos : end])
                    self._pos = end
                else:
                    return b""
                if codec.eof:
                    # What the stream did not use is the tail of what it was given: step back.
                    self._pos -= codec.unused
                    self._codec = None
                if out:
                    return out
        except _CODEC_ERRORS as exc:
            raise InvalidContext(f"build context is not a readable {self.name} stream: {exc}") from None

    def _next_stream(self) -> bool:
        rest = self._input[self._pos :]
        if not rest:
            return False
        if self._padding or rest[0] == 0:
            if bytes(rest).count(0) != len(rest):
                raise InvalidContext(f"build context has data after the end of its {self.name} stream")
            self._padding, self._pos = True, len(self._input)
            return False
        head = bytes(rest[:_MAGIC_BYTES])
        starts = _starts(self._magic, head)
        if starts is None:
            return False  # too short to tell yet
        if not starts:
            raise InvalidContext(f"build context has data after the end of its {self.name} stream")
        self._streams += 1
        if self._streams > _MAX_STREAMS:
            raise InvalidContext(f"build context has more than {_MAX_STREAMS} {self.name} streams")
        self._codec = self._new(head)
        return True

    def end(self) -> None:
        if self._codec is not None or (self._pos < len(self._input) and not self._padding):
            raise InvalidContext(f"build context is not a readable {self.name} stream: it is truncated")


class Decompressor:
    """The upload's bytes in (`push`), its tar stream out (`pull`, until it returns b"").

    Plain tar is passed on as the very bytes pushed: no copy.
    """

    def __init__(self) -> None:
        self._head = b""
        self._format: _Plain | _Streams | None = None

    @property
    def format(self) -> str:
        """tar, gzip, bzip2, xz or zstd; empty until the first bytes have come."""
        return self._format.name if self._format is not None else ""

    def push(self, data: bytes) -> None:
        if self._format is None:
            self._head += data
            if len(self._head) < _MAGIC_BYTES:
                return
            data, self._head = self._head, b""
            self._format = _detect(data)
        self._format.push(data)

    def pull(self) -> bytes:
        return self._format.pull() if self._format is not None else b""

    def end(self) -> None:
        """No more input: refuse a stream cut short."""
        if self._format is None:
            why = "it is too short" if self._head else "it is empty"
            raise InvalidContext(f"build context is not a readable tar archive: {why}")
        self._format.end()


def _detect(head: bytes) -> _Plain | _Streams:
    for name, magic, codecs in _FORMATS:
        if _starts(magic, head):
            return _Streams(name, magic, codecs())
    return _Plain()
