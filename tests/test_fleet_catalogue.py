"""The catalogue: health from probes and passive signals, models from /api/tags and /api/ps."""

from __future__ import annotations

from fleet.catalogue import Catalogue, Health, Where
from fleet.config import Backend

GB = 10**9


def backend(name: str, **kwargs: object) -> Backend:
    return Backend(name, f"http://{name}:11434", 2, 1, **kwargs)  # type: ignore[arg-type]


def tags(*models: tuple[str, int]) -> dict[str, object]:
    return {"models": [{"name": name, "model": name, "size": size} for name, size in models]}


def test_health_starts_unknown_comes_up_at_once_and_rejoins_after_good_probes() -> None:
    c = Catalogue([backend("a")], rejoin_after=2)
    assert c.state("a").health is Health.UNKNOWN
    assert c.probe_ok("a", 0.0, "0.5.1") is True
    assert c.state("a").health is Health.UP and c.state("a").version == "0.5.1"
    assert c.probe_failed("a", 1.0, "connection refused") is True
    assert c.state("a").health is Health.DOWN
    assert c.probe_ok("a", 2.0) is False  # one good probe is not enough
    assert c.probe_failed("a", 3.0, "timeout") is False  # and the count starts again
    assert c.probe_ok("a", 4.0) is False
    assert c.probe_ok("a", 5.0) is True
    assert c.state("a").health is Health.UP and c.state("a").last_error is None


def test_passive_failures_take_a_backend_down_refused_at_once_others_in_a_row() -> None:
    c = Catalogue([backend("a")], fail_after=3)
    c.probe_ok("a", 0.0)
    assert c.passive_failure("a", "timeout") is False
    assert c.passive_failure("a", "502") is False
    c.passive_success("a")  # an answer in between: the run starts again
    assert c.passive_failure("a", "timeout") is False
    assert c.passive_failure("a", "timeout") is False
    assert c.passive_failure("a", "timeout") is True
    assert c.state("a").health is Health.DOWN
    c2 = Catalogue([backend("b")])
    c2.probe_ok("b", 0.0)
    assert c2.passive_failure("b", "connection refused", refused=True) is True


def test_where_a_model_is_names_normalised_as_ollama_does() -> None:
    c = Catalogue([backend("a"), backend("b")])
    assert c.where("llama3.2") is Where.UNKNOWN  # nothing read yet
    c.probe_ok("a", 0.0)
    c.read_tags("a", tags(("llama3.2:latest", 2 * GB)), 0.0)
    assert c.where("llama3.2") is Where.INSTALLED  # a has it: b's list does not matter
    assert c.where("junk-1") is Where.UNKNOWN  # b might have it
    c.probe_ok("b", 0.0)
    c.read_tags("b", tags(("qwen2.5:7b", 5 * GB)), 0.0)
    assert c.where("junk-1") is Where.MISSING
    assert c.where("llama3.2:latest") is Where.INSTALLED
    assert c.holders("llama3.2") == ["a"]
    c.probe_failed("b", 1.0, "refused")
    assert c.where("qwen2.5:7b") is Where.DOWN  # it exists; nothing can run it now
    assert c.holders("qwen2.5:7b") == []
    assert c.where("junk-1") is Where.MISSING


def test_a_model_pinned_away_from_every_holder_is_missing() -> None:
    c = Catalogue([backend("a", models=("llama*",)), backend("b")])
    for name in ("a", "b"):
        c.probe_ok(name, 0.0)
    c.read_tags("a", tags(("qwen2.5:7b", GB), ("llama3.2", GB)), 0.0)
    c.read_tags("b", tags(), 0.0)
    assert c.where("qwen2.5:7b") is Where.MISSING  # installed on a, but not allowed there
    assert c.where("llama3.2") is Where.INSTALLED
    assert [entry["name"] for entry in c.tags()] == ["llama3.2", "qwen2.5:7b"]


