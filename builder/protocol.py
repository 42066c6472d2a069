"""Wire contract shared by the daemon and the SDK (v1).

Only plain definitions live here: the client package may import this module
and nothing else from the server side.
"""

from __future__ import annotations

import enum
import json
from json.encoder import encode_basestring_ascii
from typing import Any


class BuildStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({BuildStatus.SUCCEEDED, BuildStatus.FAILED, BuildStatus.CANCELLED})

# Event types carried in the `type` field of every SSE `data` payload.
EVENT_LOG = "log"
EVENT_STATUS = "status"
EVENT_DONE = "done"
EVENT_ERROR = "error"
TERMINAL_EVENT_TYPES = frozenset({EVENT_DONE, EVENT_ERROR})

# A build step's states (a BuildKit vertex): it starts, unless cached, then ends once as
# done, cached, error or cancelled. And the streams its output comes from.
STEP_STARTED = "started"
STEP_DONE = "done"
STEP_CACHED = "cached"
STEP_ERROR = "error"
STEP_CANCELLED = "cancelled"

STDOUT = "stdout"
STDERR = "stderr"

# POST /builds: the multipart part that carries the context, and the JSON shape's base image.
# The other fields are declared, with their types, in builder/server/models.py (`BuildSpec`).
FIELD_CONTEXT = "context"
FIELD_IMAGE = "image"
# Build secrets: multipart parts `secret.<id>`, or a JSON object `{"<id>": "<base64>"}`; never a query field.
SECRET_PART_PREFIX = "secret."
FIELD_SECRETS = "secrets"

# The builders a request may ask for (`builder` field); the daemon picks one when it does not.
BUILDERS = ("buildkit", "legacy")

# `phase` of status events: a build step changed state, or the engine clipped a step's output.
PHASE_STEP = "step"
PHASE_LOG_CLIPPED = "log_clipped"
PHASE_LOG_TRUNCATED = "log_truncated"

# Names the daemon (its --replica-id) that gave a response: several may answer behind one address.
REPLICA_HEADER = "X-Builder-Replica"

DEFAULT_DOCKERFILE = "Dockerfile"
DEFAULT_SSE_RETRY_MS = 1000


def dump_event(payload: dict[str, Any]) -> str:
    """Serialise an event payload as the single JSON line an SSE `data:` carries."""
    # ensure_ascii keeps U+2028/U+2029 and any stray CR/LF escaped, so one
    # payload can never span two SSE lines.
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=True)


def dump_log_events(
    lines: list[str],
    step: int | None = None,
    stream: str | None = None,
    elapsed: float | None = None,
    *,
    continued: bool = False,
) -> list[str]:
    """`dump_event` of each line's log event, byte for byte, without the generic encoder (the hot
    path of a chatty build). With `continued`, the first line continues the previous event's."""
    if step is None:
        suffix = "}"
    else:
        timing = "" if elapsed is None else f',"elapsed":{elapsed:.3f}'
        suffix = f',"step":{step},"stream":{encode_basestring_ascii(stream or "stdout")}{timing}}}'
    datas = ['{"type":"log","line":' + encode_basestring_ascii(line) + suffix for line in lines]
    if continued and datas:
        datas[0] = datas[0][:-1] + ',"cont":true}'
    return datas


def is_terminal_event(payload: dict[str, Any]) -> bool:
    return payload.get("type") in TERMINAL_EVENT_TYPES


# Every payload is dumped with `type` first, so a terminal frame is known by its start.
_TERMINAL_PREFIXES = tuple(f'{{"type":"{t}"' for t in sorted(TERMINAL_EVENT_TYPES))


def is_terminal_data(data: str) -> bool:
    return data.startswith(_TERMINAL_PREFIXES)
