"""The parts multi-engine and cluster tests stand on work: the second engine, redis-server, nginx,
`builder serve` processes."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
import redis.asyncio
from aiohttp import web

from builder.server.app import create_app
from builder.server.config import Settings
from tests.conftest import dockerfile, log_lines, read_log, submit, wait_for
from tests.processes import NginxProxy, RedisServer, StartDaemon

# Only catches hangs: a proxy that buffers never lets the stream go on.
HANG_SECONDS = 20


async def test_second_engine_builds_a_run_step(
    aiohttp_client: Any,
    tmp_path: Path,
    second_engine: str,
    builder: str,
    second_docker: aiodocker.Docker,
    docker: aiodocker.Docker,
) -> None:
    settings = Settings(data_dir=tmp_path / "data", docker_host=second_engine, builder=builder, flush_interval=0.02)
    client = await aiohttp_client(create_app(settings))
    name = f"builder-test/engine2-{uuid.uuid4().hex[:12]}"
    accepted = await submit(client, {"Dockerfile": dockerfile("RUN echo hi")}, image_name=name)
    status = await wait_for(client, accepted["build_id"], {"succeeded", "failed"})
    try:
        assert status["status"] == "succeeded", status
        assert "hi" in log_lines(await read_log(client, accepted["build_id"]))
        # Built on the second engine, and there only.
        assert (await second_docker.images.inspect(f"{name}:latest"))["Id"] == status["image_id"]
        with pytest.raises(aiodocker.DockerError) as missing:
            await docker.images.inspect(f"{name}:latest")
        assert missing.value.status == 404
    finally:
        await second_docker.images.delete(f"{name}:latest", force=True)


async def test_images_of_the_main_engine_are_not_on_the_second(
    docker: aiodocker.Docker, second_docker: aiodocker.Docker, base_image: str
) -> None:
    repository, tag = "builder-test/engine1-only", uuid.uuid4().hex[:12]
    await docker.images.tag(base_image, repository, tag=tag)
    try:
        assert (await docker.images.inspect(f"{repository}:{tag}"))["Id"]
        with pytest.raises(aiodocker.DockerError) as missing:
            await second_docker.images.inspect(f"{repository}:{tag}")
        assert missing.value.status == 404
    finally:
        await docker.images.delete(f"{repository}:{tag}")


async def test_second_engine_has_an_id_of_its_own(docker: aiodocker.Docker, second_docker: aiodocker.Docker) -> None:
    main, second = await docker.system.info(), await second_docker.system.info()
    assert second["DockerRootDir"] != main["DockerRootDir"]
    assert second["ID"] != main["ID"]


async def test_redis_keeps_keys_across_a_restart(redis_server: RedisServer) -> None:
    async with redis.asyncio.Redis.from_url(redis_server.url) as r:
        assert await r.ping()
        await r.set("infra:key", "kept")
    redis_server.restart()
    async with redis.asyncio.Redis.from_url(redis_server.url) as r:
        assert await r.get("infra:key") == b"kept"
        assert (await r.config_get("appendonly")) == {"appendonly": "yes"}
        assert (await r.config_get("dir"))["dir"] == str(redis_server.directory)


async def _named_upstream(aiohttp_server: Any, name: str, *routes: web.RouteDef) -> str:
    app = web.Application()

    async def whoami(request: web.Request) -> web.Response:
        return web.Response(text=name)

    app.router.add_routes([web.get("/whoami", whoami), *routes])
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


async def test_nginx_round_robins_between_upstreams(aiohttp_server: Any, nginx_proxy: NginxProxy) -> None:
    proxy = nginx_proxy([await _named_upstream(aiohttp_server, "a"), await _named_upstream(aiohttp_server, "b")])
    async with aiohttp.ClientSession() as session:
        names = []
        for _ in range(6):
            async with session.get(f"{proxy}/whoami") as response:
                names.append(await response.text())
    assert set(names) == {"a", "b"}
    assert all(first != second for first, second in itertools.pairwise(names)), names


async def test_nginx_passes_each_response_chunk_on_at_once(aiohttp_server: Any, nginx_proxy: NginxProxy) -> None:
    first_chunk_read = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first\n")
        await first_chunk_read.wait()  # the rest only once the client has had the first chunk
        await response.write(b"last\n")
        await response.write_eof()
        return response

    proxy = nginx_proxy([await _named_upstream(aiohttp_server, "a", web.get("/slow", slow))])
    async with (
        asyncio.timeout(HANG_SECONDS),
        aiohttp.ClientSession() as session,
        session.get(f"{proxy}/slow") as response,
    ):
        assert await response.content.readline() == b"first\n"
        first_chunk_read.set()
        assert await response.content.read() == b"last\n"


async def test_nginx_streams_a_request_body_without_buffering(aiohttp_server: Any, nginx_proxy: NginxProxy) -> None:
    first_part_arrived = asyncio.Event()

    async def upload(request: web.Request) -> web.Response:
        received = await request.content.readexactly(len(b"part one;"))
        first_part_arrived.set()
        received += await request.content.read()
        return web.Response(body=received)

    async def body() -> AsyncIterator[bytes]:
        yield b"part one;"
        await first_part_arrived.wait()  # the rest only once the upstream has had the first part
        yield b"part two"

    proxy = nginx_proxy([await _named_upstream(aiohttp_server, "a", web.post("/upload", upload))])
    async with (
        asyncio.timeout(HANG_SECONDS),
        aiohttp.ClientSession() as session,
        session.post(f"{proxy}/upload", data=body()) as response,
    ):
        assert response.status == 200
        assert await response.read() == b"part one;part two"


async def test_nginx_has_no_body_size_limit(aiohttp_server: Any, nginx_proxy: NginxProxy) -> None:
    async def size(request: web.Request) -> web.Response:
        received = 0
        async for chunk in request.content.iter_any():  # read() stops at aiohttp's own 1 MiB limit
            received += len(chunk)
        return web.Response(text=str(received))

    proxy = nginx_proxy([await _named_upstream(aiohttp_server, "a", web.post("/size", size))])
    body = b"x" * (3 << 20)  # nginx's default limit is 1 MiB
    async with aiohttp.ClientSession() as session, session.post(f"{proxy}/size", data=body) as response:
        assert (response.status, await response.text()) == (200, str(len(body)))


async def test_daemons_on_both_engines_behind_nginx_restart_on_their_port(
    daemon_process: StartDaemon, nginx_proxy: NginxProxy, second_engine: str, tmp_path: Path
) -> None:
    first = await daemon_process().ready()
    second = await daemon_process("--docker-host", second_engine).ready()
    proxy = nginx_proxy([first.url, second.url])
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.get(f"{proxy}/readyz") as response:  # the engine behind answers ping
                assert response.status == 200, await response.text()
        old_pid = second.proc.pid
        await second.restart().ready()
        assert second.proc.pid != old_pid
        async with session.get(f"{second.url}/readyz") as response:
            assert response.status == 200
    assert second.terminate() == 0
    access_log = (tmp_path / f"nginx-{proxy.rsplit(':', 1)[1]}" / "access.log").read_text()
    assert {f"upstream=127.0.0.1:{d.port}" for d in (first, second)} <= set(access_log.split())
