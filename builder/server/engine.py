"""The only code that speaks to the Docker engine."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import structlog

from builder.server.buildspec import BuildSpec
from builder.server.engine_output import (
    BuildOutputParser,
    EngineEvent,
    EngineFailure,
    ImageBuilt,
    PushDigest,
    PushProgress,
    parse_push_chunk,
)

log = structlog.get_logger(__name__)

_UPLOAD_CHUNK = 1 << 20
_PING_TIMEOUT = aiohttp.ClientTimeout(total=3)
# A build may run for hours and stay silent for long stretches: no total or read timeout.
_BUILD_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=30)
# Short engine calls (inspect, remove) get a bound of their own.
_CALL_SECONDS = 60
_CPU_PERIOD = 100_000  # µs, the kernel's default CFS period
_POLL_SECONDS = 0.02
_CONFLICT_RETRIES = 25
_GONE = (404, 409)  # not found, or already being removed


@dataclasses.dataclass(frozen=True)
class BuildLimits:
    """Resource limits for every build step container, as the engine's build parameters."""

    memory: int | None = None  # bytes
    cpus: float | None = None
    network: str = "bridge"

    def params(self) -> dict[str, str]:
        params = {"networkmode": self.network}
        if self.memory:
            # memswap == memory: no swap on top, so the limit really bounds the step.
            params |= {"memory": str(self.memory), "memswap": str(self.memory)}
        if self.cpus:
            params |= {"cpuperiod": str(_CPU_PERIOD), "cpuquota": str(int(self.cpus * _CPU_PERIOD))}
        return params


