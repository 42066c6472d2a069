"""What a client asked to build: request fields parsed into a typed `BuildSpec` (pure)."""

from __future__ import annotations

import dataclasses
import json
import posixpath
from collections.abc import Mapping
from typing import Any

from builder import protocol as p
from builder.server.errors import InvalidField
from builder.server.imageref import parse_image_name, validate_reference

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    image_name: str | None = None  # "name:tag", tag filled in
    dockerfile: str = p.DEFAULT_DOCKERFILE
    build_args: dict[str, str] = dataclasses.field(default_factory=dict)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    pull: bool = False
    nydus_convert: bool = False
    cache_key: str | None = None
    # Seconds the build may run before it is torn down; None: the daemon's limit.
    timeout: float | None = None
    # Set for the synthetic `FROM <image>` build (JSON request shape).
    base_image: str | None = None
    # "buildkit" or "legacy"; None until the daemon picks its default for the build.
    builder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuildSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], *, synthetic: bool = False) -> BuildSpec:
        """Validate request fields (strings from multipart/query, or JSON values)."""
        base_image = None
        if synthetic:
            base_image = validate_reference(_string(fields, p.FIELD_IMAGE, required=True))
        image_name = _string(fields, p.FIELD_IMAGE_NAME)
        if image_name:
            name, tag = parse_image_name(image_name)
            image_name = f"{name}:{tag}"
        dockerfile = p.DEFAULT_DOCKERFILE if synthetic else normalise_context_path(
            _string(fields, p.FIELD_DOCKERFILE) or p.DEFAULT_DOCKERFILE, p.FIELD_DOCKERFILE
        )
        return cls(
            image_name=image_name or None,
            dockerfile=dockerfile,
            build_args=_string_map(fields, p.FIELD_BUILD_ARGS),
            labels=_string_map(fields, p.FIELD_LABELS),
            target=_string(fields, p.FIELD_TARGET) or None,
            no_cache=_flag(fields, p.FIELD_NO_CACHE),
            pull=_flag(fields, p.FIELD_PULL),
            nydus_convert=_flag(fields, p.FIELD_NYDUS_CONVERT),
            cache_key=_string(fields, p.FIELD_CACHE_KEY) or None,
            timeout=_seconds(fields, p.FIELD_TIMEOUT),
            base_image=base_image,
            builder=_choice(fields, p.FIELD_BUILDER, p.BUILDERS),
        )


def normalise_context_path(path: str, field: str) -> str:
    """A path inside the build context, as tar member names spell it ("./a//b" -> "a/b")."""
    if "\x00" in path:
        raise InvalidField(f"{field} contains a NUL byte")
    norm = posixpath.normpath(path.lstrip("/"))
    if norm in (".", "") or norm == ".." or norm.startswith("../"):
        raise InvalidField(f"{field} {path!r} is not a path inside the build context")
    return norm


def _string(fields: Mapping[str, Any], name: str, *, required: bool = False) -> str:
    value = fields.get(name)
    if value is None:
        if required:
            raise InvalidField(f"{name} is required")
        return ""
    if not isinstance(value, str):
        raise InvalidField(f"{name} must be a string")
    if required and not value:
        raise InvalidField(f"{name} is required")
    return value


def _choice(fields: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> str | None:
    value = _string(fields, name)
    if value and value not in allowed:
        raise InvalidField(f"{name} must be one of {', '.join(allowed)}")
    return value or None


def _flag(fields: Mapping[str, Any], name: str) -> bool:
    return parse_flag(fields.get(name), name)


def parse_flag(value: Any, name: str, *, default: bool = False) -> bool:
    """A boolean from JSON, or from a form/query string ("true"/"false", "1"/"0", ...)."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise InvalidField(f"{name} must be true or false, got {value!r}")


def _seconds(fields: Mapping[str, Any], name: str) -> float | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise InvalidField(f"{name} must be a number of seconds") from None
    if isinstance(value, bool) or not 0 < seconds < float("inf"):
        raise InvalidField(f"{name} must be a positive number of seconds")
    return seconds


def _string_map(fields: Mapping[str, Any], name: str) -> dict[str, str]:
    value = fields.get(name)
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidField(f"{name} must be a JSON object of strings") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidField(f"{name} must be a JSON object of strings")
    return value
