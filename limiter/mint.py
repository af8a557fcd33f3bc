"""Mint an API key: ``python -m limiter.mint NAME [--role admin] [--tokens-per-minute N]``.

Prints the secret once (the gate keeps only its SHA-256, so it cannot be shown
again) and the TOML stanza to paste into the keys file (GATE_API_KEYS_FILE).
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
from collections.abc import Sequence

from .keys import ROLES, hash_secret, parse_keys

PREFIX = "og-"  # makes a leaked gate key recognisable in logs and secret scanners


def new_secret() -> str:
    """A fresh secret: 256 random bits, URL-safe."""
    return PREFIX + secrets.token_urlsafe(32)


def stanza(name: str, secret: str, role: str = "user", tokens_per_minute: int | None = None) -> str:
    """The keys-file table for a key (checked by the keys file parser before it is shown)."""
    # Bare TOML keys are letters, digits, _ and -; "alice.b" unquoted would be a nested table.
    table = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'
    lines = [
        f"[keys.{table}]",
        f'key_sha256 = "{hash_secret(secret)}"',
        f'role = "{role}"',
    ]
    if tokens_per_minute is not None:
        lines.append(f"tokens_per_minute = {tokens_per_minute}")
    text = "\n".join(lines) + "\n"
    parse_keys(text, "<minted stanza>")  # raises KeysFileError for a name the file cannot hold
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m limiter.mint", description="Mint an API key for Ollama Gate."
    )
    parser.add_argument("name", help="the key's name: who it is for (letters, digits, . _ @ + -)")
    parser.add_argument(
        "--role", choices=ROLES, default="user", help="admin may pull/push/create/copy/delete"
    )
    parser.add_argument(
        "--tokens-per-minute", type=int, metavar="N", help="token budget (prompt + completion)"
    )
    args = parser.parse_args(argv)
    if args.tokens_per_minute is not None and args.tokens_per_minute < 1:
        parser.error("--tokens-per-minute must be 1 or more")
    secret = new_secret()
    try:
        text = stanza(args.name, secret, args.role, args.tokens_per_minute)
    except ValueError as exc:
        parser.error(str(exc).replace("<minted stanza> line 1: ", ""))
    print(f"API key for {args.name} (shown once; the gate stores only its SHA-256):")
    print()
    print(f"    {secret}")
    print()
    print("Add this to the keys file (GATE_API_KEYS_FILE) and restart the gate:")
    print()
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
