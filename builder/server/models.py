"""Typed models of the HTTP API: what requests carry, and what the daemon answers.

Each request field is declared once, on a frozen dataclass, with its wire type. The same
declaration parses requests (`parse_fields`) and describes them in /openapi.json
(builder/server/openapi.py), so the parser and the document cannot drift apart. Answers
are TypedDicts: plain dicts at run time, checked by mypy where they are built, and turned
into JSON Schemas by `json_schema`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import posixpath
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, Generic, NamedTuple, Protocol, TypedDict, TypeVar

from builder import protocol as p
from builder.protocol import BuildStatus
from builder.server.errors import InvalidField
from builder.server.imageref import IMAGE_NAME_PATTERN, REFERENCE_PATTERN, parse_image_name, validate_reference

T = TypeVar("T")
Schema = dict[str, Any]


class Shape(enum.Flag):
    """Where a request's fields come from."""

    MULTIPART = enum.auto()  # text parts of multipart/form-data, beside the context part
    QUERY = enum.auto()  # the query string (of a raw tar/gzip upload, or of a GET)
    JSON = enum.auto()  # an application/json body: JSON values, or the strings the other shapes send
    CONTEXT = MULTIPART | QUERY
    ALL = MULTIPART | QUERY | JSON


# ---------------------------------------------------------------- wire types


class WireType(Generic[T]):
    """How one field is spelled on the wire: parsed from a request, and described as a schema.

    `parse` takes a string (multipart, query) or a JSON value, and None when the field is absent.
    `string_schema` describes the string form; `value_schema` the JSON-native form, when it differs.
    """

    default: T

    def parse(self, value: object, name: str) -> T:
        raise NotImplementedError

    def string_schema(self) -> Schema:
        return {"type": "string"}

    def value_schema(self) -> Schema | None:
        return None

    def schema(self, shape: Shape) -> Schema:
        native = self.value_schema() if shape is Shape.JSON else None
        # JSON bodies also take the string spellings: the SDK sends `"no_cache": "true"`.
        return {"anyOf": [native, self.string_schema()]} if native else self.string_schema()

    def field(self, metadata: Mapping[str, Any]) -> T:
        return dataclasses.field(default=self.default, metadata=metadata)


