"""The OpenAPI 3.0 description of the HTTP API, served at GET /openapi.json.

Kept honest by tests/test_openapi.py, which runs schemathesis against a live daemon.
"""

from __future__ import annotations

from typing import Any

from builder import __version__
from builder.protocol import BuildStatus
from builder.server.build_secrets import MAX_SECRET_BYTES, MAX_SECRETS, MAX_SECRETS_BYTES

_STATUSES = [s.value for s in BuildStatus]
_NULLABLE_STRING = {"type": "string", "nullable": True}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

_FIELDS = {
    "image_name": {"type": "string", "description": "name or name:tag (tag defaults to latest)"},
    "dockerfile": {"type": "string", "description": "path inside the context", "default": "Dockerfile"},
    "build_args": {"type": "string", "description": "JSON object of strings"},
    "labels": {"type": "string", "description": "JSON object of strings"},
    "target": {"type": "string"},
    "no_cache": {"type": "string", "enum": ["true", "false", "1", "0"]},
    "pull": {"type": "string", "enum": ["true", "false", "1", "0"]},
    "nydus_convert": {"type": "string", "enum": ["true", "false", "1", "0"]},
    "cache_key": {"type": "string"},
    "timeout": {"type": "string", "description": "seconds, at most the daemon's --build-timeout"},
}


