"""The build service: owns every build's state machine, the FIFO queue and the event logs.

queued -> running -> succeeded | failed | cancelled   (queued -> cancelled too)
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import dataclasses
import datetime
import hashlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Collection, Mapping
from pathlib import Path
from secrets import token_urlsafe
from typing import Any

import aiodocker
import aiohttp
import structlog

from builder import protocol as p
from builder.protocol import BuildStatus
from builder.server import contexts
from builder.server.build_secrets import secrets_digest
from builder.server.cluster import ControlChannel, Lease, LocalControl, LocalLease, LocalTail, LogTail
from builder.server.config import Settings
from builder.server.contexts import (
    CheckedContext,
    ContextAborted,
    ContextLimits,
    ContextPipe,
    ContextSpool,
    SpooledContext,
)
from builder.server.dockerfile_refs import image_references, onbuild_references
from builder.server.engines.base import CredentialsLookup
from builder.server.engines.docker import DockerEngine
from builder.server.engines.pool import EnginePool
from builder.server.errors import (
    BuildExpired,
    BuildNotFound,
    EngineUnavailable,
    IdempotencyKeyInProgress,
    IdempotencyKeyReused,
    InvalidContext,
    InvalidField,
    QueueFull,
    SecretsNotSupported,
    ShuttingDown,
    StoreFailing,
    TenantQuotaExceeded,
    UploadStalled,
)
from builder.server.events import UNCOMMITTED_LIMIT, EventLog, terminal_payload
from builder.server.imagepolicy import ImagePolicy
from builder.server.loghub import LogHub
from builder.server.metrics import Metrics
from builder.server.models import BuildSpec
from builder.server.publish import Publisher
from builder.server.records import (
    NYDUS_NOT_PERFORMED,
    BuildRecord,
    EventRun,
    rfc3339,
    utcnow,
)
from builder.server.recovery import Recovery
from builder.server.runner import ActiveBuild, BuildRunner
from builder.server.scheduler import FairQueue
from builder.server.store import BuildStore, StoreUnavailable

log = structlog.get_logger(__name__)

CANCELLED_MESSAGE = "build cancelled by request"
IDEMPOTENCY_WINDOW = 24 * 3600
STORE_FAILED_MESSAGE = "the daemon could not store this build's log"
# While the store cannot write, the flusher backs off up to this many seconds between tries.
_FLUSH_BACKOFF_MAX = 5.0
SHUTDOWN_MESSAGE = "daemon shut down while the build was running"
# Queue positions up to this are announced at every move; further back, at most once a second.
_QUEUE_FRONT = 5
# A submit whose Idempotency-Key another is still uploading with waits up to _CLAIM_WAIT s for it,
# looking every _CLAIM_POLL s. A claim outlives its upload's time limit by _CLAIM_MARGIN s, so
# a daemon that died while receiving cannot hold a key for long.
_CLAIM_WAIT = 10.0
_CLAIM_POLL = 0.05
_CLAIM_MARGIN = 60.0
# A DELETE of a build another replica runs looks at its record this often until it has ended.
_CANCEL_POLL = 0.05


class BuildService:
    def __init__(
        self,
        settings: Settings,
        engines: EnginePool,
        store: BuildStore,
        spool: ContextSpool,
        *,
        lease: Lease | None = None,
        control: ControlChannel | None = None,
        tail: LogTail | None = None,
        tenants: Callable[[], Collection[str]] = frozenset,
        registry_logins: Callable[[str], CredentialsLookup | None] = lambda tenant: None,
    ) -> None:
        self._settings = settings
        self._engines = engines
        # Every tenant's namespace (they change when the tokens are reloaded).
        self._tenants = tenants
        self._store = store
        self._spool = spool
        # Other daemons sharing the store (none by default): who owns which build, cancels routed
        # to the owner, and the live logs of builds running elsewhere.
        self._lease = lease or LocalLease(settings.replica_id)
        self._control = control or LocalControl()
        self._recovery = Recovery(store, engines, self._lease)
        self.logs = LogHub(
            store,
            tail or LocalTail(),
            live=self._live_log,
            window=settings.log_window,
            max_followers_per_tenant=settings.max_followers_per_tenant,
        )
        self._publisher = Publisher(settings)
        self._runner = BuildRunner(
            spool,
            self._publisher,
            save=store.save,
            keep_local=settings.keep_local,
            max_log_bytes=settings.max_log_bytes,
            max_line=settings.max_log_line,
            registry_logins=registry_logins,
        )
        self.metrics = Metrics()
        self.metrics.observe(
            queued=lambda: len(self._queue), running=lambda: len(self._running), streams=lambda: self.follower_count
        )
        self._active: dict[str, ActiveBuild] = {}
        self._queue: FairQueue[ActiveBuild] = FairQueue()
        # Per tenant: uploads being received, bytes of spooled contexts.
        self._uploads: collections.Counter[str] = collections.Counter()
        self._spooled: collections.Counter[str] = collections.Counter()
        self._running: set[ActiveBuild] = set()
        self._flush_lock = asyncio.Lock()
        self._flush_wanted = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._stopping = False
        self._draining = False
        # Set when a shutdown begins: uploads still arriving end at once (503).
        self._drain_started = asyncio.Event()
        self._stoppers: set[asyncio.Task[None]] = set()  # timeouts tearing builds down
        self._idempotency_locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Per engine, settled at its first build: an engine may not answer yet when the daemon starts.
        self._default_builders: dict[DockerEngine, str] = {}
        self.uploads = 0  # contexts being received
        # Why the store cannot write, while it cannot (the daemon is unready meanwhile).
        self.store_error: str | None = None

    # -- lifecycle -------------------------------------------------------------

    @property
    def replica_id(self) -> str:
        return self._lease.replica_id

    async def start(self) -> None:
        self._spool.reset()
        await self._recovery.recover_own()
        await self._lease.start()
        self._background = [
            asyncio.create_task(self._flush_forever(), name="event-flusher"),
            asyncio.create_task(
                self._every(self._settings.retention_interval, self.expire_old_builds), name="retention"
            ),
            asyncio.create_task(self._obey_control(), name="control"),
        ]
        if self._lease.ttl != float("inf"):
            self._background.append(
                asyncio.create_task(self._every(self._lease.ttl / 2, self._recovery.fail_lost_replicas), name="reaper")
            )

    async def drain(self, grace: float) -> None:
        """Graceful shutdown: refuse new builds, give running ones `grace` seconds, stop the rest.

        Every build ends with a terminal frame, so its followers' streams end cleanly.
        """
        self._draining = True
        self._drain_started.set()
        log.info("draining", running=len(self._running), queued=len(self._queue), grace=grace)
        for build in list(self._queue):
            await self._stop_build(build, BuildStatus.FAILED, SHUTDOWN_MESSAGE)
        running = list(self._running)
        if running:
            waiters = [asyncio.ensure_future(b.done.wait()) for b in running]
            await asyncio.wait(waiters, timeout=grace)
            for waiter in waiters:
                waiter.cancel()
        for build in running:
            await self._stop_build(build, BuildStatus.FAILED, SHUTDOWN_MESSAGE)
        for build in running:
            await self._wait_done(build, self._settings.cancel_wait)

    async def stop(self) -> None:
        self._stopping = True
        tasks = [b.task for b in self._running if b.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for build in list(self._queue):
            await self._finish(build, BuildStatus.FAILED, error=SHUTDOWN_MESSAGE)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.logs.close()
        await self._flush()
        await self._lease.stop()

    # -- queries ---------------------------------------------------------------

    async def get(self, build_id: str, namespace: str = "") -> BuildRecord:
        """A build of `namespace`; another tenant's build is exactly as unknown as no build."""
        record: BuildRecord | None
        if (build := self._active.get(build_id)) is not None:
            record = build.record
            record.last_event_id = build.log.last_id
        else:
            record = await self._store.get(build_id)
            if record is not None and not record.status.terminal:
                # Running on another replica: its record is saved at each change of state, its
                # log as it goes.
                record.last_event_id = await self._store.last_event_id(build_id)
        if record is None or record.namespace != namespace:
            if await self._store.is_expired(build_id, namespace):
                raise BuildExpired(build_id)
            raise BuildNotFound(build_id)
        return record

    async def list(self, *, namespace: str = "", status: BuildStatus | None, limit: int) -> list[BuildRecord]:
        """Newest first. A build still in memory is shown as it is now: its finished record
        reaches the store only once its log is durable, a moment after its outcome."""
        found = {r.build_id: r for r in await self._store.list(namespace=namespace, status=status, limit=limit)}
        for build in self._active.values():
            if build.accepted and build.record.namespace == namespace:
                found[build.record.build_id] = build.record
        current = [r for r in found.values() if status is None or r.status is status]
        return sorted(current, key=lambda r: r.created_at, reverse=True)[:limit]

    def _live_log(self, build_id: str) -> EventLog | None:
        build = self._active.get(build_id)
        return None if build is None else build.log

    @property
    def queued_count(self) -> int:
        return len(self._queue)

    @property
    def running_count(self) -> int:
        return len(self._running)

    # -- submit ----------------------------------------------------------------

    @property
    def context_limits(self) -> ContextLimits:
        settings = self._settings
        return ContextLimits(
            max_bytes=settings.max_context_bytes,
            max_unpacked=settings.max_context_unpacked_bytes,
            max_entries=settings.max_context_entries,
            idle_timeout=settings.upload_idle_timeout,
            total_timeout=settings.upload_timeout,
        )

    async def receive_context(
        self, chunks: AsyncIterable[bytes], *, namespace: str = "", dockerfile: str, digest: bool = False
    ) -> SpooledContext:
        """Check an upload onto the spool, for a request whose build fields may follow it (multipart):
        `dockerfile` is the name known so far, checked again once the fields are all in."""
        path, checked = await self._to_spool(
            chunks, namespace, dockerfile=dockerfile, dockerfile_required=False, digest=digest
        )
        return SpooledContext(path, checked)

    async def _to_spool(
        self, chunks: AsyncIterable[bytes], namespace: str, **options: Any
    ) -> tuple[Path, CheckedContext]:
        """An upload checked onto the spool (within the tenant's share of it); nothing kept if it fails."""
        writer = await self._spool.create(namespace)
        try:
            checked = await self._receive(chunks, writer.put, namespace, **options)
            await writer.close()
        except BaseException:
            await asyncio.shield(writer.discard())
            raise
        return writer.path, checked

    async def _receive(
        self, chunks: AsyncIterable[bytes], sink: contexts.Sink, namespace: str, **options: Any
    ) -> CheckedContext:
        """An upload checked into `sink`, with this daemon's limits; ended with a 503 by a shutdown."""
        self.uploads += 1
        self._uploads[namespace] += 1
        try:
            checked = await contexts.receive(
                chunks, sink, limits=self.context_limits, interrupted=self._drain_started, **options
            )
        finally:
            self.uploads -= 1
            self._uploads[namespace] -= 1
            if not self._uploads[namespace]:
                del self._uploads[namespace]
        self.metrics.upload_bytes.inc(checked.size)
        return checked

    async def discard_context(self, context: SpooledContext) -> None:
        await self._spool.remove(context.path)

    async def check_engine(self, namespace: str = "") -> None:
        """503 while the tenant's engine does not answer: a build accepted now could only fail."""
        if not await self._engines.for_tenant(namespace).answers():
            raise EngineUnavailable("the Docker engine does not answer; retry later")

    def check_accepting(self, spec: BuildSpec | None = None, namespace: str = "") -> None:
        """Raise if a new build would be refused; checked before an upload too."""
        settings = self._settings
        if self._draining:
            raise ShuttingDown("the daemon is shutting down; retry against another instance or later")
        if self.store_error is not None:
            raise StoreFailing(f"the daemon cannot store builds now ({self.store_error}); retry later")
        if len(self._queue) >= settings.max_queue:
            raise QueueFull(f"{len(self._queue)} builds are already waiting; retry later")
        if self._queue.count(namespace) >= settings.max_queue_per_tenant:
            raise TenantQuotaExceeded(
                f"{settings.max_queue_per_tenant} of your builds are already waiting; retry later"
            )
        if self._uploads[namespace] >= settings.max_uploads_per_tenant:
            raise TenantQuotaExceeded(
                f"{settings.max_uploads_per_tenant} of your uploads are already arriving; retry later"
            )
        if spec is not None and spec.timeout is not None and spec.timeout > self._settings.build_timeout:
            raise InvalidField(f"timeout may be at most {self._settings.build_timeout:g} seconds on this daemon")

    async def submit(
        self,
        spec: BuildSpec,
        context: AsyncIterable[bytes] | SpooledContext | None,
        *,
        namespace: str = "",
        key: str | None = None,
        secrets: Mapping[str, bytes] | None = None,
    ) -> tuple[BuildRecord, bool]:
        """Accept a build of an upload (streamed into the engine while it arrives when a build slot
        is free, else checked onto the spool to wait its turn), of a spooled context, or, with
        none, of `FROM spec.base_image`. Returns the record and whether it is a new build.

        Under an Idempotency-Key, a repeat within 24 h gets the original build (and False); the
        same key with a different request is refused. A tenant's images are named
        `<namespace>/<name>:<tag>`: the namespace comes from the token, never from the request.

        `secrets` (id -> value) stay in memory, with the build, until it ends; a repeat is
        compared by their digest, never by their values.
        """
        secrets = dict(secrets or {})
        try:
            if namespace and spec.image_name:
                spec = dataclasses.replace(spec, image_name=f"{namespace}/{spec.image_name}")
            engine = self._engines.for_tenant(namespace)
            builder = await self._builder_for(spec, engine)
            spec = dataclasses.replace(spec, builder=builder)
            if secrets and not engine.builders[builder].takes_secrets:
                raise SecretsNotSupported(f"build secrets need BuildKit; this build would run on the {builder} builder")
            self.check_accepting(spec, namespace)
            if context is None:
                if spec.base_image is None:
                    raise InvalidContext("a build needs a context or an image")
                context = contexts.synthetic(spec.base_image)
        except BaseException:
            if isinstance(context, SpooledContext):
                await self.discard_context(context)
            raise
        if key is None:
            build, _ = await self._accept(spec, context, namespace, secrets, digest=False)
            return build.record, True
        # One submit per key at a time, here and (through the store's claim) on every replica, so
        # two racing retries cannot both start a build.
        async with self._idempotency_locks.setdefault((namespace, key), asyncio.Lock()):
            try:
                if (seen := await self._claim_key(namespace, key)) is not None:
                    # A repeat: its upload is read to compare it, never built.
                    checked = await self._read_repeat(spec, context, namespace)
                    if seen[0] != _fingerprint(spec, checked.digest, secrets):
                        raise IdempotencyKeyReused(
                            "this Idempotency-Key was used for a different request in the last 24 h"
                        )
                    return await self.get(seen[1], namespace), False
                try:
                    build, checked = await self._accept(spec, context, namespace, secrets, digest=True)
                except BaseException:
                    with contextlib.suppress(StoreUnavailable):
                        await asyncio.shield(self._store.release_idempotent(namespace, key))
                    raise
                await self._store.remember_idempotent(
                    namespace,
                    key,
                    _fingerprint(spec, checked.digest, secrets),
                    build.record.build_id,
                    window=IDEMPOTENCY_WINDOW,
                )
                return build.record, True
            finally:
                self._idempotency_locks.pop((namespace, key), None)

    async def _claim_key(self, namespace: str, key: str) -> tuple[str, str] | None:
        """None once the key is ours; else (fingerprint, build_id) of the submit that has it. A
        submit with the key that is still being received elsewhere is waited for, a while."""
        pending = self._settings.upload_timeout + _CLAIM_MARGIN
        deadline = time.monotonic() + _CLAIM_WAIT
        while True:
            seen = await self._store.claim_idempotent(namespace, key, window=IDEMPOTENCY_WINDOW, pending=pending)
            if seen is None or seen[1]:
                return seen
            if time.monotonic() > deadline:
                raise IdempotencyKeyInProgress(
                    "a request with this Idempotency-Key is still being received; retry later"
                )
            await asyncio.sleep(_CLAIM_POLL)

    async def _read_repeat(
        self, spec: BuildSpec, context: AsyncIterable[bytes] | SpooledContext, namespace: str
    ) -> CheckedContext:
        if isinstance(context, SpooledContext):
            await self.discard_context(context)
            return context.checked
        return await self._receive(context, _discard, namespace, dockerfile=spec.dockerfile, digest=True)

    async def _accept(
        self,
        spec: BuildSpec,
        context: AsyncIterable[bytes] | SpooledContext,
        namespace: str,
        secrets: dict[str, bytes],
        *,
        digest: bool,
    ) -> tuple[ActiveBuild, CheckedContext]:
        record = BuildRecord(
            build_id=new_build_id(),
            spec=spec,
            namespace=namespace,
            nydus_status=self._nydus_plan(spec),
            owner=self.replica_id,
        )
        build = ActiveBuild(
            record=record,
            log=EventLog(
                record.build_id,
                window=self._settings.log_window,
                coalesce=self._settings.follower_coalesce,
                flush_soon=self._flush_wanted.set,
            ),
            engine=self._engines.for_tenant(namespace),
            secrets=secrets,
        )
        if isinstance(context, SpooledContext):
            checked = await self._adopt_spooled(build, context)
        elif self._slot_free():
            checked = await self._stream(build, context, digest=digest)
        else:
            checked = await self._spool_upload(build, context, digest=digest)
        await self._admit(build)
        return build, checked

    async def _adopt_spooled(self, build: ActiveBuild, context: SpooledContext) -> CheckedContext:
        build.spool = context.path
        checked = context.checked
        try:
            if build.record.spec.dockerfile != checked.dockerfile:
                # Named by a field that came after the context: check that Dockerfile now.
                checked = await contexts.recheck_dockerfile(
                    context.path, build.record.spec.dockerfile, self.context_limits
                )
            await self._check_context(build, checked)
        except BaseException:
            await self.discard_context(context)
            raise
        return checked

    async def _spool_upload(self, build: ActiveBuild, upload: AsyncIterable[bytes], *, digest: bool) -> CheckedContext:
        """Every build slot is taken: check the upload onto the spool, where it waits its turn."""
        build.spool, checked = await self._to_spool(
            upload,
            build.tenant,
            dockerfile=build.record.spec.dockerfile,
            digest=digest,
            before_end=lambda checked: self._check_context(build, checked),
        )
        return checked

    async def _stream(self, build: ActiveBuild, upload: AsyncIterable[bytes], *, digest: bool) -> CheckedContext:
        """A build slot is free: the build starts now, and the engine reads the checked context
        while the upload is still arriving. A check that fails ends the engine's read before it
        has the whole context, and the build is dropped as if it never was."""
        build.pipe = ContextPipe()
        self._running.add(build)
        build.task = asyncio.create_task(self._run(build), name=f"build-{build.record.build_id}")
        try:
            checked = await self._receive(
                upload,
                build.pipe.put,
                build.tenant,
                dockerfile=build.record.spec.dockerfile,
                digest=digest,
                before_end=lambda checked: self._check_context(build, checked),
            )
            await build.pipe.close()
        except ContextAborted:
            # The engine stopped reading: the build was stopped while its context was still
            # arriving (its timeout passed). The client hears why, not a broken pipe.
            reason = build.stop_reason[1] if build.stop_reason else "the engine stopped reading the context"
            await asyncio.shield(self._drop(build))
            raise UploadStalled(f"the build ended before its context had arrived: {reason}") from None
        except BaseException as exc:
            build.pipe.fail(exc)
            await asyncio.shield(self._drop(build))
            raise
        return checked

    async def _drop(self, build: ActiveBuild) -> None:
        """A build whose upload was refused: stop the engine's side, leave no trace of it."""
        build.stop_reason = (BuildStatus.FAILED, "the build context was refused")
        await self._runner.stop(build)
        if build.task is not None:
            await asyncio.wait([build.task])

    async def _check_context(self, build: ActiveBuild, checked: CheckedContext) -> None:
        """Checks that need the whole context, before the engine may have all of it: a tenant's
        build reaches only the images its namespace may use (open mode has one tenant)."""
        namespace, engine = build.record.namespace, build.engine
        if not namespace or engine is None:
            return
        policy = ImagePolicy(
            namespace, self._tenants(), self._settings.allow_base_images, registry=self._settings.registry
        )
        references = image_references(checked.dockerfile_text, build.record.spec.build_args)
        policy.check(references)
        # A base image's ONBUILD triggers run in this build too (the legacy builder runs them).
        for reference in references:
            if reference.origin == "FROM" and (info := await engine.image_info(reference.reference)):
                policy.check(onbuild_references((info.get("Config") or {}).get("OnBuild") or []))

    def _slot_free(self) -> bool:
        return not self._queue and len(self._running) < self._settings.max_concurrent and not self._stopping

    async def _admit(self, build: ActiveBuild) -> None:
        """The build's context passed every check: it exists from now on."""
        record = build.record
        build.accepted = True
        self._active[record.build_id] = build
        await self._store.save(record)
        if build.task is None:
            self._queue.append(build)
            self._announce_queue_positions(build)
            log.info("build_queued", build_id=record.build_id, image_name=record.spec.image_name)
            self._start_queued()
        else:
            log.info("build_accepted", build_id=record.build_id, image_name=record.spec.image_name)

    async def _builder_for(self, spec: BuildSpec, engine: DockerEngine) -> str:
        """The builder a build asked for, else the daemon's: with `auto`, BuildKit when the engine
        has it and no per-build memory or CPU limit is set (BuildKit through the Engine API
        ignores those, so only the legacy builder can enforce them)."""
        limited = bool(self._settings.build_memory or self._settings.build_cpus)
        if spec.builder == "buildkit" and limited:
            raise InvalidField(
                "this daemon limits the memory or CPU of build steps (--build-memory/--build-cpus), which "
                "BuildKit through the Engine API cannot enforce: use the legacy builder"
            )
        if (default := self._default_builders.get(engine)) is None:
            default = self._settings.builder
            if default == "auto":
                try:
                    buildkit = not limited and await engine.supports_buildkit()
                except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                    raise EngineUnavailable(f"the Docker engine does not answer: {exc}") from None
                default = "buildkit" if buildkit else "legacy"
            self._default_builders[engine] = default
            log.info("default_builder", builder=default)
        return spec.builder or default

    def _nydus_plan(self, spec: BuildSpec) -> str | None:
        if not spec.nydus_convert:
            return None
        if not self._publisher.nydus_available:
            return NYDUS_NOT_PERFORMED
        if not self._publisher.registry:
            return "not performed: nydus conversion needs a registry (--registry)"
        return "pending"

    def _start_queued(self) -> None:
        started = False
        while self._queue and len(self._running) < self._settings.max_concurrent and not self._stopping:
            build = self._queue.popleft()
            self._running.add(build)
            build.task = asyncio.create_task(self._run(build), name=f"build-{build.record.build_id}")
            started = True
        if started:
            self._announce_queue_positions()

    def _announce_queue_positions(self, arrived: ActiveBuild | None = None) -> None:
        """Tell waiting builds where they stand (their turn, tenants taking turns): the front few
        every time, the rest at most once a second each, so a long queue does not cost a log
        event per build per start; a build that just arrived always hears its place."""
        now = time.monotonic()
        for position, waiting in enumerate(self._queue, start=1):
            if waiting is arrived or position <= _QUEUE_FRONT or now - waiting.queue_announced_at >= 1.0:
                waiting.queue_announced_at = now
                waiting.log.append(_queued_payload(position))

    # -- running ---------------------------------------------------------------

    async def _run(self, build: ActiveBuild) -> None:
        record = build.record
        # The task copied the submitting request's context: keep build_id, drop request_id.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(build_id=record.build_id)
        record.status = BuildStatus.RUNNING
        record.started_at = utcnow()
        if build.accepted:  # a streamed build is saved once its upload passed the checks
            await self._store.save(record)
        build.log.append({"type": p.EVENT_STATUS, "status": BuildStatus.RUNNING.value})
        log.info("build_started")
        timeout = record.spec.timeout or self._settings.build_timeout
        watchdog = asyncio.get_running_loop().call_later(timeout, self._time_out, build, timeout)
        try:
            status, error = await self._runner.run(build)
            await self._finish(build, status, error=error)
        except asyncio.CancelledError:
            # Daemon shutdown: leave nothing running on the engine.
            await asyncio.shield(self._abort(build))
            raise
        except Exception as exc:
            log.exception("build_crashed")
            await asyncio.shield(self._abort(build, f"internal error: {exc}"))
        finally:
            watchdog.cancel()
            self._running.discard(build)
            self._start_queued()

    def _time_out(self, build: ActiveBuild, timeout: float) -> None:
        reason = f"timed out after {timeout:g}s"
        task = asyncio.create_task(self._stop_build(build, BuildStatus.FAILED, reason))
        self._stoppers.add(task)
        task.add_done_callback(self._stoppers.discard)

    async def _abort(self, build: ActiveBuild, error: str = SHUTDOWN_MESSAGE) -> None:
        try:
            await self._runner.tear_down(build)
        except Exception:
            log.exception("teardown_failed")
        await self._finish(build, BuildStatus.FAILED, error=error)

    # -- cancel ----------------------------------------------------------------

    async def cancel(self, build_id: str, namespace: str = "") -> tuple[BuildRecord, bool]:
        """Cancel a build; returns its record and whether teardown completed in time. A build
        another replica runs is cancelled there, and waited for the same way."""
        record = await self.get(build_id, namespace)
        if record.status.terminal:
            return record, True
        build = self._active.get(build_id)
        if build is None:
            return await self._cancel_elsewhere(record)
        await self._stop_build(build, BuildStatus.CANCELLED, CANCELLED_MESSAGE)
        return build.record, await self._wait_done(build, self._settings.cancel_wait)

    async def _cancel_elsewhere(self, record: BuildRecord) -> tuple[BuildRecord, bool]:
        if record.owner == self.replica_id:
            return record, True  # ours and not live: it ended a moment ago
        await self._control.send_cancel(record.owner, record.build_id)
        deadline = time.monotonic() + self._settings.cancel_wait
        while time.monotonic() < deadline:
            await asyncio.sleep(_CANCEL_POLL)
            current = await self._store.get(record.build_id)
            if current is None or current.status.terminal:
                return current or record, True
        return record, False

    async def _obey_control(self) -> None:
        """Cancels that other replicas route to this one, the owner of the build."""
        async for build_id in self._control.cancels():
            build = self._active.get(build_id)
            if build is not None:
                task = asyncio.create_task(self._stop_build(build, BuildStatus.CANCELLED, CANCELLED_MESSAGE))
                self._stoppers.add(task)
                task.add_done_callback(self._stoppers.discard)

    async def _stop_build(self, build: ActiveBuild, status: BuildStatus, reason: str) -> None:
        """Tear a queued or running build down (DELETE, timeout, shutdown); it ends `status`."""
        if build.stop_reason is not None or build.record.status.terminal:
            return
        build.stop_reason = (status, reason)
        build.stop_requested_at = time.monotonic()
        log.info("build_stop_requested", build_id=build.record.build_id, reason=reason)
        if build in self._queue:
            self._queue.remove(build)
            self._announce_queue_positions()
            await self._finish(build, status, error=reason)
            return
        # Shielded: a client hanging up on its DELETE must not stop the teardown.
        await asyncio.shield(self._runner.stop(build))

    async def _wait_done(self, build: ActiveBuild, timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(build.done.wait()), timeout)
        except TimeoutError:
            return False
        return True

    # -- finishing -------------------------------------------------------------

    async def _finish(self, build: ActiveBuild, status: BuildStatus, *, error: str | None) -> None:
        """Decide the build's outcome, once: only after everything it logged is durable, so a
        store that cannot write makes it fail (clearly) rather than succeed with a lost log."""
        record = build.record
        if record.status.terminal or build.done.is_set():
            return
        if build.accepted:
            try:
                await self._flush()
            except StoreUnavailable as exc:
                status, error = BuildStatus.FAILED, f"{STORE_FAILED_MESSAGE}: {exc.message}"
                build.log.drop_unshown()
        if build.spool is not None:
            await self._spool.remove(build.spool)
        # All in one step, with no await in between: readers never see a half-finished record.
        terminal = build.log.append(
            terminal_payload(status, error=error, image_ref=record.image_ref, image_id=record.image_id)
        )
        record.status = status
        record.error = error
        record.finished_at = utcnow()
        record.last_event_id = terminal.id
        build.secrets.clear()  # the engine's side is over: nothing may ask for them any more
        if not build.accepted:
            build.done.set()
            return  # a refused upload's build: never shown, nothing to keep
        # The flush commits the terminal frame, then saves the final record (a restart never finds
        # a finished record whose terminal frame was lost); if the store cannot write now, the
        # flusher keeps trying, backing off. Done (DELETE answers) once the record says so.
        with contextlib.suppress(StoreUnavailable):
            await self._flush()
        build.done.set()
        self.metrics.builds.labels(status.value).inc()
        if record.started_at is not None:
            self.metrics.build_seconds.observe((record.finished_at - record.started_at).total_seconds())
        if build.stop_requested_at is not None and status is BuildStatus.CANCELLED:
            self.metrics.teardown_seconds.observe(time.monotonic() - build.stop_requested_at)
        log.info("build_finished", build_id=record.build_id, status=status.value, error=error)

    # -- persistence of events -------------------------------------------------

    async def _every(self, interval: float, job: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except Exception:
                log.exception("background_job_failed", job=job.__name__)

    async def expire_old_builds(self) -> builtins.list[str]:
        """Retention: drop finished builds past --retention or beyond the newest --max-builds."""
        cutoff = rfc3339(utcnow() - datetime.timedelta(seconds=self._settings.retention))
        expired = await self._store.expire(
            finished_before=cutoff, keep=self._settings.max_builds, exclude=set(self._active)
        )
        if expired:
            log.info("builds_expired", count=len(expired))
        return expired

    async def _flush(self) -> None:
        """Commit every build's new events; then save the final record of each finished build
        whose log is all in, and let it go. Raises StoreUnavailable (and remembers it for
        /readyz) when the store cannot write."""
        async with self._flush_lock:
            try:
                batches = [(b, b.log.uncommitted()) for b in self._active.values()]
                logs = [(b.record.build_id, run) for b, run in batches if run]
                if logs:
                    await self._store.append_events(logs)
                for build, run in batches:
                    if run:
                        build.log.committed(run.last_id)
                    if build.log.fully_committed and build.record.status.terminal:
                        await self._store.save(build.record)
                        del self._active[build.record.build_id]
            except StoreUnavailable as exc:
                if self.store_error is None:
                    log.error("store_write_failed", error=exc.message)
                self.store_error = exc.message
                self._fail_unstorable_builds(exc.message)
                raise
            if self.store_error is not None:
                log.info("store_write_recovered")
                self.store_error = None

    def _fail_unstorable_builds(self, error: str) -> None:
        """Builds whose log has run too far ahead of a store that cannot write are stopped: their
        followers could not be shown more, and memory must not grow without end."""
        for build in list(self._running):
            if build.log.last_id - build.log.committed_id > UNCOMMITTED_LIMIT and build.stop_reason is None:
                task = asyncio.create_task(
                    self._stop_build(build, BuildStatus.FAILED, f"{STORE_FAILED_MESSAGE}: {error}")
                )
                self._stoppers.add(task)
                task.add_done_callback(self._stoppers.discard)

    async def _flush_forever(self) -> None:
        """The flusher: every commit interval, at once when a build's engine reader waits for the
        store (a chatty build commits back to back), and less often (up to 5 s) while the store
        cannot write."""
        interval = self._settings.commit_interval
        while True:
            if interval == self._settings.commit_interval:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._flush_wanted.wait()
            else:
                await asyncio.sleep(interval)
            self._flush_wanted.clear()
            try:
                await self._flush()
            except StoreUnavailable:
                interval = min(interval * 2, _FLUSH_BACKOFF_MAX)
            except Exception:
                log.exception("flush_failed")
            else:
                interval = self._settings.commit_interval

    # -- following -------------------------------------------------------------

    def check_follower(self, namespace: str = "") -> None:
        self.logs.check_follower(namespace)

    def follow(
        self, build_id: str, *, after: int = 0, follow: bool = True, namespace: str = ""
    ) -> AsyncGenerator[EventRun, None]:
        return self.logs.follow(build_id, after=after, follow=follow, namespace=namespace)

    @property
    def follower_count(self) -> int:
        return self.logs.follower_count


def new_build_id() -> str:
    """16 random bytes, URL-safe base64, drawn again when they would start with "-": such an id
    reads as an option on a command line (`builder status -v11j…` was a usage error, once in 64 builds)."""
    while (build_id := token_urlsafe(16)).startswith("-"):
        pass
    return build_id


def _fingerprint(spec: BuildSpec, digest: str | None, secrets: Mapping[str, bytes]) -> str:
    """What makes two submits the same request: their fields, their context's bytes, and their
    secrets (by digest: no value is kept)."""
    request = json.dumps(spec.to_dict(), sort_keys=True) + "\n" + (digest or "")
    if secrets:
        request += "\n" + secrets_digest(secrets)
    return hashlib.sha256(request.encode()).hexdigest()


async def _discard(pieces: object) -> None:
    return None


def _queued_payload(position: int) -> dict[str, Any]:
    return {"type": p.EVENT_STATUS, "status": BuildStatus.QUEUED.value, "queue_position": position}
