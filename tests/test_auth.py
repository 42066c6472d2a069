"""Bearer tokens and tenant isolation."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from builder.server.app import create_app, open_access_refusal
from builder.server.config import Settings
from tests.conftest import SSE, dockerfile, make_context, wait_healthy

ALPHA = {"Authorization": "Bearer tok-alpha"}
BETA = {"Authorization": "Bearer tok-beta"}


@pytest.fixture
async def tenants(aiohttp_client: Any, settings: Settings) -> TestClient:
    return await aiohttp_client(create_app(dataclasses.replace(settings, auth_tokens="tok-alpha=alpha,tok-beta=beta")))


async def _post(client: TestClient, headers: dict[str, str], **params: str) -> aiohttp.ClientResponse:
    return await client.post(
        "/builds",
        data=make_context({"Dockerfile": dockerfile("RUN true")}),
        params={"no_cache": "true", **params},
        headers={**headers, "Content-Type": "application/gzip"},
    )


async def _wait(client: TestClient, build_id: str, headers: dict[str, str]) -> dict[str, Any]:
    async with asyncio.timeout(60):
        while True:
            body = await (await client.get(f"/builds/{build_id}", headers=headers)).json()
            if body["status"] in ("succeeded", "failed", "cancelled"):
                return body
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic dG9rLWFscGhh"}])
async def test_requests_without_a_valid_token_are_401(tenants: TestClient, headers: dict[str, str]) -> None:
    for method, path in [
        ("GET", "/builds"),
        ("POST", "/builds"),
        ("GET", "/builds/x"),
        ("GET", "/builds/x/logs"),
        ("DELETE", "/builds/x"),
    ]:
        response = await tenants.request(method, path, headers=headers)
        assert response.status == 401, (method, path)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.json())["code"] == "unauthorized"
    assert (await tenants.get("/healthz")).status == 200
    assert (await tenants.get("/readyz")).status == 200


async def test_a_tenant_sees_only_its_own_builds_and_images_carry_its_namespace(
    tenants: TestClient, docker: aiodocker.Docker
) -> None:
    created = await _post(tenants, ALPHA, image_name="app:v1")
    assert created.status == 202
    build_id = (await created.json())["build_id"]
    status = await _wait(tenants, build_id, ALPHA)
    assert status["status"] == "succeeded" and status["image_ref"] == "alpha/app:v1"
    assert (await docker.images.inspect("alpha/app:v1"))["Id"] == status["image_id"]

    unknown = await tenants.get("/builds/does-not-exist", headers=BETA)
    for method, path in [
        ("GET", f"/builds/{build_id}"),
        ("GET", f"/builds/{build_id}/logs"),
        ("DELETE", f"/builds/{build_id}"),
    ]:
        response = await tenants.request(method, path, headers={**BETA, **SSE})
        assert response.status == 404, (method, path)
        body = await response.json()
        assert body["code"] == (await unknown.json())["code"] == "build_not_found"
    assert (await (await tenants.get("/builds", headers=BETA)).json())["builds"] == []
    assert [b["build_id"] for b in (await (await tenants.get("/builds", headers=ALPHA)).json())["builds"]] == [build_id]


@pytest.mark.parametrize("name", ["beta/app", "registry.example.com/app", "localhost:5000/app", "../app", "App"])
async def test_image_name_cannot_pick_another_place(tenants: TestClient, name: str) -> None:
    response = await _post(tenants, ALPHA, image_name=name)
    if name == "beta/app":
        # Allowed as a repository path, but it lands under the caller's own namespace.
        build_id = (await response.json())["build_id"]
        assert (await _wait(tenants, build_id, ALPHA))["image_ref"] == "alpha/beta/app:latest"
    else:
        assert response.status == 400
        assert (await response.json())["code"] == "invalid_field"


def test_open_daemon_refuses_non_loopback_without_insecure(settings: Settings) -> None:
    assert open_access_refusal(dataclasses.replace(settings, host="127.0.0.1", auth_tokens=None)) is None
    refusal = open_access_refusal(dataclasses.replace(settings, host="0.0.0.0", auth_tokens=None))
    assert refusal and "--insecure" in refusal
    assert open_access_refusal(dataclasses.replace(settings, host="0.0.0.0", auth_tokens=None, insecure=True)) is None
    assert open_access_refusal(dataclasses.replace(settings, host="0.0.0.0", auth_tokens="t=ns")) is None
    proc = subprocess.run(
        [sys.executable, "-m", "builder", "serve", "--host", "0.0.0.0", "--data-dir", str(settings.data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and "without authentication" in proc.stderr


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# tenants\nold-token alpha\n")
    return path


@pytest.mark.daemon_args("--auth-tokens-file", "{tmp_path}/tokens")
async def test_sighup_reloads_tokens_without_dropping_streams(
    tokens_file: Path, daemon: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, proc = daemon
    tokens = tokens_file
    old = {"Authorization": "Bearer old-token"}
    async with aiohttp.ClientSession() as session:
        await wait_healthy(session, url)
        assert (await session.get(f"{url}/builds")).status == 401
        assert (await session.get(f"{url}/builds", headers=old)).status == 200
        async with session.post(
            f"{url}/builds",
            headers={**old, "Content-Type": "application/gzip"},
            data=make_context({"Dockerfile": dockerfile("RUN echo started && sleep 2")}),
            params={"no_cache": "true"},
        ) as created:
            build_id = (await created.json())["build_id"]
        stream = await session.get(f"{url}/builds/{build_id}/logs", headers={**old, **SSE})
        tokens.write_text("new-token alpha\n")
        proc.send_signal(signal.SIGHUP)
        new = {"Authorization": "Bearer new-token"}
        async with asyncio.timeout(10):
            while (await session.get(f"{url}/builds", headers=new)).status != 200:
                await asyncio.sleep(0.1)
        assert (await session.get(f"{url}/builds", headers=old)).status == 401
        frames = [json.loads(line[6:]) for line in (await stream.text()).splitlines() if line.startswith("data: ")]
        assert frames[-1]["status"] == "succeeded"  # the stream opened with the old token ran to its end


async def test_metrics_need_a_token_or_the_metrics_token(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, auth_tokens="tok-alpha=alpha", metrics_token="scrape-me"))
    )
    assert (await client.get("/metrics")).status == 401
    scraper = await client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert scraper.status == 200
    assert (await client.get("/builds", headers={"Authorization": "Bearer scrape-me"})).status == 401
    assert (await client.get("/metrics", headers=ALPHA)).status == 200