def _error(description: str, *headers: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        response["headers"] = {name: {"schema": {"type": "string"}} for name in headers}
    return response


_UNAUTHORIZED = _error("missing or invalid bearer token", "WWW-Authenticate")
_NOT_FOUND = _error("no such build (or another tenant's)", "Retry-After")
_GONE = _error("removed by retention")
_BAD = _error("invalid request")
_SECRET_LIMITS = (f"ids match [A-Za-z0-9._-]{{1,64}}; at most {MAX_SECRETS} secrets, {MAX_SECRET_BYTES} bytes each "
                  f"and {MAX_SECRETS_BYTES} in all; BuildKit builds only")
_BUILD_ID = {"name": "build_id", "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_document() -> dict[str, Any]:
    build_ref = {"$ref": "#/components/schemas/Build"}
    by_id = {"build_id": "$response.body#/build_id"}
    accepted = {
        "description": "queued (202), or the original build of a repeated Idempotency-Key (200)",
        "headers": {"Location": {"schema": {"type": "string"}}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
        "links": {
            "GetBuild": {"operationId": "getBuild", "parameters": by_id},
            "GetBuildLog": {"operationId": "getBuildLog", "parameters": by_id},
            "CancelBuild": {"operationId": "cancelBuild", "parameters": by_id},
        },
    }
    post_responses = {
        "200": accepted, "202": accepted,
        "400": _error("invalid request: a field, a secret (invalid_secret), or secrets for a builder that "
                      "cannot take them (secrets_not_supported)"),
        "401": _UNAUTHORIZED,
        "408": _error("the upload stalled"), "413": _error("context too large"),
        "415": _error("unsupported content type"), "422": _error("Idempotency-Key reused for another request"),
        "429": _error("queue full", "Retry-After"), "503": _error("shutting down", "Retry-After"),
    }
    query_fields = [{"name": name, "in": "query", "schema": schema} for name, schema in _FIELDS.items()]
    return {
        "openapi": "3.0.3",
        "info": {"title": "builder", "version": __version__,
                 "description": "Remote container image builder daemon (API v1)"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error", "code"],
                    "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
                },
                "Accepted": {
                    "type": "object", "required": ["build_id", "status", "image_name", "links"],
                    "properties": {
                        "build_id": {"type": "string"},
                        "status": {"type": "string", "enum": _STATUSES},
                        "image_name": _NULLABLE_STRING,
                        "links": {"type": "object", "required": ["self", "logs"],
                                  "properties": {"self": {"type": "string"}, "logs": {"type": "string"}}},
                    },
                },
                "Build": {
                    "type": "object",
                    "required": ["build_id", "status", "image_name", "image_ref", "image_id", "error",
                                 "created_at", "started_at", "finished_at", "last_event_id"],
                    "properties": {
                        "build_id": {"type": "string"},
                        "status": {"type": "string", "enum": _STATUSES},
                        **{name: _NULLABLE_STRING for name in (
                            "image_name", "image_ref", "image_id", "image_digest", "image_ref_digest", "error",
                            "started_at", "finished_at", "target", "cache_key", "image", "nydus_image_ref",
                            "nydus_status")},
                        "created_at": {"type": "string", "format": "date-time"},
                        "last_event_id": {"type": "integer", "minimum": 0},
                        "dockerfile": {"type": "string"},
                        "build_args": _STRING_MAP,
                        "labels": _STRING_MAP,
                        "no_cache": {"type": "boolean"},
                        "pull": {"type": "boolean"},
                        "nydus_convert": {"type": "boolean"},
                        "timeout": {"type": "number", "nullable": True},
                    },
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {"summary": "liveness", "security": [], "responses": {
                "200": {"description": "the process runs", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"status": {"type": "string"}}}}}}}}},
            "/readyz": {"get": {"summary": "readiness: the engine answers ping", "security": [], "responses": {
                "200": {"description": "ready", "content": {"application/json": {"schema": {"type": "object"}}}},
                "503": _error("the engine does not answer")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "text format 0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}},
                "401": _UNAUTHORIZED}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {
                "200": {"description": "OpenAPI 3.0", "content": {"application/json": {"schema": {"type": "object"}}}},
                "401": _UNAUTHORIZED}}},
            "/builds": {
                "get": {
                    "operationId": "listBuilds",
                    "summary": "list builds, newest first",
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string", "enum": _STATUSES}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                    ],
                    "responses": {
                        "200": {"description": "builds", "content": {"application/json": {"schema": {
                            "type": "object", "required": ["builds"],
                            "properties": {"builds": {"type": "array", "items": build_ref}}}}}},
                        "400": _BAD, "401": _UNAUTHORIZED,
                    },
                },
                "post": {
                    "operationId": "submitBuild",
                    "summary": "submit a build: a context (multipart or raw tar/gzip) or an image (JSON)",
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}},
                        *query_fields,
                    ],
                    "requestBody": {"required": True, "description": (
                        "Build secrets travel in the body only: multipart parts named `secret.<id>` (the raw "
                        "value), or `secrets` in a JSON body (base64 values); the raw-body shape refuses them "
                        f"in the query. {_SECRET_LIMITS}."
                    ), "content": {
                        "multipart/form-data": {"schema": {
                            "type": "object", "required": ["context"],
                            "properties": {"context": {"type": "string", "format": "binary"}, **_FIELDS}}},
                        "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
                        "application/gzip": {"schema": {"type": "string", "format": "binary"}},
                        "application/json": {"schema": {
                            "type": "object", "required": ["image"],
                            "properties": {"image": {"type": "string"}, "image_name": {"type": "string"},
                                           "no_cache": {"type": "boolean"}, "pull": {"type": "boolean"},
                                           "build_args": _STRING_MAP, "labels": _STRING_MAP,
                                           "secrets": {"type": "object", "description": f"id -> base64 value; "
                                                       f"{_SECRET_LIMITS}", "additionalProperties": {
                                                           "type": "string", "format": "byte"}}}}},
                    }},
                    "responses": post_responses,
                },
            },
            "/builds/{build_id}": {
                "parameters": [_BUILD_ID],
                "get": {"operationId": "getBuild", "summary": "a build's status", "responses": {
                    "200": {"description": "status", "content": {"application/json": {"schema": build_ref}}},
                    "401": _UNAUTHORIZED, "404": _NOT_FOUND, "410": _GONE}},
                "delete": {"operationId": "cancelBuild", "summary": "cancel and tear down", "responses": {
                    "200": {"description": "torn down (or already finished)",
                            "content": {"application/json": {"schema": build_ref}}},
                    "202": {"description": "teardown still running",
                            "content": {"application/json": {"schema": build_ref}}},
                    "401": _UNAUTHORIZED, "404": _NOT_FOUND, "410": _GONE}},
            },
            "/builds/{build_id}/logs": {
                "parameters": [_BUILD_ID],
                "get": {
                    "operationId": "getBuildLog",
                    "summary": "the build log: SSE (Accept: text/event-stream) or plain text",
                    "parameters": [
                        {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                        {"name": "follow", "in": "query", "schema": {"type": "string", "enum": ["true", "false"]}},
                        {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["sse", "text"]}},
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                    ],
                    "responses": {
                        "200": {"description": "the log", "content": {
                            # Per event: `id` counts from 1; `data` is one line of JSON (see the README).
                            "text/event-stream": {"schema": {
                                "type": "object", "required": ["id", "data"],
                                "properties": {"id": {"type": "string", "pattern": "^[0-9]+$"},
                                               "data": {"type": "string"}}}},
                            "text/plain": {"schema": {"type": "string"}}}},
                        "400": _BAD, "401": _UNAUTHORIZED, "404": _NOT_FOUND, "410": _GONE,
                    },
                },
            },
        },
    }
