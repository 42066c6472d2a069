"""Which images a tenant's build may reach: the attacks, end to end through the resolver and the policy."""

from __future__ import annotations

import pytest

from builder.server.dockerfile_refs import image_references
from builder.server.errors import (
    ImageNotAllowed,
    InvalidImageReference,
    UnresolvableImageReference,
)
from builder.server.imagepolicy import ImagePolicy
from builder.server.imageref import normalise_reference

pytestmark = pytest.mark.unit

TENANTS = ("tenant-a", "tenant-b", "acme.io")
REGISTRY = "127.0.0.1:5000"
DIGEST = "sha256:" + "ab" * 32


def check(dockerfile: str, *, allowed: tuple[str, ...] = (), **build_args: str) -> None:
    """Tenant A builds `dockerfile`."""
    ImagePolicy("tenant-a", TENANTS, allowed, REGISTRY).check(image_references(dockerfile, build_args))


def denied(dockerfile: str, *, allowed: tuple[str, ...] = (), **build_args: str) -> str:
    with pytest.raises(ImageNotAllowed) as info:
        check(dockerfile, allowed=allowed, **build_args)
    assert (info.value.status, info.value.code) == (403, "image_not_allowed")
    return info.value.message


@pytest.mark.parametrize(
    "image",
    [
        "tenant-a/app:v1",
        "docker.io/tenant-a/app",
        "index.docker.io/tenant-a/app",
        f"{REGISTRY}/tenant-a/app:v1",
        f"tenant-a/app@{DIGEST}",
        "builder-busybox:latest",
        "docker.io/library/builder-busybox",
        "other/public:1",
    ],
)
def test_own_and_untenanted_images_are_allowed(image: str) -> None:
    check(f"FROM {image}\n")


@pytest.mark.parametrize(
    "image",
    [
        "tenant-b/secret:v1",
        "docker.io/tenant-b/secret",
        "index.docker.io/tenant-b/secret:v1",
        f"{REGISTRY}/tenant-b/secret:v1",
        "localhost:5000/tenant-b/secret",
        "registry.example:443/tenant-b/secret",
        f"tenant-b/secret@{DIGEST}",
        f"tenant-b/secret:v1@{DIGEST}",
        "tenant-b/deep/path/secret",
        "acme.io/app:v1",
    ],
)
def test_another_tenants_image_is_denied_on_any_registry_host(image: str) -> None:
    assert "another tenant's namespace" in denied(f"FROM {image}\n")


def test_the_message_names_the_line_the_reference_and_the_rule() -> None:
    message = denied("FROM scratch\nCOPY --from=tenant-b/secret:v1 /secret /s\n")
    assert message == (
        "line 2: COPY --from tenant-b/secret:v1 (docker.io/tenant-b/secret:v1) is in another tenant's namespace; "
        "this build may use images under tenant-a/ and images outside every tenant namespace"
    )


def test_the_synthetic_image_request_is_a_from_line() -> None:
    assert "tenant-b/secret:v1" in denied("FROM tenant-b/secret:v1\n")


def test_arg_default_naming_another_tenant() -> None:
    assert "tenant-b/x" in denied("ARG B=tenant-b/x\nFROM $B\n")


def test_build_arg_overriding_a_declared_arg() -> None:
    assert "tenant-b/x" in denied("ARG B=tenant-a/x\nFROM $B\n", B="tenant-b/x")


def test_build_arg_for_an_undeclared_name_changes_nothing() -> None:
    check("ARG B=tenant-a/x\nFROM $B\n", C="tenant-b/x")


def test_run_mount_from_another_tenant() -> None:
    assert "RUN --mount" in denied("FROM scratch\nRUN --mount=type=bind,from=tenant-b/x,target=/m cat /m/s\n")


def test_onbuild_trigger_naming_another_tenant() -> None:
    assert "ONBUILD COPY --from" in denied("FROM scratch\nONBUILD COPY --from=tenant-b/x /s /s\n")


def test_a_continuation_hiding_a_from_from_naive_readers() -> None:
    assert "tenant-b/x" in denied("FROM scratch\nRUN echo \\\\\nFROM tenant-b/x\n")


