"""Prometheus metrics of one daemon (a registry per app, so tests and replicas stay apart)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_BUILD_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
_TEARDOWN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, float("inf"))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.builds = Counter("builder_builds", "Builds finished, by final status", ["status"], registry=self.registry)
        self.build_seconds = Histogram(
            "builder_build_duration_seconds",
            "Build run time, start to end",
            buckets=_BUILD_BUCKETS,
            registry=self.registry,
        )
        self.upload_bytes = Counter("builder_upload_bytes", "Context bytes received", registry=self.registry)
        self.teardown_seconds = Histogram(
            "builder_cancel_teardown_seconds",
            "From a cancel request to a torn-down build",
            buckets=_TEARDOWN_BUCKETS,
            registry=self.registry,
        )
        self._queue = Gauge("builder_queue_depth", "Builds waiting to start", registry=self.registry)
        self._running = Gauge("builder_builds_running", "Builds running now", registry=self.registry)
        self._streams = Gauge("builder_log_streams", "Open log streams", registry=self.registry)
        self._unsent = Gauge(
            "builder_log_stream_unsent_bytes",
            "Bytes open log streams hold because their clients' sockets have not taken them",
            registry=self.registry,
        )

    def observe(
        self, *, queued: Callable[[], float], running: Callable[[], float], streams: Callable[[], float]
    ) -> None:
        """Gauges read live from the service when scraped."""
        self._queue.set_function(queued)
        self._running.set_function(running)
        self._streams.set_function(streams)

    def observe_unsent(self, unsent: Callable[[], float]) -> None:
        self._unsent.set_function(unsent)

    def render(self) -> bytes:
        return generate_latest(self.registry)
