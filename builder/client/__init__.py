"""Async Python SDK for the builder daemon.

async with BuilderClient("http://127.0.0.1:8080") as client:
    result = await client.build("./app", image_name="app:dev", on_log=print)
    print(result.image_ref)
"""

from builder.client.client import BuilderClient, RetryPolicy
from builder.client.errors import (
    BuildCancelled,
    BuilderConnectionError,
    BuilderError,
    BuilderHTTPError,
    BuildFailed,
    ClientClosedError,
    ContextError,
)
from builder.client.models import (
    BuildEvent,
    BuildResult,
    DoneEvent,
    ErrorEvent,
    EventBatch,
    LogEvent,
    StatusEvent,
)

__all__ = [
    "BuildCancelled",
    "BuildEvent",
    "BuildFailed",
    "BuildResult",
    "BuilderClient",
    "BuilderConnectionError",
    "BuilderError",
    "BuilderHTTPError",
    "ClientClosedError",
    "ContextError",
    "DoneEvent",
    "ErrorEvent",
    "EventBatch",
    "LogEvent",
    "RetryPolicy",
    "StatusEvent",
]
