"""Docker image reference grammar (github.com/distribution/reference), as pure functions."""

from __future__ import annotations

import re
from dataclasses import dataclass

from builder.server.errors import InvalidField, InvalidImageReference

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[_.]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
# The grammar as patterns both Python and ECMA-262 read alike (the OpenAPI document carries them).
REFERENCE_PATTERN = rf"{_NAME}(?::{_TAG})?(?:@{_DIGEST})?"
IMAGE_NAME_PATTERN = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*(?::{_TAG})?"  # a repository path: no host

# fullmatch: no trailing newline slips past `$`.
_REFERENCE_RE = re.compile(rf"(?P<name>{_NAME})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?", re.ASCII)
_IMAGE_NAME_RE = re.compile(rf"(?P<name>{_NAME})(?::(?P<tag>{_TAG}))?", re.ASCII)

_MAX_NAME_LENGTH = 255
# Longer than any reference the grammar admits (name, tag, sha512 digest): refused before the regex.
_MAX_REFERENCE_LENGTH = 1024
# What the legacy builder resolves as a local image ID or ID prefix (`docker build` FROM/COPY --from).
_IMAGE_ID_RE = re.compile(r"(?:sha256:)?[0-9a-f]+", re.ASCII)
_FULL_IMAGE_ID_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_DOCKER_HUB = "docker.io"


def validate_reference(ref: str) -> str:
    """Return `ref` if it is a valid image reference to put after `FROM`, else raise."""
    if not ref:
        raise InvalidImageReference("image reference is empty")
    if ref.startswith("-"):
        raise InvalidImageReference("image reference must not start with '-'")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in ref):
        raise InvalidImageReference("image reference must not contain whitespace or control characters")
    match = _REFERENCE_RE.fullmatch(ref)
    if match is None or len(match["name"]) > _MAX_NAME_LENGTH:
        raise InvalidImageReference(f"{ref!r} is not a valid image reference")
    return ref


def parse_image_name(value: str) -> tuple[str, str]:
    """Split `name[:tag]` into (name, tag), the tag defaulting to `latest`.

    The name is a repository path only: where images go (registry, namespace) is the
    daemon's choice, never the request's.
    """
    match = _IMAGE_NAME_RE.fullmatch(value)
    if match is None or len(match["name"]) > _MAX_NAME_LENGTH:
        raise InvalidField(f"image_name {value!r} is not a valid image name: expected lowercase 'name' or 'name:tag'")
    first, slash, _ = match["name"].partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        raise InvalidField(f"image_name {value!r} names a registry host; give the repository path only")
    return match["name"], match["tag"] or "latest"


@dataclass(frozen=True)
class NormalisedReference:
    """A reference as the engine reads it: Docker Hub spelled out, default tag added."""

    domain: str
    path: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        return f"{self.domain}/{self.path}{self._suffix}"

    @property
    def familiar(self) -> str:
        """The short form `docker images` shows: `busybox:latest`, `tenant/app:v1`."""
        if self.domain != _DOCKER_HUB:
            return str(self)
        path = self.path.removeprefix("library/") if self.path.count("/") == 1 else self.path
        return f"{path}{self._suffix}"

    @property
    def remainder(self) -> str:
        """Path, tag and digest: the reference without its registry host."""
        return f"{self.path}{self._suffix}"

    @property
    def _suffix(self) -> str:
        return (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def normalise_reference(ref: str) -> NormalisedReference:
    """`ref` the way the engine's ParseNormalizedNamed + TagNameOnly read it (distribution v2.8).

    The first path component is a registry host only if it has a `.` or `:` or is `localhost`;
    otherwise the image is on Docker Hub (`index.docker.io` is Docker Hub too), where a
    one-component path gets `library/`. No tag and no digest means `:latest`.
    """
    if len(ref) > _MAX_REFERENCE_LENGTH:
        raise InvalidImageReference(f"{ref[:64]!r}... is longer than any image reference")
    if _FULL_IMAGE_ID_RE.fullmatch(ref):
        raise InvalidImageReference(f"{ref!r} is an image ID, not a repository name")
    first, slash, rest = ref.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        domain, remainder = first, rest
    else:
        domain, remainder = _DOCKER_HUB, ref
    if domain == "index.docker.io":
        domain = _DOCKER_HUB
    if domain == _DOCKER_HUB and "/" not in remainder:
        remainder = f"library/{remainder}"
    if remainder.partition(":")[0].lower() != remainder.partition(":")[0]:
        raise InvalidImageReference(f"{ref!r} is not a valid image reference: repository names are lowercase")
    match = _REFERENCE_RE.fullmatch(f"{domain}/{remainder}")
    if match is None or len(match["name"]) > _MAX_NAME_LENGTH:
        raise InvalidImageReference(f"{ref!r} is not a valid image reference")
    path = match["name"][len(domain) + 1 :]
    tag, digest = match["tag"], match["digest"]
    return NormalisedReference(domain, path, tag if tag or digest else "latest", digest)


def looks_like_image_id(ref: str) -> bool:
    """Whether the legacy builder could take `ref` for a local image ID or ID prefix."""
    return _IMAGE_ID_RE.fullmatch(ref) is not None
