"""The request and answer models, and the OpenAPI document made from them, agree with what the
parser reads and what the daemon writes (pure: no engine)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from builder.protocol import BuildStatus
from builder.server.errors import InvalidField, InvalidImageReference
from builder.server.models import BuildSpec, ListQuery, LogQuery, RequestModel, Shape, parse_fields
from builder.server.openapi import openapi_document
from builder.server.records import BuildRecord

pytestmark = pytest.mark.unit


class _Recorder(Mapping[str, Any]):
    """Request fields that remember every name the parser looks up."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.asked: set[str] = set()

    def __getitem__(self, name: str) -> Any:
        self.asked.add(name)
        return self.values[name]

    def __contains__(self, name: object) -> bool:
        self.asked.add(str(name))
        return name in self.values

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def _names_read(model: type[RequestModel], shape: Shape, **values: Any) -> set[str]:
    fields = _Recorder(values)
    parse_fields(model, fields, shape)
    return fields.asked


def _post_body(content_type: str) -> dict[str, Any]:
    schema: dict[str, Any] = openapi_document()["paths"]["/builds"]["post"]["requestBody"]["content"][content_type]
    return schema["schema"]


def _query_names(path: str, method: str) -> set[str]:
    parameters = openapi_document()["paths"][path][method]["parameters"]
    return {parameter["name"] for parameter in parameters if parameter["in"] == "query"}


def test_every_field_the_parser_reads_is_in_the_document_for_its_shape() -> None:
    multipart = set(_post_body("multipart/form-data")["properties"]) - {"context"}
    assert _names_read(BuildSpec, Shape.MULTIPART) == multipart
    assert _names_read(BuildSpec, Shape.QUERY) == _query_names("/builds", "post")
    # Secrets are read beside the spec, never into it (the spec is stored; secrets never are).
    json_fields = set(_post_body("application/json")["properties"]) - {"secrets"}
    assert _names_read(BuildSpec, Shape.JSON, image="busybox") == json_fields
    assert _names_read(ListQuery, Shape.QUERY) == _query_names("/builds", "get")
    assert _names_read(LogQuery, Shape.QUERY) == _query_names("/builds/{build_id}/logs", "get")
    # What a request needs is what the document requires.
    assert _post_body("application/json")["required"] == ["image"]
    with pytest.raises(InvalidField, match="image is required"):
        BuildSpec.from_fields({}, Shape.JSON)


