"""GET /openapi.json describes the API truthfully: schemathesis finds no 5xx and no off-spec response."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from builder.server.app import create_app
from builder.server.config import Settings

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance"


async def test_openapi_document_holds_against_the_running_daemon(
    aiohttp_client: Any, settings: Settings, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, auth_tokens="st-token=fuzz")))
    assert (await client.get("/openapi.json")).status == 401
    document = await (await client.get("/openapi.json", headers={"Authorization": "Bearer st-token"})).json()
    assert {"/builds", "/builds/{build_id}", "/builds/{build_id}/logs", "/healthz", "/readyz", "/metrics"} <= set(
        document["paths"]
    )
    st = Path(sys.executable).with_name("st")
    proc = await asyncio.create_subprocess_exec(
        str(st), "run", str(client.make_url("/openapi.json")), "-H", "Authorization: Bearer st-token",
        # A fixed seed: CI runs the same cases every time (change it to explore further).
        "--checks", CHECKS, "--max-examples", "20", "--request-timeout", "30", "--seed", "20261122",
        cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(proc.communicate(), 300))[0].decode()
    assert proc.returncode == 0, output[-4000:]
    assert " passed" in output and "failed" not in output.split("Test cases:")[-1]
