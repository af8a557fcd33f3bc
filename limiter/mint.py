"""Mint an API key: ``python -m limiter.mint NAME [options] >> keys.toml``.

Writes the TOML stanza for the keys file (GATE_API_KEYS_FILE), and nothing else,
on stdout, so that it can be appended to the file as it is; the secret and what
to do with it go to stderr. The secret is shown once: the gate keeps only its
SHA-256.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
from collections.abc import Sequence

from workqueue.core import DEFAULT_PRIORITY, PRIORITIES

from .allow import check_pattern
from .keys import ROLES, hash_secret, parse_keys

PREFIX = "og-"  # makes a leaked gate key recognisable in logs and secret scanners


def new_secret() -> str:
    """A fresh secret: 256 random bits, URL-safe."""
    return PREFIX + secrets.token_urlsafe(32)


def stanza(
    name: str,
    secret: str,
    role: str = "user",
    tokens_per_minute: int | None = None,
    models: Sequence[str] | None = None,
    max_waiting: int | None = None,
    max_running: int | None = None,
    priority: str = DEFAULT_PRIORITY,
) -> str:
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
    if models is not None:
        # A JSON list of plain strings is a TOML array as well.
        lines.append(f"models = {json.dumps(list(models))}")
    if max_waiting is not None:
        lines.append(f"max_waiting = {max_waiting}")
    if max_running is not None:
        lines.append(f"max_running = {max_running}")
    if priority != DEFAULT_PRIORITY:
        lines.append(f'priority = "{priority}"')
    text = "\n".join(lines) + "\n"
    parse_keys(text, "<minted stanza>")  # raises KeysFileError for what the file cannot hold
    return text


def _pattern(value: str) -> str:
    try:
        return check_pattern(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m limiter.mint",
        description="Mint an API key for Ollama Gate. The keys-file stanza goes to stdout "
        "(append it: >> keys.toml), the secret to stderr.",
    )
    parser.add_argument("name", help="the key's name: who it is for (letters, digits, . _ @ + -)")
    parser.add_argument(
        "--role", choices=ROLES, default="user", help="admin may pull/push/create/copy/delete"
    )
    parser.add_argument(
        "--tokens-per-minute", type=int, metavar="N", help="token budget (prompt + completion)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        type=_pattern,
        metavar="GLOB",
        help="the only models the key may use, e.g. 'llama3.2:*' nomic-embed-text "
        "(default: every model)",
    )
    parser.add_argument(
        "--max-waiting",
        type=int,
        metavar="N",
        help="its jobs waiting in the work queue at once (default GATE_QUEUE_MAX_PER_CLIENT)",
    )
    parser.add_argument(
        "--max-running",
        type=int,
        metavar="N",
        help="its jobs running at once, all models (default: no cap of its own)",
    )
    parser.add_argument(
        "--priority",
        choices=PRIORITIES,
        default=DEFAULT_PRIORITY,
        help="the highest class its jobs are served at; a request may ask for a lower one "
        "with X-Gate-Priority (default: normal)",
    )
    args = parser.parse_args(argv)
    for option, value in (
        ("--tokens-per-minute", args.tokens_per_minute),
        ("--max-waiting", args.max_waiting),
        ("--max-running", args.max_running),
    ):
        if value is not None and value < 1:
            parser.error(f"{option} must be 1 or more")
    secret = new_secret()
    try:
        text = stanza(
            args.name,
            secret,
            args.role,
            args.tokens_per_minute,
            args.models,
            args.max_waiting,
            args.max_running,
            args.priority,
        )
    except ValueError as exc:
        parser.error(str(exc).replace("<minted stanza> line 1: ", ""))
    err = sys.stderr
    print(f"API key for {args.name} (shown once; the gate stores only its SHA-256):", file=err)
    print(f"\n    {secret}\n", file=err)
    print(
        "The stanza on stdout goes into the keys file (GATE_API_KEYS_FILE); then reload "
        "the gate (systemctl reload ollama-gate, or kill -HUP its master).",
        file=err,
    )
    # A blank line first keeps an appended stanza apart from the file's last line.
    sys.stdout.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
