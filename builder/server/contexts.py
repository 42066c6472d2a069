"""Build contexts on their way: an upload is checked and rewritten as it arrives (`archive/`),
and the canonical tar flows on to the engine (a `ContextPipe`) or to disk (the spool).

What the engine reads is only ever what the rewriter wrote, and its last bytes (the
end-of-archive blocks) only go out once every check has passed: a context refused at the
end never reaches the engine whole.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import io
import secrets
import tarfile
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

from builder.protocol import DEFAULT_DOCKERFILE
from builder.server.archive.rewrite import ContextRewriter
from builder.server.errors import ContextTooLarge, ShuttingDown, TenantQuotaExceeded, UploadStalled

# Upload bytes handed to the rewriter at once: one worker-thread hop per batch.
_BATCH = 1 << 20
_READ_CHUNK = 1 << 20
# Upload chunks read ahead of the checks (each at most the request's read chunk, 256 KiB).
_READ_AHEAD = 32
# Pieces of canonical tar a pipe holds while the engine reads slower than the upload comes.
_PIPE_DEPTH = 16


@dataclasses.dataclass(frozen=True)
class ContextLimits:
    max_bytes: int  # the upload as sent (compressed or not)
    max_unpacked: int  # the tar the engine reads
    max_entries: int
    idle_timeout: float  # seconds an upload may send nothing
    total_timeout: float = 3600.0  # seconds an upload may take in all


@dataclasses.dataclass(frozen=True)
class CheckedContext:
    """What the checks learnt of a context, once all of it has arrived."""

    dockerfile: str  # its path inside the context
    dockerfile_text: str
    size: int  # bytes uploaded
    unpacked: int  # bytes of the canonical tar
    # sha256 of the uploaded bytes, when asked for (idempotent submits compare it).
    digest: str | None = None


class ContextAborted(ConnectionAbortedError):
    """The upload feeding an engine request failed: the engine must not get the rest.

    An OSError, because to the engine's client it is one: the request body broke off.
    """


class ContextPipe:
    """Canonical tar handed from the upload (the request's task) to the engine (the build's task),
    a few pieces at a time: a slow engine slows the upload down instead of filling memory."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | memoryview | BaseException | None] = asyncio.Queue(_PIPE_DEPTH)
        self._reader_gone = False

    async def put(self, pieces: list[memoryview] | list[bytes]) -> None:
        for piece in pieces:
            if self._reader_gone:
                raise ContextAborted("the engine stopped reading the build context")
            await self._queue.put(piece)

    async def close(self) -> None:
        await self._queue.put(None)

    def fail(self, exc: BaseException) -> None:
        """The upload failed: the engine's read ends with an error, never with a whole tar."""
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(exc)

    async def pieces(self) -> AsyncIterator[bytes | memoryview]:
        try:
            while (piece := await self._queue.get()) is not None:
                if isinstance(piece, BaseException):
                    raise ContextAborted(f"the build context upload failed: {piece}")
                yield piece
        finally:
            self._reader_gone = True
            # Unblock an upload waiting for room, so it notices.
            while not self._queue.empty():
                self._queue.get_nowait()


@dataclasses.dataclass(frozen=True)
class SpooledContext:
    """A checked context on disk (a multipart upload, read whole before its fields are known)."""

    path: Path
    checked: CheckedContext


