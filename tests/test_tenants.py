"""Tenants on one daemon: each reaches only the images its namespace may use, and its cache
mounts are its own."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from builder.server.app import create_app
from builder.server.appkeys import SERVICE
from builder.server.config import Settings
from tests.conftest import BASE_IMAGE, log_lines, make_context, read_log, step_events, wait_for
from tests.steps import unique_sleep, wait_for_process

A = {"Authorization": "Bearer token-a"}
B = {"Authorization": "Bearer token-b"}


@pytest.fixture
async def tenants(aiohttp_client: Any, settings: Settings) -> TestClient:
    return await aiohttp_client(
        create_app(dataclasses.replace(settings, auth_tokens="token-a=tenant-a,token-b=tenant-b"))
    )


async def _post(client: TestClient, headers: dict[str, str], dockerfile: str, **fields: str) -> aiohttp.ClientResponse:
    return await client.post(
        "/builds",
        data=make_context({"Dockerfile": dockerfile}),
        params={"no_cache": "true", **fields},
        headers={**headers, "Content-Type": "application/gzip"},
    )


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
async def b_secret(tenants: TestClient, docker: aiodocker.Docker) -> AsyncIterator[str]:
    """Tenant B's image holding a secret: `tenant-b/secret:<tag>`, removed afterwards."""
    tag = uuid.uuid4().hex[:12]
    await _build(tenants, B, f"FROM {BASE_IMAGE}\nRUN echo b-only-{tag} > /secret\n", image_name=f"secret:{tag}")
    yield f"tenant-b/secret:{tag}"
    with contextlib.suppress(aiodocker.DockerError):
        await docker.images.delete(f"tenant-b/secret:{tag}", force=True)


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
    client = await aiohttp_client(
        create_app(
            dataclasses.replace(settings, auth_tokens="token-a=tenant-a", allow_base_images=("builder-busybox:*",))
        )
    )
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
    status = await _build(
        tenants, A, f"FROM {BASE_IMAGE}\n{mount} ls -a /cache && cat /cache/b || echo no-b\n", no_cache="false"
    )
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
    client = await aiohttp_client(
        create_app(
            dataclasses.replace(
                settings, auth_tokens="token-a=tenant-a,token-b=tenant-b", tenant_engines=(("tenant-b", second_engine),)
            )
        )
    )
    step = f"RUN echo {uuid.uuid4()} > /f"
    mount = f"RUN --mount=type=cache,id=mine-{uuid.uuid4().hex[:8]},target=/cache"
    built = await _build(
        client,
        B,
        f"FROM {BASE_IMAGE}\n{step}\n{mount} echo b-was-here > /cache/b\n",
        no_cache="false",
        image_name="own-engine",
    )
    # B's image lives on B's engine only.
    assert (await second_docker.images.inspect(built["image_ref"]))["Id"] == built["image_id"]
    status = await _build(
        client, A, f"FROM {BASE_IMAGE}\n{step}\n{mount} cat /cache/b || echo no-b\n", no_cache="false"
    )
    frames = await read_log(client, status["build_id"], headers=A)
    assert [s["state"] for s in step_events(frames) if step in s["name"]] == ["started", "done"]
    assert "no-b" in log_lines(frames)


async def _daemon(aiohttp_client: Any, settings: Settings, **changes: Any) -> TestClient:
    return await aiohttp_client(
        create_app(dataclasses.replace(settings, auth_tokens="token-a=tenant-a,token-b=tenant-b", **changes))
    )


async def _submit(client: TestClient, headers: dict[str, str], dockerfile: str) -> str:
    response = await _post(client, headers, dockerfile)
    body = await response.json()
    assert response.status == 202, body
    return str(body["build_id"])


async def test_retention_keeps_each_tenants_newest_builds(aiohttp_client: Any, settings: Settings) -> None:
    client = await _daemon(aiohttp_client, settings, max_builds=1)
    b_only = (await _build(client, B, f"FROM {BASE_IMAGE}\nRUN true\n"))["build_id"]
    a_builds = [(await _build(client, A, f"FROM {BASE_IMAGE}\nRUN echo {i}\n"))["build_id"] for i in range(3)]
    await client.app[SERVICE].expire_old_builds()
    assert (await client.get(f"/builds/{b_only}", headers=B)).status == 200
    assert (await client.get(f"/builds/{a_builds[-1]}", headers=A)).status == 200
    assert [(await client.get(f"/builds/{i}", headers=A)).status for i in a_builds[:-1]] == [410, 410]


