"""Docker image reference grammar (github.com/distribution/reference), as pure functions."""

from __future__ import annotations

import re

from builder.server.errors import InvalidField, InvalidImageReference

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[_.]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"

# re.ASCII: `\w` must not admit non-ASCII letters; fullmatch: no trailing newline slips past `$`.
_REFERENCE_RE = re.compile(rf"(?P<name>{_NAME})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?", re.ASCII)
_IMAGE_NAME_RE = re.compile(rf"(?P<name>{_NAME})(?::(?P<tag>{_TAG}))?", re.ASCII)

_MAX_NAME_LENGTH = 255


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
        raise InvalidField(
            f"image_name {value!r} is not a valid image name: expected lowercase 'name' or 'name:tag'"
        )
    first, slash, _ = match["name"].partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        raise InvalidField(f"image_name {value!r} names a registry host; give the repository path only")
    return match["name"], match["tag"] or "latest"
