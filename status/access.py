"""Who may see /gate/* and /metrics (GATE_STATUS_ACCESS): public, admin or local.

``check`` is a pure function of the request's address and headers so that tests
can try every case, a non-loopback address included, without sockets.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from typing import Any, Protocol

from errors import Forbidden, Unauthorized
from limiter.identity import presented_secret as limiter_presented_secret

#: Sent with a 401 so that a browser asks for the key (any user name, the key as password)
#: and Prometheus or curl know they may send it as a Bearer token.
CHALLENGE = 'Basic realm="Ollama Gate status", charset="UTF-8", Bearer realm="Ollama Gate status"'


class Headers(Protocol):
    """Request headers: a dict in tests, werkzeug's Headers in a request."""

    def get(self, key: str) -> str | None: ...


class Keyring(Protocol):
    """What the limiter's keyring offers (the ``keys`` of the app's Pipeline)."""

    def lookup(self, secret: str) -> Any: ...


def is_loopback(addr: str | None) -> bool:
    """Whether ``addr`` is a loopback address (127.0.0.0/8, ::1, or ::ffff:127.x.x.x)."""
    if not addr:
        return False
    try:
        ip = ipaddress.ip_address(addr.strip().strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def presented_secret(headers: Headers) -> str | None:
    """The key a request presents: ``Authorization: Bearer``, Basic (the password), or x-api-key.

    Basic is for browsers, which ask for a user name and password; the rest is the
    limiter's own reading (limiter.identity).
    """
    authorization = headers.get("Authorization")
    scheme, _, value = (authorization or "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "basic" and value:
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        # A browser sends user:key; curl -u KEY: sends the key as the user name.
        return password or user or None
    found = limiter_presented_secret(authorization, headers.get("X-Api-Key"))
    return found[0] if found is not None else None


def is_admin_key(key: Any) -> bool:
    if key is None:
        return False
    flag = getattr(key, "is_admin", None)
    if isinstance(flag, bool):
        return flag
    return getattr(key, "role", None) == "admin"


def check(
    mode: str,
    remote_addr: str | None,
    headers: Headers,
    keyring: Keyring | None,
    *,
    trusted_proxies: int = 0,
    loopback_ok: bool = False,
) -> None:
    """Raise Unauthorized (401) or Forbidden (403) unless the request may see the status.

    ``remote_addr`` is the client's address after the trusted proxy hops (the
    limiter's ProxyFix rewrites it when GATE_TRUSTED_PROXIES is set).
    ``loopback_ok`` lets loopback in whatever the mode: /gate/healthz uses it.
    """
    if mode == "public":
        return
    # Behind a proxy the gate does not see through (GATE_TRUSTED_PROXIES=0), every request
    # arrives from the proxy's address, loopback for an nginx on the same host: a request
    # naming a forwarded client must not pass for a local one.
    proxied = trusted_proxies == 0 and any(
        headers.get(name) for name in ("X-Forwarded-For", "Forwarded", "X-Real-Ip")
    )
    local = is_loopback(remote_addr) and not proxied
    if loopback_ok and local:
        return
    if mode == "local":
        if not local:
            why = "a proxy" if proxied and is_loopback(remote_addr) else (remote_addr or "unknown")
            raise Forbidden(
                f"the gate's status is only shown to loopback clients (GATE_STATUS_ACCESS=local); "
                f"this request came from {why}"
            )
        return
    if mode == "admin":
        if keyring is None:
            raise Unauthorized(
                "GATE_STATUS_ACCESS=admin needs an admin API key, but the gate has no API keys: "
                'set GATE_API_KEYS_FILE to a keys file with a role = "admin" key'
            )
        secret = presented_secret(headers)
        if secret is None:
            raise Unauthorized(
                "the gate's status needs an admin API key: send Authorization: Bearer <key>",
                headers={"WWW-Authenticate": CHALLENGE},
            )
        key = keyring.lookup(secret)
        if key is None:
            raise Unauthorized("invalid API key", headers={"WWW-Authenticate": CHALLENGE})
        if not is_admin_key(key):
            name = getattr(key, "name", "?")
            raise Forbidden(f"API key {name!r} has role user; the gate's status needs role admin")
        return
    raise Forbidden(f"unknown GATE_STATUS_ACCESS mode {mode!r}")
