"""The build context rewriter: the client's upload in, a canonical plain tar out (pure, incremental).

What the engine reads is what the daemon checked, by construction. Every header of the upload
is parsed here and checked on its resolved values (pax and GNU long names and links, pax sizes),
then written again by us; member data is passed through and padded by us; our two zero blocks
end the archive. Nothing else of the upload, compressed or not, ever reaches the output.

The canonical form: ustar headers (a pax header only for a name or link over 100 bytes or a
size over 8 GiB); normalised names ("./a//b" -> "a/b", directories "a/", the context "./");
permission bits kept (mode & 0o7777) and mtime kept (whole seconds, clamped to ustar's range);
uid and gid 0 and no user or group names (COPY makes files root's anyway, and the build cache
should not depend on who packed the context); xattrs, atimes and comments dropped.

Refused besides what is outside the context: devices and FIFOs, sparse files (in every GNU
dialect), unknown entry types, an entry written under a non-directory entry or replacing
another, a hard link to anything but a file archived before it, and any byte left unread:
data after the end-of-archive blocks (zeros aside) or after the last compressed stream.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from builder.protocol import DEFAULT_DOCKERFILE
from builder.server.archive.decompress import Decompressor
from builder.server.archive.headers import (
    BLOCK,
    ZERO_BLOCK,
    Header,
    read_header,
    read_pax,
    write_header,
)
from builder.server.errors import (
    BuilderError,
    ContextTooLarge,
    DockerfileNotFound,
    DockerfileTooLarge,
    InvalidContext,
    InvalidDockerfile,
)

_NOT_A_TAR = "build context is not a readable tar archive"
_DIRECT = 64 << 10  # member data pieces at least this big go out as they came, uncopied
_FLUSH = 256 << 10  # small output (headers, small files) goes out in pieces of about this size
_PATH_MAX = 4096  # Linux's: a longer name or link target could not be created anyway
# Names kept for `files` and the directory checks: bounds memory, whatever the names' lengths.
_NAMES_LIMIT = 64 << 20

_REGULAR, _HARD_LINK, _SYMLINK, _DIRECTORY = b"0", b"1", b"2", b"5"
_KINDS = {b"0": _REGULAR, b"\x00": _REGULAR, b"7": _REGULAR, b"1": _HARD_LINK, b"2": _SYMLINK, b"5": _DIRECTORY}
_KIND_NAMES = {_REGULAR: "regular file", _HARD_LINK: "hard link", _SYMLINK: "symlink", _DIRECTORY: "directory"}
_DEVICES = {b"3": "character device", b"4": "block device", b"6": "FIFO"}
_META = {b"x": "pax header", b"g": "global pax header", b"L": "GNU long name", b"K": "GNU long link name"}
_SPARSE = "is a sparse file (GNU tar --sparse), which is not supported: archive it without --sparse"
# Keys of a global pax header that would change entries: POSIX readers apply them, the engine
# ignores global headers; rather than choose, refuse.
_GLOBAL_REFUSED = (b"path", b"linkpath", b"size", b"GNU.sparse.")
_PAX_TIME = re.compile(rb"-?[0-9]+(\.[0-9]*)?")


class ContextRewriter:
    """Fed the raw upload, produces the tar the engine will read, checking it on the way.

    `feed(data)` returns an iterator over output pieces, memoryviews the rewriter never writes
    to again: member data passed through uncopied (from a plain tar, slices of `data` itself),
    headers and small files gathered in pieces of about 256 KiB. The iterator does the work:
    read it to the end before the next `feed`, so memory stays bounded whatever the input.
    `finish()` checks the upload is complete and returns the end-of-archive blocks. Both
    raise InvalidContext (400), ContextTooLarge (413), DockerfileNotFound (400),
    InvalidDockerfile (400) or DockerfileTooLarge (413) as soon as the upload shows it.
    """

    def __init__(
        self,
        *,
        max_entries: int,
        max_unpacked: int,
        dockerfile: str = DEFAULT_DOCKERFILE,
        max_dockerfile: int = 1 << 20,
        max_dockerfile_line: int = 64 << 10,
        max_header_record: int = 1 << 20,
        require_dockerfile: bool = True,
    ) -> None:
        self.max_entries = max_entries
        self.max_unpacked = max_unpacked
        self.max_header_record = max_header_record
        self.members = 0  # entries, pax and GNU headers aside
        self.unpacked = 0  # bytes of tar written (or about to be: an entry counts in full at its header)
        self.files: set[str] = set()  # normalised paths of regular files, hard links and symlinks
        self.dockerfile_path = ""  # set by finish()
        self.dockerfile_text = ""
        self._dockerfile = _DockerfileCapture(dockerfile, max_dockerfile, max_dockerfile_line)
        # False while the Dockerfile's name may still change (a field after the context): then an
        # archive without it is no error yet, and `dockerfile_path` stays "".
        self._require_dockerfile = require_dockerfile
        self._source = Decompressor()
        self._read = 0  # tar bytes read from the upload (decompressed)
        self._feeding = False
        self._out = bytearray()
        self._dirs = {""}  # every directory, explicit or implied by a path; "" is the context
        self._names_size = 0
        # Where the parser is: a header (maybe split across pieces), member data, padding, a record.
        self._partial = bytearray()
        self._data_left = 0
        self._padding = 0  # our padding after the member data
        self._capturing = False
        self._skip = 0  # input padding to pass over
        self._record: bytearray | None = None  # a pax or GNU record being collected
        self._record_left = 0
        self._record_kind = b""
        self._record_offset = 0
        self._zero_blocks = 0  # two end the archive
        # Records waiting for the entry they describe.
        self._pax: dict[bytes, bytes] | None = None
        self._long_name: bytes | None = None
        self._long_link: bytes | None = None

    def feed(self, data: bytes) -> Iterator[memoryview]:
        if self._feeding:
            raise RuntimeError("feed() again before the output of the previous feed() was read")
        self._feeding = True
        return self._rewrite(data)

    def finish(self) -> bytes:
        """The two end blocks, once the upload is known complete, a tar, with its Dockerfile."""
        if self._feeding:
            raise RuntimeError("finish() before the output of the last feed() was read")
        self._source.end()
        if self._data_left or self._skip or self._record is not None:
            raise InvalidContext(f"{_NOT_A_TAR}: it ends in the middle of an entry")
        if self._partial.count(0) != len(self._partial):
            raise InvalidContext(f"{_NOT_A_TAR}: it ends in the middle of a header")
        if not self.members:
            raise InvalidContext(f"{_NOT_A_TAR}: it is empty")
        if self._pending_records():
            raise InvalidContext(f"{_NOT_A_TAR}: it ends with a pax or GNU header but no entry")
        try:
            self.dockerfile_path, self.dockerfile_text = self._dockerfile.result()
        except DockerfileNotFound:
            if self._require_dockerfile:
                raise
        self.unpacked += 2 * BLOCK
        return ZERO_BLOCK * 2

    def _rewrite(self, data: bytes) -> Iterator[memoryview]:
        try:
            self._source.push(data)
            while piece := self._source.pull():
                self._read += len(piece)
                if self._read > self.max_unpacked:
                    raise ContextTooLarge(f"build context unpacks to more than the limit of {self.max_unpacked} bytes")
                yield from self._parse(memoryview(piece))
            if self._out:
                yield self._take()
        finally:
            self._feeding = False

    def _take(self) -> memoryview:
        out, self._out = self._out, bytearray()
        return memoryview(out)

    def _parse(self, view: memoryview) -> Iterator[memoryview]:
        pos, size = 0, len(view)
        while pos < size:
            if self._data_left:
                taken = min(self._data_left, size - pos)
                chunk = view[pos : pos + taken]
                pos += taken
                self._data_left -= taken
                if self._capturing:
                    self._dockerfile.add(chunk)
                if taken >= _DIRECT:
                    if self._out:
                        yield self._take()
                    yield chunk
                else:
                    self._out += chunk
                    if len(self._out) >= _FLUSH:
                        yield self._take()
                if not self._data_left:
                    self._end_of_data()
            elif self._skip:
                taken = min(self._skip, size - pos)
                pos += taken
                self._skip -= taken
            elif self._record is not None:
                taken = min(self._record_left, size - pos)
                self._record += view[pos : pos + taken]
                pos += taken
                self._record_left -= taken
                if not self._record_left:
                    self._end_of_record()
            elif self._zero_blocks == 2:
                # After the end: tar's record padding, zeros; anything else would go unread.
                rest = view[pos:].tobytes()
                if rest.count(0) != len(rest):
                    raise InvalidContext(f"{_NOT_A_TAR}: there is data after its end")
                pos = size
            else:
                if self._partial or size - pos < BLOCK:
                    taken = min(BLOCK - len(self._partial), size - pos)
                    self._partial += view[pos : pos + taken]
                    pos += taken
                    if len(self._partial) < BLOCK:
                        break
                    block = bytes(self._partial)
                    self._partial.clear()
                else:
                    block = view[pos : pos + BLOCK].tobytes()
                    pos += BLOCK
                self._block(block, self._read - (size - pos) - BLOCK)
                if len(self._out) >= _FLUSH:
                    yield self._take()

    def _block(self, block: bytes, offset: int) -> None:
        if block == ZERO_BLOCK:
            if self._pending_records():
                raise InvalidContext(f"{_NOT_A_TAR}: a pax or GNU header without its entry, at byte {offset}")
            self._zero_blocks += 1
            return
        if self._zero_blocks:
            raise InvalidContext(f"{_NOT_A_TAR}: a lone zero block in its middle, at byte {offset - BLOCK}")
        header = read_header(block, offset)
        if header.typeflag in _META:
            self._start_record(header, offset)
        else:
            self._entry(header, offset)

    def _pending_records(self) -> bool:
        return self._pax is not None or self._long_name is not None or self._long_link is not None

    def _start_record(self, header: Header, offset: int) -> None:
        kind, what = header.typeflag, _META[header.typeflag]
        if header.size > self.max_header_record:
            raise InvalidContext(
                f"build context has a {what} of {header.size} bytes at byte {offset}, "
                f"over the limit of {self.max_header_record} bytes"
            )
        if kind == b"g" and self._pending_records():
            raise InvalidContext(f"{_NOT_A_TAR}: a global pax header between a header and its entry, at byte {offset}")
        if {b"x": self._pax, b"L": self._long_name, b"K": self._long_link}.get(kind) is not None:
            raise InvalidContext(f"{_NOT_A_TAR}: a second {what} for one entry, at byte {offset}")
        self._record, self._record_left = bytearray(), header.size
        self._record_kind, self._record_offset = kind, offset
        if not header.size:
            self._end_of_record()

    def _end_of_record(self) -> None:
        data, kind, offset = bytes(self._record or b""), self._record_kind, self._record_offset
        self._record = None
        self._skip = -len(data) % BLOCK
        if kind == b"x":
            self._pax = read_pax(data, offset)
        elif kind == b"g":
            for key in read_pax(data, offset):
                if key.startswith(_GLOBAL_REFUSED):
                    raise InvalidContext(
                        f"build context has a global pax header setting {key.decode(errors='replace')!r}, "
                        f"at byte {offset}: not supported"
                    )
        else:
            value = data.partition(b"\x00")[0]
            if not value:
                raise InvalidContext(f"{_NOT_A_TAR}: an empty {_META[kind]} at byte {offset}")
            if kind == b"L":
                self._long_name = value
            else:
                self._long_link = value

    def _entry(self, header: Header, offset: int) -> None:
        name, linkname, size, mtime = header.name, header.linkname, header.size, header.mtime
        if self._pending_records():
            name, linkname, size, mtime = self._apply_records(header, offset)
        entry = name.decode("utf-8", "surrogateescape")
        kind = _KINDS.get(header.typeflag)
        if kind is None:
            raise _unsupported(entry, header.typeflag)
        if kind == _REGULAR and header.typeflag == b"\x00" and name.endswith(b"/"):
            kind = _DIRECTORY  # v7: a directory is a regular file whose name ends with a slash
        self.members += 1
        if self.members > self.max_entries:
            raise ContextTooLarge(f"build context has more than the limit of {self.max_entries} entries")
        path = _path(name, entry, entry)
        if not path and kind != _DIRECTORY:
            raise InvalidContext(f"build context entry {entry!r} has no name")
        self._place(path, kind, entry)
        if kind == _SYMLINK:
            linkname = _symlink_target(path, linkname, entry)
        elif kind == _HARD_LINK:
            linkname = self._hard_link_target(path, linkname, entry)
        else:
            linkname = b""
        if kind != _REGULAR:
            size = 0  # only regular files carry data (Go's reader too, whatever the size field says)
        emitted = write_header(kind, _entry_name(path, kind), linkname, size, header.mode & 0o7777, mtime)
        padding = -size % BLOCK
        if self.unpacked + len(emitted) + size + padding + 2 * BLOCK > self.max_unpacked:
            raise ContextTooLarge(f"build context unpacks to more than the limit of {self.max_unpacked} bytes")
        self.unpacked += len(emitted) + size + padding
        self._out += emitted
        self._capturing = self._dockerfile.begin(path, kind, size)
        self._data_left, self._padding = size, padding
        if not size:
            self._end_of_data()

    def _apply_records(self, header: Header, offset: int) -> tuple[bytes, bytes, int, int]:
        """Name, link name, size and mtime of the entry, as its pax and GNU records set them."""
        pax, long_name, long_link = self._pax or {}, self._long_name, self._long_link
        self._pax = self._long_name = self._long_link = None
        name = _resolve(header.name, long_name, pax.get(b"path"), "name", offset)
        linkname = _resolve(header.linkname, long_link, pax.get(b"linkpath"), "link name", offset)
        entry = name.decode("utf-8", "surrogateescape")
        if any(key.startswith(b"GNU.sparse.") for key in pax):
            raise InvalidContext(f"build context entry {entry!r} {_SPARSE}")
        size = header.size
        if b"size" in pax:
            size = _pax_size(pax[b"size"], entry)
            if header.size and header.size != size:
                raise InvalidContext(
                    f"build context entry {entry!r} has a pax size ({size}) "
                    f"that disagrees with its header ({header.size})"
                )
        mtime = _pax_time(pax[b"mtime"], entry) if b"mtime" in pax else header.mtime
        return name, linkname, size, mtime

    def _end_of_data(self) -> None:
        self._out += ZERO_BLOCK[: self._padding]
        self._skip = self._padding
        if self._capturing:
            self._capturing = False
            self._dockerfile.end()

    def _place(self, path: str, kind: bytes, entry: str) -> None:
        """Record the entry; refuse one that would land inside a non-directory or replace an entry."""
        parent = path.rpartition("/")[0]
        missing = []
        while parent not in self._dirs:
            if parent in self.files:
                raise InvalidContext(f"build context entry {entry!r} is inside {parent!r}, which is not a directory")
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        for directory in missing:
            self._remember(self._dirs, directory)
        if path in self.files:
            raise InvalidContext(f"build context entry {entry!r} appears twice")
        if kind == _DIRECTORY:
            self._remember(self._dirs, path)
        elif path in self._dirs:
            raise InvalidContext(f"build context entry {entry!r} would replace a directory")
        else:
            self._remember(self.files, path)

    def _remember(self, names: set[str], path: str) -> None:
        if path in names:
            return
        self._names_size += len(path) + 1
        if self._names_size > _NAMES_LIMIT:
            raise ContextTooLarge(f"build context entry names add up to more than {_NAMES_LIMIT} bytes")
        names.add(path)

    def _hard_link_target(self, path: str, linkname: bytes, entry: str) -> bytes:
        target = _path(linkname, entry, linkname.decode("utf-8", "surrogateescape"))
        # Tar writers link to a file archived before; the engine could not link to anything else.
        if target == path or target not in self.files:
            raise InvalidContext(f"build context entry {entry!r} is a hard link to {target!r}, not to a file before it")
        return target.encode("utf-8", "surrogateescape")


def _unsupported(entry: str, typeflag: bytes) -> InvalidContext:
    if typeflag == b"S":
        return InvalidContext(f"build context entry {entry!r} {_SPARSE}")
    if typeflag in _DEVICES:
        return InvalidContext(f"build context entry {entry!r} is a {_DEVICES[typeflag]} (device or FIFO node)")
    return InvalidContext(f"build context entry {entry!r} has an unsupported type {typeflag!r}")


def _resolve(field: bytes, gnu: bytes | None, pax: bytes | None, what: str, offset: int) -> bytes:
    """A name or link name: from a GNU long record, a pax record, or the header itself."""
    if gnu is not None and pax is not None:
        raise InvalidContext(f"{_NOT_A_TAR}: both a GNU and a pax long {what} for the entry at byte {offset}")
    if pax is not None and (not pax or b"\x00" in pax):
        raise InvalidContext(f"{_NOT_A_TAR}: an empty pax {what} or one with a NUL byte, at byte {offset}")
    return gnu if gnu is not None else pax if pax is not None else field


def _path(name: bytes, entry: str, shown: str) -> str:
    """A name as a normalised path in the context ("./a//b/../c" -> "a/c"; "" for the context itself)."""
    if len(name) > _PATH_MAX:
        raise InvalidContext(f"build context entry {entry[:200]!r}... has a path over {_PATH_MAX} bytes")
    if name.startswith(b"/"):
        raise InvalidContext(f"build context entry {entry!r} has an absolute path ({shown!r})")
    parts: list[str] = []
    for part in name.decode("utf-8", "surrogateescape").split("/"):
        if part == "..":
            if not parts:
                raise InvalidContext(f"build context entry {entry!r} escapes the context with '..' ({shown!r})")
            parts.pop()
        elif part and part != ".":
            parts.append(part)
    return "/".join(parts)


def _entry_name(path: str, kind: bytes) -> bytes:
    name = path.encode("utf-8", "surrogateescape")
    if kind != _DIRECTORY:
        return name
    return name + b"/" if name else b"./"


def _symlink_target(path: str, target: bytes, entry: str) -> bytes:
    """The target as given. Like the engine, refuse one that leaves the context, read from the
    link's directory (even an absolute one: the engine roots it there, as a build follows it)."""
    shown = target.decode("utf-8", "surrogateescape")
    if not target:
        raise InvalidContext(f"build context entry {entry!r} is a symlink with no target")
    if len(target) > _PATH_MAX:
        raise InvalidContext(f"build context entry {entry!r} has a link target over {_PATH_MAX} bytes")
    depth = path.count("/")
    for part in target.split(b"/"):
        if part == b"..":
            depth -= 1
            if depth < 0:
                raise InvalidContext(f"build context entry {entry!r} is a symlink that escapes the context ({shown!r})")
        elif part and part != b".":
            depth += 1
    return target


