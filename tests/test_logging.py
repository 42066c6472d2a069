"""Log lines from the standard library's loggers are structured like structlog's own."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from builder.observability import configure_logging

pytestmark = pytest.mark.unit


@pytest.fixture
def json_logging() -> Iterator[None]:
    """Restores logging after a test that configured it (in its body, where stdout is captured)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.contextvars.clear_contextvars()


def _lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_aiohttp_logger_lines_are_json_with_the_request_id(
    json_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "info")
    structlog.contextvars.bind_contextvars(request_id="r-123", build_id="b-9")
    logging.getLogger("aiohttp.server").error("Error handling request")
    structlog.get_logger("builder").info("own_line")
    foreign, own = _lines(capsys.readouterr().out)
    assert foreign["event"] == "Error handling request" and foreign["level"] == "error"
    assert foreign["logger"] == "aiohttp.server"
    assert foreign["request_id"] == own["request_id"] == "r-123" and foreign["build_id"] == "b-9"
    assert "timestamp" in foreign


async def test_an_unretrieved_task_exception_is_one_json_line_with_its_traceback(
    json_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "info")

    async def fails() -> None:
        raise RuntimeError("nobody looked")

    task = asyncio.ensure_future(fails())
    await asyncio.sleep(0)
    del task
    gc.collect()
    [line] = [entry for entry in _lines(capsys.readouterr().out) if entry.get("logger") == "asyncio"]
    assert str(line["event"]).startswith("Task exception was never retrieved")
    assert "RuntimeError: nobody looked" in str(line["exception"])
