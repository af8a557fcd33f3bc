"""A 200 MB blob upload streams through the gate in bounded memory.

The worker's resident memory is sampled from /proc while the upload runs; a
gate that buffered the body (Flask's get_data, a bytes join) would grow by the
blob's size, which is five times the bound asserted here.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from fakeollama import FakeOllama
from tests.support import Gate, client_requests, clients, upstream_saw_leave

MIB = 1024 * 1024
SIZE = 200 * MIB
CHUNK = MIB
BOUND_KIB = 40 * 1024


def blob_chunks(seed: bytes) -> Iterator[bytes]:
    """SIZE bytes in CHUNK pieces, each one different, made as they are sent."""
    base = hashlib.sha256(seed).digest() * (CHUNK // 32)
    for i in range(SIZE // CHUNK):
        yield i.to_bytes(8, "big") + base[8:]


def blob_digest(seed: bytes) -> str:
    hasher = hashlib.sha256()
    for chunk in blob_chunks(seed):
        hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


class SizedBody:
    """An iterable body with a length: requests sends it with Content-Length, unchunked."""

    def __init__(self, seed: bytes) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return SIZE

    def __iter__(self) -> Iterator[bytes]:
        return blob_chunks(self.seed)


class RssSampler(threading.Thread):
    """Samples the gate worker's resident memory until stopped."""

    def __init__(self, gate: Gate) -> None:
        super().__init__(daemon=True)
        self.gate = gate
        self.samples: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append(self.gate.rss_kib())
            self.done.wait(0.02)

    def __enter__(self) -> RssSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(5)


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_200mb_blob_upload_in_bounded_memory(gate: Gate, fake: FakeOllama, framing: str) -> None:
    seed = framing.encode()
    digest = blob_digest(seed)
    url = f"{gate.url}/api/blobs/{digest}"

    # Warm the worker's buffers with a small upload first, so only growth from size counts.
    small = b"warm-up" * 1000
    warm = requests.post(
        f"{gate.url}/api/blobs/sha256:{hashlib.sha256(small).hexdigest()}", data=small, timeout=10
    )
    assert warm.status_code == 201
    fake.reset()

    before = gate.rss_kib()
    started = time.monotonic()
    body = blob_chunks(seed) if framing == "chunked" else SizedBody(seed)
    framed = requests.Request("POST", url, data=body).prepare().headers
    if framing == "chunked":
        assert framed["Transfer-Encoding"] == "chunked" and "Content-Length" not in framed
    else:
        assert framed["Content-Length"] == str(SIZE) and "Transfer-Encoding" not in framed
    with RssSampler(gate) as sampler:
        resp = requests.post(url, data=body, timeout=60)
    elapsed = time.monotonic() - started
    after = gate.rss_kib()

    assert resp.status_code == 201, resp.text
    assert fake.stats()["blobs"][digest] == SIZE  # the fake hashed what arrived: it matched
    (rec,) = client_requests(fake)
    assert rec["path"] == f"/api/blobs/{digest}" and rec["status"] == 201
    assert rec["headers"]["host"] == f"{fake.host}:{fake.port}"
    if framing == "chunked":
        assert rec["headers"]["transfer-encoding"] == "chunked"

    peak = max(sampler.samples + [after])
    growth = peak - before
    print(
        f"\n{framing}: 200 MiB in {elapsed:.1f}s ({SIZE / MIB / elapsed:.0f} MiB/s); worker RSS "
        f"{before // 1024} MiB before, peak +{growth / 1024:.1f} MiB "
        f"over {len(sampler.samples)} samples, {after // 1024} MiB after"
    )
    assert len(sampler.samples) > 5  # the sampler did watch the upload
    assert growth < BOUND_KIB, f"worker grew {growth} KiB while streaming a {SIZE} byte blob"


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_client_leaving_mid_upload_aborts_the_upstream_upload(
    gate: Gate, fake: FakeOllama, framing: str
) -> None:
    """A cut upload must reach the upstream as a dropped connection, never as a whole body."""
    piece = b"p" * MIB
    digest = "sha256:" + hashlib.sha256(piece * 8).hexdigest()
    head = f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1:{gate.port}\r\n"
    if framing == "chunked":
        head += "Transfer-Encoding: chunked\r\n\r\n"
        sent = b"%x\r\n" % len(piece) + piece + b"\r\n"
    else:
        head += f"Content-Length: {len(piece) * 8}\r\n\r\n"
        sent = piece
    with socket.create_connection(("127.0.0.1", gate.port), timeout=10) as sock:
        sock.sendall(head.encode() + sent)
        fake.wait_for(lambda s: clients(s)[0]["body_bytes"] == MIB, timeout=5)
    closed_at = time.monotonic()

    stats = upstream_saw_leave(fake, closed_at, f"mid-upload ({framing})")
    assert clients(stats)[0]["status"] is None  # the fake never answered: it saw no end
    assert digest not in stats["blobs"]

    # The worker's upstream pool is still usable.
    small = b"after"
    resp = requests.post(
        f"{gate.url}/api/blobs/sha256:{hashlib.sha256(small).hexdigest()}", data=small, timeout=10
    )
    assert resp.status_code == 201
