"""One Docker Engine: its API client, what it can do, and the builders it offers.

Every Docker call of the daemon goes through this package; the builders
(`legacy.py`, `buildkit.py`) use this class for the requests they make.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiodocker
import aiohttp
import structlog

from builder.protocol import DEFAULT_DOCKERFILE
from builder.server.engines.base import Builder, EngineFailure
from builder.server.engines.streams import EngineStreams
from builder.server.models import BuildSpec

log = structlog.get_logger(__name__)

_PING_TIMEOUT = aiohttp.ClientTimeout(total=3)
_PING_FRESH_SECONDS = 1.0
# A build or a push may run for hours and stay silent for long stretches: no total or read timeout.
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=30)
# Short engine calls (inspect, remove, tag) get a bound of their own.
CALL_SECONDS = 60
_CPU_PERIOD = 100_000  # µs, the kernel's default CFS period
_POLL_SECONDS = 0.02
_CONFLICT_RETRIES = 25
_GONE = (404, 409)  # not found, or already being removed
# BuildKit through the API (`version=2`, `/build/cancel`) since API 1.39 (Docker 18.09), Linux only.
_BUILDKIT_API = (1, 39)
# How BuildKit describes the cache record of a context uploaded with a build (`http url http://build-context-<id>`).
_CONTEXT_RECORD = "http url http://build-context-"


@dataclasses.dataclass(frozen=True)
class BuildLimits:
    """Resource limits for every build step, as the engine's build parameters."""

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


@dataclasses.dataclass(frozen=True)
class PushProgress:
    """One layer's push status, e.g. ("a1b2c3", "Pushing", 1048576, 5242880) or ("a1b2c3", "Pushed", 0, 0)."""

    layer: str
    status: str
    current: int
    total: int


@dataclasses.dataclass(frozen=True)
class PushDigest:
    digest: str


