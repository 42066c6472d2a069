"""The engines a daemon builds on: its own, and one per tenant that has an engine of its own
(`--tenant-engine TENANT=DOCKER_HOST`), so that tenant shares no cache with anyone."""

from __future__ import annotations

from collections.abc import Mapping

from builder.server.engines.docker import BuildLimits, DockerEngine


class EnginePool:
    def __init__(self, default: DockerEngine, by_tenant: Mapping[str, DockerEngine] | None = None) -> None:
        self.default = default
        self._by_tenant = dict(by_tenant or {})

    @classmethod
    def connect(cls, docker_host: str | None, tenant_hosts: Mapping[str, str], *, limits: BuildLimits) -> EnginePool:
        return cls(
            DockerEngine.connect(docker_host, limits=limits),
            {tenant: DockerEngine.connect(host, limits=limits) for tenant, host in tenant_hosts.items()},
        )

    @property
    def by_tenant(self) -> Mapping[str, DockerEngine]:
        return self._by_tenant

    def for_tenant(self, namespace: str) -> DockerEngine:
        return self._by_tenant.get(namespace, self.default)

    def all(self) -> list[DockerEngine]:
        return [self.default, *self._by_tenant.values()]

    async def close(self) -> None:
        for engine in self.all():
            await engine.close()
