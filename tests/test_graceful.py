"""graceful.py leans on gunicorn internals in one place; this fails first when they move."""

from __future__ import annotations

from typing import Any

from gunicorn.workers.base import Worker
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

from graceful import gunicorn_seams_missing


def test_the_pinned_gunicorn_has_every_seam_graceful_uses() -> None:
    assert gunicorn_seams_missing() == []


class ReadsWithoutTimeout(AsyncWorker):
    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        parser: Any = iter(())
        req = next(parser)  # no keep-alive wait in timeout_ctx() any more
        del req


class OwnSigterm(Worker):
    def init_signals(self) -> None:
        import signal

        signal.signal(signal.SIGTERM, self.handle_quit)


class SignalsLate(Worker):
    def init_process(self) -> None:
        self.load_wsgi()
        self.cfg.post_worker_init(self)
        self.init_signals()


def test_a_changed_gunicorn_is_noticed() -> None:
    missing = gunicorn_seams_missing(async_worker=ReadsWithoutTimeout)
    assert missing == [
        "no longer true: AsyncWorker.handle waits for a keep-alive connection's next "
        "request in self.timeout_ctx()"
    ]
    missing = gunicorn_seams_missing(worker=OwnSigterm)
    assert missing == ["no longer true: Worker.init_signals binds SIGTERM to handle_exit"]
    missing = gunicorn_seams_missing(worker=SignalsLate)
    assert missing == [
        "no longer true: Worker.init_process sets its signals before post_worker_init"
    ]
    assert gunicorn_seams_missing(gevent_worker=GeventWorker) == []