def _string(value: object, name: str) -> str:
    """The field's text; "" when it is absent."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidField(f"{name} must be a string")
    return value


class Text(WireType[str | None]):
    """Free text, or one of `choices`; empty means unset."""

    default = None

    def __init__(self, choices: tuple[str, ...] = ()) -> None:
        self.choices = choices

    def parse(self, value: object, name: str) -> str | None:
        text = _string(value, name)
        if text and self.choices and text not in self.choices:
            raise InvalidField(f"{name} must be one of {', '.join(self.choices)}")
        return text or None

    def string_schema(self) -> Schema:
        return {"type": "string", "enum": list(self.choices)} if self.choices else {"type": "string"}


class ImageName(WireType[str | None]):
    """Where the image goes: `name[:tag]`, a repository path, stored as `name:tag`."""

    default = None

    def parse(self, value: object, name: str) -> str | None:
        if not (text := _string(value, name)):
            return None
        repository, tag = parse_image_name(text)
        return f"{repository}:{tag}"

    def string_schema(self) -> Schema:
        return {"type": "string", "pattern": f"^(?:{IMAGE_NAME_PATTERN})?$"}


class ImageReference(WireType[str | None]):
    """An image to build from, as `FROM` takes it: `[host/]path[:tag][@digest]`."""

    default = None

    def parse(self, value: object, name: str) -> str | None:
        text = _string(value, name)
        return validate_reference(text) if text else None

    def string_schema(self) -> Schema:
        return {"type": "string", "pattern": f"^{REFERENCE_PATTERN}$"}


class ContextPath(WireType[str]):
    """A path inside the build context, as tar member names spell it ("./a//b" -> "a/b")."""

    default = p.DEFAULT_DOCKERFILE

    def parse(self, value: object, name: str) -> str:
        return normalise_context_path(_string(value, name) or self.default, name)

    def string_schema(self) -> Schema:
        return {"type": "string", "default": self.default}


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class Flag(WireType[bool]):
    """A boolean: JSON true/false, or true/false, 1/0, yes/no, on/off (any case; empty is false)."""

    def __init__(self, default: bool = False) -> None:
        self.default = default

    def parse(self, value: object, name: str) -> bool:
        return parse_flag(value, name, default=self.default)

    def string_schema(self) -> Schema:
        return {"type": "string", "enum": [*_TRUE, *_FALSE]}

    def value_schema(self) -> Schema:
        return {"type": "boolean"}


class StringMap(WireType[dict[str, str]]):
    """Names to strings (build args, labels): a JSON object, or its text in a string field."""

    def parse(self, value: object, name: str) -> dict[str, str]:
        if value is None or value == "":
            return {}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise InvalidField(f"{name} must be a JSON object of strings") from None
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise InvalidField(f"{name} must be a JSON object of strings")
        return value

    def string_schema(self) -> Schema:
        return {"type": "string", "description": 'a JSON object of strings, e.g. {"A": "1"}'}

    def value_schema(self) -> Schema:
        return {"type": "object", "additionalProperties": {"type": "string"}}

    def field(self, metadata: Mapping[str, Any]) -> dict[str, str]:
        return dataclasses.field(default_factory=dict, metadata=metadata)


class Seconds(WireType[float | None]):
    """A positive, finite number of seconds."""

    default = None

    def parse(self, value: object, name: str) -> float | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str | int | float):
            raise InvalidField(f"{name} must be a number of seconds")
        try:
            seconds = float(value)
        except ValueError:
            raise InvalidField(f"{name} must be a number of seconds") from None
        if isinstance(value, bool) or not 0 < seconds < float("inf"):
            raise InvalidField(f"{name} must be a positive number of seconds")
        return seconds

    def string_schema(self) -> Schema:
        # Decimal and positive: not "0", not "0.0".
        return {"type": "string", "pattern": r"^(?:[0-9]*[1-9][0-9]*(?:\.[0-9]*)?|[0-9]*\.[0-9]*[1-9][0-9]*)$"}

    def value_schema(self) -> Schema:
        return {"type": "number", "minimum": 0, "exclusiveMinimum": True}


# 2^63: event ids and counts are int64 on the wire (SQLite, Redis).
_INT64_DIGITS = 19


class Integer(WireType[int]):
    """A decimal integer (int64) in a query string."""

    def __init__(self, default: int, minimum: int = 0) -> None:
        self.default = default
        self.minimum = minimum

    def parse(self, value: object, name: str) -> int:
        text = _string(value, name)
        if not text:
            return self.default
        digits = text.removeprefix("-")
        # ASCII digits only: str.isdigit() also admits "²", which int() refuses.
        if not (digits.isascii() and digits.isdigit()) or len(digits) > _INT64_DIGITS:
            raise InvalidField(f"{name} must be an integer")
        number = int(text)
        if number < self.minimum:
            raise InvalidField(f"{name} must be at least {self.minimum}")
        if number >= 2**63:
            raise InvalidField(f"{name} must be below 2^63")
        return number

    def string_schema(self) -> Schema:
        return {"type": "integer", "minimum": self.minimum, "maximum": 2**63 - 1}


def normalise_context_path(path: str, field: str) -> str:
    """A path inside the build context, as tar member names spell it ("./a//b" -> "a/b")."""
    if "\x00" in path:
        raise InvalidField(f"{field} contains a NUL byte")
    norm = posixpath.normpath(path.lstrip("/"))
    if norm in (".", "") or norm == ".." or norm.startswith("../"):
        raise InvalidField(f"{field} {path!r} is not a path inside the build context")
    return norm


def parse_flag(value: object, name: str, *, default: bool = False) -> bool:
    """A boolean from JSON, or from a form/query string ("true"/"false", "1"/"0", ...)."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE or not word:
            return False
    raise InvalidField(f"{name} must be true or false, got {value!r}")


# ---------------------------------------------------------------- request models


class WireField(NamedTuple):
    """A request field: its wire name, type, the request shapes that take it, its description."""

    name: str
    type: WireType[Any]
    description: str
    shapes: Shape
    required: bool
    # The model's attribute; the wire name unless the field says otherwise.
    attribute: str = ""


_WIRE = "wire"


