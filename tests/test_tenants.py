"""Tenants on one daemon: each reaches only the images its namespace may use, and its cache
mounts are its own."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from builder.server.app import create_app
from builder.server.config import Settings
from tests.conftest import BASE_IMAGE, log_lines, make_context, read_log, step_events, wait_for

A = {"Authorization": "Bearer token-a"}
B = {"Authorization": "Bearer token-b"}


@pytest.fixture
async def tenants(aiohttp_client: Any, settings: Settings) -> TestClient:
    return await aiohttp_client(create_app(dataclasses.replace(settings, auth_tokens="token-a=tenant-a,token-b=tenant-b")))


async def _post(client: TestClient, headers: dict[str, str], dockerfile: str, **fields: str) -> aiohttp.ClientResponse:
    return await client.post("/builds", data=make_context({"Dockerfile": dockerfile}),
                             params={"no_cache": "true", **fields},
                             headers={**headers, "Content-Type": "application/gzip"})


async def _build(client: TestClient, headers: dict[str, str], dockerfile: str, **fields: str) -> dict[str, Any]:
    response = await _post(client, headers, dockerfile, **fields)
    accepted = await response.json()
    assert response.status == 202, accepted
    status = await _status(client, headers, accepted["build_id"])
    assert status["status"] == "succeeded", status
    return status


async def _status(client: TestClient, headers: dict[str, str], build_id: str) -> dict[str, Any]:
    import asyncio

    async with asyncio.timeout(60):
        while True:
            body = await (await client.get(f"/builds/{build_id}", headers=headers)).json()
            if body["status"] in ("succeeded", "failed", "cancelled"):
                return body
            await asyncio.sleep(0.05)


@pytest.fixture
async def b_secret(tenants: TestClient) -> str:
    """Tenant B's image holding a secret: `tenant-b/secret:<tag>`."""
    tag = uuid.uuid4().hex[:12]
    await _build(tenants, B, f"FROM {BASE_IMAGE}\nRUN echo b-only-{tag} > /secret\n", image_name=f"secret:{tag}")
    return f"tenant-b/secret:{tag}"


@pytest.mark.parametrize(
    "dockerfile",
    [
        "FROM {image}\nRUN cat /secret\n",
        "FROM docker.io/{image}\nRUN cat /secret\n",
        "ARG BASE={image}\nFROM $BASE\nRUN cat /secret\n",
        "FROM " + BASE_IMAGE + "\nCOPY --from={image} /secret /stolen\n",
        "FROM " + BASE_IMAGE + "\nRUN --mount=type=bind,from={image},target=/m cat /m/secret\n",
        "# escape=`\nFROM " + BASE_IMAGE + " AS ok\nFROM `\n {image}\nRUN cat /secret\n",
    ],
)
async def test_a_tenant_cannot_reach_another_tenants_image(tenants: TestClient, b_secret: str, dockerfile: str) -> None:
    response = await _post(tenants, A, dockerfile.format(image=b_secret))
    body = await response.json()
    assert response.status == 403 and body["code"] == "image_not_allowed", body
    assert b_secret.split(":")[0] in body["error"]
    assert (await (await tenants.get("/builds", headers=A)).json())["builds"] == []


async def test_the_synthetic_image_build_is_checked_too(tenants: TestClient, b_secret: str) -> None:
    response = await tenants.post("/builds", json={"image": b_secret, "image_name": "copied"}, headers=A)
    body = await response.json()
    assert response.status == 403 and body["code"] == "image_not_allowed", body


async def test_a_tenant_builds_from_its_own_images_and_shared_bases(tenants: TestClient, b_secret: str) -> None:
    status = await _build(tenants, B, f"FROM {b_secret}\nRUN cat /secret\n")
    assert any(line.startswith("b-only-") for line in log_lines(await read_log(tenants, status["build_id"], headers=B)))
    await _build(tenants, A, f"FROM {BASE_IMAGE}\nRUN true\n")


