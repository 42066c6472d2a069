"""GET /openapi.json describes the API truthfully: schemathesis, through its Python API, finds no 5xx
and no off-spec answer, one operation at a time and in chains along the document's links."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import hypothesis
import schemathesis

from builder.server.app import create_app
from builder.server.config import Settings

TOKEN = "st-token"
# A fixed seed: CI runs the same cases every time (change it to explore further).
SEED = 20261122
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    # Stateful: a build just accepted can be read at once; every operation but the probes wants the token.
    "ensure_resource_availability",
    "ignored_auth",
    # Not `use_after_free`: DELETE cancels a build, whose record (status `cancelled`) and log stay readable.
)


def _config(base_url: str) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "base-url": base_url,
            # Through the document's security scheme, so that `ignored_auth` knows the token is the real one.
            "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
            "request-timeout": 30,
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
            "generation": {"database": "none"},
        }
    )


def _settings(max_examples: int, **kwargs: Any) -> hypothesis.settings:
    # No shrinking (a failure is reported as found) and no example database (every run tries the same).
    return hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
        **kwargs,
    )


def _fuzz(base_url: str) -> list[str]:
    """Each operation on its own, then chains along the links (POST -> GET/DELETE); blocking."""
    schema = schemathesis.openapi.from_url(
        f"{base_url}/openapi.json", config=_config(base_url), headers={"Authorization": f"Bearer {TOKEN}"}
    )
    tested = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @hypothesis.seed(SEED)
        @_settings(100)
        @hypothesis.given(case=operation.as_strategy())
        def each(case: schemathesis.Case) -> None:
            case.call_and_validate()

        each()
        tested.append(operation.label)
    machine = schema.as_state_machine()
    hypothesis.seed(SEED)(machine)
    machine.run(settings=_settings(50, stateful_step_count=6))
    return tested


async def test_openapi_document_holds_against_the_running_daemon(
    aiohttp_client: Any, settings: Settings, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, auth_tokens=f"{TOKEN}=fuzz")))
    assert (await client.get("/openapi.json")).status == 401
    base_url = str(client.make_url("")).rstrip("/")
    # The daemon serves on this loop; schemathesis's blocking client runs beside it.
    tested = await asyncio.wait_for(asyncio.to_thread(_fuzz, base_url), 600)
    assert {
        "POST /builds",
        "GET /builds/{build_id}",
        "DELETE /builds/{build_id}",
        "GET /builds/{build_id}/logs",
    } <= set(tested)
