"""Build contexts: check a local directory and stream it as a reproducible tar (zstd, gzip or plain).

The archive is produced block by block (tar headers, file content in chunks,
padding) and compressed on the fly, so memory stays at a few chunks whatever
the size of the context. The same tree always gives the same bytes: entries
are walked in sorted order, mtimes are 0, owners are root, and the gzip header
carries no timestamp.

What is sent: regular files (content and permission bits), directories and
symlinks (as links, with their target as is: never followed, so a link to a
file outside the context does not leak that file). The one exception is the
Dockerfile: the daemon wants it as a regular file, so a Dockerfile that is a
symlink (to a file inside the context) is sent with its target's content.
Sockets, FIFOs and device nodes are skipped silently: they have no content a
build could use. Hard links are sent as independent copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import stat
import tarfile
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Literal, Protocol

from builder.client.dockerignore import DockerIgnore, escape
from builder.client.errors import ContextError
from builder.protocol import DEFAULT_DOCKERFILE

# Also the size of each compress call: the compressing thread takes the GIL back after each
# call, and fewer, larger calls wait for it less while the event loop thread is sending.
DEFAULT_CHUNK_SIZE = 1 << 20
# Chunks the producer may run ahead of the upload.
DEFAULT_QUEUE_CHUNKS = 4
DOCKERIGNORE = ".dockerignore"
GZIP_LEVEL = 1
ZSTD_LEVEL = 1

Compression = Literal["zstd", "gzip", "none"]
# How each compression is labelled on the wire (the daemon goes by the magic bytes).
CONTENT_TYPES: dict[Compression, str] = {
    "zstd": "application/zstd",
    "gzip": "application/gzip",
    "none": "application/x-tar",
}

ProgressCallback = Callable[[int], Awaitable[None] | None]

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


def check_context(context_dir: Path, dockerfile: str = DEFAULT_DOCKERFILE) -> str:
    """Raise ContextError unless `context_dir` can be sent with `dockerfile`.

    Returns the Dockerfile's normalised path relative to the context, the one to send:
    like `docker build`, a missing default `Dockerfile` falls back to `dockerfile`, and
    a path through symlinked directories is named by where they lead.
    """
    context_dir = Path(context_dir)
    if not context_dir.exists():
        raise ContextError(f"build context {str(context_dir)!r} does not exist")
    if not context_dir.is_dir():
        raise ContextError(f"build context {str(context_dir)!r} is not a directory")
    if not dockerfile or os.path.isabs(dockerfile):
        raise ContextError(f"Dockerfile {dockerfile!r} must be a path relative to the build context")
    rel = posixpath.normpath(dockerfile)
    if rel == ".." or rel.startswith("../"):
        raise ContextError(f"Dockerfile {dockerfile!r} is outside the build context")
    if rel == DEFAULT_DOCKERFILE and not os.path.lexists(context_dir / rel):
        rel = "dockerfile" if os.path.lexists(context_dir / "dockerfile") else rel
    # Resolve symlinks too: the engine could not follow one that leaves the context.
    root = os.path.realpath(context_dir)
    parent = os.path.realpath(context_dir / posixpath.dirname(rel))
    real = os.path.realpath(context_dir / rel)
    if os.path.commonpath([root, real]) != root or os.path.commonpath([root, parent]) != root:
        raise ContextError(f"Dockerfile {dockerfile!r} is outside the build context")
    if not os.path.isfile(real):
        raise ContextError(f"Dockerfile {dockerfile!r} not found in build context {str(context_dir)!r}")
    # The archive holds a symlinked directory as a link, so the Dockerfile's entry is under its real
    # parent; the Dockerfile itself may be a link, which the archive then holds dereferenced.
    return posixpath.normpath(posixpath.join(os.path.relpath(parent, root), posixpath.basename(rel)))


def iter_context(
    context_dir: Path,
    dockerfile: str = DEFAULT_DOCKERFILE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    compression: Compression = "gzip",
) -> Iterator[bytes]:
    """Yield the context as a tar, compressed as asked, in chunks of about `chunk_size` bytes.

    Synchronous and blocking (disk reads, compression): run it off the event loop,
    e.g. through `stream_context`. The levels are the fast ones (gzip 1, zstd 1): on the
    links a build daemon sits behind, the CPU higher levels cost is not won back in time.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    dockerfile = check_context(context_dir, dockerfile)
    root = os.fspath(context_dir)
    ignore = _load_ignore(root, dockerfile)
    compressor = _compressor(compression)
    out = bytearray()
    for block in _tar_blocks(root, ignore, dockerfile, chunk_size):
        out += compressor.compress(block)
        if len(out) >= chunk_size:
            yield bytes(out)
            out.clear()
    out += compressor.flush()
    for start in range(0, len(out), chunk_size):
        yield bytes(out[start : start + chunk_size])


