"""The resolver and the real engine agree on which image a tricky Dockerfile reaches, on both builders.

A unique local "marker" image stands in for the image the resolver names: nothing can be pulled
here, so a build that succeeds and inherits the marker's label used exactly that image; one
that reaches for anything else fails with a pull error (whose text names, on BuildKit, the
reference it tried).
"""

from __future__ import annotations

import io
import json
import secrets
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiodocker
import pytest

from builder.server.dockerfile_refs import image_references, onbuild_references
from builder.server.errors import UnresolvableImageReference
from tests.conftest import BASE_IMAGE

BUILDERS = [pytest.param(False, id="legacy"), pytest.param(True, id="buildkit")]


@dataclass
class Built:
    image_id: str | None
    error: str | None


@dataclass
class Marker:
    tag: str  # dfrefs-test/marker-<hex>:latest
    token: str  # in its label dfrefs.marker and in its file /marker


async def build(docker: aiodocker.Docker, dockerfile: str, *, buildkit: bool, **build_args: str) -> Built:
    """Build on the engine (BuildKit through /build?version=2); untagged results are removed."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = dockerfile.encode("utf-8", "surrogateescape")
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    params = {"rm": "1", "forcerm": "1", "buildargs": json.dumps(build_args)} | ({"version": "2"} if buildkit else {})
    image_id = error = None
    try:
        async with docker._query(
            "build", "POST", params=params, headers={"Content-Type": "application/x-tar"}, data=buffer.getvalue()
        ) as response:
            async for raw in response.content:
                if raw.strip():
                    message = json.loads(raw)
                    if isinstance(aux := message.get("aux"), dict):  # BuildKit's trace is a string
                        image_id = aux.get("ID", image_id)
                    error = message.get("error", error)
    except aiodocker.DockerError as exc:
        error = str(exc.message)
    if image_id is not None and error is None:
        return Built(image_id, None)
    return Built(None, error or "no image")


async def label_then_remove(docker: aiodocker.Docker, image_id: str) -> str | None:
    config = (await docker.images.inspect(image_id))["Config"]
    await remove_untagged(docker, image_id)
    return (config.get("Labels") or {}).get("dfrefs.marker")


async def remove_untagged(docker: aiodocker.Docker, image_id: str) -> None:
    """Remove a build's result unless it is tagged (a FROM-only build *is* its base image)."""
    try:
        if not (await docker.images.inspect(image_id)).get("RepoTags"):
            await docker.images.delete(image_id)
    except aiodocker.DockerError as exc:
        if exc.status != 404:  # already pruned with its child
            raise


@pytest.fixture
async def marker(docker: aiodocker.Docker) -> AsyncIterator[Marker]:
    token = secrets.token_hex(8)
    tag = f"dfrefs-test/marker-{token}:latest"
    made = await build(
        docker, f"FROM {BASE_IMAGE}\nRUN echo {token} > /marker\nLABEL dfrefs.marker={token}\n", buildkit=False
    )
    assert made.image_id is not None, made.error
    await docker.images.tag(made.image_id, repo=tag.split(":")[0], tag="latest")
    yield Marker(tag, token)
    await docker.images.delete(tag, force=True)


@pytest.mark.parametrize("buildkit", BUILDERS)
async def test_escape_directive_continuation_and_args_resolve_as_the_engine_does(
    docker: aiodocker.Docker, marker: Marker, buildkit: bool
) -> None:
    repository, _, token = marker.tag.removesuffix(":latest").rpartition("-")
    dockerfile = (
        "# escape=`\n"
        "\n"
        f"ARG REPO={repository[:8]}`\n"
        "\n"
        "  # a comment inside the continuation `\n"
        f"{repository[8:]}\n"
        "ARG TOKEN=wrong TAG\n"
        f'FROM "$REPO"-${{TOKEN}}:${{TAG:-latest}} AS `\n'
        "    base\n"
        "LABEL seen=yes\n"
    )
    args = {"TOKEN": token, "UNDECLARED": "tenant-b/x"}
    assert [ref.reference for ref in image_references(dockerfile, args)] == [marker.tag]
    built = await build(docker, dockerfile, buildkit=buildkit, **args)
    assert built.image_id is not None, built.error
    assert await label_then_remove(docker, built.image_id) == marker.token