def _pax_size(value: bytes, entry: str) -> int:
    if not value.isdigit():
        raise InvalidContext(f"build context entry {entry!r} has a malformed pax size")
    return int(value)


def _pax_time(value: bytes, entry: str) -> int:
    if not _PAX_TIME.fullmatch(value):
        raise InvalidContext(f"build context entry {entry!r} has a malformed pax mtime")
    return int(value.partition(b".")[0])


class _DockerfileCapture:
    """The Dockerfile's content, captured as it streams past.

    Like `docker build`, the default `Dockerfile` falls back to `dockerfile`: as the archive
    may hold either, in any order, both are captured. What is wrong with the wanted one is
    refused at once; what is wrong with the fallback only if it is the one built.
    """

    def __init__(self, wanted: str, max_size: int, max_line: int) -> None:
        self.wanted = _path(wanted.encode("utf-8", "surrogateescape"), wanted, wanted)
        self.names = (self.wanted, "dockerfile") if self.wanted == DEFAULT_DOCKERFILE else (self.wanted,)
        self.max_size = max_size
        self.max_line = max_line
        self._found: dict[str, bytes | BuilderError] = {}
        self._current = ""
        self._data = bytearray()

    def begin(self, path: str, kind: bytes, size: int) -> bool:
        """An entry: True when its data is to be captured."""
        if path not in self.names:
            return False
        if kind == _REGULAR and size > self.max_size:
            return self._refuse(
                path,
                DockerfileTooLarge(f"the Dockerfile {path!r} is {size} bytes, over the limit of {self.max_size} bytes"),
            )
        if kind != _REGULAR:
            return self._refuse(
                path, InvalidDockerfile(f"the Dockerfile {path!r} must be a regular file, not a {_KIND_NAMES[kind]}")
            )
        self._current = path
        self._data = bytearray()
        return True

    def add(self, chunk: memoryview) -> None:
        self._data += chunk

    def end(self) -> None:
        data = bytes(self._data)
        self._data = bytearray()
        longest = max(len(line) for line in data.split(b"\n"))
        if longest > self.max_line:
            self._refuse(
                self._current,
                InvalidDockerfile(
                    f"the Dockerfile {self._current!r} has a line of {longest} bytes, over the limit of {self.max_line}"
                ),
            )
        else:
            self._found[self._current] = data

    def _refuse(self, path: str, error: BuilderError) -> bool:
        if path == self.wanted:
            raise error
        self._found[path] = error
        return False

    def result(self) -> tuple[str, str]:
        """The Dockerfile built and its text."""
        for name in self.names:
            found = self._found.get(name)
            if isinstance(found, BuilderError):
                raise found
            if found is not None:
                return name, found.decode("utf-8", "surrogateescape")
        raise DockerfileNotFound(f"Dockerfile {self.wanted!r} not found in the build context")