def test_the_status_document_lists_exactly_what_a_record_shows() -> None:
    record = BuildRecord("b1", BuildSpec(image_name="app:latest"), created_at=dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
    public = record.to_public()
    schema = openapi_document()["components"]["schemas"]["Build"]
    assert set(schema["properties"]) == set(public) == set(schema["required"])
    assert public["created_at"] == "2026-01-02T00:00:00.000Z" and public["status"] == "queued"
    assert schema["properties"]["status"]["enum"] == [s.value for s in BuildStatus]


def test_every_flag_spelling_the_document_offers_parses() -> None:
    spellings = _post_body("multipart/form-data")["properties"]["no_cache"]["enum"]
    parsed = {word: BuildSpec.from_fields({"no_cache": word}, Shape.MULTIPART).no_cache for word in spellings}
    assert parsed == {
        "true": True,
        "1": True,
        "yes": True,
        "on": True,
        "false": False,
        "0": False,
        "no": False,
        "off": False,
    }
    assert BuildSpec.from_fields({"no_cache": " TRUE "}, Shape.QUERY).no_cache
    assert not BuildSpec.from_fields({"no_cache": ""}, Shape.QUERY).no_cache
    with pytest.raises(InvalidField, match="no_cache must be true or false, got 'maybe'"):
        BuildSpec.from_fields({"no_cache": "maybe"}, Shape.MULTIPART)


def test_json_bodies_take_json_values_and_the_string_spellings_the_sdk_sends() -> None:
    native = BuildSpec.from_fields(
        {"image": "busybox", "no_cache": True, "build_args": {"A": "1"}, "timeout": 30}, Shape.JSON
    )
    spelled = BuildSpec.from_fields(
        {"image": "busybox", "no_cache": "true", "build_args": '{"A": "1"}', "timeout": "30"}, Shape.JSON
    )
    assert native == spelled == BuildSpec(base_image="busybox", no_cache=True, build_args={"A": "1"}, timeout=30.0)
    # The JSON shape builds `FROM <image>`: a dockerfile field is not read there.
    assert BuildSpec.from_fields({"image": "busybox", "dockerfile": "../x"}, Shape.JSON).dockerfile == "Dockerfile"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"timeout": "0"}, "timeout must be a positive number of seconds"),
        ({"timeout": "inf"}, "timeout must be a positive number of seconds"),
        ({"timeout": "soon"}, "timeout must be a number of seconds"),
        ({"builder": "kaniko"}, "builder must be one of buildkit, legacy"),
        ({"target": 5}, "target must be a string"),
        ({"labels": '{"a": 1}'}, "labels must be a JSON object of strings"),
        ({"dockerfile": "a/../../b"}, "dockerfile 'a/../../b' is not a path inside the build context"),
    ],
)
def test_invalid_fields_say_which_and_why(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidField, match=re.escape(message)):
        BuildSpec.from_fields(fields, Shape.MULTIPART)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x", "limit must be an integer"),
        ("²", "limit must be an integer"),
        ("0", "limit must be at least 1"),
        (str(2**63), "limit must be below 2^63"),
        ("9" * 20, "limit must be an integer"),
    ],
)
def test_integer_queries_are_ascii_int64(value: str, message: str) -> None:
    with pytest.raises(InvalidField, match=re.escape(message)):
        parse_fields(ListQuery, {"limit": value}, Shape.QUERY)


def test_query_defaults() -> None:
    assert parse_fields(ListQuery, {}, Shape.QUERY) == ListQuery(status=None, limit=50)
    assert parse_fields(LogQuery, {"follow": "0", "format": "text"}, Shape.QUERY) == LogQuery(
        after=0, follow=False, format="text"
    )
    with pytest.raises(InvalidField, match="status must be one of queued, running"):
        parse_fields(ListQuery, {"status": "done"}, Shape.QUERY)


@pytest.mark.parametrize("ref", ["busybox", "localhost:5000/team/app:v1.2-rc_3", "app@sha256:" + "a" * 64])
def test_document_pattern_admits_valid_references(ref: str) -> None:
    pattern = _post_body("application/json")["properties"]["image"]["pattern"]
    assert re.search(pattern, ref)
    assert BuildSpec.from_fields({"image": ref}, Shape.JSON).base_image == ref


@pytest.mark.parametrize("ref", ["Busybox", "a b", "-x", "app:", "/app"])
def test_document_pattern_refuses_what_the_parser_refuses(ref: str) -> None:
    pattern = _post_body("application/json")["properties"]["image"]["pattern"]
    assert not re.search(pattern, ref)
    with pytest.raises(InvalidImageReference):
        BuildSpec.from_fields({"image": ref}, Shape.JSON)


def test_error_answers_name_their_codes_and_headers() -> None:
    get_build = openapi_document()["paths"]["/builds/{build_id}"]["get"]["responses"]
    assert get_build["404"]["content"]["application/json"]["schema"]["allOf"][1]["properties"]["code"]["enum"] == [
        "build_not_found"
    ]
    assert set(get_build["404"]["headers"]) == {"Retry-After"}
    assert set(get_build["401"]["headers"]) == {"WWW-Authenticate"}
    submit = openapi_document()["paths"]["/builds"]["post"]["responses"]
    assert {"queue_full", "tenant_quota_exceeded"} == set(
        submit["429"]["content"]["application/json"]["schema"]["allOf"][1]["properties"]["code"]["enum"]
    )
