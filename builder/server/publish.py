"""After a build: push to the registry, keep a cache image per cache_key, convert with nydusify."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from typing import Any

import structlog

from builder import protocol as p
from builder.server.config import Settings
from builder.server.engines.base import EngineFailure
from builder.server.engines.docker import DockerEngine, PushDigest, PushProgress
from builder.server.hosts import is_loopback

log = structlog.get_logger(__name__)

Emit = Callable[[dict[str, Any]], object]

CACHE_REPOSITORY = "builder-cache"
# Push progress is rate-limited: one event per layer state change, byte counts at most this often.
_PROGRESS_INTERVAL = 0.5
_NYDUS_TIMEOUT = 3600


class PublishError(Exception):
    """Push, cache or conversion failed; the message is for the build's `error`."""


class Publisher:
    """Registry work after a build, on the engine the build ran on."""

    def __init__(self, settings: Settings) -> None:
        self.registry = settings.registry
        self._auth = _registry_auth(settings)
        self._nydusify = shutil.which(settings.nydusify) if settings.nydusify else None

    def pushed_ref(self, image_name: str) -> str:
        """Where a build's `name:tag` goes in the registry."""
        return f"{self.registry}/{image_name}"

    def cache_ref(self, namespace: str, cache_key: str) -> tuple[str, str]:
        """(repository, tag) of a tenant's cache image for a key: a digest, so any key makes a tag."""
        repository = f"{namespace}/{CACHE_REPOSITORY}" if namespace else CACHE_REPOSITORY
        if self.registry:
            repository = f"{self.registry}/{repository}"
        return repository, hashlib.sha256(cache_key.encode()).hexdigest()[:32]

    async def cache_sources(self, engine: DockerEngine, namespace: str, cache_key: str, emit: Emit) -> list[str]:
        """The cache image to build from, fetched from the registry when there is one."""
        repository, tag = self.cache_ref(namespace, cache_key)
        ref = f"{repository}:{tag}"
        if self.registry and (problem := await engine.pull(repository, tag, self._auth)):
            log.info("cache_image_not_pulled", ref=ref, reason=problem)
        if await engine.image_id(ref) is None:
            return []
        emit({"type": p.EVENT_STATUS, "status": "running", "phase": "cache", "cache_from": ref})
        return [ref]

    async def store_cache(self, engine: DockerEngine, image_id: str, namespace: str, cache_key: str, emit: Emit) -> str:
        repository, tag = self.cache_ref(namespace, cache_key)
        await engine.tag(image_id, repository, tag)
        if self.registry:
            await self._push(engine, repository, tag, emit, phase="push-cache")
        return f"{repository}:{tag}"

    async def push(self, engine: DockerEngine, image_id: str, image_name: str, emit: Emit) -> tuple[str, str]:
        """Tag and push; returns (image_ref, digest)."""
        repository, tag = self.pushed_ref(image_name).rsplit(":", 1)
        await engine.tag(image_id, repository, tag)
        digest = await self._push(engine, repository, tag, emit, phase="push")
        return f"{repository}:{tag}", digest

    async def _push(self, engine: DockerEngine, repository: str, tag: str, emit: Emit, *, phase: str) -> str:
        ref = f"{repository}:{tag}"
        emit({"type": p.EVENT_STATUS, "status": "running", "phase": phase, "image_ref": ref})
        started = time.monotonic()
        last_progress = 0.0
        async for event in engine.push(repository, tag, self._auth):
            match event:
                case EngineFailure(message):
                    raise PublishError(f"push of {ref} to {self.registry} failed: {message}")
                case PushDigest(digest):
                    emit(
                        {
                            "type": p.EVENT_STATUS,
                            "status": "running",
                            "phase": phase,
                            "image_ref": ref,
                            "digest": digest,
                            "seconds": round(time.monotonic() - started, 3),
                        }
                    )
                    return digest
                case PushProgress(layer, status, current, total):
                    now = time.monotonic()
                    if current and now - last_progress < _PROGRESS_INTERVAL:
                        continue
                    last_progress = now
                    event_data: dict[str, Any] = {
                        "type": p.EVENT_STATUS,
                        "status": "running",
                        "phase": phase,
                        "layer": layer,
                        "progress": status,
                    }
                    if total:
                        event_data |= {"current": current, "total": total}
                    emit(event_data)
        raise PublishError(f"push of {ref} ended without a digest")

    @property
    def nydus_available(self) -> bool:
        return self._nydusify is not None

    async def convert_nydus(self, source: str) -> str:
        """Run `nydusify convert` from the pushed image to `<source>-nydus`; returns the target."""
        assert self._nydusify is not None
        target = f"{source}-nydus"
        args = [self._nydusify, "convert", "--source", source, "--target", target]
        if is_loopback(self.registry or ""):
            # Like the engine's default, a registry on loopback is spoken to over plain HTTP.
            args += ["--source-insecure", "--target-insecure"]
        process = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), _NYDUS_TIMEOUT)
        except BaseException:
            if process.returncode is None:
                process.kill()
                await process.wait()
            raise
        if process.returncode != 0:
            tail = output.decode(errors="replace").strip().splitlines()[-3:]
            raise PublishError(f"nydusify exited with {process.returncode}: {' | '.join(tail)}")
        return target


def _registry_auth(settings: Settings) -> str:
    """X-Registry-Auth: base64url JSON credentials; `{}` means anonymous."""
    auth: dict[str, str] = {}
    if settings.registry_username:
        auth = {
            "username": settings.registry_username,
            "password": settings.registry_password or "",
            "serveraddress": settings.registry or "",
        }
    return base64.urlsafe_b64encode(json.dumps(auth).encode()).decode()
