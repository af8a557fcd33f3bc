"""Who a client is: the address its limits are counted under, and the secret it presents."""

from __future__ import annotations

import functools
import ipaddress


@functools.lru_cache(maxsize=16384)  # parsing an address costs more than the rest of a 429
def client_address(addr: str | None) -> str:
    """The rate-limit identity of a client address.

    IPv4 addresses count as themselves. An IPv6 client counts by its /64: one
    host is usually given a whole /64 and could otherwise take a fresh address,
    and so a fresh bucket, for every request. IPv4-mapped IPv6 counts as IPv4.
    """
    if not addr:
        return "unknown"
    try:
        ip = ipaddress.ip_address(addr.strip())
    except ValueError:
        return addr.strip()  # a unix socket or something else ProxyFix passed on: as is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def presented_secret(authorization: str | None, x_api_key: str | None) -> tuple[str, str] | None:
    """(secret, header it came in) from ``Authorization: Bearer <secret>``, else ``x-api-key``.

    ollama-python (OLLAMA_API_KEY) and the OpenAI SDKs send the Bearer form; the
    Anthropic SDKs, which some clients point at /v1/messages, send x-api-key.
    """
    if authorization:
        scheme, _, secret = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and secret.strip():
            return secret.strip(), "authorization"
    if x_api_key and x_api_key.strip():
        return x_api_key.strip(), "x-api-key"
    return None
