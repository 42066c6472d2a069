"""The OpenAPI 3.0 description of the HTTP API, served at GET /openapi.json.

Assembled from builder/server/models.py (request fields, answers) and builder/server/errors.py
(error codes, statuses, headers): what the parser checks is what the document says. Kept
honest by tests/test_openapi.py, which fuzzes a live daemon with schemathesis.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from builder import __version__
from builder import protocol as p
from builder.server import errors as e
from builder.server.auth import Unauthorized
from builder.server.build_secrets import MAX_SECRET_BYTES, MAX_SECRETS, MAX_SECRETS_BYTES
from builder.server.models import (
    TAR_CONTENT_TYPES,
    Accepted,
    BuildList,
    BuildSpec,
    BuildView,
    Error,
    ListQuery,
    LogQuery,
    RequestModel,
    Schema,
    Shape,
    json_schema,
    wire_fields,
)

_COMPONENTS: dict[type, str] = {Error: "Error", Accepted: "Accepted", BuildView: "Build"}


def _schema(annotation: object) -> Schema:
    return json_schema(annotation, _COMPONENTS.get)


def _ref(model: type) -> Schema:
    return {"$ref": f"#/components/schemas/{_COMPONENTS[model]}"}


def _properties(model: type[RequestModel], shape: Shape) -> dict[str, Schema]:
    properties = {}
    for field in wire_fields(model):
        if field.shapes & shape:
            schema = field.type.schema(shape)
            spelling = schema.get("description")
            schema["description"] = f"{field.description} ({spelling})" if spelling else field.description
            properties[field.name] = schema
    return properties


def _required(model: type[RequestModel], shape: Shape) -> list[str]:
    return [field.name for field in wire_fields(model) if field.shapes & shape and field.required]


def _query(model: type[RequestModel]) -> list[Schema]:
    return [
        {"name": name, "in": "query", "required": name in _required(model, Shape.QUERY), "schema": schema}
        | ({"description": description} if (description := schema.pop("description", None)) else {})
        for name, schema in _properties(model, Shape.QUERY).items()
    ]


def _errors(*classes: type[e.BuilderError]) -> dict[str, Schema]:
    """Error answers by status: the codes each may carry, and the headers sent with them."""
    by_status: dict[int, list[type[e.BuilderError]]] = {}
    for cls in classes:
        by_status.setdefault(cls.status, []).append(cls)
    responses = {}
    for status, group in sorted(by_status.items()):
        codes = sorted({cls.code for cls in group})
        body = {"allOf": [_ref(Error), {"type": "object", "properties": {"code": {"enum": codes}}}]}
        response = _json(body, ", ".join(codes))
        if headers := sorted({name for cls in group for name in cls.response_headers}):
            response["headers"] = {name: {"schema": {"type": "string"}} for name in headers}
        responses[str(status)] = response
    return responses


# What every operation but the probes may answer: no token, or (without tokens) a web page's request.
_GUARDED = (Unauthorized, e.Forbidden)
_BUILD_GONE = (e.BuildNotFound, e.BuildExpired)
_SUBMIT_ERRORS = (
    *_GUARDED,
    e.BadRequest,
    e.InvalidField,
    e.InvalidImageReference,
    e.UnresolvableImageReference,
    e.InvalidContext,
    e.DockerfileNotFound,
    e.InvalidDockerfile,
    e.ImageNotAllowed,
    e.InvalidSecret,
    e.SecretsNotSupported,
    e.EngineSessionFailed,
    e.UploadStalled,
    e.ContextTooLarge,
    e.DockerfileTooLarge,
    e.UnsupportedMediaType,
    e.IdempotencyKeyReused,
    e.IdempotencyKeyInProgress,
    e.QueueFull,
    e.TenantQuotaExceeded,
    e.ShuttingDown,
    e.StoreFailing,
    e.EngineUnavailable,
)


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_SECRET_LIMITS = (
    f"ids match [A-Za-z0-9._-]{{1,64}}; at most {MAX_SECRETS} secrets, {MAX_SECRET_BYTES} bytes each and "
    f"{MAX_SECRETS_BYTES} in all; BuildKit builds only"
)


def _submit_body() -> Schema:
    multipart = {
        "type": "object",
        "required": [p.FIELD_CONTEXT],
        "properties": {
            p.FIELD_CONTEXT: {
                "type": "string",
                "format": "binary",
                "description": "the context: a tar, maybe compressed",
            },
            **_properties(BuildSpec, Shape.MULTIPART),
        },
        # Build secrets: one part per secret, named `secret.<id>`, the raw value.
        "patternProperties": {
            r"^secret\.[A-Za-z0-9._-]{1,64}$": {"type": "string", "format": "binary", "description": _SECRET_LIMITS},
        },
    }
    from_image = {
        "type": "object",
        "required": _required(BuildSpec, Shape.JSON),
        "properties": {
            **_properties(BuildSpec, Shape.JSON),
            p.FIELD_SECRETS: {
                "type": "object",
                "description": f"build secrets, id -> base64 value; {_SECRET_LIMITS}",
                "additionalProperties": {"type": "string", "format": "byte"},
            },
        },
    }
    tar = {"schema": {"type": "string", "format": "binary"}}
    return {
        "required": True,
        "description": (
            "Build secrets travel in the body only: multipart parts `secret.<id>`, or `secrets` in a JSON body; "
            "the raw tar shape refuses them (its fields are in the query)."
        ),
        "content": {
            "multipart/form-data": {"schema": multipart},
            **{content_type: tar for content_type in TAR_CONTENT_TYPES},
            "application/json": {"schema": from_image},
        },
    }


def _operation(operation_id: str, summary: str, responses: Schema, *errors: Iterable[type[e.BuilderError]]) -> Schema:
    return {
        "operationId": operation_id,
        "summary": summary,
        "responses": responses | _errors(*(cls for group in errors for cls in group)),
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    by_id = {"build_id": "$response.body#/build_id"}
    accepted = _json(_ref(Accepted), "queued (202), or the original build of a repeated Idempotency-Key (200)")
    accepted["headers"] = {"Location": {"schema": {"type": "string"}}}
    accepted["links"] = {
        "GetBuild": {"operationId": "getBuild", "parameters": by_id},
        "GetBuildLog": {"operationId": "getBuildLog", "parameters": by_id},
        "CancelBuild": {"operationId": "cancelBuild", "parameters": by_id},
    }
    build = _json(_ref(BuildView), "the build's status")
    build_id = {"name": "build_id", "in": "path", "required": True, "schema": {"type": "string"}}
    submit = _operation(
        "submitBuild",
        "submit a build: a context (multipart, or a raw tar with the fields in the query) or an image (JSON)",
        {"200": accepted, "202": accepted},
        _SUBMIT_ERRORS,
    )
    submit["parameters"] = [
        {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "minLength": 1, "maxLength": 255}},
        # Read for the raw tar shape only.
        *_query(BuildSpec),
    ]
    submit["requestBody"] = _submit_body()
    get_log = _operation(
        "getBuildLog",
        "the build log: SSE (Accept: text/event-stream, or ?format=sse) or plain text",
        {
            "200": {
                "description": "the log",
                "content": {
                    # Per event: `id` counts from 1; `data` is one line of JSON (see the README).
                    "text/event-stream": {
                        "schema": {
                            "type": "object",
                            "required": ["id", "data"],
                            "properties": {"id": {"type": "string", "pattern": "^[0-9]+$"}, "data": {"type": "string"}},
                        }
                    },
                    "text/plain": {"schema": {"type": "string"}},
                },
            }
        },
        _GUARDED,
        _BUILD_GONE,
        (e.InvalidField, e.TenantQuotaExceeded),
    )
    get_log["parameters"] = [
        *_query(LogQuery),
        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"}},
    ]
    list_builds = _operation(
        "listBuilds",
        "list builds, newest first",
        {"200": _json(_schema(BuildList), "builds")},
        _GUARDED,
        (e.InvalidField,),
    )
    list_builds["parameters"] = _query(ListQuery)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "builder",
            "version": __version__,
            "description": "Remote container image builder daemon (API v1)",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {name: json_schema(model) for model, name in _COMPONENTS.items()},
        },
        "security": [{"bearer": []}],
        "paths": {
            # The probes need no token; without tokens, a web page's request is refused (403) there too.
            "/healthz": {
                "get": {
                    "summary": "liveness",
                    "security": [],
                    "responses": {
                        "200": _json(
                            {"type": "object", "properties": {"status": {"type": "string"}}}, "the process runs"
                        )
                    }
                    | _errors(e.Forbidden),
                }
            },
            "/readyz": {
                "get": {
                    "summary": "readiness: the store writes and the engine answers ping",
                    "security": [],
                    "responses": {"200": _json({"type": "object"}, "ready")}
                    | _errors(e.Forbidden, e.StoreFailing, e.EngineUnavailable),
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "text format 0.0.4",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    }
                    | _errors(*_GUARDED),
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "this document",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0")} | _errors(*_GUARDED),
                }
            },
            "/builds": {"get": list_builds, "post": submit},
            "/builds/{build_id}": {
                "parameters": [build_id],
                "get": _operation("getBuild", "a build's status", {"200": build}, _GUARDED, _BUILD_GONE),
                "delete": _operation(
                    "cancelBuild",
                    "cancel and tear down",
                    {
                        "200": _json(_ref(BuildView), "torn down (or already finished)"),
                        "202": _json(_ref(BuildView), "teardown still running"),
                    },
                    _GUARDED,
                    _BUILD_GONE,
                ),
            },
            "/builds/{build_id}/logs": {"parameters": [build_id], "get": get_log},
        },
    }