def test_a_heredoc_body_smuggling_a_from() -> None:
    assert "tenant-b/x" in denied("FROM scratch\nRUN cat <<LABEL\nfrom tenant-b/x\nLABEL a=b\n")


def test_a_syntax_frontend_is_refused_before_any_policy() -> None:
    with pytest.raises(UnresolvableImageReference):
        check("# syntax=tenant-b/frontend\nFROM scratch\n")


def test_own_namespace_prefix_is_not_fooled_by_a_longer_name() -> None:
    assert "tenant-b" in denied("FROM tenant-b/tenant-a/x\n")
    check("FROM tenant-ab/x\n")


def test_a_registry_host_is_compared_without_case() -> None:
    assert "another tenant" in denied("FROM 127.0.0.1:5000/tenant-b/x\n")
    ImagePolicy("tenant-a", TENANTS, registry="REGISTRY.example:5000").check(
        image_references("FROM registry.EXAMPLE:5000/tenant-a/x\n", {})
    )


# --- --allow-base-image patterns ---


def test_with_patterns_only_own_and_matching_images_are_allowed() -> None:
    allowed = ("builder-busybox:*",)
    check("FROM builder-busybox:latest\nFROM tenant-a/x\n", allowed=allowed)
    assert "matches no --allow-base-image pattern" in denied("FROM other/public\n", allowed=allowed)


def test_patterns_match_the_full_normalised_form_too() -> None:
    check("FROM busybox\n", allowed=("docker.io/library/*",))
    assert "no --allow-base-image" in denied("FROM ghcr.io/x/busybox\n", allowed=("docker.io/library/*",))


def test_patterns_see_registry_images_without_the_registry_prefix() -> None:
    check(f"FROM {REGISTRY}/shared/base:1\n", allowed=("shared/base:*",))


def test_a_pattern_can_open_another_tenants_images_explicitly() -> None:
    check("FROM tenant-b/public:1\n", allowed=("tenant-b/public:*",))


def test_patterns_are_case_sensitive_globs() -> None:
    assert "no --allow-base-image" in denied("FROM busybox\n", allowed=("BUSYBOX:*",))


# --- Namespaces and open mode ---


def test_a_tenant_named_library_owns_the_official_images() -> None:
    # Its tags `library/x` are what `FROM x` means to the engine: they cannot be told apart.
    policy = ImagePolicy("tenant-a", ["library"])
    with pytest.raises(ImageNotAllowed):
        policy.check(image_references("FROM busybox\n", {}))


def test_the_callers_namespace_counts_even_if_not_listed() -> None:
    ImagePolicy("solo", []).check(image_references("FROM solo/x\n", {}))


def test_open_mode_has_no_policy() -> None:
    with pytest.raises(ValueError, match="open mode"):
        ImagePolicy("", TENANTS)


# --- Normalisation (distribution v2.8's ParseNormalizedNamed + TagNameOnly) ---


@pytest.mark.parametrize(
    ("ref", "normalised", "familiar"),
    [
        ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1", "busybox:1"),
        ("docker.io/tenant/app", "docker.io/tenant/app:latest", "tenant/app:latest"),
        ("library/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("localhost/app", "localhost/app:latest", "localhost/app:latest"),
        (f"127.0.0.1:5000/t/app@{DIGEST}", f"127.0.0.1:5000/t/app@{DIGEST}", f"127.0.0.1:5000/t/app@{DIGEST}"),
        (f"app:1@{DIGEST}", f"docker.io/library/app:1@{DIGEST}", f"app:1@{DIGEST}"),
    ],
)
def test_normalisation(ref: str, normalised: str, familiar: str) -> None:
    assert (str(normalise_reference(ref)), normalise_reference(ref).familiar) == (normalised, familiar)


@pytest.mark.parametrize("ref", ["Tenant/app", "a" * 64, "app:", "-app", "a/../b", "x" * 2000])
def test_what_the_engine_cannot_parse_is_invalid(ref: str) -> None:
    with pytest.raises(InvalidImageReference):
        normalise_reference(ref)
