"""Host names and addresses (pure)."""

from __future__ import annotations

import ipaddress


def is_loopback(address: str) -> bool:
    """localhost or a loopback IP, with or without a port ("127.0.0.1:5000", "[::1]:5000", "::1")."""
    host = address
    if host.startswith("[") and "]" in host:
        host = host[1 : host.index("]")]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_part(authority: str) -> str:
    """The host of `host[:port]` (brackets of an IPv6 literal kept off)."""
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def open_mode_refusal(host: str | None, origin: str | None, listen_host: str) -> str | None:
    """Why a request to a daemon without tokens must be refused, if it must.

    Without tokens anyone who reaches the daemon can build, so it must not be reachable from a
    web page: a foreign `Host` is DNS rebinding (a name of the attacker's that resolves to
    127.0.0.1), a foreign `Origin` a cross-site request.
    """
    allowed = {"localhost"}
    if listen_host not in ("", "0.0.0.0", "::"):
        allowed.add(_host_part(listen_host).lower())
    wildcard = listen_host in ("", "0.0.0.0", "::")

    def trusted(name: str) -> bool:
        name = name.lower().rstrip(".")
        # Bound to every address (with --insecure), an address is fine: rebinding needs a name.
        return name in allowed or is_loopback(name) or (wildcard and _is_ip(name))

    # No Host at all (HTTP/1.0) is no browser's: browsers always send one.
    if host is not None and not trusted(_host_part(host.strip())):
        return f"Host {host!r} is not a loopback name or address; this daemon has no auth tokens"
    if origin is not None:
        scheme, sep, authority = origin.strip().partition("://")
        if not sep or scheme not in ("http", "https") or not trusted(_host_part(authority.split("/", 1)[0])):
            return f"cross-site request from Origin {origin!r}; this daemon has no auth tokens"
    return None
