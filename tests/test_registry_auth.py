"""Registry logins from Docker config.json files (pure, plus the files' reading)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from builder.server.registry_auth import RegistryLogins, parse_docker_config, registry_host


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("name", "host"),
    [
        ("registry.example:5000", "registry.example:5000"),
        ("http://127.0.0.1:5000/v2/", "127.0.0.1:5000"),
        ("https://Registry.Example", "registry.example"),
        ("https://index.docker.io/v1/", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("docker.io", "docker.io"),
    ],
)
def test_registry_names_reduce_to_one_spelling(name: str, host: str) -> None:
    assert registry_host(name) == host


def test_config_json_logins_in_each_spelling() -> None:
    config = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": _auth("hub-user", "p:with:colons")},
            "registry.example": {"username": "plain", "password": "pw"},
            "oauth.example": {"identitytoken": "refresh-token"},
            "helper.example": {},  # filled in by a credential helper: nothing to use here
        },
        "credsStore": "desktop",
    }
    assert parse_docker_config(json.dumps(config)) == {
        "docker.io": ("hub-user", "p:with:colons"),
        "registry.example": ("plain", "pw"),
        "oauth.example": ("", "refresh-token"),
    }


def test_a_config_without_auths_has_no_logins() -> None:
    assert parse_docker_config('{"credsStore": "desktop"}') == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not valid JSON"),
        ("[]", "not a JSON object"),
        ('{"auths": []}', "auths must be an object"),
        ('{"auths": {"r.example": "x"}}', "must be an object"),
        ('{"auths": {"r.example": {"auth": "%%%"}}}', "not base64"),
        (
            json.dumps({"auths": {"r.example": {"auth": base64.b64encode(b"no-colon").decode()}}}),
            "not base64 of user:password",
        ),
    ],
)
def test_a_broken_config_is_refused_naming_the_file_and_never_a_credential(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        parse_docker_config(text, source="/etc/builder/config.json")
    assert str(refused.value).startswith("/etc/builder/config.json: ")
    assert "no-colon" not in str(refused.value)


def _write(path: Path, logins: dict[str, tuple[str, str]]) -> Path:
    path.write_text(json.dumps({"auths": {host: {"auth": _auth(*login)} for host, login in logins.items()}}))
    return path


def test_a_tenants_own_login_wins_and_the_daemons_fills_in(tmp_path: Path) -> None:
    daemon = _write(tmp_path / "daemon.json", {"shared.example": ("d", "1"), "both.example": ("d", "2")})
    tenant = _write(tmp_path / "a.json", {"both.example": ("a", "3"), "own.example": ("a", "4")})
    logins = RegistryLogins(daemon, {"tenant-a": tenant})
    a = logins.for_tenant("tenant-a")
    b = logins.for_tenant("tenant-b")
    assert a is not None and b is not None
    assert (a("both.example"), a("shared.example"), a("own.example")) == (("a", "3"), ("d", "1"), ("a", "4"))
    assert (b("both.example"), b("own.example"), b("unknown.example")) == (("d", "2"), None, None)


def test_without_files_builds_get_no_lookup(tmp_path: Path) -> None:
    assert RegistryLogins().for_tenant("") is None
    tenant_only = RegistryLogins(None, {"tenant-a": _write(tmp_path / "a.json", {"r.example": ("a", "1")})})
    assert tenant_only.for_tenant("tenant-b") is None
    lookup = tenant_only.for_tenant("tenant-a")
    assert lookup is not None and lookup("r.example") == ("a", "1")


def test_reload_reads_the_files_again_and_a_broken_one_keeps_the_old_logins(tmp_path: Path) -> None:
    path = _write(tmp_path / "config.json", {"r.example": ("user", "old")})
    logins = RegistryLogins(path)
    _write(path, {"r.example": ("user", "new")})
    logins.reload()
    assert logins.login("", "r.example") == ("user", "new")
    path.write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        logins.reload()
    assert logins.login("", "r.example") == ("user", "new")


def test_a_missing_file_is_an_error_at_start(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        RegistryLogins(tmp_path / "absent.json")
