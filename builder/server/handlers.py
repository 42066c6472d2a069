"""HTTP handlers: translate requests into calls on the build service, and results into JSON."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

from aiohttp import BodyPartReader, web

from builder import protocol as p
from builder.protocol import BuildStatus
from builder.server.appkeys import ENGINES, NAMESPACE, PINGER, SERVICE, SETTINGS, STREAMS
from builder.server.build_secrets import MAX_SECRET_BYTES, MAX_SECRETS_BYTES, add_secret, secrets_from_json
from builder.server.contexts import SpooledContext
from builder.server.errors import (
    BadRequest,
    ContextTooLarge,
    EngineUnavailable,
    InvalidField,
    InvalidSecret,
    StoreFailing,
    UnsupportedMediaType,
    UploadStalled,
)
from builder.server.models import (
    MAX_LIST_LIMIT,
    TAR_CONTENT_TYPES,
    Accepted,
    BuildList,
    BuildSpec,
    ListQuery,
    LogQuery,
    Shape,
    parse_fields,
)
from builder.server.openapi import openapi_document
from builder.server.records import BuildRecord
from builder.server.streams import (
    BatchedEventStreamResponse,
    EventStreamResponse,
    LogStreamResponse,
    PlainLogResponse,
)

routes = web.RouteTableDef()


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # The trailing newline keeps an operator's shell prompt off the end of `curl` output.
    return web.json_response(data, status=status, headers=headers, dumps=lambda obj: json.dumps(obj) + "\n")


_MAX_FIELD_BYTES = 64 * 1024
_READ_CHUNK = 256 * 1024
_MAX_ID_DIGITS = 19
# Multipart framing, the text fields and the secrets ride in the same body as the context.
_MULTIPART_OVERHEAD = (1 << 20) + MAX_SECRETS_BYTES
# A JSON body: the fields, and the secrets in base64 (4/3 of their bytes, with room for their ids).
_MAX_JSON_BYTES = _MAX_FIELD_BYTES + 2 * MAX_SECRETS_BYTES


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return json_response(
        {
            "status": "ok",
            "builds_running": service.running_count,
            "builds_queued": service.queued_count,
            "log_followers": service.follower_count,
            "uploads": service.uploads,
        },
        headers={"X-Builder-Context-Encodings": "zstd, gzip, bzip2, xz, identity"},
    )


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    if (store_error := request.app[SERVICE].store_error) is not None:
        raise StoreFailing(f"the daemon cannot write its store: {store_error}")
    engines = request.app[ENGINES]
    if not await engines.default.ping():
        raise EngineUnavailable("the Docker engine does not answer ping")
    # Tenants' own engines are reported; one that is down fails only its tenant's builds.
    tenant_engines = {tenant: await engine.ping() for tenant, engine in engines.by_tenant.items()}
    return json_response({"status": "ready", **({"tenant_engines": tenant_engines} if tenant_engines else {})})


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVICE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


@routes.post("/builds")
async def create_build(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    # Before reading a possibly large body.
    service.check_accepting(namespace=request[NAMESPACE])
    await service.check_engine(request[NAMESPACE])
    key = _idempotency_key(request)
    limit = request.app[SETTINGS].max_context_bytes
    content_type = request.content_type
    context: SpooledContext | AsyncIterable[bytes] | None
    secrets: dict[str, bytes] = {}
    if content_type == "multipart/form-data":
        _reject_oversized(request, limit + _MULTIPART_OVERHEAD)
        spec, context, secrets = await _read_multipart(request, digest=key is not None)
    elif content_type in TAR_CONTENT_TYPES:
        # The streaming shape: the fields come first (in the query), so the build can start
        # while the body is still arriving.
        _reject_oversized(request, limit)
        _refuse_secrets_in_query(request.query)
        spec, context = BuildSpec.from_fields(request.query, Shape.QUERY), request.content.iter_chunked(_READ_CHUNK)
    elif content_type == "application/json":
        fields = await _read_json(request)
        secrets = secrets_from_json(fields.pop(p.FIELD_SECRETS, None))
        spec, context = BuildSpec.from_fields(fields, Shape.JSON), None
    else:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {content_type!r}: send multipart/form-data, "
            "application/x-tar, application/gzip or application/json"
        )
    record, created = await service.submit(spec, context, namespace=request[NAMESPACE], key=key, secrets=secrets)
    body = _accepted_body(record, request)
    # A repeat of an earlier submit (same Idempotency-Key and request) answers 200, not 202.
    return json_response(body, status=202 if created else 200, headers={"Location": body["links"]["self"]})


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise InvalidField("Idempotency-Key must be 1 to 255 printable characters")
    return key


@routes.get("/builds")
async def list_builds(request: web.Request) -> web.Response:
    query = parse_fields(ListQuery, request.query, Shape.QUERY)
    status = BuildStatus(query.status) if query.status else None
    records = await request.app[SERVICE].list(
        namespace=request[NAMESPACE], status=status, limit=min(query.limit, MAX_LIST_LIMIT)
    )
    body: BuildList = {"builds": [r.to_public() for r in records]}
    return json_response(body)


@routes.get("/builds/{build_id}", name="build")
async def get_build(request: web.Request) -> web.Response:
    record = await request.app[SERVICE].get(request.match_info["build_id"], request[NAMESPACE])
    return json_response(record.to_public())


@routes.delete("/builds/{build_id}")
async def cancel_build(request: web.Request) -> web.Response:
    record, complete = await request.app[SERVICE].cancel(request.match_info["build_id"], request[NAMESPACE])
    return json_response(record.to_public(), status=200 if complete else 202)


@routes.get("/builds/{build_id}/logs")
async def stream_logs(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    build_id = request.match_info["build_id"]
    query = parse_fields(LogQuery, request.query, Shape.QUERY)
    after = _resume_after(request, query)
    response = _log_response(request, query)
    # Unknown (404) or expired (410) builds are answered before any byte of the stream.
    await service.get(build_id, request[NAMESPACE])
    service.check_follower(request[NAMESPACE])
    if request.method == "HEAD":
        # Headers only: a body would be read as the start of the next response on this connection.
        return web.Response(headers=response.headers)
    request.app[STREAMS].add(response)
    try:
        await response.start(request)
        async with contextlib.aclosing(
            service.follow(build_id, after=after, follow=query.follow, namespace=request[NAMESPACE])
        ) as events:
            async for batch in events:
                await response.send_events(build_id, batch)
    except ConnectionError:
        pass  # the client left; closing `events` released its subscription
    finally:
        await response.close_stream()
    return response


def _log_response(request: web.Request, query: LogQuery) -> LogStreamResponse:
    """SSE for EventSource and SDKs; plain text for `curl -N` (Accept: */*) or `?format=text`."""
    fmt = query.format
    if fmt == "text" or (fmt is None and "text/event-stream" not in request.headers.get("Accept", "")):
        return PlainLogResponse()
    settings = request.app[SETTINGS]
    # Batched frames for clients that ask (ours): one frame and one JSON parse per batch.
    kind = BatchedEventStreamResponse if query.batch else EventStreamResponse
    return kind(retry_ms=settings.sse_retry_ms, pinger=request.app[PINGER])


def _accepted_body(record: BuildRecord, request: web.Request) -> Accepted:
    self_url = str(request.app.router["build"].url_for(build_id=record.build_id))
    return {
        "build_id": record.build_id,
        "status": record.status,
        "image_name": record.spec.image_name,
        "links": {"self": self_url, "logs": f"{self_url}/logs"},
    }


def _reject_oversized(request: web.Request, limit: int) -> None:
    if request.content_length is not None and request.content_length > limit:
        raise ContextTooLarge(f"build context is larger than the limit of {limit} bytes")


def _refuse_secrets_in_query(query: Mapping[str, str]) -> None:
    """Secrets never travel in a URL (proxies and access logs keep URLs): the raw-body shape has
    no place for them."""
    if any(name == p.FIELD_SECRETS or name.startswith(p.SECRET_PART_PREFIX) for name in query):
        raise InvalidSecret(
            "secrets cannot be query parameters: send them as multipart parts "
            f"'{p.SECRET_PART_PREFIX}<id>' or in a JSON body's {p.FIELD_SECRETS!r}"
        )


async def _read_multipart(
    request: web.Request, *, digest: bool
) -> tuple[BuildSpec, SpooledContext | None, dict[str, bytes]]:
    service = request.app[SERVICE]
    reader = await request.multipart()
    fields: dict[str, str] = {}
    secrets: dict[str, bytes] = {}
    context: SpooledContext | None = None
    try:
        async for part in reader:
            if not isinstance(part, BodyPartReader) or part.name is None:
                raise BadRequest("nested or unnamed multipart parts are not supported")
            if part.name == p.FIELD_CONTEXT:
                if context is not None:
                    raise BadRequest("more than one context part")
                # Fields may still follow: the context waits on the spool, checked. Those that came
                # first are checked now, before the context is read.
                dockerfile = BuildSpec.from_fields(fields, Shape.MULTIPART).dockerfile
                context = await service.receive_context(
                    _part_chunks(part),
                    namespace=request[NAMESPACE],
                    dockerfile=dockerfile,
                    digest=digest,
                )
            elif part.name.startswith(p.SECRET_PART_PREFIX):
                add_secret(secrets, part.name.removeprefix(p.SECRET_PART_PREFIX), await _read_secret_part(part))
            else:
                fields[part.name] = await _read_text_part(part)
        if context is None:
            raise BadRequest(f"multipart request has no {p.FIELD_CONTEXT!r} file part")
        return BuildSpec.from_fields(fields, Shape.MULTIPART), context, secrets
    except BaseException:
        if context is not None:
            await service.discard_context(context)
        raise


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(_READ_CHUNK):
        yield chunk


async def _read_text_part(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(_READ_CHUNK):
        data += chunk
        if len(data) > _MAX_FIELD_BYTES:
            raise InvalidField(f"field {part.name!r} is longer than {_MAX_FIELD_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidField(f"field {part.name!r} is not UTF-8 text") from None


async def _read_secret_part(part: BodyPartReader) -> bytes:
    """A secret's value, in memory only, and not a byte over the limit."""
    data = bytearray()
    while chunk := await part.read_chunk(_READ_CHUNK):
        data += chunk
        if len(data) > MAX_SECRET_BYTES:
            raise InvalidSecret(f"secret {part.name!r} is larger than {MAX_SECRET_BYTES} bytes")
    return bytes(data)


async def _read_json(request: web.Request) -> dict[str, Any]:
    # The whole body, however the network cut it, and not a byte over the limit; a small body,
    # so the idle bound covers all of it (a trickle of JSON ends too).
    body = bytearray()
    seconds = request.app[SETTINGS].upload_idle_timeout
    try:
        async with asyncio.timeout(seconds):
            while chunk := await request.content.read(_MAX_JSON_BYTES + 1 - len(body)):
                body += chunk
                if len(body) > _MAX_JSON_BYTES:
                    raise BadRequest(f"JSON body is longer than {_MAX_JSON_BYTES} bytes")
    except TimeoutError:
        raise UploadStalled(f"the JSON body did not arrive within {seconds:g} seconds") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def _resume_after(request: web.Request, query: LogQuery) -> int:
    """The `Last-Event-ID` header (what EventSource sends on reconnect), else `?after=N`.

    The header wins: an EventSource opened on `?after=N` sends both when it reconnects, and
    the header is where it has got to since.
    """
    header = request.headers.get("Last-Event-ID", "").strip()
    if header:
        return _event_id(header, "Last-Event-ID")
    return query.after


def _event_id(raw: str, name: str) -> int:
    # ASCII digits only: str.isdigit() also admits "²", which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > _MAX_ID_DIGITS:
        raise InvalidField(f"{name} must be an event id: a non-negative integer below 2^63")
    value = int(raw)
    if value >= 2**63:
        raise InvalidField(f"{name} must be an event id: a non-negative integer below 2^63")
    return value
