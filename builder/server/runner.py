"""Drives one build: context -> engine -> events -> publish -> outcome.

The runner knows builds, events and outcomes, never which builder runs them: it
asks the build's builder to start, to stop, and to clean up after itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterable, Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from builder import protocol as p
from builder.protocol import BuildStatus
from builder.server.contexts import ContextPipe, ContextSpool
from builder.server.engines.base import (
    BuildJob,
    BuildRun,
    CredentialsLookup,
    EngineFailure,
    ImageBuilt,
    LogClipped,
    Output,
    StepChanged,
    bring_forward,
)
from builder.server.engines.docker import DockerEngine
from builder.server.events import EventLog
from builder.server.publish import Publisher, PublishError
from builder.server.records import BuildRecord

log = structlog.get_logger(__name__)


@dataclasses.dataclass(eq=False)
class ActiveBuild:
    """A build that is queued, running, or finished but not yet fully persisted."""

    record: BuildRecord
    log: EventLog
    # Where its checked context comes from: a pipe from the upload still arriving, or the spool.
    pipe: ContextPipe | None = None
    spool: Path | None = None
    # Once its upload has passed every check: until then nothing of it is saved or shown.
    accepted: bool = False
    task: asyncio.Task[None] | None = None
    # Set once DELETE, the timeout or shutdown asked it to stop: how it ends then.
    stop_reason: tuple[BuildStatus, str] | None = None
    stop_requested_at: float | None = None
    queue_announced_at: float = 0.0
    # The engine the build runs on (its tenant's), and its side of the build while it runs.
    engine: DockerEngine | None = None
    run: BuildRun | None = None
    # Bounds the phases around the engine build (cache pull, push): a stop ends them at once.
    deadline: asyncio.Timeout | None = None
    log_clipped: bool = False
    # Bytes of output lines logged so far, and whether the log stopped taking them.
    log_bytes: int = 0
    log_truncated: bool = False
    # Bytes of its context on the spool (they count against its tenant's spool quota).
    spooled_bytes: int = 0
    # Its secrets, in memory only: emptied when it ends, however it ends (and kept out of any repr:
    # a traceback renderer that shows locals must not print them).
    secrets: dict[str, bytes] = dataclasses.field(default_factory=dict, repr=False)
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def tenant(self) -> str:
        return self.record.namespace


class BuildRunner:
    def __init__(
        self,
        spool: ContextSpool,
        publisher: Publisher,
        *,
        save: Callable[[BuildRecord], Awaitable[None]],
        keep_local: bool,
        max_log_bytes: int,
        max_line: int,
        registry_logins: Callable[[str], CredentialsLookup | None] = lambda tenant: None,
    ) -> None:
        self._max_log_bytes = max_log_bytes
        self._max_line = max_line
        self._spool = spool
        self._publisher = publisher
        self._save = save
        self._keep_local = keep_local
        # Per tenant: its logins for the registries builds pull from, if the daemon has any.
        self._registry_logins = registry_logins

    async def run(self, build: ActiveBuild) -> tuple[BuildStatus, str | None]:
        """Build and publish; the outcome, once whatever must go is gone."""
        status, error = await self._drive(build)
        if build.stop_reason is not None:
            await self.tear_down(build)
            return build.stop_reason
        if status is not BuildStatus.SUCCEEDED and build.run is not None:
            # A failed build keeps its layers (cache, as with `docker build`), not its containers.
            await build.run.clean_up(images=False)
        return status, error

    async def stop(self, build: ActiveBuild) -> None:
        """Stop a running build now; returns once the engine runs nothing of it."""
        build.log.stop_waiting()
        if build.deadline is not None:
            bring_forward(build.deadline)
        elif build.run is not None:
            await build.run.stop()

    async def tear_down(self, build: ActiveBuild) -> None:
        """Remove everything a stopped build left: its tags, containers, and images it created."""
        record = build.record
        await self._remove_tags(build)
        if build.run is not None:
            await build.run.clean_up(images=True)
        record.image_id = record.image_ref = None

    async def _drive(self, build: ActiveBuild) -> tuple[BuildStatus, str | None]:
        record = build.record
        spec = record.spec
        engine = build.engine
        assert engine is not None
        failure: str | None = None
        try:
            cache_from = (
                await self._bounded(
                    build, self._publisher.cache_sources(engine, record.namespace, spec.cache_key, build.log.append)
                )
                if spec.cache_key
                else []
            )
            context: AsyncIterable[bytes | memoryview]
            if build.pipe is not None:
                context = build.pipe.pieces()
            else:
                assert build.spool is not None  # no pipe: the context waited on the spool
                context = self._spool.read(build.spool)
            job = BuildJob(
                build_id=record.build_id,
                spec=spec,
                context=context,
                cache_from=cache_from,
                tenant=record.namespace,
                max_line=self._max_line,
                on_context_sent=lambda: self._context_sent(build),
                remember=lambda kind, ident: self._remember(record, kind, ident),
                secrets=build.secrets,
                registry_logins=self._registry_logins(record.namespace),
            )
            builder = engine.builders[spec.builder or "buildkit"]
            build.run = builder.start(job)
            if build.stop_reason is not None:
                await build.run.stop()
            image_id, failure = await self._follow_engine(build, build.run)
            if failure is None and image_id is not None and build.stop_reason is None:
                record.image_id = await engine.image_id(image_id) or image_id
                record.image_ref = spec.image_name or record.image_id
                if spec.image_name:
                    record.tags.append(spec.image_name)
                failure = await self._bounded(build, self._publish(build))
            elif failure is None and image_id is None:
                failure = "the engine did not report an image"
        except TimeoutError:
            failure = "stopped"
        return (BuildStatus.FAILED, failure) if failure is not None else (BuildStatus.SUCCEEDED, None)

    async def _bounded(self, build: ActiveBuild, work: Awaitable[Any]) -> Any:
        """Run a phase around the engine build (cache pull, push) that a stop ends at once."""
        async with asyncio.timeout(None) as deadline:
            build.deadline = deadline
            if build.stop_reason is not None:
                bring_forward(deadline)
            try:
                return await work
            finally:
                build.deadline = None

    async def _follow_engine(self, build: ActiveBuild, run: BuildRun) -> tuple[str | None, str | None]:
        """The engine's events into the build's log; the image id or the failure."""
        image_id: str | None = None
        failure: str | None = None
        async with contextlib.aclosing(run.events()) as batches:
            async for batch in batches:
                datas: list[str] = []
                for event in batch:
                    match event:
                        case Output():
                            self._output(build, event, datas)
                        case StepChanged():
                            datas.append(p.dump_event(_step_payload(event)))
                        case LogClipped(step, message):
                            if not build.log_clipped:
                                build.log_clipped = True
                                datas.append(
                                    p.dump_event(
                                        {
                                            "type": p.EVENT_STATUS,
                                            "status": "running",
                                            "phase": p.PHASE_LOG_CLIPPED,
                                            "step": step,
                                            "message": message,
                                        }
                                    )
                                )
                        case ImageBuilt(image):
                            image_id = image
                        case EngineFailure(message):
                            failure = message
                if datas:
                    build.log.extend_data(datas)  # one wake-up of the followers per engine read
                    await build.log.wait_for_store()
        return image_id, failure

    def _output(self, build: ActiveBuild, output: Output, datas: list[str]) -> None:
        """A step's lines as log events; past --max-log-bytes, no more lines (said once)."""
        if build.log_truncated:
            return
        build.log_bytes += sum(map(len, output.lines))
        if build.log_bytes > self._max_log_bytes:
            build.log_truncated = True
            datas.append(
                p.dump_event(
                    {
                        "type": p.EVENT_STATUS,
                        "status": "running",
                        "phase": p.PHASE_LOG_TRUNCATED,
                        "message": f"the build's log passed {self._max_log_bytes} bytes: no more output is kept "
                        "(the build goes on)",
                    }
                )
            )
            return
        datas.extend(
            p.dump_log_events(output.lines, output.step, output.stream, output.elapsed, continued=output.continued)
        )

    async def _context_sent(self, build: ActiveBuild) -> None:
        # The engine has every byte: a spooled copy is not needed any more.
        if build.spool is not None:
            await self._spool.remove(build.spool)

    async def _remember(self, record: BuildRecord, kind: str, ident: str) -> None:
        # Saved before the builder relies on it: a restart after a crash can still remove it.
        (record.containers if kind == "container" else record.created_images).append(ident)
        await self._save(record)

    async def _publish(self, build: ActiveBuild) -> str | None:
        """Push (with a registry), convert (with nydusify), keep the cache image; the failure, if any."""
        record, spec, publisher, engine = build.record, build.record.spec, self._publisher, build.engine
        assert record.image_id is not None and engine is not None
        try:
            if publisher.registry:
                # An untagged build still needs a name in the registry.
                name = spec.image_name or f"builds:b-{record.build_id}"
                record.tags.append(publisher.pushed_ref(name))
                record.image_ref, record.image_digest = await publisher.push(
                    engine, record.image_id, name, build.log.append
                )
                repository = record.image_ref.rsplit(":", 1)[0]
                record.image_ref_digest = f"{repository}@{record.image_digest}"
                if spec.nydus_convert and publisher.nydus_available:
                    await self._convert_nydus(build)
            if spec.cache_key:
                await publisher.store_cache(engine, record.image_id, record.namespace, spec.cache_key, build.log.append)
        except PublishError as exc:
            if not self._keep_local:
                await self._remove_tags(build)
            return str(exc)
        if publisher.registry and not self._keep_local:
            await self._remove_tags(build)
        return None

    async def _convert_nydus(self, build: ActiveBuild) -> None:
        """A failed conversion is reported in nydus_status; the pushed image stands."""
        record = build.record
        assert record.image_ref is not None
        try:
            record.nydus_image_ref = await self._publisher.convert_nydus(record.image_ref)
        except PublishError as exc:
            record.nydus_status = f"failed: {exc}"
            build.log.append({"type": p.EVENT_STATUS, "status": "running", "phase": "nydus", "error": str(exc)})
        else:
            record.nydus_status = "performed"
            build.log.append(
                {
                    "type": p.EVENT_STATUS,
                    "status": "running",
                    "phase": "nydus",
                    "nydus_image_ref": record.nydus_image_ref,
                }
            )

    async def _remove_tags(self, build: ActiveBuild) -> None:
        """Untag what this build tagged, unless the tag has moved on to another image since."""
        record, engine = build.record, build.engine
        if engine is None or not record.image_id:
            return
        for tag in record.tags:
            if await engine.image_id(tag) == record.image_id:
                await engine.remove_image(tag)


def _step_payload(event: StepChanged) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "type": p.EVENT_STATUS,
        "status": "running",
        "phase": p.PHASE_STEP,
        "step": event.step,
        "name": event.name,
        "state": event.state,
    }
    if event.duration is not None:
        payload["duration"] = event.duration
    if event.error is not None:
        payload["error"] = event.error
    return payload