async def test_a_0x85_byte_before_a_mount_flag_is_a_blank_to_buildkit_and_the_resolver(
    docker: aiodocker.Docker, marker: Marker
) -> None:
    # BuildKit reads flags byte by byte: 0x85 is whitespace there, so this RUN mounts the marker.
    dockerfile = (
        (f'FROM {BASE_IMAGE}\nRUN \x85--mount=from={marker.tag},target=/m test "$(cat /m/marker)" = {marker.token}\n')
        .encode()
        .replace(b"\xc2\x85", b"\x85")
        .decode("utf-8", "surrogateescape")
    )
    assert [ref.reference for ref in image_references(dockerfile, {})] == [BASE_IMAGE, marker.tag]
    built = await build(docker, dockerfile, buildkit=True)
    assert built.image_id is not None, built.error
    await remove_untagged(docker, built.image_id)


async def test_a_base_images_onbuild_trigger_reaches_an_image_on_the_legacy_builder(
    docker: aiodocker.Docker, marker: Marker
) -> None:
    parent = f"FROM {BASE_IMAGE}\nONBUILD COPY --from={marker.tag} /marker /marker\n"
    assert [(ref.reference, ref.origin) for ref in image_references(parent, {})] == [
        (BASE_IMAGE, "FROM"),
        (marker.tag, "ONBUILD COPY --from"),
    ]
    made = await build(docker, parent, buildkit=False)
    assert made.image_id is not None, made.error
    try:
        triggers = (await docker.images.inspect(made.image_id))["Config"]["OnBuild"]
        assert [ref.reference for ref in onbuild_references(triggers)] == [marker.tag]
        child_dockerfile = f'FROM {made.image_id}\nRUN test "$(cat /marker)" = {marker.token}\n'
        child = await build(docker, child_dockerfile, buildkit=False)
        assert child.image_id is not None, child.error
        await remove_untagged(docker, child.image_id)
    finally:
        await remove_untagged(docker, made.image_id)


@pytest.mark.parametrize("buildkit", BUILDERS)
async def test_an_image_id_prefix_is_refused_because_the_legacy_builder_resolves_it(
    docker: aiodocker.Docker, marker: Marker, buildkit: bool
) -> None:
    prefix = (await docker.images.inspect(marker.tag))["Id"].removeprefix("sha256:")[:10]
    dockerfile = f"FROM {prefix}\n"
    with pytest.raises(UnresolvableImageReference, match="image ID"):
        image_references(dockerfile, {})
    built = await build(docker, dockerfile + "LABEL x=y\n", buildkit=buildkit)
    if buildkit:  # BuildKit takes it for a Docker Hub name and tries to pull it
        assert built.error is not None and f"library/{prefix}/manifests/latest" in built.error
    else:
        assert built.image_id is not None, built.error
        assert await label_then_remove(docker, built.image_id) == marker.token


async def test_buildkit_pulls_the_syntax_directives_frontend(docker: aiodocker.Docker) -> None:
    dockerfile = "# syntax=dfrefs-test/no-such-frontend\nFROM scratch\n"
    with pytest.raises(UnresolvableImageReference, match="dfrefs-test/no-such-frontend"):
        image_references(dockerfile, {})
    built = await build(docker, dockerfile, buildkit=True)
    assert built.error is not None and "dfrefs-test/no-such-frontend/manifests/latest" in built.error


@pytest.mark.parametrize("buildkit", BUILDERS)
async def test_heredoc_lines_are_instructions_to_the_engine(docker: aiodocker.Docker, buildkit: bool) -> None:
    dockerfile = f"FROM {BASE_IMAGE}\nRUN <<EOF\necho hi\nEOF\n"
    with pytest.raises(UnresolvableImageReference) as refused:
        image_references(dockerfile, {})
    assert refused.value.message.startswith("line 3: unknown instruction 'echo'")
    built = await build(docker, dockerfile, buildkit=buildkit)
    assert built.error is not None and "line 3: unknown instruction: ECHO" in built.error


@pytest.mark.parametrize("buildkit", BUILDERS)
async def test_copy_from_an_image_is_pulled_by_the_name_the_resolver_gives(
    docker: aiodocker.Docker, buildkit: bool
) -> None:
    dockerfile = f"FROM {BASE_IMAGE}\nCOPY --from=dfrefs-test/absent-{secrets.token_hex(4)} /a /a\n"
    (_, ref) = image_references(dockerfile, {})
    built = await build(docker, dockerfile, buildkit=buildkit)
    assert built.error is not None
    if buildkit:
        assert f"{ref.normalised.path}/manifests/{ref.normalised.tag}" in built.error
    else:  # the legacy builder's pull error does not name the image, its step error does
        assert f"invalid from flag value {ref.reference}" in built.error
