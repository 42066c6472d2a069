"""Build secrets and registry logins on the real engine, through the daemon's HTTP API, the SDK and
the CLI: the secret reaches its step and nothing else; registry logins come from config.json files."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from builder.client import BuilderClient, BuildFailed
from builder.server.app import create_app
from builder.server.build_secrets import (
    MAX_SECRET_BYTES,
    MAX_SECRETS,
    MAX_SECRETS_BYTES,
    add_secret,
    secrets_digest,
    secrets_from_json,
)
from builder.server.config import Settings
from builder.server.engines.buildkit import _session_needs
from builder.server.errors import InvalidSecret
from builder.terminal import _secrets as cli_secrets
from tests.conftest import BASE_IMAGE, dockerfile, log_lines, make_context, read_log
from tests.processes import PASSWORD, USER, StartDaemon
from tests.steps import processes_running, unique_sleep, wait_for_process

CLI = [sys.executable, "-m", "builder"]
MOUNT = "RUN --mount=type=secret,id=tok sh -c 'sha256sum /run/secrets/tok'"

Client = TestClient | aiohttp.ClientSession


def new_secret() -> bytes:
    """A distinctive random value: found anywhere, it can only have come from the test."""
    return f"s3cret-{secrets.token_hex(16)}".encode()


def digest_line(value: bytes, secret_id: str = "tok") -> str:
    """What `sha256sum /run/secrets/<id>` prints for `value`."""
    return f"{hashlib.sha256(value).hexdigest()}  /run/secrets/{secret_id}"


async def post_multipart(
    client: Client,
    files: Mapping[str, str],
    secret_parts: Mapping[str, bytes],
    headers: Mapping[str, str] | None = None,
    **fields: str,
) -> aiohttp.ClientResponse:
    """POST /builds as multipart: fields, a `secret.<id>` part per secret, then the context."""
    fields.setdefault("no_cache", "true")
    form = aiohttp.FormData()
    for name, text in fields.items():
        form.add_field(name, text)
    for secret_id, value in secret_parts.items():
        form.add_field(f"secret.{secret_id}", value, filename=secret_id, content_type="application/octet-stream")
    form.add_field("context", make_context(files), filename="context.tar.gz", content_type="application/gzip")
    return await client.post("/builds", data=form, headers=headers)


async def post_json(
    client: Client,
    image: str,
    secret_values: Mapping[str, bytes],
    headers: Mapping[str, str] | None = None,
    **fields: Any,
) -> aiohttp.ClientResponse:
    body = {
        "image": image,
        "no_cache": True,
        **fields,
        "secrets": {i: base64.b64encode(v).decode() for i, v in secret_values.items()},
    }
    return await client.post("/builds", json=body, headers=headers)


async def accepted(response: aiohttp.ClientResponse) -> str:
    body = await response.json()
    assert response.status == 202, body
    return str(body["build_id"])


async def finished(client: Client, build_id: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The build's status once it has ended."""
    async with asyncio.timeout(60):
        while True:
            status: dict[str, Any] = await (await client.get(f"/builds/{build_id}", headers=headers)).json()
            if status["status"] in {"succeeded", "failed", "cancelled"}:
                return status
            await asyncio.sleep(0.05)


@pytest.fixture
async def images(docker: aiodocker.Docker) -> AsyncIterator[list[str]]:
    """Image names a test made; removed afterwards."""
    made: list[str] = []
    yield made
    for image in made:
        with contextlib.suppress(aiodocker.DockerError):
            await docker.images.delete(image, force=True)


@pytest.fixture
async def onbuild_image(client: TestClient, images: list[str]) -> str:
    """An image whose ONBUILD step reads secret `tok`: what the JSON shape (`FROM <image>`) runs."""
    name = f"secrets-test/onbuild:{uuid.uuid4().hex[:12]}"
    build_id = await accepted(
        await post_multipart(client, {"Dockerfile": dockerfile(f"ONBUILD {MOUNT}")}, {}, image_name=name)
    )
    assert (await finished(client, build_id))["status"] == "succeeded"
    images.append(name)
    return name


