"""BuildKit sessions (secrets, registry logins) against the real engine and a real registry."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import h2.config
import h2.connection
import h2.events
import pytest

from builder.server.engines import protowire
from builder.server.engines.session import (
    CREDENTIALS,
    GET_SECRET,
    HEALTH_CHECK,
    BuildSession,
    _GrpcError,
    _parse_docker_host,
    _unframe,
)
from builder.server.errors import EngineSessionFailed
from tests.conftest import dockerfile, make_context
from tests.processes import PASSWORD, USER

SECRET = b"s3cret value\n"


@dataclasses.dataclass
class BuildKitBuild:
    """What a raw `/build?version=2` call ended with."""

    output: str = ""  # the steps' own output, from the trace's vertex logs
    error: str | None = None
    image_id: str | None = None


def _vertex_logs(aux: str) -> bytes:
    """The `msg` of each VertexLog (StatusResponse field 3, its field 4) in one trace batch."""
    return b"".join(
        protowire.last_bytes(value, 4)
        for number, _, value in protowire.fields(base64.b64decode(aux))
        if number == 3 and isinstance(value, memoryview)
    )


async def buildkit_build(
    docker: aiodocker.Docker,
    dockerfile_text: str,
    *,
    session_id: str | None = None,
    build_id: str | None = None,
    on_output: asyncio.Event | None = None,
    wait_for_output: str = "",
) -> BuildKitBuild:
    """A BuildKit build of a one-file context through the engine API, no cache; sets `on_output`
    once the steps have printed `wait_for_output`."""
    params = {"version": "2", "nocache": "1", "buildid": build_id or uuid.uuid4().hex}
    if session_id is not None:
        params["session"] = session_id
    result = BuildKitBuild()
    async with docker._query(
        "build",
        "POST",
        params=params,
        data=make_context({"Dockerfile": dockerfile_text}, gzip=False),
        headers={"Content-Type": "application/x-tar"},
        timeout=None,
    ) as response:
        async for line in response.content:
            message = json.loads(line)
            if message.get("id") == "moby.buildkit.trace":
                result.output += _vertex_logs(message["aux"]).decode()
                if on_output is not None and wait_for_output in result.output:
                    on_output.set()
            elif message.get("id") == "moby.image.id":
                result.image_id = message["aux"]["ID"]
            elif "error" in message:
                result.error = message["error"]
    return result


@pytest.fixture
async def images(docker: aiodocker.Docker) -> AsyncIterator[list[str | None]]:
    """Images a test built; removed afterwards."""
    built: list[str | None] = []
    yield built
    for image in filter(None, built):
        with contextlib.suppress(aiodocker.DockerError):
            await docker.images.delete(image, force=True)


async def test_secret_reaches_the_step(docker: aiodocker.Docker, images: list[str | None]) -> None:
    async with BuildSession(secrets={"tok": SECRET}) as session:
        build = await buildkit_build(
            docker,
            dockerfile("RUN --mount=type=secret,id=tok sha256sum /run/secrets/tok"),
            session_id=session.session_id,
        )
    images.append(build.image_id)
    assert build.error is None, build
    assert f"{hashlib.sha256(SECRET).hexdigest()}  /run/secrets/tok" in build.output
    assert session.missing_secrets == []


async def test_secret_larger_than_the_http2_window_arrives_whole(
    docker: aiodocker.Docker, images: list[str | None]
) -> None:
    secret = bytes(range(256)) * 1600  # 400 KiB: several times the engine's initial 64 KiB window
    async with BuildSession(secrets={"big": secret}) as session:
        build = await buildkit_build(
            docker,
            dockerfile("RUN --mount=type=secret,id=big sha256sum /run/secrets/big"),
            session_id=session.session_id,
        )
    images.append(build.image_id)
    assert build.error is None, build
    assert hashlib.sha256(secret).hexdigest() in build.output


async def test_required_secret_not_given_fails_naming_it(docker: aiodocker.Docker) -> None:
    async with BuildSession(secrets={"tok": SECRET}) as session:
        build = await buildkit_build(
            docker,
            dockerfile("RUN --mount=type=secret,id=nope,required=true echo never"),
            session_id=session.session_id,
        )
    assert build.error is not None and build.image_id is None
    assert "secret nope not found" in build.error
    assert session.missing_secrets == ["nope"]
    assert session.failure_message(build.error) == build.error  # the engine already names it


async def test_optional_secret_not_given_is_named_in_the_failure(docker: aiodocker.Docker) -> None:
    # required=false is the Dockerfile default: the engine mounts nothing and the step fails alone.
    async with BuildSession() as session:
        build = await buildkit_build(
            docker,
            dockerfile("RUN --mount=type=secret,id=nope,target=/tmp/t cat /tmp/t"),
            session_id=session.session_id,
        )
    assert build.error is not None and "nope" not in build.error
    assert session.missing_secrets == ["nope"]
    assert session.failure_message(build.error) == f"{build.error} (secrets not provided: nope)"


async def test_session_outlives_health_checks_between_steps(docker: aiodocker.Docker, images: list[str | None]) -> None:
    # The engine checks health every second and drops a session that fails one; the secret of
    # the second step is asked for only after a few of those checks.
    async with BuildSession(secrets={"tok": SECRET}) as session:
        build = await buildkit_build(
            docker,
            dockerfile("RUN sleep 3", "RUN --mount=type=secret,id=tok sha256sum /run/secrets/tok"),
            session_id=session.session_id,
        )
    images.append(build.image_id)
    assert build.error is None, build
    assert hashlib.sha256(SECRET).hexdigest() in build.output


async def test_cancel_mid_step_with_the_session_open(docker: aiodocker.Docker) -> None:
    build_id = uuid.uuid4().hex
    started = asyncio.Event()
    async with BuildSession(secrets={"tok": SECRET}) as session:
        build_task = asyncio.create_task(
            buildkit_build(
                docker,
                dockerfile("RUN --mount=type=secret,id=tok sh -c 'echo started; sleep 30'"),
                session_id=session.session_id,
                build_id=build_id,
                on_output=started,
                wait_for_output="started",
            )
        )
        waiting = asyncio.create_task(started.wait())
        await asyncio.wait([build_task, waiting], timeout=20, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        assert started.is_set(), build_task.result() if build_task.done() else "the step printed nothing"
        async with docker._query("build/cancel", "POST", params={"id": build_id}) as response:
            assert response.status == 200
        # Well before the step's 30 s: the cancel, not the sleep, ends the build.
        async with asyncio.timeout(20):
            build = await build_task
        assert session.alive
    print(f"cancelled build ended with: {build.error}")
    assert build.error is not None and "cancel" in build.error, build
    assert build.image_id is None
    assert not session.alive


async def test_failed_session_open_raises_engine_session_failed(tmp_path: Path) -> None:
    with pytest.raises(EngineSessionFailed, match="cannot open a BuildKit session"):
        async with BuildSession(docker_host=f"unix://{tmp_path}/no.sock"):
            pass


async def test_engine_refusing_a_second_session_with_the_same_id_is_reported() -> None:
    async with BuildSession() as first:
        second = BuildSession()
        second.session_id = first.session_id
        with pytest.raises(EngineSessionFailed, match=f"session {first.session_id} already exists"):
            async with second:
                pass
        assert first.alive


async def _call_as_the_engine(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, message: bytes
) -> tuple[str, dict[bytes, bytes]]:
    """Upgrade like the engine does and call one gRPC method: the upgrade request, and the
    response headers and trailers together (what the engine's gRPC client would read)."""
    upgrade = (await reader.readuntil(b"\r\n\r\n")).decode()
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.send_headers(
        1,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    client.send_data(1, b"\x00" + len(message).to_bytes(4, "big") + message, end_stream=True)
    writer.write(client.data_to_send())
    answer: dict[bytes, bytes] = {}
    while data := await reader.read(65536):
        for event in client.receive_data(data):
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                answer.update(event.headers)
            if isinstance(event, h2.events.StreamEnded):
                return upgrade, answer
        writer.write(client.data_to_send())
    raise AssertionError("the session closed the connection without answering")


async def test_methods_the_session_does_not_serve_get_unimplemented(tmp_path: Path) -> None:
    # The engine calls Auth/GetTokenAuthority for a registry with token auth whether or not the
    # session announced it; UNIMPLEMENTED (12) is what makes it fall back to Auth/Credentials.
    # The engine here never asks for it without a token server, so a stand-in engine asks.
    answered: asyncio.Future[tuple[str, dict[bytes, bytes]]] = asyncio.get_running_loop().create_future()

    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = protowire.field_bytes(1, b"registry.example")
        answered.set_result(
            await _call_as_the_engine(reader, writer, "/moby.filesync.v1.Auth/GetTokenAuthority", request)
        )
        writer.close()

    server = await asyncio.start_unix_server(engine, tmp_path / "engine.sock")
    async with server, BuildSession(docker_host=f"unix://{tmp_path}/engine.sock") as session:
        async with asyncio.timeout(10):
            upgrade, answer = await answered
    assert upgrade.startswith("POST /session HTTP/1.1\r\n")
    assert "\r\nUpgrade: h2c\r\n" in upgrade and "\r\nConnection: Upgrade\r\n" in upgrade
    assert f"\r\nX-Docker-Expose-Session-Uuid: {session.session_id}\r\n" in upgrade
    announced = {
        line.split(": ", 1)[1]
        for line in upgrade.split("\r\n")
        if line.startswith("X-Docker-Expose-Session-Grpc-Method: ")
    }
    assert announced == {GET_SECRET, CREDENTIALS, HEALTH_CHECK}
    assert answer[b"grpc-status"] == b"12"
    assert answer[b"grpc-message"] == b"unknown method /moby.filesync.v1.Auth/GetTokenAuthority"


# Registry logins ---------------------------------------------------------------------------


def _login_for(registry: str, password: str, asked: list[str]) -> BuildSession:
    def lookup(host: str) -> tuple[str, str] | None:
        asked.append(host)
        return (USER, password) if host == registry else None

    return BuildSession(credentials=lookup)


async def test_from_a_private_registry_pulls_with_the_session_login(
    docker: aiodocker.Docker, login_registry: str, private_image: str, images: list[str | None]
) -> None:
    asked: list[str] = []
    async with _login_for(login_registry, PASSWORD, asked) as session:
        build = await buildkit_build(docker, f"FROM {private_image}\nRUN echo pulled\n", session_id=session.session_id)
    images.append(build.image_id)
    assert build.error is None, build
    assert "pulled" in build.output
    assert asked and set(asked) == {login_registry}


async def test_from_a_private_registry_with_a_wrong_password_fails_unauthorized(
    docker: aiodocker.Docker, login_registry: str, private_image: str
) -> None:
    asked: list[str] = []
    async with _login_for(login_registry, "wrong", asked) as session:
        build = await buildkit_build(docker, f"FROM {private_image}\nRUN echo pulled\n", session_id=session.session_id)
    assert build.error is not None and build.image_id is None
    assert f"pulling from host {login_registry} failed" in build.error and "401 Unauthorized" in build.error, (
        build.error
    )
    assert login_registry in asked


async def test_from_a_private_registry_without_a_login_fails(
    docker: aiodocker.Docker, login_registry: str, private_image: str
) -> None:
    async with BuildSession(credentials=lambda host: None) as session:
        build = await buildkit_build(docker, f"FROM {private_image}\nRUN echo pulled\n", session_id=session.session_id)
    assert build.error is not None and build.image_id is None
    assert f"pulling from host {login_registry} failed" in build.error and "401 Unauthorized" in build.error


# Pure parts ----------------------------------------------------------------------------------


def test_unframe_reads_one_uncompressed_message() -> None:
    message = protowire.field_bytes(1, b"tok")
    assert _unframe(b"\x00" + len(message).to_bytes(4, "big") + message) == message


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", 3),
        (b"\x00\x00\x00", 3),
        (b"\x00\x00\x00\x00\x09abc", 3),  # INVALID_ARGUMENT
        (b"\x01\x00\x00\x00\x00", 12),  # compressed: UNIMPLEMENTED
    ],
)
def test_unframe_refuses_short_mismatched_or_compressed_frames(body: bytes, code: int) -> None:
    with pytest.raises(_GrpcError) as refused:
        _unframe(body)
    assert refused.value.code == code


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("unix:///var/run/docker.sock", ("/var/run/docker.sock", "", 0, "docker")),
        ("tcp://10.0.0.5:2376", (None, "10.0.0.5", 2376, "10.0.0.5:2376")),
        ("tcp://engine", (None, "engine", 2375, "engine:2375")),
        ("http://[::1]:2375", (None, "::1", 2375, "[::1]:2375")),
    ],
)
def test_docker_host_addresses(url: str, expected: tuple[str | None, str, int, str]) -> None:
    address = _parse_docker_host(url)
    assert (address.unix_path, address.host, address.port, address.host_header) == expected


