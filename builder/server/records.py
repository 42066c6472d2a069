"""Build records and log events: the data the service owns and the store persists."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any, NamedTuple, overload

from builder.protocol import BuildStatus, is_terminal_data
from builder.server.models import BuildSpec, BuildView

NYDUS_NOT_PERFORMED = "not performed: no nydusify tool is available on this daemon"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@overload
def rfc3339(value: dt.datetime) -> str: ...
@overload
def rfc3339(value: dt.datetime | None) -> str | None: ...
def rfc3339(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


class Event(NamedTuple):
    """One log event: its per-build id and the JSON line sent as SSE `data`."""

    id: int
    data: str
    terminal: bool

    @classmethod
    def of(cls, id: int, data: str) -> Event:
        return cls(id, data, is_terminal_data(data))


@dataclasses.dataclass(frozen=True, slots=True)
class EventRun:
    """Events with consecutive ids from `first_id`: the JSON line (SSE `data`) of each, in order.

    The form events take through the daemon, from the engine reader to the window, the store and
    the followers: a chatty build logs a hundred thousand lines a second, and an object per run
    of them, not one per event, is what lets its reader keep up with the engine (and leaves the
    garbage collector nothing to scan). Empty (falsy) when nothing follows `first_id - 1`.
    """

    first_id: int
    datas: Sequence[str] = ()

    def __len__(self) -> int:
        return len(self.datas)

    @property
    def last_id(self) -> int:
        return self.first_id + len(self.datas) - 1

    @property
    def terminal(self) -> bool:
        """Whether it ends with the build's terminal event (nothing follows one)."""
        return bool(self.datas) and is_terminal_data(self.datas[-1])


@dataclasses.dataclass
class BuildRecord:
    build_id: str
    spec: BuildSpec
    # The tenant whose token submitted it; "" when the daemon runs without auth.
    namespace: str = ""
    status: BuildStatus = BuildStatus.QUEUED
    created_at: dt.datetime = dataclasses.field(default_factory=utcnow)
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    image_ref: str | None = None
    image_id: str | None = None
    error: str | None = None
    image_digest: str | None = None
    image_ref_digest: str | None = None
    nydus_image_ref: str | None = None
    nydus_status: str | None = None
    last_event_id: int = 0
    # What teardown must remove, recorded as the engine reports it (survives restarts).
    containers: list[str] = dataclasses.field(default_factory=list)
    created_images: list[str] = dataclasses.field(default_factory=list)
    tags: list[str] = dataclasses.field(default_factory=list)
    # The replica running it (--replica-id): the one its cancels go to, and whose lease it lives by.
    owner: str = ""

    def to_public(self) -> BuildView:
        """The status JSON of GET /builds/{id}."""
        spec = self.spec
        return {
            "build_id": self.build_id,
            "status": self.status,
            "image_name": spec.image_name,
            "image_ref": self.image_ref,
            "image_id": self.image_id,
            "image_digest": self.image_digest,
            "image_ref_digest": self.image_ref_digest,
            "error": self.error,
            "created_at": rfc3339(self.created_at),
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at),
            "last_event_id": self.last_event_id,
            "dockerfile": spec.dockerfile,
            "build_args": spec.build_args,
            "labels": spec.labels,
            "target": spec.target,
            "no_cache": spec.no_cache,
            "pull": spec.pull,
            "cache_key": spec.cache_key,
            "timeout": spec.timeout,
            "image": spec.base_image,
            "builder": spec.builder,
            "nydus_convert": spec.nydus_convert,
            "nydus_image_ref": self.nydus_image_ref,
            "nydus_status": self.nydus_status,
            "replica": self.owner,
        }

    def to_storage(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        data["spec"] = self.spec.to_dict()
        for key in ("created_at", "started_at", "finished_at"):
            data[key] = rfc3339(getattr(self, key))
        return data

    @classmethod
    def from_storage(cls, data: dict[str, Any]) -> BuildRecord:
        data = dict(data)
        data["status"] = BuildStatus(data["status"])
        data["spec"] = BuildSpec.from_dict(data["spec"])
        for key in ("created_at", "started_at", "finished_at"):
            data[key] = _parse_time(data[key])
        return cls(**data)
