"""The application factory: middleware, routes, and the resources' lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import signal
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from builder import protocol as p
from builder.server.appkeys import (
    CLUSTER,
    ENGINES,
    NAMESPACE,
    PINGER,
    REGISTRY_LOGINS,
    SERVICE,
    SETTINGS,
    STREAMS,
    TOKENS,
)
from builder.server.auth import TokenTable
from builder.server.cluster import alone
from builder.server.config import Settings
from builder.server.connections import AcceptErrorLimiter, ConnectionGuard, ConnectionLimits
from builder.server.contexts import ContextSpool
from builder.server.engines.docker import BuildLimits
from builder.server.engines.pool import EnginePool
from builder.server.errors import BuilderError, Forbidden
from builder.server.handlers import json_response, routes
from builder.server.hosts import is_loopback, open_mode_refusal
from builder.server.registry_auth import RegistryLogins
from builder.server.service import BuildService
from builder.server.store import SqliteBuildStore
from builder.server.streams import StreamPinger

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A client that hangs up cancels its handler, so abandoned log streams release
# their subscription at once instead of at the next ping.
# aiohttp's own parser answers oversized headers with plain text before the app sees them;
# let it accept up to 1 MiB so the app can refuse them (431) in JSON.
RUNNER_OPTIONS: dict[str, Any] = {
    "handler_cancellation": True,
    # Request bodies are read 1 MiB ahead (aiohttp's default is 64 KiB), so the socket is not
    # paused while an upload's previous batch is checked.
    "read_bufsize": 1 << 20,
    "max_line_size": 1 << 20,
    "max_field_size": 1 << 20,
}
# What the app itself accepts: a header line, and all header lines together.
_MAX_HEADER_BYTES = 16 * 1024
_MAX_HEADERS_BYTES = 64 * 1024
_LISTEN_BACKLOG = 1024
# On shutdown, how long log streams get to send what they still owe.
_STREAM_FINISH_SECONDS = 3.0


async def serve(settings: Settings) -> None:
    """Run the daemon until SIGTERM or SIGINT, then drain: no new builds (503), running
    ones get --shutdown-grace to finish, the rest are torn down, every stream ends cleanly."""
    app = create_app(settings)
    guard = ConnectionGuard(ConnectionLimits(settings.max_connections, settings.max_connections_per_client))
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrorLimiter())
    runner = GuardedAppRunner(
        app,
        guard,
        access_log=None,
        # aiohttp (>= 3.14) drops a connection that has not sent a whole request head this long
        # after it opened, or after its previous response: half a header is no way to hold a socket.
        keepalive_timeout=settings.header_timeout,
        **RUNNER_OPTIONS,
    )
    await runner.setup()
    try:
        # A deep accept queue: a thousand followers may connect at once.
        await web.TCPSite(runner, settings.host, settings.port, backlog=_LISTEN_BACKLOG).start()
        log.info(
            "serving",
            host=settings.host,
            port=settings.port,
            data_dir=str(settings.data_dir),
            max_connections=guard.total,
            max_connections_per_client=guard.per_client,
        )
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # New tokens take effect for new requests, new registry logins for new builds; open
        # streams are left alone.
        loop.add_signal_handler(signal.SIGHUP, _reload, app)
        await stop.wait()
        log.info("shutdown_requested")
        await app[SERVICE].drain(settings.shutdown_grace)
    finally:
        await runner.cleanup()
    log.info("stopped")


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose connections pass a ConnectionGuard first."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> Any:
        return self._guard.wrap(await super()._make_server())


def _reload(app: web.Application) -> None:
    try:
        app[TOKENS].reload()
    except (OSError, ValueError) as exc:
        log.error("auth_tokens_reload_failed", error=str(exc))
    try:
        app[REGISTRY_LOGINS].reload()
    except (OSError, ValueError) as exc:
        log.error("registry_logins_reload_failed", error=str(exc))


def open_access_refusal(settings: Settings) -> str | None:
    """Why the daemon must not start as configured, if it must not."""
    tokens = TokenTable(path=settings.auth_tokens_file, env=settings.auth_tokens)
    if tokens.enabled or settings.insecure or is_loopback(settings.host):
        return None
    return (
        f"refusing to listen on {settings.host} without authentication: anyone who can reach it could "
        "run builds. Configure --auth-tokens-file or BUILDER_AUTH_TOKENS, or pass --insecure."
    )


def registry_logins(settings: Settings) -> RegistryLogins:
    """The registry logins of `--registry-config` and `--tenant-registry-config`; OSError or
    ValueError if a file cannot be read or is not a Docker config.json."""
    return RegistryLogins(settings.registry_config, dict(settings.tenant_registry_configs))


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[request_context_middleware, error_middleware, auth_middleware])
    app[SETTINGS] = settings
    app[TOKENS] = TokenTable(path=settings.auth_tokens_file, env=settings.auth_tokens)
    app[REGISTRY_LOGINS] = registry_logins(settings)
    app[STREAMS] = weakref.WeakSet()
    app.add_routes(routes)
    app.cleanup_ctx.extend([_engine_ctx, _cluster_ctx, _service_ctx, _pinger_ctx])
    app.on_response_prepare.append(_name_replica)
    app.on_shutdown.append(_close_streams)
    return app


@web.middleware
async def request_context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if len(request.raw_path) > _MAX_HEADER_BYTES:
        return _json_error(414, "uri_too_long", f"the request target is longer than {_MAX_HEADER_BYTES} bytes", {})
    sizes = [len(name) + len(value) for name, value in request.raw_headers]
    if max(sizes, default=0) > _MAX_HEADER_BYTES or sum(sizes) > _MAX_HEADERS_BYTES:
        return _json_error(
            431,
            "request_header_fields_too_large",
            f"request headers may be {_MAX_HEADER_BYTES} bytes each and {_MAX_HEADERS_BYTES} in all",
            {},
        )
    request_id = request.headers.get("X-Request-ID") or secrets.token_hex(8)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    if build_id := request.match_info.get("build_id"):
        structlog.contextvars.bind_contextvars(build_id=build_id)
    response = await handler(request)
    if not response.prepared:
        response.headers["X-Request-ID"] = request_id
    return response


async def _name_replica(request: web.Request, response: web.StreamResponse) -> None:
    """Behind a load balancer, every answer says which daemon gave it (streams included)."""
    response.headers[p.REPLICA_HEADER] = request.app[SETTINGS].replica_id


# Probes for load balancers and orchestrators answer without a token.
_PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every endpoint but the probes needs a valid token when auth is configured; without tokens,
    requests from web pages (a foreign Host or Origin) are refused."""
    tokens = request.app[TOKENS]
    if not tokens.enabled and (
        refusal := open_mode_refusal(
            request.headers.get("Host"), request.headers.get("Origin"), request.app[SETTINGS].host
        )
    ):
        raise Forbidden(refusal)
    if request.path in _PUBLIC_PATHS or _is_metrics_scraper(request):
        request[NAMESPACE] = ""
    else:
        request[NAMESPACE] = tokens.namespace(request.headers.get("Authorization"))
        if request[NAMESPACE]:
            structlog.contextvars.bind_contextvars(namespace=request[NAMESPACE])
    return await handler(request)