@pytest.mark.parametrize("url", ["https://engine:2376", "ssh://user@engine", "npipe:////./pipe/docker_engine"])
def test_docker_host_schemes_a_session_cannot_use(url: str) -> None:
    with pytest.raises(ValueError, match="unix:// or plain tcp://"):
        _parse_docker_host(url)


def test_last_bytes_takes_the_last_occurrence_and_defaults_to_empty() -> None:
    message = protowire.field_bytes(1, b"a") + protowire.field_varint(2, 7) + protowire.field_bytes(1, b"b")
    assert protowire.last_bytes(message, 1) == b"b"
    assert protowire.last_bytes(message, 3) == b""


async def test_from_a_private_registry_with_a_broken_login_lookup_fails_naming_the_host(
    docker: aiodocker.Docker, login_registry: str, private_image: str
) -> None:
    def lookup(host: str) -> tuple[str, str] | None:
        raise RuntimeError("vault unreachable")

    async with BuildSession(credentials=lookup) as session:
        build = await buildkit_build(docker, f"FROM {private_image}\nRUN echo pulled\n", session_id=session.session_id)
        assert session.alive  # the lookup's failure ended one call, not the session
    print(build.error)
    assert build.error is not None and build.image_id is None
    assert f"credentials lookup for {login_registry} failed" in build.error, build.error
