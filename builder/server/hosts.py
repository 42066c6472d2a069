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
