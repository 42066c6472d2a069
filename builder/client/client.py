"""BuilderClient: the async SDK for the builder daemon."""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Self

import aiohttp
from yarl import URL

from builder import protocol as p
from builder.client.context import (
    CONTENT_TYPES,
    Compression,
    check_context,
    stream_context,
)
from builder.client.errors import (
    BuildCancelled,
    BuilderConnectionError,
    BuilderError,
    BuilderHTTPError,
    BuildFailed,
    ClientClosedError,
)
from builder.client.models import (
    BuildEvent,
    BuildResult,
    DoneEvent,
    ErrorEvent,
    EventBatch,
    LogEvent,
    decode_frame,
    terminal_event_from_status,
)
from builder.client.sse import SSEDecoder

DEFAULT_URL = "http://127.0.0.1:8080"
# Requests get a total bound; a log stream only connect and idle bounds (the daemon pings every 15 s).
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
UPLOAD_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_read=300)
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# A submit is retried only where the daemon surely did not fail the request itself.
_RETRY_SUBMIT = frozenset({408, 429, 502, 503, 504})

# What GET /healthz lists as the context compressions the daemon accepts.
CONTEXT_ENCODINGS_HEADER = "X-Builder-Context-Encodings"
CompressOption = Literal["auto", "zstd", "gzip", "none"]
_COMPRESS_OPTIONS: tuple[CompressOption, ...] = ("auto", "zstd", "gzip", "none")

LogCallback = Callable[[str], Awaitable[None] | None]
ProgressCallback = Callable[[int], Awaitable[None] | None]
# Build secrets: id -> value (text is sent as UTF-8).
Secrets = Mapping[str, bytes | str]


class RetryPolicy:
    """Delays between attempts: 100 ms doubling with full jitter to a cap; Retry-After wins."""

    def __init__(self, *, first: float = 0.1, cap: float = 3.0, budget: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        # How long attempts may go on failing (unknown build, 5xx, no connection) before giving up.
        self.budget = budget

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.cap * 10)
        # The exponent is bounded: a float overflows past 2**1023, and the cap is reached long before.
        return random.uniform(self.first / 2, min(self.cap, self.first * 2.0 ** min(attempt, 64)))


