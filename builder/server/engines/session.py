"""A BuildKit session: secrets and registry credentials for one build, served from memory.

BuildKit asks for secrets and registry logins by calling gRPC methods on the *client* of
a build. The client opens `POST /session` on the engine and upgrades it to HTTP/2
cleartext; from then on the engine is the gRPC client on that connection and we are the
gRPC server. The client passes the session's id to `/build` as `session=`.

Being the connecting side and the server at once is why this speaks HTTP/2 through the
sans-IO `h2` state machine: grpclib and grpcio servers only serve connections they accept
on a listening socket, and the engine never connects to us.

Secrets stay in memory: no secret value is logged or written anywhere, only secret ids.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Self
from urllib.parse import quote, urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import structlog

from builder.server.engines import protowire
from builder.server.engines.base import CredentialsLookup
from builder.server.errors import EngineSessionFailed

log = structlog.get_logger(__name__)

GET_SECRET = "/moby.buildkit.secrets.v1.Secrets/GetSecret"
CREDENTIALS = "/moby.filesync.v1.Auth/Credentials"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"

# gRPC status codes (grpc/codes) we answer with.
_OK = 0
_INVALID_ARGUMENT = 3
_NOT_FOUND = 5
_UNIMPLEMENTED = 12
_INTERNAL = 13
_SERVING = 1  # grpc.health.v1.HealthCheckResponse.ServingStatus

_CONNECT_SECONDS = 10.0
_CLOSE_SECONDS = 1.0
_READ_SIZE = 65536
_MAX_ERROR_BODY = 65536
# grpc-message is percent-encoded: everything outside printable ASCII, and "%" itself.
_GRPC_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class _GrpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BuildSession:
    """One BuildKit session on a connection of its own to the engine.

    ```
    async with BuildSession(secrets={"tok": b"..."}, credentials=lookup) as session:
        ... POST /build?version=2&session={session.session_id} ...
    ```

    The engine calls `GetSecret` for `RUN --mount=type=secret`, `Auth/Credentials` for a
    registry that asks for a login, and `Health/Check` every second to keep the session.
    Any other method (the token-authority ones among them) gets UNIMPLEMENTED, which the
    engine takes as "this client has none": it falls back to `Credentials`.
    """

    def __init__(
        self,
        *,
        secrets: Mapping[str, bytes] | None = None,
        credentials: CredentialsLookup | None = None,
        docker_host: str | None = None,
        name: str = "builder",
    ) -> None:
        self.session_id = uuid.uuid4().hex
        # Secret ids the engine asked for and we did not have, in the order it asked.
        self.missing_secrets: list[str] = []
        self._secrets = dict(secrets or {})
        self._credentials = credentials
        self._name = name
        try:
            self._address = _parse_docker_host(docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST)
        except ValueError as exc:
            raise EngineSessionFailed(f"cannot open a BuildKit session on the engine: {exc}") from None
        self._methods: dict[str, Callable[[bytes], bytes]] = {
            GET_SECRET: self._get_secret,
            CREDENTIALS: self._get_credentials,
            HEALTH_CHECK: self._health_check,
        }
        self._h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self._requests: dict[int, tuple[str, bytearray]] = {}
        self._replies: dict[int, bytes] = {}  # framed reply bytes still held back by flow control
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        """True while the connection to the engine is open and served."""
        return self._task is not None and not self._task.done()

    def failure_message(self, engine_message: str) -> str:
        """The message a failed build should end with: the engine's, naming the secrets it asked
        for and did not get. An optional secret mount (the Dockerfile default) that finds nothing
        makes the step fail on its own, with an engine message that says nothing of the secret."""
        unnamed = [i for i in self.missing_secrets if f"secret {i} not found" not in engine_message]
        if not unnamed:
            return engine_message
        return f"{engine_message} (secrets not provided: {', '.join(unnamed)})"

    async def __aenter__(self) -> Self:
        try:
            async with asyncio.timeout(_CONNECT_SECONDS):
                self._reader, self._writer = await self._connect()
                await self._upgrade()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            await self._close_socket()
            raise EngineSessionFailed(f"cannot open a BuildKit session on the engine: {exc!r}") from exc
        except BaseException:
            await self._close_socket()
            raise
        self._h2.initiate_connection()
        self._writer.write(self._h2.data_to_send())
        self._task = asyncio.create_task(self._serve(), name=f"build-session-{self.session_id}")
        log.debug("build session opened", session_id=self.session_id, secret_ids=sorted(self._secrets))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop serving and close the connection; the engine then drops the session."""
        if self._task is not None:
            self._task.cancel()
            # wait() rather than await: the task's own CancelledError must not look like ours.
            await asyncio.wait([self._task])
            if not self._task.cancelled() and self._task.exception() is not None:
                log.warning(
                    "build session ended with an error", session_id=self.session_id, error=repr(self._task.exception())
                )
        if self._writer is not None and not self._writer.is_closing():
            try:
                self._h2.close_connection()
                self._writer.write(self._h2.data_to_send())
            except h2.exceptions.ProtocolError:
                pass  # the engine already ended the connection
        await self._close_socket()
        self._secrets.clear()  # our copy: nothing is served from here on
        log.debug("build session closed", session_id=self.session_id, missing_secrets=self.missing_secrets)

    async def _close_socket(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        try:
            async with asyncio.timeout(_CLOSE_SECONDS):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            pass

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._address.unix_path is not None:
            return await asyncio.open_unix_connection(self._address.unix_path)
        return await asyncio.open_connection(self._address.host, self._address.port)

    async def _upgrade(self) -> None:
        assert self._reader is not None and self._writer is not None
        headers = [
            ("Host", self._address.host_header),
            ("Connection", "Upgrade"),
            ("Upgrade", "h2c"),
            ("Content-Length", "0"),
            ("X-Docker-Expose-Session-Uuid", self.session_id),
            ("X-Docker-Expose-Session-Name", self._name),
            ("X-Docker-Expose-Session-Sharedkey", self.session_id),
            *(("X-Docker-Expose-Session-Grpc-Method", method) for method in self._methods),
        ]
        request = "POST /session HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        self._writer.write(request.encode("latin-1"))
        head = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *header_lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) >= 2 and parts[1] == "101":
            return
        # The engine answers a refusal with a JSON {"message": ...} body; keep it for the error.
        length = 0
        for line in header_lines:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length" and value.strip().isdigit():
                length = min(int(value.strip()), _MAX_ERROR_BODY)
        body = (await self._reader.readexactly(length)).decode("utf-8", "replace").strip() if length else ""
        raise EngineSessionFailed(f"the engine refused a BuildKit session: {status_line.strip()} {body}".strip())

    async def _serve(self) -> None:
        assert self._reader is not None and self._writer is not None
        try:
            while data := await self._reader.read(_READ_SIZE):
                if not self._receive(data):
                    break
                self._writer.write(self._h2.data_to_send())
                await self._writer.drain()
        except (OSError, h2.exceptions.ProtocolError) as exc:
            log.warning("build session connection failed", session_id=self.session_id, error=repr(exc))
        else:
            log.debug("build session connection ended by the engine", session_id=self.session_id)

    def _receive(self, data: bytes) -> bool:
        """Feed bytes to the HTTP/2 machine and act on its events; False once the engine says goodbye."""
        for event in self._h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers).get(b":path", b"").decode("latin-1")
                self._requests[event.stream_id] = (path, bytearray())
            elif isinstance(event, h2.events.DataReceived):
                if event.stream_id in self._requests:
                    self._requests[event.stream_id][1].extend(event.data)
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                if event.stream_id in self._requests:
                    path, body = self._requests.pop(event.stream_id)
                    self._on_stream(event.stream_id, self._answer, path, bytes(body))
            elif isinstance(event, h2.events.StreamReset):
                self._requests.pop(event.stream_id, None)
                self._replies.pop(event.stream_id, None)
            elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                for stream_id in list(self._replies):
                    self._on_stream(stream_id, self._send_reply)
            elif isinstance(event, h2.events.ConnectionTerminated):
                return False
        return True

    def _on_stream(self, stream_id: int, act: Callable[..., None], *args: object) -> None:
        """Act on one stream, unless the engine has reset it meanwhile (a reset later in the same
        read is already known to h2 though not yet seen here): that call is simply dropped."""
        try:
            act(stream_id, *args)
        except h2.exceptions.StreamClosedError:
            self._replies.pop(stream_id, None)

    def _answer(self, stream_id: int, path: str, body: bytes) -> None:
        try:
            method = self._methods.get(path)
            if method is None:
                raise _GrpcError(_UNIMPLEMENTED, f"unknown method {path}")
            reply = method(_unframe(body))
        except _GrpcError as exc:
            # A "trailers-only" response: the status goes in the only HEADERS frame.
            self._h2.send_headers(
                stream_id,
                [
                    (":status", "200"),
                    ("content-type", "application/grpc"),
                    ("grpc-status", str(exc.code)),
                    ("grpc-message", quote(exc.message, safe=_GRPC_MESSAGE_SAFE)),
                ],
                end_stream=True,
            )
            return
        self._h2.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
        self._replies[stream_id] = b"\x00" + len(reply).to_bytes(4, "big") + reply
        self._send_reply(stream_id)

    def _send_reply(self, stream_id: int) -> None:
        """Send as much of a reply as flow control allows, and the OK trailers once all of it is out."""
        pending = self._replies[stream_id]
        while pending:
            size = min(len(pending), self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size)
            if size <= 0:
                self._replies[stream_id] = pending
                return
            self._h2.send_data(stream_id, pending[:size])
            pending = pending[size:]
        del self._replies[stream_id]
        self._h2.send_headers(stream_id, [("grpc-status", str(_OK))], end_stream=True)

    def _get_secret(self, request: bytes) -> bytes:
        secret_id = protowire.last_bytes(request, 1).decode("utf-8", "replace")
        data = self._secrets.get(secret_id)
        log.debug(
            "build session secret asked for", session_id=self.session_id, secret_id=secret_id, found=data is not None
        )
        if data is None:
            if secret_id not in self.missing_secrets:
                self.missing_secrets.append(secret_id)
            # NotFound is what BuildKit reads as "no such secret" (and skips when required=false).
            raise _GrpcError(_NOT_FOUND, f"secret {secret_id} not found")
        return protowire.field_bytes(1, data)

    def _get_credentials(self, request: bytes) -> bytes:
        host = protowire.last_bytes(request, 1).decode("utf-8", "replace")
        try:
            login = self._credentials(host) if self._credentials is not None else None
        except Exception as exc:  # noqa: BLE001 - a lookup that breaks must not end the session
            # Only the type: a lookup's message might quote what it was looking at.
            log.error(
                "build session credentials lookup failed",
                session_id=self.session_id,
                host=host,
                error=type(exc).__name__,
            )
            raise _GrpcError(_INTERNAL, f"credentials lookup for {host} failed") from None
        log.debug("build session credentials asked for", session_id=self.session_id, host=host, found=login is not None)
        if login is None:
            return b""  # empty username and secret: the engine goes on anonymously
        username, secret = login
        return protowire.field_bytes(1, username.encode()) + protowire.field_bytes(2, secret.encode())

    def _health_check(self, request: bytes) -> bytes:
        return protowire.field_varint(1, _SERVING)


