"""Which images a tenant's build may reach (pure).

Tenants share one engine, where tenant T's images are tagged `T/<name>:<tag>` and pushed to
`<registry>/T/<name>:<tag>`. A build of namespace N may use
  (a) images under N,
  (b) images matching an `--allow-base-image` glob, and, only when no glob is configured,
  (c) images under no tenant namespace at all (`builder-busybox:latest`, Docker Hub images).

An image is under tenant T when its repository path starts with `T/`, on any registry host:
the daemon's registry answers to more names than `--registry` gives (127.0.0.1, localhost,
the host's name), so the host cannot tell a tenant's pushed image from another registry's.
A namespace that looks like a host (`acme.io`) is also matched as the host, since the engine
reads the local tag `acme.io/app` that way.

Open mode (no tokens, namespace "") has a single tenant: there is nothing to keep apart and
no policy to build; `ImagePolicy` refuses to be made for it so that callers say so.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable, Sequence

from builder.server.dockerfile_refs import ImageReference
from builder.server.errors import ImageNotAllowed, InvalidImageReference
from builder.server.imageref import NormalisedReference, normalise_reference


class ImagePolicy:
    """The images namespace `namespace` may reach; `check` raises `ImageNotAllowed` otherwise.

    `tenant_namespaces` are all tenants' namespaces (the caller's may be among them).
    `allowed` are fnmatch globs (`*` also matches `/`) tried on the normalised reference,
    e.g. `docker.io/library/builder-busybox:*`, and on its short form, `builder-busybox:*`.
    `registry` is the daemon's `--registry HOST[:PORT]`: its prefix is dropped, so
    `<registry>/tenant/app:v1` and `tenant/app:v1` normalise alike.
    """

    def __init__(
        self,
        namespace: str,
        tenant_namespaces: Collection[str],
        allowed: Sequence[str] = (),
        registry: str | None = None,
    ) -> None:
        if not namespace:
            raise ValueError("open mode (namespace '') has one tenant: it needs no image policy")
        self.namespace = namespace
        self._tenants = frozenset(tenant for tenant in tenant_namespaces if tenant) | {namespace}
        self._allowed = tuple(allowed)
        self._registry = registry.lower() if registry else None

    def check(self, refs: Iterable[ImageReference]) -> None:
        """Raise `ImageNotAllowed` for the first reference this namespace may not use."""
        for ref in refs:
            self._check(ref)

    def _check(self, ref: ImageReference) -> None:
        local = self._without_registry(ref.normalised)
        owners = self._owners(ref.normalised) | self._owners(local)
        if owners == {self.namespace}:
            return
        forms = (str(local), local.familiar)
        if any(fnmatch.fnmatchcase(form, pattern) for pattern in self._allowed for form in forms):
            return
        if not owners and not self._allowed:
            return
        where = f"line {ref.line}: " if ref.line else ""
        if owners:
            why = "is in another tenant's namespace"
        else:
            why = "matches no --allow-base-image pattern"
        raise ImageNotAllowed(
            f"{where}{ref.origin} {ref.reference} ({local}) {why}; this build may use images under "
            f"{self.namespace}/{self._allowance}"
        )

    @property
    def _allowance(self) -> str:
        if self._allowed:
            return " and images matching " + ", ".join(self._allowed)
        return " and images outside every tenant namespace"

    def _without_registry(self, ref: NormalisedReference) -> NormalisedReference:
        """`ref` as the local tag the daemon pushed it from: how patterns see it."""
        if self._registry is None or ref.domain.lower() != self._registry:
            return ref
        try:
            return normalise_reference(ref.remainder)
        except InvalidImageReference:  # too long once `docker.io/library/` is added
            return ref

    def _owners(self, ref: NormalisedReference) -> set[str]:
        first = ref.path.partition("/")[0]
        return {tenant for tenant in self._tenants if tenant in (first, ref.domain.lower())}
