"""Typed application state."""

from __future__ import annotations

import weakref

from aiohttp import web

from builder.server.auth import TokenTable
from builder.server.cluster import Cluster
from builder.server.config import Settings
from builder.server.engines.pool import EnginePool
from builder.server.registry_auth import RegistryLogins
from builder.server.service import BuildService
from builder.server.streams import LogStreamResponse, StreamPinger

SETTINGS = web.AppKey("settings", Settings)
TOKENS = web.AppKey("tokens", TokenTable)
REGISTRY_LOGINS = web.AppKey("registry_logins", RegistryLogins)
# The caller's namespace, from its token ("" when the daemon runs without auth).
NAMESPACE = web.RequestKey("namespace", str)
ENGINES = web.AppKey("engines", EnginePool)
# The store, and how this daemon reaches the others sharing it (cluster mode).
CLUSTER = web.AppKey("cluster", Cluster)
SERVICE = web.AppKey("service", BuildService)
# Open log streams, ended on shutdown so it does not wait on them.
STREAMS = web.AppKey("streams", weakref.WeakSet[LogStreamResponse])
PINGER = web.AppKey("pinger", StreamPinger)
