"""Spooled build contexts on disk: receive an upload, check it, hand the file to the engine."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import secrets
import tarfile
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

from builder.protocol import DEFAULT_DOCKERFILE
from builder.server.errors import ContextTooLarge, DockerfileNotFound, UploadStalled
from builder.server.tarscan import TarScanner

_WRITE_BATCH = 1 << 20
_READ_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class SpooledContext:
    path: Path
    size: int
    # Regular files and symlinks in the archive, by normalised path.
    files: frozenset[str]
    # sha256 of the uploaded bytes, when asked for (idempotent submits compare it).
    digest: str | None = None

    def dockerfile(self, wanted: str) -> str:
        """The path to build with; like `docker build`, the default falls back to `dockerfile`."""
        candidates = [wanted] + (["dockerfile"] if wanted == DEFAULT_DOCKERFILE else [])
        for name in candidates:
            if name in self.files:
                return name
        raise DockerfileNotFound(f"Dockerfile {wanted!r} not found in the build context")


class ContextSpool:
    def __init__(self, directory: Path, *, max_entries: int, max_unpacked: int, idle_timeout: float) -> None:
        self.directory = directory
        self._limits = {"max_members": max_entries, "max_unpacked": max_unpacked}
        self._idle_timeout = idle_timeout

    def reset(self) -> None:
        """Start-up: nothing is building yet, so any spooled file is a leftover."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.iterdir():
            leftover.unlink(missing_ok=True)

    async def receive(self, chunks: AsyncIterable[bytes], *, limit: int, digest: bool = False) -> SpooledContext:
        """Stream an upload to a new file, reading its tar headers on the way.

        Over `limit` bytes, not a tar, or any other failure: the file is removed.
        """
        path = self.directory / f"{secrets.token_hex(16)}.ctx"
        fh = await asyncio.to_thread(path.open, "wb")
        scanner = TarScanner(**self._limits)
        hasher = hashlib.sha256() if digest else None
        size = 0
        pending: list[bytes] = []
        pending_size = 0
        try:
            async for chunk in _stall_guarded(chunks, self._idle_timeout):
                size += len(chunk)
                if size > limit:
                    raise ContextTooLarge(f"build context is larger than the limit of {limit} bytes")
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= _WRITE_BATCH:
                    await asyncio.to_thread(_absorb, fh, scanner, hasher, b"".join(pending))
                    pending, pending_size = [], 0
            await asyncio.to_thread(_absorb, fh, scanner, hasher, b"".join(pending))
            scanner.finish()
        except BaseException:
            await asyncio.to_thread(_close_and_remove, fh, path)
            raise
        await asyncio.to_thread(fh.close)
        return SpooledContext(path, size, frozenset(scanner.files), hasher.hexdigest() if hasher else None)

    async def write_synthetic(self, base_image: str) -> SpooledContext:
        """A context whose Dockerfile is exactly `FROM <base_image>` (already validated)."""
        dockerfile = f"FROM {base_image}\n".encode()
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo(DEFAULT_DOCKERFILE)
            info.size = len(dockerfile)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(dockerfile))
        return await self.receive(_single(buffer.getvalue()), limit=len(buffer.getvalue()))

    async def read(self, path: Path) -> AsyncIterator[bytes]:
        """A spooled context's bytes, read in a worker thread so the event loop never blocks."""
        with await asyncio.to_thread(path.open, "rb") as fh:
            while chunk := await asyncio.to_thread(fh.read, _READ_CHUNK):
                yield chunk

    async def remove(self, path: Path) -> None:
        await asyncio.to_thread(path.unlink, missing_ok=True)


async def _stall_guarded(chunks: AsyncIterable[bytes], idle_timeout: float) -> AsyncIterator[bytes]:
    """The upload's chunks; one that takes longer than `idle_timeout` to come ends it (slow loris)."""
    iterator = aiter(chunks)
    while True:
        try:
            async with asyncio.timeout(idle_timeout):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UploadStalled(f"the upload sent nothing for {idle_timeout:g} seconds") from None
        yield chunk


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _absorb(fh: io.BufferedWriter, scanner: TarScanner, hasher: Any, data: bytes) -> None:
    # One worker-thread hop per batch does it all: the header scan, the digest, the disk write.
    scanner.feed(data)
    if hasher is not None:
        hasher.update(data)
    fh.write(data)


def _close_and_remove(fh: io.BufferedWriter, path: Path) -> None:
    fh.close()
    path.unlink(missing_ok=True)
