"""Bearer tokens, each mapped to a namespace (tenant); reloadable on SIGHUP."""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import structlog

from builder.server.errors import BuilderError

log = structlog.get_logger(__name__)

# A namespace becomes the first path component of image names: keep it a valid one.
_NAMESPACE_RE = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?", re.ASCII)


class Unauthorized(BuilderError):
    status = 401
    code = "unauthorized"
    response_headers: ClassVar[Mapping[str, str]] = {"WWW-Authenticate": 'Bearer realm="builder"'}


class TokenTable:
    """Token -> namespace, from `--auth-tokens-file` and/or `BUILDER_AUTH_TOKENS`."""

    def __init__(self, *, path: Path | None = None, env: str | None = None) -> None:
        self._path = path
        self._env = env
        self._tokens: list[tuple[bytes, str]] = []
        self.reload()

    @property
    def enabled(self) -> bool:
        return bool(self._path or self._env)

    @property
    def namespaces(self) -> frozenset[str]:
        """Every tenant's namespace."""
        return frozenset(namespace for _, namespace in self._tokens)

    def reload(self) -> None:
        """Read the tokens again; a broken file keeps the previous table (and says why)."""
        pairs: list[tuple[str, str]] = []
        if self._env:
            for item in self._env.split(","):
                token, sep, namespace = item.strip().partition("=")
                if item.strip():
                    pairs.append(_pair(token, namespace if sep else "", "BUILDER_AUTH_TOKENS"))
        if self._path is not None:
            for number, line in enumerate(self._path.read_text().splitlines(), start=1):
                line = line.split("#", 1)[0].strip()
                if line:
                    token, _, namespace = line.partition(" ")
                    pairs.append(_pair(token, namespace.strip(), f"{self._path}:{number}"))
        self._tokens = [(token.encode(), namespace) for token, namespace in pairs]
        log.info("auth_tokens_loaded", count=len(self._tokens))

    def namespace(self, authorization: str | None) -> str:
        """The caller's namespace; Unauthorized unless the header carries a known token."""
        if not self.enabled:
            return ""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("this daemon needs an Authorization: Bearer <token> header")
        offered = token.strip().encode()
        found = None
        # Compare with every token, in constant time each, so timing tells nothing.
        for known, namespace in self._tokens:
            if hmac.compare_digest(known, offered):
                found = namespace
        if found is None:
            raise Unauthorized("the bearer token is not valid")
        return found


# Names whose images are not a tenant's: Docker Hub's official images (`library/…`).
_RESERVED_NAMESPACES = frozenset({"library"})


def _pair(token: str, namespace: str, where: str) -> tuple[str, str]:
    if not token or not _NAMESPACE_RE.fullmatch(namespace):
        raise ValueError(f"{where}: expected 'token namespace' with a lowercase namespace, got {namespace!r}")
    if namespace in _RESERVED_NAMESPACES or "." in namespace:
        # `library/x` is Docker Hub's `x`, and `a.b/x` names a registry host `a.b`: images in
        # such a namespace could not be told from images outside every tenant.
        raise ValueError(f"{where}: namespace {namespace!r} is reserved or looks like a registry host")
    return token, namespace
