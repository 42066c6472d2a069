"""Hostile clients and awkward inputs at the HTTP edge: each gets a clear answer, and the
connection or the daemon is left as it should be."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import SSE, dockerfile, parse_sse, submit, wait_for


async def _raw(client: TestClient, request: bytes) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(request)
    await writer.drain()
    try:
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def test_head_on_a_log_sends_headers_only_and_keeps_the_connection_usable(client: TestClient) -> None:
    accepted = await submit(client, {"Dockerfile": dockerfile("RUN echo hi")})
    await wait_for(client, accepted["build_id"], {"succeeded"})
    path = f"/builds/{accepted['build_id']}/logs"
    # Two requests on one keep-alive connection: a HEAD body would be read as the second answer.
    answer = await _raw(
        client,
        (
            f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        ).encode(),
    )
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/plain" in head
    assert rest.startswith(b"HTTP/1.1 200"), rest[:200]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["status"] == "ok"


async def test_odd_last_event_ids_are_400_not_500(client: TestClient) -> None:
    accepted = await submit(client, {"Dockerfile": dockerfile()})
    for value in ("²", "١٢", str(2**63), "9" * 40, "-1", "1e3"):
        response = await client.get(f"/builds/{accepted['build_id']}/logs", headers={**SSE, "Last-Event-ID": value})
        body = await response.json()
        assert response.status == 400 and body["code"] == "invalid_field", (value, body)
    response = await client.get(f"/builds/{accepted['build_id']}/logs", params={"after": str(2**63)})
    assert response.status == 400


async def test_last_event_id_wins_over_after(client: TestClient) -> None:
    accepted = await submit(client, {"Dockerfile": dockerfile("RUN seq 1 5")})
    await wait_for(client, accepted["build_id"], {"succeeded"})
    # An EventSource opened on ?after=1 reconnects with its own Last-Event-ID: no repeats.
    response = await client.get(
        f"/builds/{accepted['build_id']}/logs", params={"after": "1"}, headers={**SSE, "Last-Event-ID": "4"}
    )
    frames = parse_sse(await response.text())
    assert frames[0][0] == 5


async def test_a_json_body_split_across_segments_is_read_whole(client: TestClient) -> None:
    body = json.dumps({"image": "builder-busybox:latest", "image_name": "split-json"}).encode()

    async def in_two_pieces() -> Any:
        yield body[:10]
        await asyncio.sleep(0.2)
        yield body[10:]

    response = await client.post("/builds", data=in_two_pieces(), headers={"Content-Type": "application/json"})
    assert response.status == 202, await response.text()


async def test_open_mode_refuses_web_pages_foreign_host_and_cross_site_origin(client: TestClient) -> None:
    image = {"image": "builder-busybox:latest"}
    # DNS rebinding: a name of the attacker's that resolves to 127.0.0.1.
    rebound = await client.post("/builds", json=image, headers={"Host": "evil.example:8080"})
    assert rebound.status == 403 and (await rebound.json())["code"] == "forbidden"
    # A browser-style cross-site POST.
    csrf = await client.post(
        "/builds", json=image, headers={"Origin": "http://evil.example", "Host": f"127.0.0.1:{client.port}"}
    )
    assert csrf.status == 403 and "Origin" in (await csrf.json())["error"]
    assert (await client.post("/builds", json=image, headers={"Origin": "null"})).status == 403
    # The daemon's own names still work, with or without an Origin of theirs.
    for host, origin in (
        (f"localhost:{client.port}", None),
        ("[::1]", "http://localhost:3000"),
        (f"127.0.0.1:{client.port}", f"http://127.0.0.1:{client.port}"),
    ):
        headers = {"Host": host, **({"Origin": origin} if origin else {})}
        response = await client.get("/healthz", headers=headers)
        assert response.status == 200, (host, origin, await response.text())
    assert (await (await client.get("/builds")).json())["builds"] == []


async def test_with_tokens_the_host_is_not_checked(aiohttp_client: Any, settings: Any) -> None:
    import dataclasses

    from builder.server.app import create_app

    client = await aiohttp_client(create_app(dataclasses.replace(settings, auth_tokens="t1=team")))
    response = await client.get("/builds", headers={"Host": "builder.example.com", "Authorization": "Bearer t1"})
    assert response.status == 200


async def test_an_engine_that_is_down_gets_503_with_retry_after_not_202(aiohttp_client: Any, settings: Any) -> None:
    import dataclasses

    from builder.server.app import create_app
    from tests.conftest import make_context

    client = await aiohttp_client(create_app(dataclasses.replace(settings, docker_host="unix:///nonexistent/d.sock")))
    for response in (
        await client.post("/builds", json={"image": "builder-busybox:latest"}),
        await client.post(
            "/builds", data=make_context({"Dockerfile": dockerfile()}), headers={"Content-Type": "application/gzip"}
        ),
    ):
        assert response.status == 503, await response.text()
        assert response.headers["Retry-After"] == "5"
        assert (await response.json())["code"] == "engine_unavailable"
    assert (await (await client.get("/builds")).json())["builds"] == []


async def test_an_engine_that_hangs_gets_503_in_seconds(aiohttp_client: Any, settings: Any, tmp_path: Any) -> None:
    """A stand-in engine (a socket that accepts and never answers): a hung dockerd is a fault the
    real engine cannot be made to produce on demand."""
    import dataclasses

    from builder.server.app import create_app

    connections: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    socket_path = tmp_path / "hung.sock"
    server = await asyncio.start_unix_server(never_answer, path=str(socket_path))
    try:
        client = await aiohttp_client(create_app(dataclasses.replace(settings, docker_host=f"unix://{socket_path}")))
        async with asyncio.timeout(10):
            submitted = asyncio.create_task(client.post("/builds", json={"image": "builder-busybox:latest"}))
            # The daemon keeps serving while it waits on the engine.
            assert (await client.get("/healthz")).status == 200
            response = await submitted
        assert response.status == 503 and (await response.json())["code"] == "engine_unavailable"
        assert connections, "the daemon never asked the stand-in engine"
    finally:
        server.close()
        for writer in connections:
            writer.close()


async def test_a_build_whose_timeout_passes_while_its_context_arrives_gets_408_not_500(client: TestClient) -> None:
    for _ in range(5):  # the timeout fires at different points of the upload
        response = await client.post("/builds", json={"image": "builder-busybox:latest", "timeout": 1e-9})
        body = await response.json()
        assert response.status in (202, 408), body
        if response.status == 408:
            assert body["code"] == "upload_stalled" and "timed out" in body["error"]
    assert (await client.get("/healthz")).status == 200
