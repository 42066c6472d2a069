"""Build contexts: check a local directory and stream it as a reproducible tar.gz.

The archive is produced block by block (tar headers, file content in chunks,
padding) and compressed on the fly, so memory stays at about one chunk
whatever the size of the context. The same tree always gives the same bytes:
entries are walked in sorted order, mtimes are 0, owners are root, and the
gzip header carries no timestamp.

What is sent: regular files (content and permission bits), directories and
symlinks (as links, with their target as is: never followed, so a link to a
file outside the context does not leak that file). Sockets, FIFOs and device
nodes are skipped silently: they have no content a build could use. Hard
links are sent as independent copies.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import stat
import tarfile
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

from builder.client.dockerignore import DockerIgnore, escape
from builder.client.errors import ContextError
from builder.protocol import DEFAULT_DOCKERFILE

DEFAULT_CHUNK_SIZE = 1 << 20
DOCKERIGNORE = ".dockerignore"

ProgressCallback = Callable[[int], Awaitable[None] | None]

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_DONE = object()


def check_context(context_dir: Path, dockerfile: str = DEFAULT_DOCKERFILE) -> str:
    """Raise ContextError unless `context_dir` can be sent with `dockerfile`.

    Returns the Dockerfile's normalised path relative to the context (like
    `docker build`, a missing default `Dockerfile` falls back to `dockerfile`).
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
    real = os.path.realpath(context_dir / rel)
    if os.path.commonpath([root, real]) != root:
        raise ContextError(f"Dockerfile {dockerfile!r} is outside the build context")
    if not os.path.isfile(real):
        raise ContextError(f"Dockerfile {dockerfile!r} not found in build context {str(context_dir)!r}")
    return rel


def iter_context_tar_gz(
    context_dir: Path,
    dockerfile: str = DEFAULT_DOCKERFILE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    compresslevel: int = 1,
) -> Iterator[bytes]:
    """Yield the context as a gzip-compressed tar, in chunks of `chunk_size` bytes (the last may be shorter).

    Synchronous and blocking (disk reads, compression): run it off the event
    loop, e.g. through `stream_context`. Level 1 by default: on the fast links a build
    daemon sits behind, level 6 cost a 20 MiB context 0.5 s of CPU for a few percent.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    dockerfile = check_context(context_dir, dockerfile)
    root = os.fspath(context_dir)
    ignore = _load_ignore(root, dockerfile)
    # wbits=31: gzip wrapper whose header has mtime 0 and no file name.
    compressor = zlib.compressobj(compresslevel, zlib.DEFLATED, 31)
    out = bytearray()
    for block in _tar_blocks(root, ignore, chunk_size):
        out += compressor.compress(block)
        while len(out) >= chunk_size:
            yield bytes(out[:chunk_size])
            del out[:chunk_size]
    out += compressor.flush()
    for start in range(0, len(out), chunk_size):
        yield bytes(out[start : start + chunk_size])


async def stream_context(
    context_dir: Path,
    dockerfile: str = DEFAULT_DOCKERFILE,
    *,
    on_progress: ProgressCallback | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> AsyncIterator[bytes]:
    """`iter_context_tar_gz` with every step in a worker thread, so the event loop never blocks.

    `on_progress(bytes_sent_so_far)` (plain or async) is called once each chunk
    has been taken by the consumer.
    """
    chunks = iter_context_tar_gz(Path(context_dir), dockerfile, chunk_size)
    sent = 0
    try:
        while (chunk := await asyncio.to_thread(next, chunks, _DONE)) is not _DONE:
            yield chunk
            sent += len(chunk)
            if on_progress is not None and (result := on_progress(sent)) is not None:
                await result
    finally:
        try:
            chunks.close()
        except ValueError:
            # Cancelled while a worker thread still runs next(): that thread
            # finishes its step, then the dropped generator closes its file.
            pass


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


def _tar_blocks(root: str, ignore: DockerIgnore, chunk_size: int) -> Iterator[bytes]:
    """The uncompressed tar stream, in pieces of at most `chunk_size` (headers aside)."""
    offset = 0
    for rel, path, st in _walk(root, "", ignore):
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
