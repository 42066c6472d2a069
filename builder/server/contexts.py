"""Spooled build contexts on disk: receive an upload, check it, hand the file to the engine."""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import tarfile
import zlib
from collections.abc import AsyncIterable
from pathlib import Path

from builder.protocol import DEFAULT_DOCKERFILE
from builder.server.errors import ContextTooLarge, DockerfileNotFound, InvalidContext

_WRITE_BATCH = 1 << 20


class ContextSpool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def reset(self) -> None:
        """Start-up: nothing is building yet, so any spooled file is a leftover."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.iterdir():
            leftover.unlink(missing_ok=True)

    def _new_path(self) -> Path:
        return self.directory / f"{secrets.token_hex(16)}.ctx"

    async def receive(self, chunks: AsyncIterable[bytes], *, limit: int) -> Path:
        """Stream an upload to a new file; over `limit` bytes or on any failure, remove it."""
        path = self._new_path()
        fh = await asyncio.to_thread(path.open, "wb")
        size = 0
        pending: list[bytes] = []
        pending_size = 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise ContextTooLarge(f"build context is larger than the limit of {limit} bytes")
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= _WRITE_BATCH:
                    await asyncio.to_thread(fh.write, b"".join(pending))
                    pending, pending_size = [], 0
            if pending:
                await asyncio.to_thread(fh.write, b"".join(pending))
        except BaseException:
            await asyncio.to_thread(_close_and_remove, fh, path)
            raise
        await asyncio.to_thread(fh.close)
        return path

    async def write_synthetic(self, base_image: str) -> Path:
        """A context whose Dockerfile is exactly `FROM <base_image>` (already validated)."""
        dockerfile = f"FROM {base_image}\n".encode()
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo(DEFAULT_DOCKERFILE)
            info.size = len(dockerfile)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(dockerfile))
        path = self._new_path()
        await asyncio.to_thread(path.write_bytes, buffer.getvalue())
        return path

    async def check(self, path: Path, dockerfile: str) -> str:
        """Check that `path` is a readable tar holding `dockerfile`; returns the path to build with."""
        return await asyncio.to_thread(_find_dockerfile, path, dockerfile)

    async def remove(self, path: Path) -> None:
        await asyncio.to_thread(path.unlink, missing_ok=True)


def _close_and_remove(fh: io.BufferedWriter, path: Path) -> None:
    fh.close()
    path.unlink(missing_ok=True)


def _find_dockerfile(path: Path, dockerfile: str) -> str:
    # Like `docker build`, the default name falls back to lower-case `dockerfile`.
    wanted = [dockerfile] + (["dockerfile"] if dockerfile == DEFAULT_DOCKERFILE else [])
    found: set[str] = set()
    try:
        # "r:*" detects gzip/bzip2/xz by content, not by name.
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                name = os.path.normpath(member.name.lstrip("/")) if member.name else ""
                if name in wanted and (member.isfile() or member.issym()):
                    found.add(name)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise InvalidContext(f"build context is not a readable tar archive: {exc}") from None
    for name in wanted:
        if name in found:
            return name
    raise DockerfileNotFound(f"Dockerfile {dockerfile!r} not found in the build context")