def _unframe(body: bytes) -> bytes:
    """The one message of a unary gRPC request (length-prefixed, uncompressed)."""
    if len(body) < 5:
        raise _GrpcError(_INVALID_ARGUMENT, "request without a message")
    if body[0] != 0:
        raise _GrpcError(_UNIMPLEMENTED, "compressed messages are not supported")
    length = int.from_bytes(body[1:5], "big")
    if length != len(body) - 5:
        raise _GrpcError(_INVALID_ARGUMENT, "request message length does not match its frame")
    return body[5:]


@dataclasses.dataclass(frozen=True)
class _EngineAddress:
    unix_path: str | None = None
    host: str = ""
    port: int = 0

    @property
    def host_header(self) -> str:
        if self.unix_path is not None:
            return "docker"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _parse_docker_host(url: str) -> _EngineAddress:
    """Where a DOCKER_HOST value points: a unix socket, or plain TCP (TLS is not supported here)."""
    parts = urlsplit(url)
    if parts.scheme == "unix" and parts.path:
        return _EngineAddress(unix_path=parts.path)
    if parts.scheme in ("tcp", "http") and parts.hostname:
        return _EngineAddress(host=parts.hostname, port=parts.port or 2375)
    raise ValueError(f"a BuildKit session needs a unix:// or plain tcp:// engine address, not {url!r}")
