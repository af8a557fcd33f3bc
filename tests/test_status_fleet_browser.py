"""The status page's Backends section in headless Chromium, under real gunicorn: a fleet of
three fake Ollamas (one killed and restarted while the page watches) and a fleet of one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from fakeollama import FakeOllama
from tests.chromium import chromium, full_page_screenshot, missing
from tests.support import Gate
from tests.test_status_browser import SELECTED_TEXT, text, wait_for

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

Fakes = dict[str, FakeOllama]

# Each card's name, health and models in one script call (the page redraws every second).
CARDS = """
return Array.prototype.map.call(document.querySelectorAll('#backends .backend'), function (c) {
  return {name: c.dataset.backend, health: c.dataset.health, text: c.textContent,
          models: Array.prototype.map.call(c.querySelectorAll('tr[data-model]'),
                                           function (r) { return r.dataset.model; })};
});
"""


def cards(driver: Any) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in driver.execute_script(CARDS)}


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    servers = {
        "big": FakeOllama(
            token_interval=0.01, vram=2, vram_bytes="8GB", models="llama3.2=2GB,qwen2.5:7b=4GB"
        ),
        "small": FakeOllama(token_interval=0.01, vram=1, models="llama3.2=2GB"),
        "spare": FakeOllama(token_interval=0.01, models="phi3=2GB", load_time=4),
    }
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


def test_backends_section_lists_each_backend_and_shows_a_killed_one_down(
    gate_factory: Callable[..., Gate], tmp_path: Path, fakes: Fakes
) -> None:
    path = tmp_path / "backends.toml"
    path.write_text(
        f'[backends.big]\nurl = "{fakes["big"].url}"\nvram = "8GB"\nmax_models = 2\n'
        f'[backends.small]\nurl = "{fakes["small"].url}"\nmax_models = 1\n'
        f'[backends.spare]\nurl = "{fakes["spare"].url}"\nmax_models = 1\n'
    )
    gate = gate_factory("http://127.0.0.1:9", {"GATE_BACKENDS_FILE": str(path)})
    body = {"model": "qwen2.5:7b", "prompt": "hi", "stream": False}
    resp = requests.post(gate.url + "/api/generate", json=body, timeout=30)
    assert resp.status_code == 200 and resp.headers["X-Gate-Backend"] == "big"

    def down_banner(driver: Any) -> str:
        return str(driver.execute_script(SELECTED_TEXT, "#banners .banner.down"))

    with chromium(1280, 900) as driver:
        driver.get(gate.url + "/gate/status")
        wait_for(driver, lambda d: len(cards(d)) == 3)
        wait_for(driver, lambda d: {c["health"] for c in cards(d).values()} == {"up"})
        # big's card: the model it loaded (a catalogue poll after the job), of its budget.
        wait_for(driver, lambda d: "qwen2.5:7b" in cards(d)["big"]["models"])
        big = cards(driver)["big"]["text"]
        assert "1 of 2 models loaded" in big and "of 7.5 GiB" in big, big  # 8GB, in GiB
        assert "probed" in big and "loads" in big and "evictions" in big, big
        assert "(no budget set)" in cards(driver)["small"]["text"]
        assert text(driver, "upstream") == "backends 3 of 3 up"
        # The places are the backends' own: 2 + 1 + 1 models.
        assert text(driver, "active-models").endswith(" / 4")
        caps = text(driver, "caps")
        assert "backends big 2 model(s) in 7.5 GiB, small 1 model(s), spare 1 model(s)" in caps
        # The first backend's /api/ps alone would mislead: the cards replace that table.
        assert not driver.find_element("id", "loaded-section").is_displayed()
        assert down_banner(driver) == ""

        # A job runs on spare while its model loads: /api/ps does not list it yet.
        body = {"model": "phi3", "prompt": "hi", "stream": False}
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(requests.post, gate.url + "/api/generate", json=body, timeout=30)
            row = 'div[data-backend="spare"] tr[data-model="phi3:latest"]'
            shown = wait_for(driver, lambda d: d.execute_script(SELECTED_TEXT, row))
            assert shown == "phi3:latestloading1 / 1", shown
            assert job.result().status_code == 200
        wait_for(
            driver,
            lambda d: (
                "phi3" in cards(d)["spare"]["text"] and "loading" not in cards(d)["spare"]["text"]
            ),
        )
        # The Models table says loaded for a model in any backend's /api/ps, not the first's.
        state = '#models tr[data-model="phi3:latest"] td.state'
        wait_for(driver, lambda d: "loaded" in d.execute_script(SELECTED_TEXT, state))

        fakes["spare"].kill()
        try:
            shown = wait_for(driver, down_banner, timeout=20)
            assert shown.startswith("Backend spare is down: " + fakes["spare"].url), shown
            assert "they go to the other backends" in shown, shown
            wait_for(driver, lambda d: cards(d)["spare"]["health"] == "down")
            assert "does not answer" in cards(driver)["spare"]["text"]
            assert {cards(driver)[n]["health"] for n in ("big", "small")} == {"up"}
            assert text(driver, "upstream") == "backends 2 of 3 up · 1 down"
            full_page_screenshot(driver, str(tmp_path / "status-fleet-down-1280.png"), 1280)
        finally:
            fakes["spare"].start()
        wait_for(driver, lambda d: cards(d)["spare"]["health"] == "up", timeout=30)
        wait_for(driver, lambda d: down_banner(d) == "")

        # A phone: the cards stack, nothing sticks out sideways.
        driver.set_window_size(390, 900)
        wait_for(driver, lambda d: d.execute_script("return window.innerWidth") <= 390)
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    assert (tmp_path / "status-fleet-down-1280.png").stat().st_size > 10_000


def test_a_fleet_of_one_is_one_line(fake: FakeOllama, gate_factory: Callable[..., Gate]) -> None:
    gate = gate_factory(fake.url)
    assert requests.post(
        gate.url + "/api/generate", json={"model": "m1", "prompt": "hi", "stream": False}
    ).ok
    with chromium(1280, 900) as driver:
        driver.get(gate.url + "/gate/status")
        wait_for(driver, lambda d: [c["health"] for c in cards(d).values()] == ["up"])
        line = wait_for(
            driver, lambda d: "m1:latest" in (t := list(cards(d).values())[0]["text"]) and t
        )
        assert "probed" in line and "1 of 1 model loaded" in line, line
        assert driver.find_elements("css selector", "#backends .backend.one")
        assert not driver.find_elements("css selector", "#backends table")  # compact
        assert driver.find_element("id", "loaded-section").is_displayed()
        assert text(driver, "upstream").startswith("upstream up")