def wire(
    type_: WireType[T],
    description: str,
    *,
    name: str = "",
    shapes: Shape = Shape.ALL,
    required: bool = False,
) -> T:
    """Declare a dataclass field as a request field (its wire name is the attribute's unless `name`)."""
    return type_.field({_WIRE: WireField(name, type_, description, shapes, required)})


class RequestModel(Protocol):
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


M = TypeVar("M", bound=RequestModel)


@functools.cache
def wire_fields(model: type[RequestModel]) -> tuple[WireField, ...]:
    """The request fields a model declares, in declaration order."""
    return tuple(
        f.metadata[_WIRE]._replace(attribute=f.name, name=f.metadata[_WIRE].name or f.name)
        for f in dataclasses.fields(model)
        if _WIRE in f.metadata
    )


@functools.cache
def _fields_in(model: type[RequestModel], shape: Shape) -> tuple[WireField, ...]:
    # Once per shape: Flag arithmetic costs a microsecond a time, per field of every request.
    return tuple(field for field in wire_fields(model) if field.shapes & shape)


def parse_fields(model: type[M], values: Mapping[str, Any], shape: Shape) -> M:
    """A model from request fields: strings (multipart, query) or JSON values; unknown names are ignored."""
    parsed: dict[str, Any] = {}
    for field in _fields_in(model, shape):
        value = values.get(field.name)
        if field.required and (value is None or value == ""):
            raise InvalidField(f"{field.name} is required")
        parsed[field.attribute] = field.type.parse(value, field.name)
    return model(**parsed)


# The raw shape of POST /builds: a tar, compressed or not, as the body; the fields in the query.
TAR_CONTENT_TYPES = (
    "application/x-tar",
    "application/tar",
    "application/gzip",
    "application/x-gzip",
    "application/zstd",
    "application/x-bzip2",
    "application/x-xz",
    "application/octet-stream",
)


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """What a client asked to build: the fields of POST /builds, in any of its three shapes."""

    # Set for the synthetic `FROM <image>` build (the JSON shape).
    base_image: str | None = wire(
        ImageReference(),
        "the image to build from: the build is `FROM <image>` (a context is built instead in the other shapes)",
        name=p.FIELD_IMAGE,
        shapes=Shape.JSON,
        required=True,
    )
    image_name: str | None = wire(ImageName(), "name or name:tag (the tag defaults to latest) under your namespace")
    dockerfile: str = wire(ContextPath(), "the Dockerfile's path inside the context", shapes=Shape.CONTEXT)
    build_args: dict[str, str] = wire(StringMap(), "build arguments (ARG)")
    labels: dict[str, str] = wire(StringMap(), "labels added to the image")
    target: str | None = wire(Text(), "the Dockerfile stage to build")
    no_cache: bool = wire(Flag(), "build every step afresh")
    pull: bool = wire(Flag(), "pull newer base images")
    nydus_convert: bool = wire(Flag(), "also convert the pushed image to Nydus")
    cache_key: str | None = wire(Text(), "builds with the same key share the build cache")
    # Seconds the build may run before it is torn down; None: the daemon's limit.
    timeout: float | None = wire(Seconds(), "seconds the build may run, at most the daemon's --build-timeout")
    # None until the daemon picks its default for the build.
    builder: str | None = wire(Text(choices=p.BUILDERS), "the builder to use (default: the daemon's --builder)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuildSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], shape: Shape) -> BuildSpec:
        """Validate request fields (strings from multipart/query, or JSON values)."""
        return parse_fields(cls, fields, shape)


_DEFAULT_LIMIT = 50
# A larger `limit` is served as this many.
MAX_LIST_LIMIT = 500


@dataclasses.dataclass(frozen=True)
class ListQuery:
    """The query of GET /builds."""

    status: str | None = wire(
        Text(choices=tuple(s.value for s in BuildStatus)), "only builds with this status", shapes=Shape.QUERY
    )
    limit: int = wire(
        Integer(default=_DEFAULT_LIMIT, minimum=1), f"at most this many (up to {MAX_LIST_LIMIT})", shapes=Shape.QUERY
    )


@dataclasses.dataclass(frozen=True)
class LogQuery:
    """The query of GET /builds/{build_id}/logs (`Last-Event-ID`, a header, wins over `after`)."""

    after: int = wire(Integer(default=0), "resume after this event id", shapes=Shape.QUERY)
    follow: bool = wire(Flag(default=True), "keep the stream open until the build ends", shapes=Shape.QUERY)
    format: str | None = wire(
        Text(choices=("sse", "text")), "sse or text (default: by the Accept header)", shapes=Shape.QUERY
    )
    batch: bool = wire(
        Flag(default=False),
        "SSE in batches: each frame `id: <last id>` and `data: <first id> [<event>,...]` (consecutive ids), "
        "a few KiB of events, for clients that decode a batch with one JSON parse",
        shapes=Shape.QUERY,
    )


# ---------------------------------------------------------------- answers


class Doc(NamedTuple):
    """Schema keywords for one TypedDict key: `Annotated[str, Doc(format="date-time")]`."""

    description: str | None = None
    format: str | None = None
    minimum: int | None = None
    enum: tuple[str, ...] | None = None

    def keywords(self) -> Schema:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._asdict().items() if v is not None}