class ContextSpool:
    """Checked contexts waiting on disk for their build to start (canonical, uncompressed tar),
    with each tenant's share of the disk bounded."""

    def __init__(self, directory: Path, *, max_bytes_per_tenant: int = 1 << 62) -> None:
        self.directory = directory
        self.max_bytes_per_tenant = max_bytes_per_tenant
        self._files: dict[Path, tuple[str, int]] = {}  # path -> (tenant, bytes)
        self._bytes: collections.Counter[str] = collections.Counter()

    def tenant_bytes(self, tenant: str) -> int:
        return self._bytes[tenant]

    def reset(self) -> None:
        """Start-up: nothing is building yet, so any spooled file is a leftover."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.iterdir():
            leftover.unlink(missing_ok=True)

    async def create(self, tenant: str = "") -> SpoolWriter:
        path = self.directory / f"{secrets.token_hex(16)}.tar"
        self._files[path] = (tenant, 0)
        return SpoolWriter(self, path, await asyncio.to_thread(path.open, "wb"))

    def _grow(self, path: Path, size: int) -> None:
        tenant, written = self._files[path]
        if self._bytes[tenant] + size > self.max_bytes_per_tenant:
            raise TenantQuotaExceeded(
                f"your contexts waiting on this daemon's disk would pass {self.max_bytes_per_tenant} bytes; "
                "retry once some of your builds have started"
            )
        self._files[path] = (tenant, written + size)
        self._bytes[tenant] += size

    def _forget(self, path: Path) -> None:
        if (entry := self._files.pop(path, None)) is not None:
            tenant, written = entry
            self._bytes[tenant] -= written
            if not self._bytes[tenant]:
                del self._bytes[tenant]

    async def read(self, path: Path) -> AsyncIterator[bytes]:
        """A spooled context's bytes, read in a worker thread so the event loop never blocks."""
        with await asyncio.to_thread(path.open, "rb") as fh:
            while chunk := await asyncio.to_thread(fh.read, _READ_CHUNK):
                yield chunk

    async def remove(self, path: Path) -> None:
        self._forget(path)
        await asyncio.to_thread(path.unlink, missing_ok=True)


class SpoolWriter:
    def __init__(self, spool: ContextSpool, path: Path, fh: BinaryIO) -> None:
        self._spool = spool
        self.path = path
        self._fh = fh

    async def put(self, pieces: list[memoryview] | list[bytes]) -> None:
        self._spool._grow(self.path, sum(len(piece) for piece in pieces))
        await asyncio.to_thread(self._fh.writelines, pieces)

    async def close(self) -> None:
        await asyncio.to_thread(self._fh.close)

    async def discard(self) -> None:
        def close_and_remove() -> None:
            self._fh.close()
            self.path.unlink(missing_ok=True)

        self._spool._forget(self.path)
        await asyncio.to_thread(close_and_remove)


Sink = Callable[[list[memoryview] | list[bytes]], Awaitable[None]]


async def receive(
    chunks: AsyncIterable[bytes],
    sink: Sink,
    *,
    limits: ContextLimits,
    dockerfile: str = DEFAULT_DOCKERFILE,
    dockerfile_required: bool = True,
    digest: bool = False,
    before_end: Callable[[CheckedContext], Awaitable[None]] | None = None,
    interrupted: asyncio.Event | None = None,
) -> CheckedContext:
    """Check and rewrite an upload as it arrives, handing the canonical tar to `sink` piece by piece.

    Raises a BuilderError (400, 408, 413) as soon as the upload shows it is bad. `before_end`
    runs the checks that need the whole context (the Dockerfile, say) before the
    end-of-archive blocks go to `sink`: until then the engine cannot act on the context.
    Without `dockerfile_required`, a context lacking that Dockerfile passes (its name may
    still change), with `dockerfile` "" in the result. When `interrupted` is set (the daemon
    shuts down), the upload ends at once with a 503.
    """
    rewriter = ContextRewriter(
        max_entries=limits.max_entries,
        max_unpacked=limits.max_unpacked,
        dockerfile=dockerfile,
        require_dockerfile=dockerfile_required,
    )
    hasher = hashlib.sha256() if digest else None
    size = 0
    batch: list[bytes] = []
    batch_size = 0
    async for chunk in _guarded(chunks, limits.idle_timeout, limits.total_timeout, interrupted):
        size += len(chunk)
        if size > limits.max_bytes:
            raise ContextTooLarge(f"build context is larger than the limit of {limits.max_bytes} bytes")
        batch.append(chunk)
        batch_size += len(chunk)
        if batch_size >= _BATCH:
            await sink(await asyncio.to_thread(_rewrite, rewriter, hasher, b"".join(batch)))
            batch, batch_size = [], 0
    if batch:
        await sink(await asyncio.to_thread(_rewrite, rewriter, hasher, b"".join(batch)))
    end = rewriter.finish()
    context = CheckedContext(
        dockerfile=rewriter.dockerfile_path,
        dockerfile_text=rewriter.dockerfile_text,
        size=size,
        unpacked=rewriter.unpacked,
        digest=hasher.hexdigest() if hasher is not None else None,
    )
    if before_end is not None:
        await before_end(context)
    await sink([end])
    return context


