"""The status page in headless Chromium while load runs: the queue appears, then drains.

The page is the only client of status.json here: what the test reads is what a
person sees. Screenshots land in pytest's tmp dir (kept for the last runs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fakeollama import FakeOllama
from tests.chromium import chromium, full_page_screenshot, missing
from tests.status_support import Load
from tests.support import Gate

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


def text(driver: Any, element_id: str) -> str:
    return str(driver.find_element("id", element_id).text.strip())


def wait_for(driver: Any, pred: Callable[[Any], Any], timeout: float = 15) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(pred)


# The page redraws its tables every second: read text in one script call, so that an
# element found in one call is never gone (stale) by the next.
SELECTED_TEXT = "var e = document.querySelector(arguments[0]); return e ? e.textContent : '';"


def model_state(driver: Any, model: str) -> str:
    """The badges in the State cell of ``model``'s row ("" while there is no row)."""
    return str(driver.execute_script(SELECTED_TEXT, f'tr[data-model="{model}"] td.state'))


def test_status_page_shows_the_queue_appear_and_drain(
    fake: FakeOllama, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    gate = gate_factory(fake.url, {"GATE_MODEL_CONCURRENCY": "1", "GATE_MAX_ACTIVE_MODELS": "1"})
    with chromium(1280, 900) as driver:
        driver.get(gate.url + "/gate/status")
        wait_for(driver, lambda d: text(d, "live").startswith("live"))
        assert text(driver, "total-waiting") == "0"
        assert text(driver, "upstream").startswith("upstream")

        with Load(gate, 4) as load:
            wait_for(driver, lambda d: text(d, "total-waiting") in ("2", "3"))
            assert text(driver, "total-running") == "1"
            assert "active" in model_state(driver, "m1:latest")
            full_page_screenshot(driver, str(tmp_path / "status-busy-1280.png"), 1280)
        assert load.results == [200] * 4

        wait_for(driver, lambda d: text(d, "total-waiting") == "0")
        wait_for(driver, lambda d: text(d, "total-running") == "0")
        # The depth chart drew the queue it saw: a path for waiting and one for running.
        paths = driver.find_elements("css selector", "#chart-depth path.a, #chart-depth path.b")
        assert len(paths) == 2
        full_page_screenshot(driver, str(tmp_path / "status-idle-1280.png"), 1280)

        # A phone: nothing sticks out sideways except inside the tables' own scroll boxes.
        driver.set_window_size(390, 900)
        wait_for(driver, lambda d: d.execute_script("return window.innerWidth") <= 390)
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0
        full_page_screenshot(driver, str(tmp_path / "status-390.png"), 390)

        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    for name in ("status-busy-1280.png", "status-idle-1280.png", "status-390.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_status_page_says_waiting_not_idle_and_shows_the_caps(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(
        fake.url,
        {"GATE_MODEL_CONCURRENCY": "1", "GATE_MAX_ACTIVE_MODELS": "1", "GATE_QUEUE_MAX": "40"},
    )
    slow = {"X-Fake-Tokens": "40", "X-Fake-Token-Interval": "0.15"}  # holds m1 for ~6 s
    with chromium(1280, 900) as driver:
        driver.get(gate.url + "/gate/status")
        wait_for(driver, lambda d: text(d, "live").startswith("live"))
        caps = text(driver, "caps")
        assert "1 active model(s)" in caps and "queue 40, 32 per client" in caps, caps
        assert text(driver, "active-models") == "0 / 1"
        assert text(driver, "priorities") == (
            "Priority classes: interactive 0 running, 0 waiting · normal 0 running, 0 waiting"
            " · batch 0 running, 0 waiting"
        )
        with Load(gate, 1, headers=slow) as first:
            wait_for(driver, lambda d: text(d, "total-running") == "1")
            # No keys file: clients are GATE_ANON_PRIORITY, normal by default.
            assert "normal 1 running, 0 waiting" in text(driver, "priorities")
            with Load(gate, 1, model="m2", headers=slow) as second:
                # m2 has a job waiting and no place yet: "waiting", never "idle".
                state = wait_for(driver, lambda d: model_state(d, "m2:latest"))
                assert "waiting" in state and "idle" not in state, state
                assert text(driver, "active-models") == "1 / 1"
                assert text(driver, "total-waiting-sub") == "max 40 · 32/client"
        assert first.results == [200] and second.results == [200]
        # Once nothing runs or waits, both are idle.
        wait_for(driver, lambda d: "idle" in model_state(d, "m2:latest"))


def test_status_page_shows_a_banner_while_the_upstream_is_down(
    fake: FakeOllama, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    gate = gate_factory(fake.url)

    def banner(driver: Any) -> str:
        return str(driver.execute_script(SELECTED_TEXT, "#banners .banner.down"))

    with chromium(1280, 900) as driver:
        driver.get(gate.url + "/gate/status")
        wait_for(driver, lambda d: text(d, "upstream").startswith("upstream up"))
        assert banner(driver) == ""
        fake.stop()
        try:
            shown = wait_for(driver, banner, timeout=20)
            assert shown.startswith("Ollama is down: " + fake.url), shown
            assert "refused" in shown
            full_page_screenshot(driver, str(tmp_path / "status-down-1280.png"), 1280)
        finally:
            fake.start()
        wait_for(driver, lambda d: banner(d) == "", timeout=20)