async def test_one_tenant_filling_its_queue_share_leaves_room_for_others_and_starts_take_turns(
    aiohttp_client: Any, settings: Settings
) -> None:
    client = await _daemon(aiohttp_client, settings, max_concurrent=1, max_queue_per_tenant=3)
    sleep = unique_sleep()
    blocker = await _submit(client, A, f"FROM {BASE_IMAGE}\nRUN {sleep}\n")
    await wait_for_process(sleep)
    queued_a = [await _submit(client, A, f"FROM {BASE_IMAGE}\nRUN echo a{i}\n") for i in range(3)]
    refused = await _post(client, A, f"FROM {BASE_IMAGE}\nRUN echo a-too-many\n")
    body = await refused.json()
    assert refused.status == 429 and body["code"] == "tenant_quota_exceeded" and "Retry-After" in refused.headers
    queued_b = await _submit(client, B, f"FROM {BASE_IMAGE}\nRUN echo b\n")
    assert (await client.delete(f"/builds/{blocker}", headers=A)).status == 200
    started = {}
    for build_id, headers in [*[(i, A) for i in queued_a], (queued_b, B)]:
        started[build_id] = (await _status(client, headers, build_id))["started_at"]
    order = sorted(started, key=started.__getitem__)
    # Round-robin: A's first, then B's only one, then A's others, instead of B last.
    assert order == [queued_a[0], queued_b, queued_a[1], queued_a[2]]


async def test_a_tenants_uploads_at_once_and_log_streams_are_capped(aiohttp_client: Any, settings: Settings) -> None:
    import asyncio

    client = await _daemon(aiohttp_client, settings, max_uploads_per_tenant=1, max_followers_per_tenant=1)
    held = asyncio.Event()

    async def slow() -> Any:
        yield make_context({"Dockerfile": f"FROM {BASE_IMAGE}\n"})[:50]
        await held.wait()

    in_flight = asyncio.create_task(
        client.post("/builds", data=slow(), headers={**A, "Content-Type": "application/gzip"})
    )
    async with asyncio.timeout(10):
        while (await (await client.get("/healthz")).json())["uploads"] != 1:
            await asyncio.sleep(0.02)
    second = await _post(client, A, f"FROM {BASE_IMAGE}\n")
    assert second.status == 429 and (await second.json())["code"] == "tenant_quota_exceeded"
    other = await _build(client, B, f"FROM {BASE_IMAGE}\nRUN true\n")
    held.set()
    in_flight.cancel()

    sleep = unique_sleep()
    running = await _submit(client, B, f"FROM {BASE_IMAGE}\nRUN {sleep}\n")
    stream = await client.get(f"/builds/{running}/logs", headers={**B, "Accept": "text/event-stream"})
    assert stream.status == 200
    refused = await client.get(f"/builds/{other['build_id']}/logs", headers={**B, "Accept": "text/event-stream"})
    assert refused.status == 429 and (await refused.json())["code"] == "tenant_quota_exceeded"
    stream.close()
    assert (await client.delete(f"/builds/{running}", headers=B)).status == 200


async def test_a_tenants_spooled_bytes_are_capped(aiohttp_client: Any, settings: Settings) -> None:
    import os

    client = await _daemon(aiohttp_client, settings, max_concurrent=1, max_spool_bytes_per_tenant=64 * 1024)
    sleep = unique_sleep()
    blocker = await _submit(client, B, f"FROM {BASE_IMAGE}\nRUN {sleep}\n")
    await wait_for_process(sleep)
    big = make_context({"Dockerfile": f"FROM {BASE_IMAGE}\n", "blob": os.urandom(200 * 1024)})
    refused = await client.post("/builds", data=big, headers={**A, "Content-Type": "application/gzip"})
    body = await refused.json()
    assert refused.status == 429 and body["code"] == "tenant_quota_exceeded", body
    assert list(settings.spool_dir.iterdir()) == []
    waiting = await _submit(client, B, f"FROM {BASE_IMAGE}\nRUN true\n")
    assert len(list(settings.spool_dir.iterdir())) == 1
    assert (await client.delete(f"/builds/{blocker}", headers=B)).status == 200
    assert (await _status(client, B, waiting))["status"] == "succeeded"
