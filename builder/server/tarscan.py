"""Read a build context's tar headers as the upload streams in (pure, incremental).

The upload is checked in the same pass that spools it to disk, so a large context
is never read twice and a broken one is refused as soon as it shows.
"""

from __future__ import annotations

import bz2
import lzma
import tarfile
import zlib
from typing import Protocol

from builder.server.errors import ContextTooLarge, InvalidContext

_BLOCK = 512
_STEP = 1 << 20  # decompressed bytes produced per step


class _Decompressor(Protocol):
    eof: bool  # after the end of the compressed stream, trailing bytes are ignored

    def decompress(self, data: bytes, max_length: int = ...) -> bytes: ...


def _decompressor(head: bytes) -> _Decompressor | None:
    """Docker's own rule: compression is known by its magic bytes, not by a name."""
    if head.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    if head.startswith(b"BZh"):
        return bz2.BZ2Decompressor()
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor()
    return None


class TarScanner:
    """Fed the raw upload; raises InvalidContext (400) or ContextTooLarge (413) as soon as
    the archive shows it is broken, hostile, or over a limit."""

    def __init__(self, *, max_members: int = 1_000_000, max_unpacked: int = 1 << 62) -> None:
        self.max_members = max_members
        self.max_unpacked = max_unpacked
        self.unpacked = 0  # tar bytes after decompression
        self._head = b""
        self._decompressor: _Decompressor | None = None
        self._decided = False
        self._buffer = bytearray()
        self._skip = 0  # bytes of member data (and padding) still to pass over
        self._long_name: str | None = None  # from a GNU 'L' or pax 'path' record, for the next member
        self._special: bytes | None = None  # a pax/GNU header's data being collected
        self._special_type = b""
        self._special_size = 0
        self.ended = False
        self.members = 0
        # Regular files and symlinks, by normalised path: enough to find the Dockerfile.
        self.files: set[str] = set()

    def feed(self, data: bytes) -> None:
        if not self._decided:
            self._head += data
            if len(self._head) < 6:
                return
            data, self._head = self._head, b""
            self._decompressor = _decompressor(data)
            self._decided = True
        if self._decompressor is None:
            self._unpacked(len(data))
            self._parse(data)
            return
        try:
            # Bounded output per step: a small gzip bomb must not inflate in one call.
            while data and not self._decompressor.eof:
                out = self._decompressor.decompress(data, _STEP)
                data = _unconsumed(self._decompressor)
                self._unpacked(len(out))
                self._parse(out)
                if not out and not data:
                    break
            while not self._decompressor.eof and not _needs_input(self._decompressor):
                out = self._decompressor.decompress(b"", _STEP)
                if not out:
                    break
                self._unpacked(len(out))
                self._parse(out)
        except (zlib.error, OSError, EOFError, lzma.LZMAError) as exc:
            raise InvalidContext(f"build context is not a readable tar archive: {exc}") from None

    def _unpacked(self, n: int) -> None:
        self.unpacked += n
        if self.unpacked > self.max_unpacked:
            raise ContextTooLarge(
                f"build context unpacks to more than the limit of {self.max_unpacked} bytes"
            )

    def finish(self) -> None:
        if not self._decided:
            data, self._head = self._head, b""
            self._decided = True
            self._parse(data)
        if self.ended:
            return
        if self.members == 0:
            raise InvalidContext("build context is not a readable tar archive: it is empty")
        if self._skip or self._special is not None or self._buffer.strip(b"\0"):
            raise InvalidContext("build context is not a readable tar archive: it ends in the middle")
        # Like tar and the engine, an archive without its two zero blocks is accepted.

    def _parse(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.ended:
            if self._skip:
                n = min(self._skip, len(view))
                if self._special is not None:
                    self._special += view[:n]
                self._skip -= n
                view = view[n:]
                if not self._skip and self._special is not None:
                    self._finish_special()
                continue
            need = _BLOCK - len(self._buffer)
            self._buffer += view[:need]
            view = view[need:]
            if len(self._buffer) == _BLOCK:
                block = bytes(self._buffer)
                self._buffer.clear()
                self._header(block)

    def _header(self, block: bytes) -> None:
        if block == b"\0" * _BLOCK:
            # The first of the two end blocks; whatever follows is padding.
            self.ended = self.members > 0 or self.ended
            if not self.members:
                raise InvalidContext("build context is not a readable tar archive: it is empty")
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise InvalidContext(f"build context is not a readable tar archive: {exc}") from None
        padded = -(-info.size // _BLOCK) * _BLOCK
        if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.XGLTYPE):
            self._special, self._special_type, self._special_size = b"", info.type, info.size
            self._skip = padded
            if not padded:
                self._finish_special()
            return
        name = self._long_name if self._long_name is not None else info.name
        self._long_name = None
        self.members += 1
        if self.members > self.max_members:
            raise ContextTooLarge(f"build context has more than the limit of {self.max_members} entries")
        _check_entry(name, info)
        if info.isreg() or info.issym():
            self.files.add(_normalise(name))
        # Only regular files (and their old/contiguous kinds) carry data in the archive.
        self._skip = padded if info.isreg() or info.type not in tarfile.SUPPORTED_TYPES else 0

    def _finish_special(self) -> None:
        data = (self._special or b"")[: self._special_size]
        kind = self._special_type
        self._special = None
        if kind == tarfile.GNUTYPE_LONGNAME:
            self._long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == tarfile.XHDTYPE:
            for key, value in _pax_records(data):
                if key == "path":
                    self._long_name = value


def _pax_records(data: bytes) -> list[tuple[str, str]]:
    """`<length> <key>=<value>\\n` records of a pax extended header."""
    records = []
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise InvalidContext("build context is not a readable tar archive: bad pax header") from None
        if length <= 0:
            break
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        records.append((key.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))
        pos += length
    return records


def _check_entry(name: str, info: tarfile.TarInfo) -> None:
    """Refuse entries that could write outside the context or make device nodes."""
    _check_path(name, name)
    if info.islnk():
        # A hard link's target must be inside the archive too.
        _check_path(info.linkname, name)
    if info.ischr() or info.isblk() or info.isfifo():
        raise InvalidContext(f"build context entry {name!r} is a device or FIFO node")


def _check_path(path: str, entry: str) -> None:
    if path.startswith("/"):
        raise InvalidContext(f"build context entry {entry!r} has an absolute path ({path!r})")
    depth = 0
    for part in path.split("/"):
        depth += -1 if part == ".." else 0 if part in ("", ".") else 1
        if depth < 0:
            raise InvalidContext(f"build context entry {entry!r} escapes the context with '..' ({path!r})")


def _unconsumed(decompressor: _Decompressor) -> bytes:
    # zlib keeps what it has not read yet in unconsumed_tail; bz2/lzma keep it internally.
    return getattr(decompressor, "unconsumed_tail", b"")


def _needs_input(decompressor: _Decompressor) -> bool:
    # zlib has no needs_input: it has produced all it can once unconsumed_tail is empty.
    return getattr(decompressor, "needs_input", True)


def _normalise(name: str) -> str:
    parts = [part for part in name.split("/") if part not in ("", ".")]
    return "/".join(parts)