def test_loaded_models_count_loads_and_evictions_and_feed_the_view() -> None:
    c = Catalogue([backend("a", vram=8 * GB)])
    c.probe_ok("a", 0.0)
    assert not c.view("a").healthy  # up, but nothing is placed there before its models are known
    c.read_tags("a", tags(("m", 3 * GB), ("n", 4 * GB)), 0.0)
    assert c.view("a").loaded == {}
    ps = {"models": [{"name": "m:latest", "size": 3 * GB, "size_vram": 3 * GB, "expires_at": "x"}]}
    c.read_ps("a", ps, 1.0)
    assert c.state("a").loads == 0  # the first reading is what was there already
    c.read_ps("a", {"models": [{"model": "n", "size": 4 * GB, "size_vram": 2 * GB}]}, 2.0)
    assert (c.state("a").loads, c.state("a").evictions) == (1, 1)
    view = c.view("a")
    assert view.healthy and view.installed == {"m:latest": 3 * GB, "n:latest": 4 * GB}
    assert view.loaded == {"n:latest": 2 * GB}
    row = c.snapshot()[0]
    assert row["loaded"] == {"n:latest": {"size_vram": 2 * GB, "expires_at": None}}
    assert (row["vram_used"], row["vram"], row["installed"]) == (2 * GB, 8 * GB, 2)
    # Down, it has lost what it had loaded; its installed models are kept for "503, not 404".
    c.probe_failed("a", 3.0, "refused")
    assert c.view("a").loaded == {} and not c.view("a").healthy
    assert c.where("m") is Where.DOWN


def test_unions_over_healthy_backends() -> None:
    c = Catalogue([backend("a"), backend("b"), backend("c")])
    for name in ("a", "b", "c"):
        c.probe_ok(name, 0.0)
    c.read_tags("a", tags(("m", 1), ("n", 2)), 0.0)
    c.read_tags("b", tags(("n", 2), ("o", 3)), 0.0)
    c.read_tags("c", tags(("p", 4)), 0.0)
    c.read_ps("b", {"models": [{"name": "o:latest", "size": 3}]}, 0.0)
    c.probe_failed("c", 1.0, "refused")
    assert [entry["name"] for entry in c.tags()] == ["m", "n", "o"]
    assert [entry["name"] for entry in c.tags(allowed={"n:latest"})] == ["n"]
    assert [entry["name"] for entry in c.ps()] == ["o:latest"]


def test_a_404_forgets_the_model_on_that_backend_and_bad_answers_are_ignored() -> None:
    c = Catalogue([backend("a")])
    c.probe_ok("a", 0.0)
    c.read_tags("a", tags(("m", 1)), 0.0)
    c.forget_model("a", "m")
    assert c.where("m") is Where.MISSING
    c.read_tags("a", {"models": [None, {"name": ""}, {"name": "ok", "size": -3}, "x"]}, 1.0)
    assert c.view("a").installed == {"ok:latest": 0}
    c.read_tags("a", "not json", 2.0)
    assert c.view("a").installed == {}


def test_status_rows_say_how_long_ago_each_backend_was_probed() -> None:
    from fleet.runtime import Fleet
    from settings import Settings

    now = [100.0]
    settings = Settings(upstream="http://127.0.0.1:9,http://127.0.0.1:10")
    fleet = Fleet(settings, settings.backends(), clock=lambda: now[0])
    try:
        first, second = (b.name for b in fleet.backends)
        fleet.catalogue.probe_ok(first, 98.5, "0.12.6")
        now[0] = 101.25
        rows = {row["name"]: row for row in fleet.queue.snapshot()["backends"]}
        assert rows[first]["probe_age"] == 2.75
        assert rows[second]["probe_age"] is None  # not probed yet
    finally:
        fleet.close()


class _Stop(BaseException):
    """Ends a poll loop driven by hand."""


class _Waits:
    """Stands for a poller's wake event: records each wait the loop asks for and moves the
    clock on by it; after ``rounds`` waits it ends the loop."""

    def __init__(self, now: list[float], rounds: int) -> None:
        self.now, self.rounds, self.delays = now, rounds, []  # type: list[float]

    def wait(self, delay: float) -> None:
        self.delays.append(delay)
        if len(self.delays) == self.rounds:
            raise _Stop
        self.now[0] += delay

    def clear(self) -> None:
        pass


def test_a_down_backend_is_only_probed_and_its_poller_waits_for_the_next_probe() -> None:
    # Once a backend went down its /api/ps and /api/tags reads fell due and stayed due (they
    # are skipped while it is down), so the poller asked to wait 0 s: it spun a core until
    # the backend came back.
    from fleet.runtime import PROBE_INTERVAL, Fleet
    from settings import Settings

    now = [100.0]
    settings = Settings(upstream="http://127.0.0.1:9,http://127.0.0.1:10")  # nothing listens
    fleet = Fleet(settings, settings.backends(), clock=lambda: now[0])
    try:
        name = fleet.backends[0].name
        fleet.catalogue.probe_ok(name, now[0])  # up, then down at the first probe
        waits = fleet._wake[name] = _Waits(now, rounds=4)  # type: ignore[assignment]
        try:
            fleet._poll_loop(fleet.backends[0])
        except _Stop:
            pass
        assert fleet.catalogue.state(name).health is Health.DOWN
        assert waits.delays == [PROBE_INTERVAL] * 4
    finally:
        fleet.close()
