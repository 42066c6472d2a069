"""BuilderClient: the async SDK for the builder daemon."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from builder import protocol as p
from builder.client.context import check_context, stream_context
from builder.client.errors import (
    BuildCancelled,
    BuilderConnectionError,
    BuilderError,
    BuilderHTTPError,
    BuildFailed,
)
from builder.client.models import (
    BuildEvent,
    BuildResult,
    DoneEvent,
    ErrorEvent,
    LogEvent,
    decode_event,
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

LogCallback = Callable[[str], Awaitable[None] | None]
ProgressCallback = Callable[[int], Awaitable[None] | None]


class RetryPolicy:
    """Delays between attempts: 100 ms doubling with full jitter to a cap; Retry-After wins."""

    def __init__(self, *, first: float = 0.1, cap: float = 3.0, budget: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        # How long the build may stay unknown (404) or the daemon unreachable before giving up.
        self.budget = budget

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.cap * 10)
        return random.uniform(self.first / 2, min(self.cap, self.first * 2**attempt))


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

    async def __aenter__(self) -> BuilderClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self._session

    async def close(self) -> None:
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
        on_log: LogCallback | None = None,
        on_upload_progress: ProgressCallback | None = None,
    ) -> BuildResult:
        """Upload a context directory, follow the build to its end, return the image reference."""
        started = time.monotonic()
        build_id = await self.submit(
            context_dir, image_name=image_name, dockerfile=dockerfile, build_args=build_args,
            target=target, labels=labels, no_cache=no_cache, on_upload_progress=on_upload_progress,
        )
        return await self.wait(build_id, on_log=on_log, started=started)

    async def build_image(
        self, image: str, *, image_name: str, no_cache: bool = False, on_log: LogCallback | None = None
    ) -> BuildResult:
        """The synthetic `FROM <image>` build: brings an existing image into the builder's hands."""
        started = time.monotonic()
        build_id = await self.submit_image(image, image_name=image_name, no_cache=no_cache)
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
        on_upload_progress: ProgressCallback | None = None,
    ) -> str:
        """Upload a context and queue its build; returns the build id without waiting."""
        context = Path(context_dir)
        dockerfile = check_context(context, dockerfile)
        fields = _fields(image_name=image_name, dockerfile=dockerfile, build_args=build_args,
                         labels=labels, target=target, no_cache=no_cache)

        def form() -> dict[str, Any]:
            # A fresh body per attempt: the context streams from disk again on a retry.
            data = aiohttp.FormData()
            for name, value in fields.items():
                data.add_field(name, value)
            data.add_field(
                p.FIELD_CONTEXT,
                stream_context(context, dockerfile, on_progress=on_upload_progress),
                filename="context.tar.gz",
                content_type="application/gzip",
            )
            return {"data": data, "timeout": UPLOAD_TIMEOUT}

        return await self._post_build(form)

    async def submit_image(self, image: str, *, image_name: str, no_cache: bool = False) -> str:
        payload = {p.FIELD_IMAGE: image, **_fields(image_name=image_name, no_cache=no_cache)}
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
                body = await self._request("POST", "/builds", headers={"Idempotency-Key": key}, **request())
                return body["build_id"]
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
        on_batch_end: Callable[[], object] | None = None,
        started: float | None = None,
    ) -> BuildResult:
        """Follow a build to its terminal frame, calling `on_log` per line (and `on_batch_end`
        after each batch that arrived together). If the caller gives up (Ctrl+C, a failing
        callback such as a broken pipe), the remote build is cancelled before re-raising."""
        started = time.monotonic() if started is None else started
        try:
            async for batch in self.log_batches(build_id):
                for event in batch:
                    if isinstance(event, LogEvent) and on_log is not None:
                        if (result := on_log(event.line)) is not None:
                            await result
                    elif isinstance(event, DoneEvent):
                        return BuildResult(build_id, event.data["status"], event.image_ref, event.image_id,
                                           time.monotonic() - started)
                    elif isinstance(event, ErrorEvent):
                        if event.status == p.BuildStatus.CANCELLED.value:
                            raise BuildCancelled(build_id, event.error)
                        raise BuildFailed(build_id, event.error)
                if on_batch_end is not None:
                    on_batch_end()
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
        return await self._request("GET", f"/builds/{build_id}")

    async def cancel(self, build_id: str) -> dict[str, Any]:
        return await self._request("DELETE", f"/builds/{build_id}")

    async def list(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, str] = {"limit": str(limit)}
        if status:
            params["status"] = status
        return (await self._request("GET", "/builds", params=params))["builds"]

    # -- the log, with retries ---------------------------------------------------

    async def logs(self, build_id: str, *, after: int = 0, follow: bool = True) -> AsyncIterator[BuildEvent]:
        """Typed events after `after`, each exactly once, in order, through cuts and retries.

        Ends at the terminal frame (or, with follow=False, at what exists now). Gives up only on
        a non-retryable HTTP error, or when the build stays unknown (404) or the daemon
        unreachable for longer than the retry budget.
        """
        async for batch in self.log_batches(build_id, after=after, follow=follow):
            for event in batch:
                yield event

    async def log_batches(
        self, build_id: str, *, after: int = 0, follow: bool = True
    ) -> AsyncIterator[list[BuildEvent]]:
        """`logs`, as the events of each network read: lets a printer flush once per batch."""
        last = after
        attempt = 0
        lost_since: float | None = None  # when the build/daemon was last known to be alive
        finishing = not follow  # once the status is terminal, fetch the rest without following
        while True:
            retry_after: float | None = None
            try:
                async with self.session.get(
                    self.url / "builds" / build_id / "logs",
                    params={"follow": "true" if not finishing else "false"},
                    headers={"Accept": "text/event-stream",
                             **({"Last-Event-ID": str(last)} if last else {})},
                    timeout=STREAM_TIMEOUT,
                ) as response:
                    if response.status == 200:
                        attempt, lost_since = 0, None
                        decoder = SSEDecoder()
                        async for chunk in response.content.iter_any():
                            batch = []
                            for sse in decoder.feed(chunk):
                                # Our frames carry decimal ids; anything else is no event of ours.
                                if not (sse.id.isascii() and sse.id.isdigit()) or int(sse.id) <= last:
                                    continue
                                event = decode_event(int(sse.id), sse.data)
                                last = event.id
                                batch.append(event)
                                if event.terminal:
                                    yield batch
                                    return
                            if batch:
                                yield batch
                        if finishing:
                            if follow:  # the status said terminal, yet no frame: trust the status
                                yield [terminal_event_from_status(await self.status(build_id))]
                            return
                    elif response.status == 404 or response.status in RETRYABLE_STATUSES:
                        retry_after = _retry_after(response)
                        if response.status == 404 or response.status in (502, 503, 504):
                            lost_since = lost_since or time.monotonic()
                    else:
                        raise await _http_error(response)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                lost_since = lost_since or time.monotonic()
                failure: Exception | None = exc
            else:
                failure = None
            # The stream ended without a terminal frame: is the build still alive?
            try:
                status = await self.status(build_id)
            except BuilderHTTPError as exc:
                if exc.status != 404 and exc.status not in RETRYABLE_STATUSES:
                    raise
            except BuilderConnectionError:
                pass
            else:
                lost_since = None
                finishing = finishing or p.BuildStatus(status["status"]).terminal
            if lost_since is not None and time.monotonic() - lost_since > self._retry.budget:
                raise BuilderConnectionError(
                    f"gave up on the log of build {build_id} after {self._retry.budget:.0f} s: "
                    f"{failure or 'the build is unknown to the daemon'}"
                )
            await asyncio.sleep(self._retry.delay(attempt, retry_after))
            attempt += 1

    # -- plumbing ----------------------------------------------------------------

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            async with self.session.request(method, self.url / path.lstrip("/"), **kwargs) as response:
                if response.status >= 400:
                    raise await _http_error(response)
                return await response.json()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise BuilderConnectionError(f"cannot reach the builder daemon at {self.url}: {exc}") from exc


def _fields(**values: Any) -> dict[str, str]:
    """Request fields as the daemon's multipart/JSON contract spells them; unset ones left out."""
    fields = {}
    for name, value in values.items():
        if value is None or value == {} or value is False:
            continue
        fields[name] = "true" if value is True else json.dumps(dict(value)) if isinstance(value, Mapping) else value
    return fields


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


async def _http_error(response: aiohttp.ClientResponse) -> BuilderHTTPError:
    try:
        body = await response.json(content_type=None)
        code, message = str(body["code"]), str(body["error"])
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        code, message = "http_error", response.reason or ""
    return BuilderHTTPError(response.status, code, message, retry_after=_retry_after(response))