async def stream_context(
    context_dir: Path,
    dockerfile: str = DEFAULT_DOCKERFILE,
    *,
    compression: Compression = "gzip",
    on_progress: ProgressCallback | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    queue_chunks: int = DEFAULT_QUEUE_CHUNKS,
) -> AsyncIterator[bytes]:
    """`iter_context` in a producer thread that runs ahead of the consumer.

    Reading and compressing (zlib and zstd release the GIL while compressing) go on while
    the caller sends; at most `queue_chunks` chunks wait, so memory stays bounded whatever
    the size of the context. `on_progress(bytes_taken_so_far)` (plain or async) is called
    once each chunk has been taken by the consumer.
    """
    loop = asyncio.get_running_loop()
    ready: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()
    room = threading.Semaphore(queue_chunks)
    stop = threading.Event()

    def hand_over(item: bytes | Exception | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed after the consumer left
            loop.call_soon_threadsafe(ready.put_nowait, item)

    def produce() -> None:
        try:
            for chunk in iter_context(Path(context_dir), dockerfile, chunk_size, compression=compression):
                room.acquire()
                if stop.is_set():
                    return
                hand_over(chunk)
        except Exception as exc:  # noqa: BLE001 (handed to the consumer, which raises it)
            hand_over(exc)
        else:
            hand_over(None)

    threading.Thread(target=produce, name="builder-context", daemon=True).start()
    taken = 0
    try:
        while (item := await ready.get()) is not None:
            if isinstance(item, Exception):
                raise item
            room.release()
            yield item
            taken += len(item)
            if on_progress is not None and (result := on_progress(taken)) is not None:
                await result
    finally:
        # A consumer gone early (cancelled, failed upload) stops the producer at its next chunk.
        stop.set()
        room.release()


class _Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes, /) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def _compressor(compression: Compression) -> _Compressor:
    if compression == "zstd":
        import zstandard  # only uploads that use it pay for the import

        return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compressobj()
    if compression == "gzip":
        # wbits=31: gzip wrapper whose header has mtime 0 and no file name.
        return zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    if compression == "none":
        return _Identity()
    raise ValueError(f"unknown compression {compression!r}")


def _load_ignore(root: str, dockerfile: str) -> DockerIgnore:
    try:
        patterns = DockerIgnore.from_file(os.path.join(root, DOCKERIGNORE)).patterns
    except FileNotFoundError:
        patterns = []
    except (OSError, ValueError) as exc:
        raise ContextError(f"cannot use {DOCKERIGNORE}: {exc}") from None
    # Like the docker CLI: the engine needs these two even if ignored, and as
    # exceptions they also make the walk descend into an ignored parent.
    return DockerIgnore([*patterns, "!" + escape(dockerfile), "!" + DOCKERIGNORE])


def _tar_blocks(root: str, ignore: DockerIgnore, dockerfile: str, chunk_size: int) -> Iterator[bytes]:
    """The uncompressed tar stream, in pieces of at most `chunk_size` (headers aside)."""
    offset = 0
    for rel, path, st in _walk(root, "", ignore):
        if rel == dockerfile and stat.S_ISLNK(st.st_mode):
            st = _stat_target(path, rel)  # check_context saw it resolve to a file inside the context
        info = tarfile.TarInfo(rel)
        info.mode = stat.S_IMODE(st.st_mode)
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = _readlink(path, rel)
        else:
            info.type = tarfile.REGTYPE
            info.size = st.st_size
        # PAX: long names, non-ASCII names and files over 8 GiB need no special case.
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        yield header
        offset += len(header)
        if info.type == tarfile.REGTYPE and info.size:
            yield from _file_content(path, rel, info.size, chunk_size)
            padding = -info.size % _BLOCK
            if padding:
                yield bytes(padding)
            offset += info.size + padding
    # End-of-archive marker (two zero blocks), then pad to a full record like tarfile.
    offset += 2 * _BLOCK
    yield bytes(2 * _BLOCK + (-offset % _RECORD))


def _walk(root: str, rel: str, ignore: DockerIgnore) -> Iterator[tuple[str, str, os.stat_result]]:
    """Entries under `rel` (depth-first, sorted, each directory before its contents)."""
    directory = os.path.join(root, rel) if rel else root
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda entry: entry.name)
    except OSError as exc:
        where = rel or "."
        raise ContextError(f"cannot read directory {where!r} of the build context: {exc.strerror}") from None
    for entry in entries:
        name = f"{rel}/{entry.name}" if rel else entry.name
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            raise ContextError(f"cannot stat {name!r} in the build context: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            if ignore.can_skip_dir(name):
                continue
            # An excluded directory is still walked when an exception may re-include
            # something in it; like the docker CLI, it then gets no entry of its own.
            if not ignore.excluded(name):
                yield name, entry.path, st
            yield from _walk(root, name, ignore)
        elif (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)) and not ignore.excluded(name):
            yield name, entry.path, st


def _stat_target(path: str, rel: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ContextError(f"cannot read the Dockerfile {rel!r}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ContextError(f"Dockerfile {rel!r} is not a regular file")
    return st


def _readlink(path: str, rel: str) -> str:
    try:
        return os.readlink(path)
    except OSError as exc:
        raise ContextError(f"cannot read symlink {rel!r} in the build context: {exc.strerror}") from None


def _file_content(path: str, rel: str, size: int, chunk_size: int) -> Iterator[bytes]:
    """Exactly `size` bytes of the file (the size its header announced)."""
    try:
        with open(path, "rb") as fh:
            left = size
            while left:
                data = fh.read(min(chunk_size, left))
                if not data:
                    raise ContextError(f"file {rel!r} shrank while the build context was being sent")
                left -= len(data)
                yield data
    except OSError as exc:
        raise ContextError(f"cannot read {rel!r} in the build context: {exc.strerror}") from None
