"""Build secrets as requests carry them: checked ids and sizes, and a digest that stands for them (pure).

A secret's value lives in memory only, for as long as its build: nothing here logs, stores or
names a value; messages name secret ids.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from typing import Any

from builder.server.errors import InvalidSecret

# The ids `RUN --mount=type=secret,id=…` can name, kept to what is safe in a multipart part name.
SECRET_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# BuildKit's own limit for one secret.
MAX_SECRET_BYTES = 500 * 1024
MAX_SECRETS = 100
# All of a build's values together: a queued build keeps them in memory while it waits.
MAX_SECRETS_BYTES = 1 << 20


def add_secret(secrets: dict[str, bytes], secret_id: str, value: bytes) -> None:
    """Add one secret to a build's, within the limits; InvalidSecret (400) if it does not fit."""
    if not SECRET_ID.fullmatch(secret_id):
        raise InvalidSecret(f"secret id {secret_id[:80]!r} must be 1 to 64 of A-Z, a-z, 0-9, '.', '_', '-'")
    if secret_id in secrets:
        raise InvalidSecret(f"secret {secret_id} is given twice")
    if len(secrets) >= MAX_SECRETS:
        raise InvalidSecret(f"a build may have at most {MAX_SECRETS} secrets")
    if len(value) > MAX_SECRET_BYTES:
        raise InvalidSecret(f"secret {secret_id} is larger than {MAX_SECRET_BYTES} bytes")
    if sum(map(len, secrets.values())) + len(value) > MAX_SECRETS_BYTES:
        raise InvalidSecret(f"a build's secrets may be at most {MAX_SECRETS_BYTES} bytes in all")
    secrets[secret_id] = value


def secrets_from_json(value: Any) -> dict[str, bytes]:
    """The `secrets` member of a JSON request: an object of base64 strings (absent or null: none)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidSecret("secrets must be a JSON object of base64 strings")
    secrets: dict[str, bytes] = {}
    for secret_id, encoded in value.items():
        if not isinstance(encoded, str):
            raise InvalidSecret(f"secret {secret_id[:80]!r} must be a base64 string")
        # Checked before decoding: an oversized value is refused without being decoded.
        if len(encoded) > 4 * (MAX_SECRET_BYTES // 3 + 1):
            raise InvalidSecret(f"secret {secret_id[:80]!r} is larger than {MAX_SECRET_BYTES} bytes")
        try:
            # Line breaks allowed: `base64` wraps its output at 76 columns.
            data = base64.b64decode("".join(encoded.split()), validate=True)
        except (binascii.Error, ValueError):
            # The message says where, never what: the value is a secret even when malformed.
            raise InvalidSecret(f"secret {secret_id[:80]!r} is not valid base64") from None
        add_secret(secrets, secret_id, data)
    return secrets


def secrets_digest(secrets: Mapping[str, bytes]) -> str:
    """What stands for a build's secrets where requests are compared (Idempotency-Key): sha256 over
    each id and the sha256 of its value, in id order. Empty for no secrets."""
    if not secrets:
        return ""
    digest = hashlib.sha256()
    for secret_id in sorted(secrets):
        digest.update(secret_id.encode() + b"\0" + hashlib.sha256(secrets[secret_id]).digest())
    return digest.hexdigest()
