"""Registry logins for the images builds pull (`FROM`), from Docker `config.json` files.

The daemon's file (`--registry-config`) serves every build; a tenant's own file
(`--tenant-registry-config TENANT=PATH`) serves that tenant's builds, and wins over the
daemon's for a registry both name. Only `auths` entries are read: `auth` (base64 of
`user:password`), or `username` and `password`, or an `identitytoken`. Credential helpers
(`credsStore`, `credHelpers`) are not run.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from builder.server.engines.base import CredentialsLookup

log = structlog.get_logger(__name__)

# (username, password); an identity token goes with an empty username, as Docker's CLI sends it.
Login = tuple[str, str]

# Docker Hub's names: config.json keys it as https://index.docker.io/v1/, BuildKit asks for
# registry-1.docker.io, people write docker.io.
_DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


def registry_host(name: str) -> str:
    """A registry as config.json keys and BuildKit asks name it, reduced to one spelling:
    `https://index.docker.io/v1/` and `registry-1.docker.io` -> `docker.io`,
    `http://127.0.0.1:5000/v2/` -> `127.0.0.1:5000`."""
    name = name.strip()
    host = urlsplit(name if "//" in name else f"//{name}").netloc.lower()
    return _DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def parse_docker_config(text: str, *, source: str = "config.json") -> dict[str, Login]:
    """Registry host -> login, from the text of a Docker config.json; ValueError naming `source`
    (never a credential) when it is not one."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError(f"{source}: not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: not a JSON object")
    auths = data.get("auths")
    if auths is None:
        auths = {}
    if not isinstance(auths, dict):
        raise ValueError(f"{source}: auths must be an object")
    logins: dict[str, Login] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: auths[{key!r}] must be an object")
        if (login := _login(entry, f"{source}: auths[{key!r}]")) is not None:
            logins[registry_host(key)] = login
    return logins


def _login(entry: Mapping[str, Any], where: str) -> Login | None:
    if encoded := entry.get("auth"):
        try:
            username, sep, password = base64.b64decode(str(encoded), validate=True).decode().partition(":")
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: auth is not base64 of user:password") from None
        if not sep:
            raise ValueError(f"{where}: auth is not base64 of user:password")
        return username, password
    if token := entry.get("identitytoken"):
        return "", str(token)
    if entry.get("username") or entry.get("password"):
        return str(entry.get("username") or ""), str(entry.get("password") or "")
    return None  # an entry a credential helper fills in: nothing here to use


class RegistryLogins:
    """The daemon's and each tenant's registry logins; `reload()` reads the files again (SIGHUP)."""

    def __init__(self, default: Path | None = None, by_tenant: Mapping[str, Path] | None = None) -> None:
        self._paths = (default, dict(by_tenant or {}))
        self._default: dict[str, Login] = {}
        self._by_tenant: dict[str, dict[str, Login]] = {}
        self.reload()

    def reload(self) -> None:
        """Read every file; one that cannot be read or parsed raises and the old logins stay."""
        default_path, tenant_paths = self._paths
        default = _read(default_path) if default_path is not None else {}
        by_tenant = {tenant: _read(path) for tenant, path in tenant_paths.items()}
        self._default, self._by_tenant = default, by_tenant
        log.info(
            "registry_logins_loaded",
            registries=sorted(default),
            tenants={tenant: sorted(logins) for tenant, logins in by_tenant.items()},
        )

    def login(self, tenant: str, host: str) -> Login | None:
        """The login for `host` in `tenant`'s builds: the tenant's own, else the daemon's."""
        registry = registry_host(host)
        own = self._by_tenant.get(tenant, {})
        return own.get(registry) or self._default.get(registry)

    def for_tenant(self, tenant: str) -> CredentialsLookup | None:
        """What a build of `tenant` asks for logins, or None when no file serves it."""
        if self._paths[0] is None and tenant not in self._paths[1]:
            return None
        return functools.partial(self.login, tenant)


def _read(path: Path) -> dict[str, Login]:
    return parse_docker_config(path.read_text(), source=str(path))