async def test_a_reference_the_daemon_cannot_resolve_is_refused(tenants: TestClient) -> None:
    response = await _post(tenants, A, "FROM $UNDECLARED\nRUN true\n")
    body = await response.json()
    assert response.status == 400 and body["code"] == "unresolvable_image_reference", body


async def test_allow_base_image_patterns_narrow_what_tenants_may_use(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(
        settings, auth_tokens="token-a=tenant-a", allow_base_images=("builder-busybox:*",)
    )))
    await _build(client, A, f"FROM {BASE_IMAGE}\nRUN true\n")
    response = await _post(client, A, "FROM some-other-image:1\nRUN true\n")
    assert response.status == 403 and (await response.json())["code"] == "image_not_allowed"


async def test_open_mode_has_one_tenant_and_no_image_check(client: TestClient) -> None:
    response = await _post(client, {}, "FROM tenant-b/not-checked-here:1\nRUN true\n")
    accepted = await response.json()
    assert response.status == 202, accepted
    assert (await wait_for(client, accepted["build_id"], {"failed", "succeeded"}))["status"] == "failed"


async def test_a_tenant_cannot_mount_another_tenants_cache_on_a_shared_engine(tenants: TestClient) -> None:
    cache = f"shared-{uuid.uuid4().hex[:8]}"
    mount = f"RUN --mount=type=cache,id={cache},target=/cache"
    # Cache mounts outlive builds (not `no_cache`): each step differs, so nothing else is reused.
    await _build(tenants, B, f"FROM {BASE_IMAGE}\n{mount} echo b-was-here > /cache/b\n", no_cache="false")
    status = await _build(tenants, A, f"FROM {BASE_IMAGE}\n{mount} ls -a /cache && cat /cache/b || echo no-b\n",
                          no_cache="false")
    lines = log_lines(await read_log(tenants, status["build_id"], headers=A))
    assert "no-b" in lines and "b-was-here" not in lines
    # B's own next build does see it: the cache is kept, per tenant.
    status = await _build(tenants, B, f"FROM {BASE_IMAGE}\n{mount} cat /cache/b\n", no_cache="false")
    assert "b-was-here" in log_lines(await read_log(tenants, status["build_id"], headers=B))


async def test_on_a_shared_engine_an_identical_step_is_cached_across_tenants(tenants: TestClient) -> None:
    """What tenants on one engine share (the README says so): the layer cache."""
    step = f"RUN echo {uuid.uuid4()} > /f"
    await _build(tenants, B, f"FROM {BASE_IMAGE}\n{step}\n", no_cache="false")
    status = await _build(tenants, A, f"FROM {BASE_IMAGE}\n{step}\n", no_cache="false")
    frames = await read_log(tenants, status["build_id"], headers=A)
    assert [s["state"] for s in step_events(frames) if step in s["name"]] == ["cached"]


async def test_a_tenant_on_an_engine_of_its_own_shares_no_layer_and_no_cache_mount(
    aiohttp_client: Any, settings: Settings, second_engine: str, second_docker: Any
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(
        settings, auth_tokens="token-a=tenant-a,token-b=tenant-b", tenant_engines=(("tenant-b", second_engine),)
    )))
    step = f"RUN echo {uuid.uuid4()} > /f"
    mount = f"RUN --mount=type=cache,id=mine-{uuid.uuid4().hex[:8]},target=/cache"
    built = await _build(client, B, f"FROM {BASE_IMAGE}\n{step}\n{mount} echo b-was-here > /cache/b\n",
                         no_cache="false", image_name="own-engine")
    # B's image lives on B's engine only.
    assert (await second_docker.images.inspect(built["image_ref"]))["Id"] == built["image_id"]
    status = await _build(client, A, f"FROM {BASE_IMAGE}\n{step}\n{mount} cat /cache/b || echo no-b\n",
                          no_cache="false")
    frames = await read_log(client, status["build_id"], headers=A)
    assert [s["state"] for s in step_events(frames) if step in s["name"]] == ["started", "done"]
    assert "no-b" in log_lines(frames)