class DockerEngine:
    def __init__(self, docker: aiodocker.Docker, limits: BuildLimits | None = None) -> None:
        self._docker = docker
        self._limits = limits or BuildLimits()

    @classmethod
    def connect(cls, docker_host: str | None, *, limits: BuildLimits | None = None) -> DockerEngine:
        # No client-wide timeout: long calls (build) must not hit one; short ones pass their own.
        return cls(aiodocker.Docker(url=docker_host, timeout=aiohttp.ClientTimeout()), limits)

    async def close(self) -> None:
        await self._docker.close()

    async def ping(self) -> bool:
        try:
            async with self._docker._query(
                "_ping", versioned_api=False, timeout=_PING_TIMEOUT
            ) as response:
                return (await response.read()) == b"OK"
        except (aiodocker.DockerError, aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def build(
        self,
        context: Path,
        spec: BuildSpec,
        *,
        cache_from: list[str] | None = None,
        on_context_sent: Callable[[], Awaitable[object]] | None = None,
    ) -> AsyncIterator[list[EngineEvent]]:
        """Run a legacy-builder build; yields the parsed events of each read from the engine.

        Ends with exactly one `ImageBuilt` or `EngineFailure`: a stream that
        stops without the engine naming the image is a failure, never a success.
        """
        parser = BuildOutputParser()
        failure: EngineFailure | None = None
        try:
            async with self._docker._query(
                "build",
                "POST",
                params=_build_params(spec, cache_from or []) | self._limits.params(),
                headers={"Content-Type": "application/x-tar"},
                data=_read_file(context, on_context_sent),
                timeout=_BUILD_TIMEOUT,
            ) as response:
                built = False
                async for chunks in _json_batches(response.content):
                    events = [event for chunk in chunks for event in parser.feed(chunk)]
                    for n, event in enumerate(events):
                        if isinstance(event, EngineFailure):
                            yield events[: n + 1]
                            return
                        built = built or isinstance(event, ImageBuilt)
                    yield events
            if not built:
                failure = EngineFailure("the Docker engine ended the build stream without naming an image")
        except aiodocker.DockerError as exc:
            failure = EngineFailure(_docker_message(exc))
        except (aiohttp.ClientError, OSError) as exc:
            failure = EngineFailure(f"lost the connection to the Docker engine: {exc}")
        yield parser.finish() + ([failure] if failure is not None else [])

    async def remove_container(self, container_id: str) -> None:
        """Kill and remove a container (even one created but not started); returns once it is gone."""
        container = self._docker.containers.container(container_id)
        async with asyncio.timeout(_CALL_SECONDS):
            try:
                await container.delete(force=True, v=True)
            except aiodocker.DockerError as exc:
                # 409: the builder itself is removing it (forcerm); wait for that below.
                if exc.status not in _GONE:
                    raise
            while True:
                try:
                    await container.show()
                except aiodocker.DockerError as exc:
                    if exc.status == 404:
                        return
                    raise
                await asyncio.sleep(_POLL_SECONDS)

    async def remove_image(self, image: str) -> bool:
        """Remove an image (tag or id) and its untagged parents; False if it is gone or still in use."""
        async with asyncio.timeout(_CALL_SECONDS):
            for _ in range(_CONFLICT_RETRIES):
                try:
                    await self._docker.images.delete(image)
                except aiodocker.DockerError as exc:
                    if exc.status == 404:
                        return False
                    if exc.status != 409:
                        raise
                    # In use: often a container the builder is still removing.
                    await asyncio.sleep(_POLL_SECONDS)
                else:
                    return True
        log.warning("image_still_in_use", image=image)
        return False

    async def tag(self, image: str, repository: str, tag: str) -> None:
        async with asyncio.timeout(_CALL_SECONDS):
            await self._docker.images.tag(image, repository, tag=tag)

    async def push(
        self, repository: str, tag: str, auth: str
    ) -> AsyncIterator[PushProgress | PushDigest | EngineFailure]:
        """Push `repository:tag`; ends with one `PushDigest` or `EngineFailure`.

        `auth` is the X-Registry-Auth value. Closing the iteration drops the connection,
        which makes the engine abandon the push.
        """
        digest: PushDigest | None = None
        try:
            async with self._docker._query(
                f"images/{repository}/push", "POST", params={"tag": tag},
                headers={"X-Registry-Auth": auth}, timeout=_BUILD_TIMEOUT,
            ) as response:
                async for chunks in _json_batches(response.content):
                    for chunk in chunks:
                        event = parse_push_chunk(chunk)
                        if isinstance(event, EngineFailure):
                            yield event
                            return
                        if isinstance(event, PushDigest):
                            digest = event
                        elif event is not None:
                            yield event
        except aiodocker.DockerError as exc:
            yield EngineFailure(_docker_message(exc))
            return
        except (aiohttp.ClientError, OSError) as exc:
            yield EngineFailure(f"lost the connection to the Docker engine: {exc}")
            return
        yield digest or EngineFailure("the Docker engine ended the push without a digest")

    async def pull(self, repository: str, tag: str, auth: str) -> str | None:
        """Pull `repository:tag`; returns None on success, else the engine's message."""
        try:
            async with self._docker._query(
                "images/create", "POST", params={"fromImage": repository, "tag": tag},
                headers={"X-Registry-Auth": auth}, timeout=_BUILD_TIMEOUT,
            ) as response:
                async for chunks in _json_batches(response.content):
                    for chunk in chunks:
                        if isinstance(event := parse_push_chunk(chunk), EngineFailure):
                            return event.message
        except aiodocker.DockerError as exc:
            return _docker_message(exc)
        except (aiohttp.ClientError, OSError) as exc:
            return f"lost the connection to the Docker engine: {exc}"
        return None

    async def image_id(self, image: str) -> str | None:
        try:
            async with asyncio.timeout(_CALL_SECONDS):
                info = await self._docker.images.inspect(image)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise
        return info["Id"]


def _build_params(spec: BuildSpec, cache_from: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {
        "dockerfile": spec.dockerfile,
        # Intermediate containers go away whatever the outcome.
        "rm": "1",
        "forcerm": "1",
        "nocache": "1" if spec.no_cache else "0",
        "pull": "1" if spec.pull else "0",
    }
    if spec.image_name:
        params["t"] = spec.image_name
    if spec.build_args:
        params["buildargs"] = json.dumps(spec.build_args)
    if spec.labels:
        params["labels"] = json.dumps(spec.labels)
    if spec.target:
        params["target"] = spec.target
    if cache_from:
        params["cachefrom"] = json.dumps(cache_from)
    return params


async def _read_file(path: Path, on_done: Callable[[], Awaitable[object]] | None) -> AsyncIterator[bytes]:
    # aiodocker's own fileobj feeding reads on the event loop; read in a worker thread instead.
    with await asyncio.to_thread(path.open, "rb") as fh:
        while chunk := await asyncio.to_thread(fh.read, _UPLOAD_CHUNK):
            yield chunk
    if on_done is not None:
        await on_done()


async def _json_batches(content: aiohttp.StreamReader) -> AsyncIterator[list[dict[str, Any]]]:
    """The JSON messages of each network read, as one batch (a chatty build sends thousands)."""
    # Split by hand: StreamReader.readline() rejects lines over 64 KiB.
    buffer = b""
    async for data in content.iter_any():
        *lines, buffer = (buffer + data).split(b"\n")
        if batch := [_decode(raw) for raw in lines if raw.strip()]:
            yield batch
    if buffer.strip():
        yield [_decode(buffer)]


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        chunk = json.loads(raw)
    except ValueError:
        return {"stream": raw.decode("utf-8", "replace") + "\n"}
    return chunk if isinstance(chunk, dict) else {"stream": f"{chunk}\n"}


def _docker_message(exc: aiodocker.DockerError) -> str:
    message = exc.message
    if isinstance(message, dict):
        message = message.get("message", message)
    return str(message).strip()