# The secret reaches its step, in every request shape that carries one ------------------------------


async def test_a_multipart_secret_reaches_the_step(client: TestClient) -> None:
    value = new_secret()
    build_id = await accepted(await post_multipart(client, {"Dockerfile": dockerfile(MOUNT)}, {"tok": value}))
    assert (await finished(client, build_id))["status"] == "succeeded"
    assert digest_line(value) in log_lines(await read_log(client, build_id))


async def test_a_json_secret_reaches_the_onbuild_step_of_the_image(client: TestClient, onbuild_image: str) -> None:
    value = new_secret()
    build_id = await accepted(await post_json(client, onbuild_image, {"tok": value}))
    assert (await finished(client, build_id))["status"] == "succeeded"
    assert digest_line(value) in log_lines(await read_log(client, build_id))


async def test_the_sdk_sends_secrets_with_a_context_and_with_an_image(
    client: TestClient, tmp_path: Path, onbuild_image: str
) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile(MOUNT))
    value, text = new_secret(), new_secret().decode()
    async with BuilderClient(str(client.make_url("/"))) as sdk:
        lines: list[str] = []
        await sdk.build(
            context, image_name="secrets-test/sdk", no_cache=True, secrets={"tok": value}, on_log=lines.append
        )
        assert digest_line(value) in lines
        lines.clear()
        await sdk.build_image(
            onbuild_image,
            image_name="secrets-test/sdk-image",
            no_cache=True,
            secrets={"tok": text},
            on_log=lines.append,
        )
        assert digest_line(text.encode()) in lines