def _is_metrics_scraper(request: web.Request) -> bool:
    """`--metrics-token` opens /metrics (and nothing else) to a scraper without a tenant token."""
    token = request.app[SETTINGS].metrics_token
    if request.path != "/metrics" or not token:
        return False
    offered = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(offered.encode(), token.encode())


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON {"error", "code"}: never an HTML page or a traceback."""
    try:
        return await handler(request)
    except BuilderError as exc:
        log.info("request_failed", status=exc.status, code=exc.code, error=exc.message)
        return _json_error(exc.status, exc.code, exc.message, exc.headers)
    except HttpProcessingError as exc:
        # A malformed body met while reading it (multipart part headers, chunk framing).
        return _json_error(400, "bad_request", f"malformed request: {exc.message}", {})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return _json_error(exc.status, code, exc.reason, dict(exc.headers))
    except Exception:
        log.exception("request_crashed")
        return _json_error(500, "internal_error", "internal server error", {})


def _json_error(status: int, code: str, message: str, headers: dict[str, str]) -> web.Response:
    headers = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
    return json_response({"error": message, "code": code}, status=status, headers=headers)


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[ENGINES] = EnginePool.connect(
        settings.docker_host,
        dict(settings.tenant_engines),
        limits=BuildLimits(memory=settings.build_memory, cpus=settings.build_cpus, network=settings.build_network),
    )
    yield
    await app[ENGINES].close()


async def _cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.redis_url:
        # Imported here: a daemon on its own never loads the Redis client.
        from builder.server import redis_cluster

        cluster = redis_cluster.connect(
            settings.redis_url,
            replica_id=settings.replica_id,
            lease_ttl=settings.lease_ttl,
            retention=settings.retention,
        )
    else:
        cluster = alone(SqliteBuildStore(settings.database_path), settings.replica_id)
    await cluster.open()
    app[CLUSTER] = cluster
    yield
    await cluster.close()


async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    spool = ContextSpool(settings.spool_dir, max_bytes_per_tenant=settings.max_spool_bytes_per_tenant)
    cluster = app[CLUSTER]
    service = BuildService(
        settings,
        app[ENGINES],
        cluster.store,
        spool,
        lease=cluster.lease,
        control=cluster.control,
        tail=cluster.tail,
        tenants=lambda: app[TOKENS].namespaces,
        registry_logins=app[REGISTRY_LOGINS].for_tenant,
    )
    await service.start()
    service.metrics.observe_unsent(lambda: sum(stream.unsent_bytes for stream in app[STREAMS]))
    app[SERVICE] = service
    yield
    await service.stop()


async def _pinger_ctx(app: web.Application) -> AsyncIterator[None]:
    pinger = app[PINGER] = StreamPinger(app[SETTINGS].sse_ping_interval)
    task = asyncio.create_task(pinger.run(), name="sse-pinger")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _close_streams(app: web.Application) -> None:
    """After a drain every build has its terminal frame: let streams deliver it, then end them."""
    streams = [*app[STREAMS]]
    pending = [task for s in streams if (task := s.handler_task) is not None and not task.done()]
    if pending:
        await asyncio.wait(pending, timeout=_STREAM_FINISH_SECONDS)
    for stream in streams:
        stream.stop()