Timestamp = Annotated[str, Doc(format="date-time", description="RFC 3339, UTC")]


class Error(TypedDict):
    """Every error answer."""

    error: str
    code: str


class Links(TypedDict):
    self: str
    logs: str


class Accepted(TypedDict):
    """The answer to POST /builds."""

    build_id: str
    status: BuildStatus
    image_name: str | None
    links: Links


class BuildView(TypedDict):
    """A build's status: GET /builds/{build_id}, DELETE, and each item of GET /builds."""

    build_id: str
    status: BuildStatus
    image_name: Annotated[str | None, Doc("name:tag the image is tagged with")]
    image_ref: Annotated[str | None, Doc("where the image was pushed (or tagged), once built")]
    image_id: str | None
    image_digest: str | None
    image_ref_digest: str | None
    error: str | None
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    last_event_id: Annotated[int, Doc(minimum=0)]
    dockerfile: str
    build_args: dict[str, str]
    labels: dict[str, str]
    target: str | None
    no_cache: bool
    pull: bool
    cache_key: str | None
    timeout: float | None
    image: Annotated[str | None, Doc("the base image of a build from JSON {image}")]
    builder: Annotated[str | None, Doc(enum=p.BUILDERS)]
    nydus_convert: bool
    nydus_image_ref: str | None
    nydus_status: str | None
    replica: Annotated[str, Doc("the daemon (its --replica-id) that runs or ran the build")]


class BuildList(TypedDict):
    builds: list[BuildView]


def json_schema(annotation: object, refs: Callable[[type], str | None] = lambda _: None) -> Schema:
    """An OpenAPI 3.0 schema for a type: TypedDicts, enums, str/int/float/bool,
    `X | None`, `list[X]`, `dict[str, X]`, `Annotated[X, Doc(...)]`.

    `refs(typed_dict)` may name a component to refer to instead of writing it out.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        annotated = json_schema(args[0], refs)
        for extra in args[1:]:
            if isinstance(extra, Doc):
                annotated |= extra.keywords()
        if annotated.get("nullable") and "enum" in annotated:
            annotated["enum"].append(None)  # OpenAPI 3.0.3: null must be one of the values too
        return annotated
    if origin in (types.UnionType, typing.Union):
        others = [a for a in args if a is not type(None)]
        if len(others) != 1:
            raise TypeError(f"no schema for {annotation!r}: only `X | None` unions")
        return json_schema(others[0], refs) | {"nullable": True}
    if origin is list:
        return {"type": "array", "items": json_schema(args[0], refs)}
    if origin is dict:
        return {"type": "object", "additionalProperties": json_schema(args[1], refs)}
    if isinstance(annotation, type) and typing.is_typeddict(annotation):
        if (name := refs(annotation)) is not None:
            return {"$ref": f"#/components/schemas/{name}"}
        hints = typing.get_type_hints(annotation, include_extras=True)
        schema: Schema = {
            "type": "object",
            "required": sorted(vars(annotation)["__required_keys__"]),
            "properties": {key: json_schema(hint, refs) for key, hint in hints.items()},
        }
        if annotation.__doc__:
            schema["description"] = annotation.__doc__
        return schema
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"type": "string", "enum": [member.value for member in annotation]}
    for python_type, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
        if annotation is python_type:
            return {"type": name}
    raise TypeError(f"no schema for {annotation!r}")