def _rewrite(rewriter: ContextRewriter, hasher: Any, data: bytes) -> list[memoryview]:
    # One worker-thread hop does it all: decompression, the header checks, the digest.
    if hasher is not None:
        hasher.update(data)
    return list(rewriter.feed(data))


async def recheck_dockerfile(path: Path, dockerfile: str, limits: ContextLimits) -> CheckedContext:
    """Check a spooled (canonical) context again for a Dockerfile named after it arrived
    (a multipart field that came after the context part)."""
    context = await receive(_read_file(path), _discard, limits=_unbounded(limits), dockerfile=dockerfile)
    return dataclasses.replace(context, size=path.stat().st_size)


async def synthetic(base_image: str) -> AsyncIterator[bytes]:
    """The upload of a context whose Dockerfile is exactly `FROM <base_image>` (already validated)."""
    dockerfile = f"FROM {base_image}\n".encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(DEFAULT_DOCKERFILE)
        info.size = len(dockerfile)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(dockerfile))
    yield buffer.getvalue()


async def _guarded(
    chunks: AsyncIterable[bytes], idle_timeout: float, total_timeout: float, interrupted: asyncio.Event | None
) -> AsyncIterator[bytes]:
    """The upload's chunks, read ahead by a task of their own, so the socket keeps being read
    while a batch is being checked and written. A chunk that takes longer than `idle_timeout`
    to come ends the upload (slow loris), so does an upload longer than `total_timeout` in all
    (a trickle), and so does `interrupted` (a shutdown)."""
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(_READ_AHEAD)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total_timeout

    async def read() -> None:
        iterator = aiter(chunks)
        try:
            while True:
                idle = min(idle_timeout, deadline - loop.time())
                try:
                    async with asyncio.timeout(idle):
                        chunk = await anext(iterator)
                except StopAsyncIteration:
                    await queue.put(None)
                    return
                except TimeoutError:
                    await queue.put(
                        UploadStalled(
                            f"the upload sent nothing for {idle_timeout:g} seconds"
                            if idle == idle_timeout
                            else f"the upload took longer than {total_timeout:g} seconds"
                        )
                    )
                    return
                await queue.put(chunk)
        except Exception as exc:  # noqa: BLE001 (the connection broke, a malformed body: the consumer raises it)
            await queue.put(exc)

    reader = asyncio.create_task(read())
    stop = asyncio.ensure_future(interrupted.wait()) if interrupted is not None else None
    try:
        while True:
            if queue.empty() and stop is not None:
                item_ready = asyncio.ensure_future(queue.get())
                await asyncio.wait({item_ready, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not item_ready.done():
                    item_ready.cancel()
                    raise ShuttingDown("the daemon is shutting down; send the build to another instance or later")
                item = item_ready.result()
            else:
                item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        reader.cancel()
        if stop is not None:
            stop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    with await asyncio.to_thread(path.open, "rb") as fh:
        while chunk := await asyncio.to_thread(fh.read, _READ_CHUNK):
            yield chunk


async def _discard(pieces: list[memoryview] | list[bytes]) -> None:
    return None


def _unbounded(limits: ContextLimits) -> ContextLimits:
    # The spooled copy was checked against the limits already; only the Dockerfile is new.
    return dataclasses.replace(limits, max_bytes=1 << 62, idle_timeout=3600.0)
