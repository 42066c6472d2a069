"""Bad requests get a JSON error with the right status, nothing is left behind, the daemon keeps serving."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from builder.server.app import create_app
from builder.server.config import Settings
from tests.conftest import dockerfile, log_lines, make_context, read_log, wait_for, wait_healthy


async def _error(response: aiohttp.ClientResponse, status: int, code: str) -> str:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error", "code"} and body["code"] == code, body
    return body["error"]


@pytest.mark.parametrize(
    "ref",
    [
        "busybox\nRUN touch /pwned",
        "busybox\r\nRUN x",
        "busy box",
        " busybox",
        "-busybox",
        "busybox\x00",
        "busybox\t",
        "UPPER:case",
        "",
    ],
)
async def test_synthetic_image_reference_is_validated(client: TestClient, ref: str) -> None:
    response = await client.post("/builds", json={"image": ref})
    message = await _error(response, 400, "invalid_image_reference" if ref else "invalid_field")
    assert message
    assert (await (await client.get("/builds")).json())["builds"] == []


async def test_missing_dockerfile_names_the_path(client: TestClient, settings: Settings) -> None:
    form = aiohttp.FormData()
    form.add_field("context", make_context({"README": "no dockerfile here"}), filename="c.tgz")
    form.add_field("dockerfile", "build/Dockerfile.prod")
    message = await _error(await client.post("/builds", data=form), 400, "dockerfile_not_found")
    assert "build/Dockerfile.prod" in message
    assert list(settings.spool_dir.iterdir()) == []


async def test_garbage_body_is_not_a_tar(client: TestClient, settings: Settings) -> None:
    response = await client.post("/builds", data=os.urandom(10_000), headers={"Content-Type": "application/x-tar"})
    assert "not a readable tar" in await _error(response, 400, "invalid_context")
    empty = await client.post("/builds", data=b"", headers={"Content-Type": "application/gzip"})
    await _error(empty, 400, "invalid_context")
    assert list(settings.spool_dir.iterdir()) == []


async def _chunks(data: bytes, size: int = 4096):
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_upload_over_limit_is_413_and_daemon_keeps_serving(aiohttp_client: Any, settings: Settings) -> None:
    small = dataclasses.replace(settings, max_context_bytes=64 * 1024)
    client = await aiohttp_client(create_app(small))
    big = make_context({"Dockerfile": dockerfile(), "blob": os.urandom(200_000)})

    # Announced by Content-Length: refused before the body is read.
    response = await client.post("/builds", data=big, headers={"Content-Type": "application/gzip"})
    assert "limit" in await _error(response, 413, "context_too_large")
    # Chunked, no Content-Length: refused while streaming, partial file removed.
    response = await client.post("/builds", data=_chunks(big), headers={"Content-Type": "application/gzip"})
    await _error(response, 413, "context_too_large")
    form = aiohttp.FormData()
    form.add_field("context", _chunks(big), filename="c.tgz", content_type="application/gzip")
    await _error(await client.post("/builds", data=form), 413, "context_too_large")
    assert list(small.spool_dir.iterdir()) == []

    ok = await client.post(
        "/builds", data=make_context({"Dockerfile": dockerfile()}), headers={"Content-Type": "application/gzip"}
    )
    assert ok.status == 202
    assert (await client.get("/healthz")).status == 200


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"build_args": "not json"}, "invalid_field"),
        ({"build_args": '["a"]'}, "invalid_field"),
        ({"build_args": '{"A": 1}'}, "invalid_field"),
        ({"labels": '{"a": {"b": "c"}}'}, "invalid_field"),
        ({"image_name": "../etc/passwd"}, "invalid_field"),
        ({"image_name": "Has-Upper"}, "invalid_field"),
        ({"no_cache": "maybe"}, "invalid_field"),
        ({"dockerfile": "../outside/Dockerfile"}, "invalid_field"),
    ],
)
async def test_invalid_fields_are_400(
    client: TestClient, settings: Settings, fields: dict[str, str], code: str
) -> None:
    form = aiohttp.FormData()
    form.add_field("context", make_context({"Dockerfile": dockerfile()}), filename="c.tgz")
    for name, value in fields.items():
        form.add_field(name, value)
    await _error(await client.post("/builds", data=form), 400, code)
    assert list(settings.spool_dir.iterdir()) == []


async def test_multipart_without_context_part(client: TestClient) -> None:
    form = aiohttp.FormData()
    form.add_field("image_name", "x")
    form.add_field("other", b"bytes", filename="other.bin")
    assert "context" in await _error(await client.post("/builds", data=form), 400, "bad_request")


async def test_json_body_must_be_an_object(client: TestClient) -> None:
    bad = await client.post("/builds", data=b"{nope", headers={"Content-Type": "application/json"})
    await _error(bad, 400, "bad_request")
    await _error(await client.post("/builds", json=["busybox"]), 400, "bad_request")


async def test_unsupported_content_type_is_415(client: TestClient) -> None:
    response = await client.post("/builds", data=b"hello", headers={"Content-Type": "text/plain"})
    await _error(response, 415, "unsupported_media_type")


async def test_unknown_build_is_404_with_retry_after(client: TestClient) -> None:
    for path in ("/builds/unknown", "/builds/unknown/logs"):
        response = await client.get(path)
        await _error(response, 404, "build_not_found")
        assert response.headers["Retry-After"] == "1"


async def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    await _error(await client.get("/nope"), 404, "not_found")
    await _error(await client.put("/builds"), 405, "method_not_allowed")


async def test_bad_resume_position_is_400(client: TestClient) -> None:
    accepted = await client.post("/builds", json={"image": "builder-busybox:latest"})
    build_id = (await accepted.json())["build_id"]
    await _error(await client.get(f"/builds/{build_id}/logs", params={"after": "x"}), 400, "invalid_field")
    bad_header = await client.get(f"/builds/{build_id}/logs", headers={"Last-Event-ID": "-3"})
    await _error(bad_header, 400, "invalid_field")


async def test_idempotency_key_repeats_return_the_original_build(client: TestClient, settings: Settings) -> None:
    body = make_context({"Dockerfile": dockerfile("RUN true")})
    headers = {"Content-Type": "application/gzip", "Idempotency-Key": "retry-me-1"}
    first = await client.post("/builds", data=body, headers=headers, params={"image_name": "idem"})
    again = await client.post("/builds", data=body, headers=headers, params={"image_name": "idem"})
    assert (first.status, again.status) == (202, 200)
    assert (await first.json())["build_id"] == (await again.json())["build_id"]
    assert len((await (await client.get("/builds")).json())["builds"]) == 1

    other_body = make_context({"Dockerfile": dockerfile("RUN false")})
    changed = await client.post("/builds", data=other_body, headers=headers, params={"image_name": "idem"})
    await _error(changed, 422, "idempotency_key_reused")
    changed_fields = await client.post("/builds", data=body, headers=headers, params={"image_name": "other"})
    await _error(changed_fields, 422, "idempotency_key_reused")
    assert len((await (await client.get("/builds")).json())["builds"]) == 1
    assert len(list(settings.spool_dir.iterdir())) <= 1  # only the one real build's context, if still running

    synthetic = {"image": "builder-busybox:latest"}
    one = await client.post("/builds", json=synthetic, headers={"Idempotency-Key": "json-1"})
    two = await client.post("/builds", json=synthetic, headers={"Idempotency-Key": "json-1"})
    assert (one.status, two.status) == (202, 200)
    await _error(
        await client.post("/builds", json={"image": "other"}, headers={"Idempotency-Key": "json-1"}),
        422,
        "idempotency_key_reused",
    )


def _raw_tar(*entries: tuple[str, bytes]) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.addfile(_info("Dockerfile", 0), io.BytesIO(b""))
        for name, kind in entries:
            info = _info(name, 0)
            info.type = kind
            tar.addfile(info)
    return buffer.getvalue()


def _info(name: str, size: int):
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = size
    return info


@pytest.mark.parametrize(
    ("entry", "kind", "fragment"),
    [
        ("../../etc/cron.d/x", b"0", "escapes the context"),
        ("/abs/file", b"0", "absolute path"),
        ("fifo", b"6", "device or FIFO"),
        ("tty", b"3", "device or FIFO"),
    ],
)
async def test_hostile_tar_entries_are_400_naming_the_entry(
    client: TestClient, settings: Settings, entry: str, kind: bytes, fragment: str
) -> None:
    response = await client.post("/builds", data=_raw_tar((entry, kind)), headers={"Content-Type": "application/gzip"})
    message = await _error(response, 400, "invalid_context")
    assert fragment in message and repr(entry) in message
    assert list(settings.spool_dir.iterdir()) == []
    good = await client.post("/builds", json={"image": "builder-busybox:latest"})
    assert good.status == 202


async def test_gzip_bomb_is_413_before_the_engine_sees_it(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, max_context_unpacked_bytes=8 << 20)))
    real_bomb = make_context({"Dockerfile": dockerfile(), "zeros": bytes(100 << 20)})
    assert len(real_bomb) < 1 << 20
    response = await client.post("/builds", data=real_bomb, headers={"Content-Type": "application/gzip"})
    assert "unpacks to more than" in await _error(response, 413, "context_too_large")
    assert list(settings.spool_dir.iterdir()) == []
    assert (await client.post("/builds", json={"image": "builder-busybox:latest"})).status == 202


async def test_stalled_upload_is_dropped_and_its_partial_file_removed(aiohttp_client: Any, settings: Settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, upload_idle_timeout=0.5)))
    body = make_context({"Dockerfile": dockerfile(), "blob": os.urandom(300_000)})

    async def slow_loris():
        yield body[:100_000]
        await asyncio.sleep(5)
        yield body[100_000:]

    response = await client.post("/builds", data=slow_loris(), headers={"Content-Type": "application/gzip"})
    assert "sent nothing for 0.5 seconds" in await _error(response, 408, "upload_stalled")
    assert list(settings.spool_dir.iterdir()) == []
    assert (await client.post("/builds", json={"image": "builder-busybox:latest"})).status == 202


async def test_two_context_parts_are_refused(client: TestClient, settings: Settings) -> None:
    form = aiohttp.FormData()
    for _ in range(2):
        form.add_field("context", make_context({"Dockerfile": dockerfile()}), filename="c.tgz")
    assert "more than one context" in await _error(await client.post("/builds", data=form), 400, "bad_request")
    assert list(settings.spool_dir.iterdir()) == []


async def test_symlink_out_of_the_context_never_reaches_the_host(client: TestClient) -> None:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = dockerfile("COPY link /copied", "RUN cat /copied").encode()
        info = _info("Dockerfile", len(data))
        tar.addfile(info, io.BytesIO(data))
        link = _info("link", 0)
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    response = await client.post(
        "/builds", data=buffer.getvalue(), headers={"Content-Type": "application/gzip"}, params={"no_cache": "true"}
    )
    build_id = (await response.json())["build_id"]
    status = await wait_for(client, build_id, {"succeeded", "failed"})
    # "COPY failed: ... /etc/passwd" (legacy), '"/etc/passwd" not found' (BuildKit): never the host's file.
    assert status["status"] == "failed" and "/etc/passwd" in status["error"], status["error"]
    assert not [line for line in log_lines(await read_log(client, build_id)) if line.startswith("root:")]


async def test_truncated_gzip_and_huge_field_are_400_and_a_good_build_follows(
    client: TestClient, settings: Settings
) -> None:
    good = make_context({"Dockerfile": dockerfile("RUN true")})
    truncated = await client.post("/builds", data=good[: len(good) // 2], headers={"Content-Type": "application/gzip"})
    await _error(truncated, 400, "invalid_context")
    form = aiohttp.FormData()
    form.add_field("context", good, filename="c.tgz")
    form.add_field("image_name", "a" * (10 << 20))
    assert "longer than" in await _error(await client.post("/builds", data=form), 400, "invalid_field")
    assert list(settings.spool_dir.iterdir()) == []
    accepted = await client.post("/builds", data=good, headers={"Content-Type": "application/gzip"})
    assert (await wait_for(client, (await accepted.json())["build_id"], {"succeeded", "failed"}))[
        "status"
    ] == "succeeded"


async def test_huge_header_and_huge_query_are_json_errors(daemon: tuple[str, Any]) -> None:
    # The real `builder serve`: its HTTP parser settings are part of what is tested.
    url, _ = daemon
    async with aiohttp.ClientSession() as session:
        await wait_healthy(session, url)
        async with session.get(f"{url}/builds", headers={"X-Huge": "h" * (200 << 10)}) as response:
            assert "headers may be" in await _error(response, 431, "request_header_fields_too_large")
        async with session.post(
            f"{url}/builds",
            params={"image_name": "a" * (100 << 10)},
            data=b"",
            headers={"Content-Type": "application/gzip"},
        ) as response:
            await _error(response, 414, "uri_too_long")
        async with session.get(f"{url}/healthz") as response:
            assert response.status == 200
