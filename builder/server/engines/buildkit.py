"""BuildKit through the Engine API: `POST /build?version=2`, cancelled with `/build/cancel`.

Control and output travel apart: the build's own output only ever arrives inside
trace messages, so nothing a step prints can pass for the engine's word.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import posixpath
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import aiodocker
import aiohttp
import structlog

from builder.server.engines.base import (
    STEP_ERROR,
    BuildJob,
    EngineEvent,
    EngineFailure,
    ImageBuilt,
    Output,
    StepChanged,
    bring_forward,
)
from builder.server.engines.docker import DockerEngine, build_params, docker_message, error_message
from builder.server.engines.session import BuildSession
from builder.server.engines.trace import StepTracker, decode_status
from builder.server.errors import EngineSessionFailed

log = structlog.get_logger(__name__)

# How long a stopped build's stream may take to end before the connection is dropped
# (which cancels the build too, on the engine's side).
STOP_WAIT = 10.0
_CANCEL_TIMEOUT = aiohttp.ClientTimeout(total=10)
_TRACE_PREFIX = b'{"id":"moby.buildkit.trace","aux":"'
_SWEEP_TRIES = 5
_SWEEP_RETRY_SECONDS = 1.0
_SWEEP_SETTLE_SECONDS = 1.0
_SETTLE_PASSES = 4
_SWEEP_INTERVAL_SECONDS = 60.0
_PRUNE_FINISH_SECONDS = 10.0
_MOUNT = re.compile(r"--mount=(\S+)")
# Docker 20.10's BuildKit, once over 1 MiB of output waits in one status update, sends empty status
# messages for ever (streams.py): a run this long of them is that, not a build.
_WEDGED_EMPTY_RUN = 10_000
_NO_SESSION = "no active session"
_SSH_NOT_FORWARDED = "forwarded from the client"


class BuildKitBuilder:
    name = "buildkit"
    takes_secrets = True

    def __init__(self, engine: DockerEngine) -> None:
        self._engine = engine
        self._sweeper: asyncio.Task[None] | None = None
        self._sweep_wanted = False
        self._swept_at = float("-inf")
        self._settle_passes = 0
        self._pruning: asyncio.Future[None] | None = None

    def start(self, job: BuildJob) -> BuildKitRun:
        return BuildKitRun(self._engine, job, on_end=self._sweep_soon)

    async def aclose(self) -> None:
        pending = self._sweep_wanted or self._settle_passes > 0
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if pending and (self._pruning is None or self._pruning.done()):
            # A sweep was due: do it now rather than leave a broken-off context behind.
            self._pruning = asyncio.ensure_future(self._prune())
        if self._pruning is not None:
            # A prune under way is left to finish: an engine call dropped half-way is not one to risk.
            await asyncio.wait([self._pruning], timeout=_PRUNE_FINISH_SECONDS)

    def _sweep_soon(self, *, broken_off: bool) -> None:
        """A build's stream ended: its context is dead weight in the engine's build cache. A context
        that broke off is swept soon (an upload refused part way must leave nothing); whole ones
        at most once a minute (the engine's disk-usage call is not free). One sweep at a time."""
        now = asyncio.get_running_loop().time()
        if not broken_off and now - self._swept_at < _SWEEP_INTERVAL_SECONDS:
            return
        self._sweep_wanted = True
        self._settle_passes = _SETTLE_PASSES if broken_off else 1
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="buildkit-context-sweeper")

    async def _sweep(self) -> None:
        while self._sweep_wanted or self._settle_passes:
            self._sweep_wanted = False
            self._settle_passes = max(self._settle_passes - 1, 0)
            # The engine lets go of a broken-off upload's record a moment after the stream ends,
            # and sometimes only seconds later: such a sweep looks again.
            await asyncio.sleep(_SWEEP_SETTLE_SECONDS)
            self._swept_at = asyncio.get_running_loop().time()
            self._pruning = asyncio.ensure_future(self._prune())
            await asyncio.shield(self._pruning)

    async def _prune(self) -> None:
        for attempt in range(_SWEEP_TRIES):
            try:
                if reclaimed := await self._engine.prune_build_contexts():
                    log.debug("build_contexts_pruned", bytes=reclaimed)
                return
            except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                # E.g. "a disk usage operation is already running": someone else asked the engine.
                if attempt == _SWEEP_TRIES - 1:
                    log.warning("build_context_prune_failed", error=str(exc))
                else:
                    await asyncio.sleep(_SWEEP_RETRY_SECONDS)