class BuilderClient:
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        cancel_timeout: float = 15.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = URL(url or os.environ.get("BUILDER_URL") or DEFAULT_URL)
        token = token or os.environ.get("BUILDER_TOKEN")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._cancel_timeout = cancel_timeout
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self._context_encodings: frozenset[str] | None = None  # what the daemon's /healthz advertised

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ClientClosedError("Cannot send a request, as the client has been closed.")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Release the connections (an injected session stays open); later requests raise ClientClosedError."""
        self._closed = True
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    # -- builds ----------------------------------------------------------------

    async def build(
        self,
        context_dir: str | os.PathLike[str],
        *,
        image_name: str,
        dockerfile: str = p.DEFAULT_DOCKERFILE,
        build_args: Mapping[str, str] | None = None,
        target: str | None = None,
        labels: Mapping[str, str] | None = None,
        no_cache: bool = False,
        compress: CompressOption = "auto",
        secrets: Secrets | None = None,
        on_log: LogCallback | None = None,
        on_upload_progress: ProgressCallback | None = None,
    ) -> BuildResult:
        """Upload a context directory, follow the build to its end, return the image reference."""
        started = time.monotonic()
        build_id = await self.submit(
            context_dir,
            image_name=image_name,
            dockerfile=dockerfile,
            build_args=build_args,
            target=target,
            labels=labels,
            no_cache=no_cache,
            compress=compress,
            secrets=secrets,
            on_upload_progress=on_upload_progress,
        )
        return await self.wait(build_id, on_log=on_log, started=started)

    async def build_image(
        self,
        image: str,
        *,
        image_name: str,
        no_cache: bool = False,
        secrets: Secrets | None = None,
        on_log: LogCallback | None = None,
    ) -> BuildResult:
        """The synthetic `FROM <image>` build: brings an existing image into the builder's hands."""
        started = time.monotonic()
        build_id = await self.submit_image(image, image_name=image_name, no_cache=no_cache, secrets=secrets)
        return await self.wait(build_id, on_log=on_log, started=started)

    async def submit(
        self,
        context_dir: str | os.PathLike[str],
        *,
        image_name: str,
        dockerfile: str = p.DEFAULT_DOCKERFILE,
        build_args: Mapping[str, str] | None = None,
        target: str | None = None,
        labels: Mapping[str, str] | None = None,
        no_cache: bool = False,
        compress: CompressOption = "auto",
        secrets: Secrets | None = None,
        on_upload_progress: ProgressCallback | None = None,
    ) -> str:
        """Upload a context and queue its build; returns the build id without waiting.

        `compress="auto"` sends zstd if the daemon advertises it, gzip otherwise. With `secrets`,
        the request is multipart (secrets cannot ride in a URL), so the daemon spools the context
        before the build starts; without, the context streams into the engine as it arrives.
        """
        context = Path(context_dir)
        dockerfile = check_context(context, dockerfile)
        if compress not in _COMPRESS_OPTIONS:
            raise ValueError(f"compress must be one of {', '.join(_COMPRESS_OPTIONS)}, not {compress!r}")
        compression: Compression = await self._auto_compression() if compress == "auto" else compress
        fields = _fields(
            image_name=image_name,
            dockerfile=dockerfile,
            build_args=build_args,
            labels=labels,
            target=target,
            no_cache=no_cache,
        )

        def upload() -> dict[str, Any]:
            # A fresh body per attempt: it streams from disk again.
            body = stream_context(context, dockerfile, compression=compression, on_progress=on_upload_progress)
            if secrets:
                return {
                    "data": _multipart(fields, secrets, body, CONTENT_TYPES[compression]),
                    "timeout": UPLOAD_TIMEOUT,
                }
            # The raw-body shape, fields in the query: the daemon can start the build while the
            # context is still arriving.
            return {
                "data": body,
                "params": fields,
                "headers": {"Content-Type": CONTENT_TYPES[compression]},
                "timeout": UPLOAD_TIMEOUT,
            }

        return await self._post_build(upload)

    async def _auto_compression(self) -> Compression:
        """zstd if the daemon's /healthz advertises it (asked once per client), else gzip."""
        if self._context_encodings is None:
            try:
                async with self._open("GET", "healthz") as response:
                    advertised = response.headers.get(CONTEXT_ENCODINGS_HEADER, "") if response.status == 200 else ""
            except (aiohttp.ClientError, TimeoutError, OSError):
                return "gzip"  # not cached: the upload's own retries deal with an unreachable daemon
            self._context_encodings = frozenset(e.strip().lower() for e in advertised.split(","))
        return "zstd" if "zstd" in self._context_encodings else "gzip"

    async def submit_image(
        self, image: str, *, image_name: str, no_cache: bool = False, secrets: Secrets | None = None
    ) -> str:
        payload: dict[str, Any] = {p.FIELD_IMAGE: image, **_fields(image_name=image_name, no_cache=no_cache)}
        if secrets:
            payload[p.FIELD_SECRETS] = {
                secret_id: base64.b64encode(_secret_bytes(value)).decode() for secret_id, value in secrets.items()
            }
        return await self._post_build(lambda: {"json": payload})

    async def _post_build(self, request: Callable[[], dict[str, Any]]) -> str:
        """POST /builds, retried when the answer is lost or the daemon is briefly unavailable.

        Every attempt carries the same Idempotency-Key, so a retry of a POST that did reach
        the daemon gets the original build back instead of starting a second one.
        """
        key = uuid.uuid4().hex
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                options = request()
                headers = {**options.pop("headers", {}), "Idempotency-Key": key}
                body = await self._request("POST", "builds", headers=headers, **options)
                return str(body["build_id"])
            except BuilderHTTPError as exc:
                if exc.status not in _RETRY_SUBMIT or time.monotonic() - started > self._retry.budget:
                    raise
                delay = self._retry.delay(attempt, exc.retry_after)
            except BuilderConnectionError:
                if time.monotonic() - started > self._retry.budget:
                    raise
                delay = self._retry.delay(attempt)
            await asyncio.sleep(delay)
            attempt += 1

    async def wait(
        self,
        build_id: str,
        *,
        on_log: LogCallback | None = None,
        on_events: Callable[[EventBatch], object] | None = None,
        started: float | None = None,
    ) -> BuildResult:
        """Follow a build to its terminal frame, calling `on_log` per output line, and `on_events`
        once per batch that arrived together with its events but the terminal one (log lines and
        status events, such as BuildKit's steps). If the caller gives up (Ctrl+C, a failing
        callback such as a broken pipe), the remote build is cancelled before re-raising."""
        started = time.monotonic() if started is None else started
        try:
            async for batch in self.log_batches(build_id):
                # A batch ends at the terminal frame, if it holds one.
                end = batch[-1]
                if on_events is not None:
                    on_events(batch[:-1] if end.terminal else batch)
                if on_log is not None:
                    for event in batch:
                        if isinstance(event, LogEvent) and (result := on_log(event.line)) is not None:
                            await result
                if isinstance(end, DoneEvent):
                    return BuildResult(
                        build_id, end.data["status"], end.image_ref, end.image_id, time.monotonic() - started
                    )
                if isinstance(end, ErrorEvent):
                    if end.status == p.BuildStatus.CANCELLED.value:
                        raise BuildCancelled(build_id, end.error)
                    raise BuildFailed(build_id, end.error)
        except BuilderError:
            raise
        except BaseException:
            await self._cancel_shielded(build_id)
            raise
        raise BuilderConnectionError(f"log of build {build_id} ended without a terminal frame")

    async def _cancel_shielded(self, build_id: str) -> None:
        """DELETE the build; a further cancellation of the caller cannot abort it (bounded wait)."""
        task = asyncio.ensure_future(self.cancel(build_id))
        deadline = time.monotonic() + self._cancel_timeout
        while not task.done() and (remaining := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(asyncio.shield(task), remaining)
            except asyncio.CancelledError:
                continue  # a second Ctrl+C: the DELETE goes on
            except (BuilderError, TimeoutError):
                break
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a failed DELETE must not mask the caller's own exception

    # -- queries ---------------------------------------------------------------

    async def status(self, build_id: str) -> dict[str, Any]:
        status: dict[str, Any] = await self._request("GET", "builds", build_id)
        return status

    async def cancel(self, build_id: str) -> dict[str, Any]:
        status: dict[str, Any] = await self._request("DELETE", "builds", build_id)
        return status

    async def list(self, *, status: str | None = None, limit: int = 50) -> builtins.list[dict[str, Any]]:
        params: dict[str, str] = {"limit": str(limit)}
        if status:
            params["status"] = status
        builds: builtins.list[dict[str, Any]] = (await self._request("GET", "builds", params=params))["builds"]
        return builds

    # -- the log, with retries ---------------------------------------------------

    async def logs(self, build_id: str, *, after: int = 0, follow: bool = True) -> AsyncIterator[BuildEvent]:
        """Typed events after `after`, each exactly once, in order, through cuts and retries.

        Ends at the terminal frame (or, with follow=False, at what exists now). Gives up on a
        non-retryable HTTP error, or when attempts (404, 5xx, no connection, in any mix) keep
        failing for the retry budget with no event delivered: it then raises the last failure.
        """
        async for batch in self.log_batches(build_id, after=after, follow=follow):
            for event in batch:
                yield event

    async def log_batches(self, build_id: str, *, after: int = 0, follow: bool = True) -> AsyncIterator[EventBatch]:
        """`logs`, as the events of each network read: lets a printer flush once per batch."""
        last = after
        attempt = 0
        # Since when every attempt has failed (404, 5xx, no connection); only events delivered
        # reset it, not a status that answers, so a log endpoint failing for good is given up on.
        failing_since: float | None = None
        failure: BuilderError | None = None  # the latest failed attempt's error
        finishing = not follow  # once the status is terminal, fetch the rest without following
        while True:
            failed = True
            try:
                async with self._open(
                    "GET",
                    "builds",
                    build_id,
                    "logs",
                    # Batched frames: one frame, and one JSON parse, per batch of events.
                    params={"follow": "true" if not finishing else "false", "batch": "true"},
                    headers={"Accept": "text/event-stream", **({"Last-Event-ID": str(last)} if last else {})},
                    timeout=STREAM_TIMEOUT,
                ) as response:
                    if response.status == 200:
                        failed = False
                        decoder = SSEDecoder()
                        async for chunk in response.content.iter_any():
                            # The events of this read, one batch per stretch of consecutive ids.
                            first = last + 1
                            payloads: builtins.list[dict[str, Any]] = []
                            for sse in decoder.feed(chunk):
                                # Our frames carry decimal ids; anything else is no event of ours.
                                if not (sse.id.isascii() and sse.id.isdigit()) or int(sse.id) <= last:
                                    continue
                                frame = decode_frame(int(sse.id), sse.data)
                                if frame.first_id <= last:  # a batch frame that overlaps what came before
                                    frame = frame[last + 1 - frame.first_id :]
                                if payloads and frame.first_id != last + 1:  # ids skip (after a daemon crash)
                                    attempt, failing_since = 0, None
                                    yield EventBatch(first, payloads)
                                    payloads = []
                                if not payloads:
                                    first = frame.first_id
                                payloads += frame.payloads
                                last = frame.last_id
                                if p.is_terminal_event(payloads[-1]):
                                    yield EventBatch(first, payloads)
                                    return
                            if payloads:
                                attempt, failing_since = 0, None
                                yield EventBatch(first, payloads)
                        if finishing:
                            if follow:  # the status said terminal, yet no frame: trust the status
                                end = terminal_event_from_status(await self.status(build_id))
                                yield EventBatch(end.id, [end.data])
                            return
                    elif response.status == 404 or response.status in RETRYABLE_STATUSES:
                        failure = await _http_error(response)
                    else:
                        raise await _http_error(response)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                failure = self._connection_error(exc)
                failure.__cause__ = exc
                failed = True
            if failed:
                failing_since = failing_since or time.monotonic()
            out_of_budget = failing_since is not None and time.monotonic() - failing_since > self._retry.budget
            if out_of_budget and failure is not None:
                failure.add_note(
                    f"gave up on the log of build {build_id}: attempts kept failing for {self._retry.budget:g} s"
                )
                raise failure
            # The stream ended without a terminal frame: is the build over?
            try:
                status = await self.status(build_id)
            except BuilderHTTPError as exc:
                if exc.status != 404 and exc.status not in RETRYABLE_STATUSES:
                    raise
            except BuilderConnectionError:
                pass
            else:
                finishing = finishing or p.BuildStatus(status["status"]).terminal
            retry_after = failure.retry_after if failed and isinstance(failure, BuilderHTTPError) else None
            await asyncio.sleep(self._retry.delay(attempt, retry_after))
            attempt += 1

    # -- plumbing ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _open(
        self, method: str, *segments: str, headers: Mapping[str, str] | None = None, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        # The token goes on every request, also through a session the caller injected. Redirects
        # are not followed (as httpx): a streamed upload cannot be sent twice, and a daemon that
        # moved is better named by its new URL, which the error gives.
        async with self.session.request(
            method,
            self.url.joinpath(*segments),
            headers={**self._headers, **(headers or {})},
            allow_redirects=False,
            **kwargs,
        ) as response:
            yield response

    async def _request(self, method: str, *segments: str, **kwargs: Any) -> Any:
        try:
            async with self._open(method, *segments, **kwargs) as response:
                if response.status >= 300:
                    raise await _http_error(response)
                return await response.json()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._connection_error(exc) from exc

    def _connection_error(self, exc: BaseException) -> BuilderConnectionError:
        return BuilderConnectionError(f"cannot reach the builder daemon at {self.url}: {exc or type(exc).__name__}")


def _fields(**values: Any) -> dict[str, str]:
    """Request fields as the daemon's multipart/JSON contract spells them; unset ones left out."""
    fields = {}
    for name, value in values.items():
        if value is None or value == {} or value is False:
            continue
        fields[name] = "true" if value is True else json.dumps(dict(value)) if isinstance(value, Mapping) else value
    return fields


def _secret_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _multipart(
    fields: Mapping[str, str], secrets: Secrets, context: AsyncIterator[bytes], content_type: str
) -> aiohttp.MultipartWriter:
    """The multipart shape: fields and secrets first, the context last, streamed."""
    writer = aiohttp.MultipartWriter("form-data")
    for name, text in fields.items():
        writer.append(text).set_content_disposition("form-data", name=name)
    for secret_id, value in secrets.items():
        part = writer.append(_secret_bytes(value), {"Content-Type": "application/octet-stream"})
        part.set_content_disposition("form-data", name=p.SECRET_PART_PREFIX + secret_id)
    part = writer.append(context, {"Content-Type": content_type})
    part.set_content_disposition("form-data", name=p.FIELD_CONTEXT, filename="context")
    return writer


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


async def _http_error(response: aiohttp.ClientResponse) -> BuilderHTTPError:
    if 300 <= response.status < 400 and (location := response.headers.get("Location")):
        return BuilderHTTPError(response.status, "redirect", f"the daemon redirects to {location}: use that URL")
    try:
        body = await response.json(content_type=None)
        code, message = str(body["code"]), str(body["error"])
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        code, message = "http_error", response.reason or ""
    return BuilderHTTPError(response.status, code, message, retry_after=_retry_after(response))