class DockerEngine:
    """A Docker Engine, reached at one DOCKER_HOST."""

    def __init__(
        self, docker: aiodocker.Docker, limits: BuildLimits | None = None, *, docker_host: str | None = None
    ) -> None:
        self.docker = docker
        self.limits = limits or BuildLimits()
        # As configured (None: $DOCKER_HOST, else the local socket): where a BuildKit session connects.
        self.docker_host = docker_host
        self.builders: dict[str, Builder] = {}
        self._streams = EngineStreams(docker_host)
        # (loop time, answered) of the last ping: a burst of submits asks the engine once.
        self._last_ping: tuple[float, bool] = (float("-inf"), False)

    @classmethod
    def connect(cls, docker_host: str | None, *, limits: BuildLimits | None = None) -> DockerEngine:
        # No client-wide timeout: long calls (build) must not hit one; short ones pass their own.
        engine = cls(
            aiodocker.Docker(url=docker_host, timeout=aiohttp.ClientTimeout()), limits, docker_host=docker_host
        )
        # Imported here: the builders import this module for its helpers.
        from builder.server.engines.buildkit import BuildKitBuilder
        from builder.server.engines.legacy import LegacyBuilder

        engine.builders = {"buildkit": BuildKitBuilder(engine), "legacy": LegacyBuilder(engine)}
        return engine

    async def close(self) -> None:
        for builder in self.builders.values():
            await builder.aclose()
        await self._streams.aclose()
        await self.docker.close()

    async def ping(self) -> bool:
        try:
            async with self.docker._query("_ping", versioned_api=False, timeout=_PING_TIMEOUT) as response:
                answered = (await response.read()) == b"OK"
        except (TimeoutError, aiodocker.DockerError, aiohttp.ClientError, OSError):
            answered = False
        self._last_ping = (asyncio.get_running_loop().time(), answered)
        return answered

    async def answers(self) -> bool:
        """Whether the engine answered a ping in the last second (pinging it if not asked since)."""
        when, answered = self._last_ping
        if asyncio.get_running_loop().time() - when < _PING_FRESH_SECONDS:
            return answered
        return await self.ping()

    async def supports_buildkit(self) -> bool:
        """Whether this engine builds with BuildKit through its API (a Linux engine, API >= 1.39)."""
        async with asyncio.timeout(CALL_SECONDS):
            async with self.docker._query("_ping", versioned_api=False) as response:
                api = response.headers.get("Api-Version", "0.0")
                os_type = response.headers.get("Ostype", "linux")
        try:
            version = tuple(int(part) for part in api.split(".")[:2])
        except ValueError:
            return False
        return os_type == "linux" and version >= _BUILDKIT_API

    def request(
        self,
        path: str,
        method: str = "GET",
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        timeout: aiohttp.ClientTimeout = STREAM_TIMEOUT,
    ) -> Any:
        """A raw API request (an async context manager giving the response); aiodocker's own
        calls cannot pass every build parameter."""
        return self.docker._query(path, method, params=params, headers=headers, data=data, timeout=timeout)

    def stream(
        self,
        path: str,
        method: str,
        *,
        params: Mapping[str, Any],
        headers: Mapping[str, str],
        data: AsyncIterable[bytes | memoryview] | None,
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """A raw API request whose response body is read on a thread of its own (streams.py says
        why), as an iterator of pieces; the request's error comes from the iterator."""
        return self._streams.stream(path, method, params=params, headers=headers, data=data, timeout=STREAM_TIMEOUT)

    # -- containers and images ---------------------------------------------------------

    async def container_info(self, container_id: str) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(CALL_SECONDS):
                return await self.docker.containers.container(container_id).show()
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise

    async def remove_container(self, container_id: str) -> None:
        """Kill and remove a container (even one created but not started); returns once it is gone."""
        container = self.docker.containers.container(container_id)
        async with asyncio.timeout(CALL_SECONDS):
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
        async with asyncio.timeout(CALL_SECONDS):
            for _ in range(_CONFLICT_RETRIES):
                try:
                    await self.docker.images.delete(image)
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

    async def image_info(self, image: str) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(CALL_SECONDS):
                return await self.docker.images.inspect(image)
        except aiodocker.DockerError as exc:
            # 400: a reference this engine cannot parse (an IPv6 registry host on 20.10) names no image of it.
            if exc.status in (400, 404):
                return None
            raise

    async def image_id(self, image: str) -> str | None:
        info = await self.image_info(image)
        return None if info is None else info["Id"]

    async def tag(self, image: str, repository: str, tag: str) -> None:
        async with asyncio.timeout(CALL_SECONDS):
            await self.docker.images.tag(image, repository, tag=tag)

    async def prune_build_contexts(self) -> int:
        """Remove the contexts BuildKit keeps in its build cache after their builds ended.

        BuildKit stores each uploaded context (and each partial one, when an upload broke off)
        as a cache record under a URL of its own, so none is ever used again: they only fill
        the engine's disk. Records still in use belong to running builds and stay. Returns the
        bytes reclaimed.
        """
        async with asyncio.timeout(CALL_SECONDS):
            async with self.request("system/df") as response:
                usage = await response.json()
            reclaimed = 0
            for record in usage.get("BuildCache") or []:
                if record.get("InUse") or not str(record.get("Description", "")).startswith(_CONTEXT_RECORD):
                    continue
                async with self.request(
                    "build/prune", "POST", params={"filters": json.dumps({"id": [record["ID"]]})}
                ) as response:
                    reclaimed += int((await response.json()).get("SpaceReclaimed") or 0)
        return reclaimed

    # -- registry ------------------------------------------------------------------------

    async def push(
        self, repository: str, tag: str, auth: str
    ) -> AsyncIterator[PushProgress | PushDigest | EngineFailure]:
        """Push `repository:tag`; ends with one `PushDigest` or `EngineFailure`.

        `auth` is the X-Registry-Auth value. Closing the iteration drops the connection,
        which makes the engine abandon the push.
        """
        digest: PushDigest | None = None
        try:
            async with self.request(
                f"images/{repository}/push", "POST", params={"tag": tag}, headers={"X-Registry-Auth": auth}
            ) as response:
                async for chunks in json_batches(response.content):
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
            yield EngineFailure(docker_message(exc))
            return
        except (aiohttp.ClientError, OSError) as exc:
            yield EngineFailure(f"lost the connection to the Docker engine: {exc}")
            return
        yield digest or EngineFailure("the Docker engine ended the push without a digest")

    async def pull(self, repository: str, tag: str, auth: str) -> str | None:
        """Pull `repository:tag`; returns None on success, else the engine's message."""
        try:
            async with self.request(
                "images/create",
                "POST",
                params={"fromImage": repository, "tag": tag},
                headers={"X-Registry-Auth": auth},
            ) as response:
                async for chunks in json_batches(response.content):
                    for chunk in chunks:
                        if isinstance(event := parse_push_chunk(chunk), EngineFailure):
                            return event.message
        except aiodocker.DockerError as exc:
            return docker_message(exc)
        except (aiohttp.ClientError, OSError) as exc:
            return f"lost the connection to the Docker engine: {exc}"
        return None


async def json_batches(content: aiohttp.StreamReader) -> AsyncIterator[list[dict[str, Any]]]:
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


def error_message(chunk: Mapping[str, Any], fallback: str) -> str | None:
    """The engine's in-band error of a stream message, if it is one."""
    if "error" not in chunk and "errorDetail" not in chunk:
        return None
    detail = chunk.get("errorDetail")
    message = (detail.get("message") if isinstance(detail, dict) else None) or chunk.get("error")
    return str(message or fallback)


def docker_message(exc: aiodocker.DockerError) -> str:
    return str(exc.message).strip()


_DIGEST_RE = re.compile(r"\S+: digest: (sha256:[0-9a-f]{64}) size: \d+")


def parse_push_chunk(chunk: dict[str, Any]) -> PushProgress | PushDigest | EngineFailure | None:
    """Parse one message of the engine's image push stream (pure)."""
    if (message := error_message(chunk, "the engine reported an unknown push error")) is not None:
        return EngineFailure(message)
    aux = chunk.get("aux")
    if isinstance(aux, dict) and isinstance(aux.get("Digest"), str):
        return PushDigest(aux["Digest"])
    status = chunk.get("status")
    if not isinstance(status, str):
        return None
    if m := _DIGEST_RE.fullmatch(status):
        return PushDigest(m.group(1))
    detail = chunk.get("progressDetail") or {}
    return PushProgress(
        str(chunk.get("id", "")), status, int(detail.get("current") or 0), int(detail.get("total") or 0)
    )


def build_params(spec: BuildSpec, cache_from: list[str]) -> dict[str, Any]:
    """The engine's build parameters both builders share."""
    params: dict[str, Any] = {
        # Intermediate containers go away whatever the outcome.
        "rm": "1",
        "forcerm": "1",
        "nocache": "1" if spec.no_cache else "0",
        "pull": "1" if spec.pull else "0",
    }
    if spec.dockerfile != DEFAULT_DOCKERFILE:
        # Left out by default: the engine then falls back to `dockerfile` as the checks did.
        params["dockerfile"] = spec.dockerfile
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