class BuildKitRun:
    def __init__(self, engine: DockerEngine, job: BuildJob, *, on_end: Callable[..., None]) -> None:
        self._engine = engine
        self._job = job
        self._on_end = on_end
        self._stopped = False
        self._context_sent = False
        self._deadline: asyncio.Timeout | None = None
        self._ended = asyncio.Event()
        self._image_id: str | None = None
        self._tracker = StepTracker(max_line=job.max_line)
        self._failed_step: str | None = None
        self._session: BuildSession | None = None
        self._empty_run = 0

    async def events(self) -> AsyncGenerator[list[EngineEvent], None]:
        failure: EngineFailure | None = None
        try:
            async with asyncio.timeout(None) as deadline, contextlib.AsyncExitStack() as scope:
                self._deadline = deadline
                if self._stopped:
                    bring_forward(deadline)
                if self._job.secrets or self._job.registry_logins is not None:
                    # Open before the build and closed after it, whatever its end: the engine
                    # asks it for the secrets and logins while the build runs.
                    self._session = await scope.enter_async_context(
                        BuildSession(
                            secrets=self._job.secrets,
                            credentials=self._job.registry_logins,
                            docker_host=self._engine.docker_host,
                        )
                    )
                async with self._engine.stream(
                    "build",
                    "POST",
                    params=self._params(),
                    headers={"Content-Type": "application/x-tar"},
                    data=self._send_context(),
                ) as stream:
                    buffer = b""
                    async for data in stream:
                        *lines, buffer = (buffer + data).split(b"\n")
                        batch = self._batch(lines)
                        if batch:
                            yield batch
                            if isinstance(batch[-1], EngineFailure):
                                return
                    if buffer.strip() and (batch := self._batch([buffer])):
                        yield batch
                        if isinstance(batch[-1], EngineFailure):
                            return
            if self._image_id is None:
                failure = EngineFailure("the Docker engine ended the build stream without naming an image")
        except TimeoutError:
            failure = EngineFailure("build stream closed after the stop grace period")
        except EngineSessionFailed as exc:
            failure = EngineFailure(exc.message)
        except aiodocker.DockerError as exc:
            failure = EngineFailure(docker_message(exc))
        except (aiohttp.ClientError, OSError) as exc:
            failure = EngineFailure(f"lost the connection to the Docker engine: {exc}")
        finally:
            self._deadline = None
            self._ended.set()
            self._on_end(broken_off=not self._context_sent)
        yield self._tracker.finish() + ([failure] if failure is not None else [])

    def _params(self) -> dict[str, Any]:
        params = build_params(self._job.spec, self._job.cache_from)
        # BuildKit removes its own step containers; rm/forcerm are the legacy builder's.
        del params["rm"], params["forcerm"]
        params |= {"version": "2", "buildid": self._job.build_id}
        if self._session is not None:
            params["session"] = self._session.session_id
        build_args = dict(self._job.spec.build_args)
        if self._job.spec.cache_key:
            # The image carries its own cache metadata, so a later build can use it from a registry
            # (`cachefrom`) with no local layer left.
            build_args["BUILDKIT_INLINE_CACHE"] = "1"
        if self._job.tenant:
            # Cache mounts are keyed by their id alone; within the tenant's namespace, one tenant
            # cannot mount another's (whatever the build asked for).
            build_args["BUILDKIT_CACHE_MOUNT_NS"] = self._job.tenant
        if build_args:
            params["buildargs"] = json.dumps(build_args)
        # BuildKit knows "default" (the bridge), "host" and "none".
        if self._engine.limits.network != "bridge":
            params["networkmode"] = self._engine.limits.network
        return params

    async def _send_context(self) -> AsyncIterator[bytes | memoryview]:
        async for chunk in self._job.context:
            yield chunk
        self._context_sent = True
        if self._job.on_context_sent is not None:
            await self._job.on_context_sent()

    def _batch(self, lines: list[bytes]) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        for raw in lines:
            if raw.startswith(_TRACE_PREFIX):
                # The bulk of the stream: base64 of a protobuf, decoded without the JSON parser.
                end = raw.index(b'"', len(_TRACE_PREFIX))
                if not self._trace(base64.b64decode(raw[len(_TRACE_PREFIX) : end]), events):
                    return events
                continue
            if not raw.strip():
                continue
            try:
                message = json.loads(raw)
            except ValueError:
                events.append(Output([raw.decode("utf-8", "replace")]))
                continue
            if not isinstance(message, dict):
                continue
            if (error := error_message(message, "the engine reported an unknown build error")) is not None:
                events.extend(self._tracker.finish())
                events.append(EngineFailure(self._explain(error)))
                return events
            aux = message.get("aux")
            if message.get("id") == "moby.image.id" and isinstance(aux, dict) and isinstance(aux.get("ID"), str):
                self._image_id = aux["ID"]
                events.append(ImageBuilt(aux["ID"]))
            elif message.get("id") == "moby.buildkit.trace" and isinstance(aux, str):
                if not self._trace(base64.b64decode(aux), events):
                    return events
            elif isinstance(stream := message.get("stream"), str) and stream.strip():
                events.append(Output(stream.rstrip("\n").split("\n")))
        return events

    def _trace(self, status: bytes, events: list[EngineEvent]) -> bool:
        """Adds what a trace message says to `events`; False once the engine's stream is wedged."""
        if not status:
            self._empty_run += 1
            if self._empty_run < _WEDGED_EMPTY_RUN:
                return True
            events.extend(self._tracker.finish())
            events.append(
                EngineFailure(
                    "the Docker engine stopped reporting the build: its BuildKit sends empty progress messages "
                    "without end (an engine bug when over 1 MiB of step output waits to be sent); the build "
                    "was stopped"
                )
            )
            return False
        self._empty_run = 0
        new = self._tracker.feed(decode_status(status))
        for event in new:
            if isinstance(event, StepChanged) and event.state == STEP_ERROR:
                self._failed_step = event.name
        events.extend(new)
        return True

    def _explain(self, error: str) -> str:
        """The engine's error, made plain where it is cryptic."""
        if self._session is not None:
            error = self._session.failure_message(error)
            if _NO_SESSION in error:
                return f"the daemon's BuildKit session for this build was lost ({error})"
        elif _NO_SESSION in error:
            # A build runs without a session when it was given no secrets (and the daemon has no
            # registry logins for it): the engine then refuses any mount that needs one.
            return f"{_session_needs(self._failed_step or '')} ({error})"
        if _SSH_NOT_FORWARDED in error:
            return f"RUN --mount=type=ssh needs SSH agent forwarding, which this daemon does not offer ({error})"
        return error

    async def stop(self) -> None:
        self._stopped = True
        if self._deadline is None:
            return  # not started, or already over
        if not self._context_sent:
            # No step can run before the engine has the whole context: drop the upload.
            bring_forward(self._deadline)
            return
        bring_forward(self._deadline, STOP_WAIT)
        try:
            async with self._engine.request(
                "build/cancel", "POST", params={"id": self._job.build_id}, timeout=_CANCEL_TIMEOUT
            ) as response:
                await response.read()
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            # Dropping the connection cancels the build too.
            log.warning("buildkit_cancel_failed", error=str(exc))
            if self._deadline is not None:
                bring_forward(self._deadline)
        # The stream ends once the engine has stopped the build's steps.
        await asyncio.shield(self._ended.wait())

    async def clean_up(self, *, images: bool) -> None:
        # BuildKit removes its own step containers; the image is all a build can leave.
        if images and self._image_id is not None:
            info = await self._engine.image_info(self._image_id)
            # Only once no tag names it any more: the service removed the build's own tags first.
            if info is not None and not info.get("RepoTags"):
                await self._engine.remove_image(self._image_id)


def _session_needs(step: str) -> str:
    """What the mounts of a step (`[2/2] RUN --mount=type=secret,id=tok …`) needed a session for."""
    secret_ids: list[str] = []
    ssh = False
    for mount in _MOUNT.findall(step):
        options = dict(option.partition("=")[::2] for option in mount.split(","))
        if options.get("type") == "secret":
            # As the Dockerfile frontend does: the id defaults to the target's file name.
            target = options.get("target") or options.get("dst") or options.get("destination") or ""
            secret_ids.append(options.get("id") or posixpath.basename(target))
        elif options.get("type") == "ssh":
            ssh = True
    needs = []
    if secret_ids:
        needs.append(f"RUN --mount=type=secret needs secrets this build was not given: {', '.join(secret_ids)}")
    if ssh:
        needs.append("RUN --mount=type=ssh needs SSH agent forwarding, which this daemon does not offer")
    return "; ".join(needs) or "this build needs a BuildKit session (secrets or SSH forwarding), and had none"
