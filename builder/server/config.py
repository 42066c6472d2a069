"""Daemon settings: one frozen object, built by the CLI or by tests."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

from builder.protocol import DEFAULT_SSE_RETRY_MS

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = 8080
    max_concurrent: int = 2
    # The builder a build gets unless it asks: buildkit | legacy | auto (BuildKit when the engine has it).
    builder: str = "auto"
    max_context_bytes: int = 2 * GIB
    # Limits on what an upload unpacks to (a gzip bomb stops here, before the engine sees it).
    max_context_unpacked_bytes: int = 8 * GIB
    max_context_entries: int = 200_000
    # An upload that sends nothing for this long is dropped (slow loris), and one that takes longer
    # than upload_timeout in all (a trickle of a byte per idle timeout).
    upload_idle_timeout: float = 60.0
    upload_timeout: float = 3600.0
    # A connection that has not sent a whole request head this long after it opened (or after its
    # previous response) is dropped.
    header_timeout: float = 10.0
    # Open connections, in all (0: as many as the descriptor limit allows) and per client address.
    max_connections: int = 0
    max_connections_per_client: int = 1024
    # Passed to the engine for every build container: bytes of memory, CPUs, network mode.
    build_memory: int | None = None
    build_cpus: float | None = None
    build_network: str = "bridge"
    docker_host: str | None = dataclasses.field(default_factory=lambda: os.environ.get("DOCKER_HOST"))
    # Tenants whose builds run on an engine of their own: (namespace, DOCKER_HOST) pairs.
    tenant_engines: tuple[tuple[str, str], ...] = ()
    # Bearer tokens: `token namespace` lines in a file (env BUILDER_AUTH_TOKENS_FILE), and/or
    # "t1=ns1,t2=ns2" (env BUILDER_AUTH_TOKENS).
    auth_tokens_file: Path | None = dataclasses.field(
        default_factory=lambda: Path(path) if (path := os.environ.get("BUILDER_AUTH_TOKENS_FILE")) else None
    )
    auth_tokens: str | None = dataclasses.field(
        default_factory=lambda: os.environ.get("BUILDER_AUTH_TOKENS"), repr=False
    )
    # A token that may read /metrics (and nothing else); tenant tokens may read it too.
    metrics_token: str | None = dataclasses.field(
        default_factory=lambda: os.environ.get("BUILDER_METRICS_TOKEN"), repr=False
    )
    # Base images every tenant may build from (fnmatch globs on references); none: any image
    # under no tenant's namespace.
    allow_base_images: tuple[str, ...] = ()
    # Without tokens the daemon is open to anyone who reaches it: loopback only, unless this.
    insecure: bool = False
    log_format: str = "auto"  # json | console | auto (json unless stdout is a TTY)
    log_level: str = "info"
    # A build running longer is torn down like a DELETE and fails; a request may ask for less.
    build_timeout: float = 3600.0
    # Builds waiting beyond this many are refused with 429, and beyond this many of one tenant's.
    max_queue: int = 100
    max_queue_per_tenant: int = 25
    # Per tenant: bytes of contexts waiting on the spool, uploads at once, open log streams.
    max_spool_bytes_per_tenant: int = 8 * GIB
    max_uploads_per_tenant: int = 8
    max_followers_per_tenant: int = 1000
    # On SIGTERM, running builds get this long to finish before they are torn down.
    shutdown_grace: float = 30.0
    # DELETE waits this long for teardown before answering 202.
    cancel_wait: float = 10.0
    # How often buffered log events are committed to the store, in one transaction (None: 50 ms
    # alone, where a commit is a SQLite transaction; 10 ms in cluster mode, where followers on
    # other replicas see events only once committed, and a commit is one Redis round trip).
    flush_interval: float | None = None
    # Longest output line kept whole (longer ones are cut into continuation events), and the most
    # output a build's log keeps (past it, the build goes on and its log says so).
    max_log_line: int = 64 * 1024
    max_log_bytes: int = 100 * 1024 * 1024
    # Recent events kept in memory per running build, shared by its followers; one
    # further behind catches up from the store.
    log_window: int = 100_000
    # A woken follower waits this long for more events before writing (fewer, larger writes).
    follower_coalesce: float = 0.01
    # Finished builds' records and logs are kept this long, and at most max_builds of them per tenant.
    retention: float = 7 * 24 * 3600
    max_builds: int = 10_000
    retention_interval: float = 60.0
    # Registry to push results to (HOST[:PORT]); none keeps images local.
    registry: str | None = None
    registry_username: str | None = None
    registry_password: str | None = dataclasses.field(
        default_factory=lambda: os.environ.get("BUILDER_REGISTRY_PASSWORD"), repr=False
    )
    # Docker config.json files with logins for the registries builds pull from (`FROM`): the
    # daemon's, and (tenant, path) pairs of tenants' own.
    registry_config: Path | None = None
    tenant_registry_configs: tuple[tuple[str, Path], ...] = ()
    # Keep the local image after a push (a failed push keeps it either way when true).
    keep_local: bool = True
    # The nydus conversion tool; used only when found on PATH (or at this path).
    nydusify: str = "nydusify"
    # Cluster mode: daemons sharing one Redis share builds, logs, cancels and Idempotency-Keys.
    # Each has a stable replica id and its own engine; one that misses heartbeats for lease_ttl
    # seconds is lost, and another fails its builds.
    redis_url: str | None = dataclasses.field(default_factory=lambda: os.environ.get("BUILDER_REDIS_URL"))
    replica_id: str = dataclasses.field(default_factory=socket.gethostname)
    lease_ttl: float = 10.0
    sse_retry_ms: int = DEFAULT_SSE_RETRY_MS
    sse_ping_interval: float = 15.0

    @property
    def commit_interval(self) -> float:
        if self.flush_interval is not None:
            return self.flush_interval
        return 0.01 if self.redis_url else 0.05

    @property
    def database_path(self) -> Path:
        return self.data_dir / "builds.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "contexts"