async def test_the_cli_reads_secrets_from_a_file_and_from_the_environment(client: TestClient, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(
        dockerfile(
            "RUN --mount=type=secret,id=npmrc --mount=type=secret,id=TOKEN"
            " sha256sum /run/secrets/npmrc /run/secrets/TOKEN"
        )
    )
    from_file, from_env = new_secret(), new_secret()
    (tmp_path / "npmrc").write_bytes(from_file)
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "--url",
        str(client.make_url("/")),
        "build",
        "--no-cache",
        "--secret",
        f"id=npmrc,src={tmp_path / 'npmrc'}",
        "--secret",
        "id=TOKEN,env=BUILD_TOKEN",
        str(context),
        env={**os.environ, "BUILD_TOKEN": from_env.decode()},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert f" {digest_line(from_file, 'npmrc')}\n" in out.decode()
    assert f" {digest_line(from_env, 'TOKEN')}\n" in out.decode()


async def test_the_cli_refuses_a_secret_it_cannot_read(client: TestClient, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "--url",
        str(client.make_url("/")),
        "build",
        "--secret",
        "id=tok,env=NOT_SET_ANYWHERE",
        str(tmp_path),
        env={k: v for k, v in os.environ.items() if k != "NOT_SET_ANYWHERE"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert "NOT_SET_ANYWHERE is not set" in err.decode()
    assert (await (await client.get("/builds")).json())["builds"] == []


# Missing secrets, SSH, and requests refused -------------------------------------------------------


async def test_a_secret_the_build_was_not_given_fails_it_naming_the_id(client: TestClient) -> None:
    # With a session (it has another secret): the engine asks for `tok` and gets NOT_FOUND.
    build_id = await accepted(await post_multipart(client, {"Dockerfile": dockerfile(MOUNT)}, {"other": new_secret()}))
    status = await finished(client, build_id)
    assert status["status"] == "failed"
    assert "secrets not provided: tok" in status["error"], status["error"]


async def test_a_build_given_no_secrets_fails_naming_the_one_it_needs(client: TestClient) -> None:
    # Without a session: the engine refuses the mount, and the daemon names the secret from the step.
    build_id = await accepted(await post_multipart(client, {"Dockerfile": dockerfile(MOUNT)}, {}))
    status = await finished(client, build_id)
    assert status["status"] == "failed"
    assert "secrets this build was not given: tok" in status["error"], status["error"]


async def test_an_ssh_mount_fails_naming_ssh_with_a_session_open(client: TestClient) -> None:
    build_id = await accepted(
        await post_multipart(
            client, {"Dockerfile": dockerfile("RUN --mount=type=ssh,required=true true")}, {"tok": new_secret()}
        )
    )
    status = await finished(client, build_id)
    assert status["status"] == "failed"
    assert "RUN --mount=type=ssh needs SSH agent forwarding" in status["error"], status["error"]


@pytest.mark.parametrize("shape", ["multipart", "json"])
@pytest.mark.parametrize(
    ("secret_id", "value", "message"),
    [
        ("bad/id", b"x", "must be 1 to 64 of"),
        ("x" * 65, b"x", "must be 1 to 64 of"),
        ("big", b"x" * (MAX_SECRET_BYTES + 1), f"larger than {MAX_SECRET_BYTES} bytes"),
    ],
)
async def test_a_bad_secret_id_or_an_oversize_value_is_a_400(
    client: TestClient, shape: str, secret_id: str, value: bytes, message: str
) -> None:
    if shape == "multipart":
        response = await post_multipart(client, {"Dockerfile": dockerfile(MOUNT)}, {secret_id: value})
    else:
        response = await post_json(client, BASE_IMAGE, {secret_id: value})
    body = await response.json()
    assert response.status == 400 and body["code"] == "invalid_secret", body
    assert message in body["error"]
    assert (await (await client.get("/builds")).json())["builds"] == []


async def test_secrets_in_the_query_of_a_raw_body_are_a_400(client: TestClient) -> None:
    response = await client.post(
        "/builds",
        data=make_context({"Dockerfile": dockerfile(MOUNT)}),
        params={"secret.tok": "value"},
        headers={"Content-Type": "application/gzip"},
    )
    body = await response.json()
    assert response.status == 400 and body["code"] == "invalid_secret"
    assert "multipart" in body["error"] and "value" not in body["error"]


async def test_the_legacy_builder_with_secrets_is_a_400(client: TestClient) -> None:
    response = await post_multipart(client, {"Dockerfile": dockerfile(MOUNT)}, {"tok": new_secret()}, builder="legacy")
    body = await response.json()
    assert response.status == 400 and body["code"] == "secrets_not_supported", body
    assert "legacy" in body["error"]


async def test_an_idempotent_repeat_compares_secrets_by_value(client: TestClient) -> None:
    value = new_secret()
    files = {"Dockerfile": dockerfile(MOUNT)}
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = await post_multipart(client, files, {"tok": value}, headers=key)
    build_id = await accepted(first)
    repeat = await post_multipart(client, files, {"tok": value}, headers=key)
    assert repeat.status == 200 and (await repeat.json())["build_id"] == build_id
    other = await post_multipart(client, files, {"tok": new_secret()}, headers=key)
    assert other.status == 422 and (await other.json())["code"] == "idempotency_key_reused"
    assert [b["build_id"] for b in (await (await client.get("/builds")).json())["builds"]] == [build_id]


# Nothing keeps a secret: the image, the data dir, the daemon's logs, the build log, /metrics -------


async def test_a_secret_is_nowhere_but_in_its_step(
    daemon_process: StartDaemon, docker: aiodocker.Docker, images: list[str], tmp_path: Path
) -> None:
    # Debug logging: the most the daemon ever says.
    daemon = await daemon_process("--log-level", "debug").ready()
    value = new_secret()
    encoded = base64.b64encode(value)
    name = f"secrets-test/leak:{uuid.uuid4().hex[:12]}"
    images.append(name)
    async with aiohttp.ClientSession(base_url=daemon.url) as client:
        # A multipart build whose image keeps the secret's digest (so the image is searched for real),
        # under an Idempotency-Key (so that record exists too), then a JSON build of that image.
        build_id = await accepted(
            await post_multipart(
                client,
                {"Dockerfile": dockerfile("RUN --mount=type=secret,id=tok sha256sum /run/secrets/tok > /digest")},
                {"tok": value},
                headers={"Idempotency-Key": "leak-test"},
                image_name=name,
            )
        )
        assert (await finished(client, build_id))["status"] == "succeeded"
        json_build = await accepted(await post_json(client, name, {"tok": value}, image_name=f"{name}-json"))
        images.append(f"{name}-json")
        assert (await finished(client, json_build))["status"] == "succeeded"
        build_logs = [
            await (await client.get(f"/builds/{b}/logs", params=p)).read()
            for b in (build_id, json_build)
            for p in ({"format": "text"}, {"format": "sse"})
        ]
        metrics = await (await client.get("/metrics")).read()
        # Every file, while the daemon runs (its SQLite WAL is there now) and after it has stopped.
        data_files = _files(daemon.data_dir)
        daemon.terminate()
        data_files |= {f"{path} (stopped)": data for path, data in _files(daemon.data_dir).items()}
    saved = bytearray()
    async with docker._query(f"images/{name}/get") as response:
        async for chunk in response.content.iter_any():
            saved += chunk
    daemon_log = daemon.log_path.read_bytes()
    # Each place is searched for real: it holds what this test made.
    assert hashlib.sha256(value).hexdigest().encode() in saved
    assert any(build_id.encode() in data for data in data_files.values())
    assert any(path.endswith("-wal") for path in data_files), sorted(data_files)
    assert b"build session opened" in daemon_log and build_id.encode() in daemon_log
    assert all(b"/run/secrets/tok" in log for log in build_logs[:2])
    assert all(name.encode() in log for log in build_logs[2:])
    assert b"builder_builds_total" in metrics
    for form in (value, encoded):
        assert form not in saved
        assert [path for path, data in data_files.items() if form in data] == []
        assert form not in daemon_log
        assert all(form not in log for log in build_logs)
        assert form not in metrics


def _files(root: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in root.rglob("*") if path.is_file()}


async def test_cancel_mid_step_with_a_session_open_stops_the_step_and_closes_the_session(
    daemon_process: StartDaemon,
) -> None:
    daemon = await daemon_process("--log-level", "debug").ready()
    sleep = unique_sleep()
    async with aiohttp.ClientSession(base_url=daemon.url) as client:
        build_id = await accepted(
            await post_multipart(
                client,
                {
                    "Dockerfile": dockerfile(
                        f"RUN --mount=type=secret,id=tok sh -c 'test -s /run/secrets/tok && {sleep}'"
                    )
                },
                {"tok": new_secret()},
            )
        )
        await wait_for_process(sleep)
        response = await client.delete(f"/builds/{build_id}")
        assert response.status == 200 and (await response.json())["status"] == "cancelled"
    assert processes_running(sleep) == []
    lines = [json.loads(line) for line in daemon.log_path.read_text().splitlines() if line.startswith("{")]
    session = [line["event"] for line in lines if line.get("build_id") == build_id and "session_id" in line]
    assert session[0] == "build session opened" and session[-1] == "build session closed", session


# Registry logins for FROM -------------------------------------------------------------------------


def docker_config(path: Path, registry: str, password: str, *, plain: bool = False) -> Path:
    """A Docker config.json with one login, as `docker login` writes it (`auth`), or spelled out."""
    entry = (
        {"username": USER, "password": password}
        if plain
        else {"auth": base64.b64encode(f"{USER}:{password}".encode()).decode()}
    )
    path.write_text(json.dumps({"auths": {f"http://{registry}/v2/" if plain else registry: entry}}))
    return path


async def _app(aiohttp_client: Any, settings: Settings, **changes: Any) -> TestClient:
    client: TestClient = await aiohttp_client(create_app(dataclasses.replace(settings, **changes)))
    return client


@pytest.mark.parametrize("plain", [False, True], ids=["auth", "username-password"])
async def test_from_a_private_registry_pulls_with_the_daemons_registry_config(
    aiohttp_client: Any,
    settings: Settings,
    tmp_path: Path,
    login_registry: str,
    private_image: str,
    plain: bool,
) -> None:
    config = docker_config(tmp_path / "config.json", login_registry, PASSWORD, plain=plain)
    client = await _app(aiohttp_client, settings, registry_config=config)
    files = {"Dockerfile": f"FROM {private_image}\nRUN echo pulled\n"}
    build_id = await accepted(await post_multipart(client, files, {}))
    assert (await finished(client, build_id))["status"] == "succeeded"
    assert "pulled" in log_lines(await read_log(client, build_id))


async def test_from_a_private_registry_with_a_wrong_login_fails_naming_the_registry(
    aiohttp_client: Any,
    settings: Settings,
    tmp_path: Path,
    login_registry: str,
    private_image: str,
) -> None:
    config = docker_config(tmp_path / "config.json", login_registry, "wrong")
    client = await _app(aiohttp_client, settings, registry_config=config)
    build_id = await accepted(await post_json(client, private_image, {}))
    status = await finished(client, build_id)
    assert status["status"] == "failed"
    assert login_registry in status["error"] and "401 Unauthorized" in status["error"], status["error"]


async def test_a_tenants_registry_config_wins_over_the_daemons(
    aiohttp_client: Any,
    settings: Settings,
    tmp_path: Path,
    login_registry: str,
    private_image: str,
) -> None:
    client = await _app(
        aiohttp_client,
        settings,
        auth_tokens="token-a=tenant-a,token-b=tenant-b",
        registry_config=docker_config(tmp_path / "daemon.json", login_registry, "wrong"),
        tenant_registry_configs=(("tenant-a", docker_config(tmp_path / "a.json", login_registry, PASSWORD)),),
    )
    outcomes = {}
    for tenant in ("a", "b"):
        headers = {"Authorization": f"Bearer token-{tenant}"}
        build_id = await accepted(await post_json(client, private_image, {}, headers=headers))
        outcomes[tenant] = (await finished(client, build_id, headers))["status"]
    assert outcomes == {"a": "succeeded", "b": "failed"}


async def test_sdk_build_failure_names_the_missing_secret(client: TestClient, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile(MOUNT))
    async with BuilderClient(str(client.make_url("/"))) as sdk:
        with pytest.raises(BuildFailed, match="secrets not provided: tok"):
            await sdk.build(context, image_name="secrets-test/missing", no_cache=True, secrets={"other": b"x"})


# Pure parts -----------------------------------------------------------------------------------


def test_add_secret_takes_valid_ids_within_the_limits() -> None:
    taken: dict[str, bytes] = {}
    for secret_id in ("npmrc", "A.b_c-9", "x" * 64):
        add_secret(taken, secret_id, b"v")
    assert taken == {"npmrc": b"v", "A.b_c-9": b"v", "x" * 64: b"v"}


@pytest.mark.parametrize(
    ("given", "secret_id", "value", "message"),
    [
        ({}, "", b"v", "must be 1 to 64"),
        ({}, "a b", b"v", "must be 1 to 64"),
        ({}, "é", b"v", "must be 1 to 64"),
        ({"tok": b"v"}, "tok", b"v", "given twice"),
        ({f"s{i}": b"" for i in range(MAX_SECRETS)}, "one-more", b"v", f"at most {MAX_SECRETS} secrets"),
        ({}, "big", b"x" * (MAX_SECRET_BYTES + 1), f"larger than {MAX_SECRET_BYTES} bytes"),
        (
            {"a": b"x" * MAX_SECRET_BYTES, "b": b"x" * MAX_SECRET_BYTES},
            "c",
            b"x" * (MAX_SECRETS_BYTES - 2 * MAX_SECRET_BYTES + 1),
            f"at most {MAX_SECRETS_BYTES} bytes in all",
        ),
    ],
)
def test_add_secret_refuses_what_does_not_fit(
    given: dict[str, bytes], secret_id: str, value: bytes, message: str
) -> None:
    with pytest.raises(InvalidSecret, match=message):
        add_secret(dict(given), secret_id, value)


def test_json_secrets_are_base64_line_breaks_allowed() -> None:
    wrapped = base64.encodebytes(b"y" * 100).decode()  # wrapped at 76 columns, as `base64` prints it
    assert secrets_from_json({"a": base64.b64encode(b"\x00\xff").decode(), "b": wrapped}) == {
        "a": b"\x00\xff",
        "b": b"y" * 100,
    }
    assert secrets_from_json(None) == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["a"], "must be a JSON object"),
        ({"a": 1}, "must be a base64 string"),
        ({"a": "not base64!"}, "not valid base64"),
        ({"a": "A" * (4 * (MAX_SECRET_BYTES // 3 + 2))}, "larger than"),
    ],
)
def test_json_secrets_that_are_not_base64_strings_are_refused(value: Any, message: str) -> None:
    with pytest.raises(InvalidSecret, match=message) as refused:
        secrets_from_json(value)
    assert "not base64!" not in str(refused.value)


def test_the_secrets_digest_stands_for_ids_and_values_without_holding_either_value() -> None:
    one = secrets_digest({"a": b"first", "b": b"second"})
    assert one == secrets_digest({"b": b"second", "a": b"first"})
    assert one not in (secrets_digest({"a": b"first", "b": b"other"}), secrets_digest({"a": b"first", "c": b"second"}))
    assert secrets_digest({}) == ""
    assert len(one) == 64 and b"first" not in one.encode()


@pytest.mark.parametrize(
    ("step", "needs"),
    [
        (
            "[2/2] RUN --mount=type=secret,id=tok cat /run/secrets/tok",
            "RUN --mount=type=secret needs secrets this build was not given: tok",
        ),
        (
            "[2/2] RUN --mount=id=a,type=secret --mount=type=secret,target=/etc/npmrc true",
            "RUN --mount=type=secret needs secrets this build was not given: a, npmrc",
        ),
        (
            "[2/2] RUN --mount=type=ssh --mount=type=secret,id=t true",
            (
                "RUN --mount=type=secret needs secrets this build was not given: t; "
                "RUN --mount=type=ssh needs SSH agent forwarding, which this daemon does not offer"
            ),
        ),
        ("[2/2] RUN true", "this build needs a BuildKit session (secrets or SSH forwarding), and had none"),
    ],
)
def test_what_a_step_needed_a_session_for(step: str, needs: str) -> None:
    assert _session_needs(step) == needs


def test_cli_secret_specs_read_as_docker_build_reads_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "npmrc").write_bytes(b"from-file")
    monkeypatch.setenv("TOKEN", "from-env")
    monkeypatch.setenv("OTHER", "from-other")
    assert cli_secrets(
        [
            f"id=npmrc,src={tmp_path / 'npmrc'}",
            f"id=f2,source={tmp_path / 'npmrc'}",
            "id=TOKEN",
            "id=t2,env=OTHER",
            "type=env,id=t3,src=OTHER",
        ]
    ) == {"npmrc": b"from-file", "f2": b"from-file", "TOKEN": b"from-env", "t2": b"from-other", "t3": b"from-other"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("src=/x", "has no id="),
        ("id=a,colour=red", "expected id=ID"),
        ("id=a,type=ssh", "type must be file or env"),
        ("id=NOT_SET_ANYWHERE", "NOT_SET_ANYWHERE is not set"),
    ],
)
def test_cli_secret_specs_that_say_nothing_usable_are_refused(
    spec: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ValueError, match=message):
        cli_secrets([spec])
