"""The live page in a real browser: Debian's headless chromium, driven by selenium through Debian's
chromium-driver (never a downloaded browser), against the real service (redis-server, Ray, `serve run`)
with a GStreamer RTSP server looping a shared clip. The tests run in file order on one service and
one browser session. FERSTREAM_LIVE_PAGE_SCREENSHOT=<path> saves the screenshot the README shows."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.conftest import REPO_ROOT, free_port, require, wait_until
from tests.serve_app.serving import Service, service_with_its_own_redis
from tests.servers import RtspServer

pytestmark = pytest.mark.integration

CLIP = "head-pose-face-detection-female-and-male"  # two people
TOKEN = "live-page-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST_RECONNECT = {"reconnect": {"initial_s": 0.2, "max_s": 1.0}, "watchdog_timeout_s": 3.0, "open_timeout_s": 3.0}
STATIC = REPO_ROOT / "serve_app" / "static"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("live-page")


@pytest.fixture(scope="module")
def browser_binaries() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    require(chromium is not None and driver is not None, "chromium and chromium-driver are not installed (scripts/setup.sh)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        require(False, "selenium is not installed (pip install -e '.[test]')")
    assert chromium is not None and driver is not None
    return chromium, driver


@pytest.fixture(scope="module")
def camera_server(work: Path, shared_clips: dict[str, Path]) -> Iterator[RtspServer]:
    rtsp = RtspServer(shared_clips[CLIP], free_port(), work / "rtsp.log")
    rtsp.start()
    yield rtsp
    rtsp.stop()


@pytest.fixture(scope="module")
def service(work: Path, camera_server: RtspServer, browser_binaries: tuple[str, str]) -> Iterator[Service]:
    # The API's token (FERSTREAM_API_TOKENS of the cluster); the page sends the one typed into it.
    with service_with_its_own_redis(work, api_token=TOKEN) as running:
        yield running


@pytest.fixture(scope="module")
def browser(browser_binaries: tuple[str, str], work: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    chromium, driver_path = browser_binaries
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(argument)
    # Both paths given: selenium has nothing to look up or download.
    driver_service = DriverService(executable_path=driver_path, log_output=str(work / "chromedriver.log"))
    driver = webdriver.Chrome(service=driver_service, options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def api_get(service: Service, path: str) -> requests.Response:
    return requests.get(f"{service.api}{path}", headers=AUTH, timeout=10)


def streams(service: Service) -> dict[str, dict[str, Any]]:
    response = api_get(service, "/streams")
    response.raise_for_status()
    return {stream["camera_id"]: stream for stream in response.json()}


def card(browser: Any, camera_id: str) -> Any:
    from selenium.webdriver.common.by import By

    found = browser.find_elements(By.CSS_SELECTOR, f'section.camera[data-camera="{camera_id}"]')
    return found[0] if found else None


def in_card(browser: Any, camera_id: str, selector: str) -> list[Any]:
    """The elements under the camera's card; none while the card is not drawn yet."""
    from selenium.webdriver.common.by import By

    found = card(browser, camera_id)
    return found.find_elements(By.CSS_SELECTOR, selector) if found is not None else []


def bar_columns(browser: Any, camera_id: str) -> set[str]:
    """The chart's 5-second columns that have a bar."""
    return {bar.get_attribute("x") for bar in in_card(browser, camera_id, "svg.chart rect.bar")}


def wait_in_browser(service: Service, browser: Any, condition: Any, timeout_s: float, what: str) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException

    def attempt() -> Any:
        try:
            return condition()
        except StaleElementReferenceException:  # redrawn between find and read: look again
            return None

    def detail() -> str:
        status = browser.execute_script("return document.getElementById('status').textContent")
        return f"page status: {status}\n{service.log_tail()}"

    return wait_until(attempt, timeout_s, what, detail=detail)


def test_the_page_is_served_without_a_token_and_needs_nothing_from_outside(service):
    page = requests.get(f"{service.api}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/live.js">' in page.text
    for name, kind in (("live.js", "text/javascript"), ("live.css", "text/css")):
        asset = requests.get(f"{service.api}/static/{name}", timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
    escape = requests.get(f"{service.api}/static/..%2Fdeployments.py", timeout=10)  # a fixed list of files, never a path
    assert escape.status_code in (401, 404) and "import" not in escape.text
    assert requests.get(f"{service.api}/static/nothing.js", timeout=10).status_code == 404
    # Offline: no file loads anything from another host (the SVG namespace is a name, not a fetch).
    for path in STATIC.iterdir():
        urls = set(re.findall(r"https?://[^\s\"')]+", path.read_text())) - {"http://www.w3.org/2000/svg"}
        assert not urls, f"{path.name} refers to {urls}"


def test_a_camera_appears_with_its_state_its_chart_fills_and_its_tracks_show_emotions(service, camera_server, browser):
    from selenium.webdriver.common.by import By

    body = {"camera_id": "lobby", "url": camera_server.url, "target_fps": 5, "options": FAST_RECONNECT}
    response = requests.post(f"{service.api}/streams", json=body, headers=AUTH, timeout=10)
    assert response.status_code == 201, response.text

    browser.get(f"{service.api}/")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "save-token").click()
    assert browser.execute_script("return sessionStorage.getItem('ferstream-token')") == TOKEN

    wait_in_browser(service, browser, lambda: card(browser, "lobby"), 30, "the camera's card")
    wait_in_browser(
        service, browser, lambda: [state.text for state in in_card(browser, "lobby", ".state")] == ["streaming"], 240, "state streaming"
    )

    # The chart fills: bars in at least two of its 5-second columns, i.e. more than one slice of the minute.
    wait_in_browser(service, browser, lambda: len(bar_columns(browser, "lobby")) >= 2, 120, "bars in two columns of the chart")
    classes = api_get(service, "/streams/lobby/summary").json()["classes"]
    assert len(classes) >= 2

    def track_rows() -> list[tuple[str, str]]:
        rows = in_card(browser, "lobby", "table.tracks tr.track")
        return [(row.find_element(By.CSS_SELECTOR, ".emotion").text, row.find_element(By.CSS_SELECTOR, ".confidence").text) for row in rows]

    rows = wait_in_browser(service, browser, track_rows, 60, "a current track in the table")
    for emotion, confidence in rows:
        assert emotion in classes
        assert re.fullmatch(r"\d{1,3}%", confidence), confidence

    # The page redraws every second: read each element inside a retry, or it may go stale between find and read.
    def mix_shares() -> list[str]:
        return [item.get_attribute("data-emotion") for item in card(browser, "lobby").find_elements(By.CSS_SELECTOR, ".mix li.share")]

    shares = wait_in_browser(service, browser, mix_shares, 30, "the emotion mix")
    assert set(shares) <= set(classes)
    stats = wait_in_browser(service, browser, lambda: card(browser, "lobby").find_element(By.CSS_SELECTOR, ".stats").text, 30, "stats")
    assert re.search(r"fps \d+\.\d / 5", stats) and "dropped" in stats and "reconnects" in stats, stats


def test_the_preview_is_off_unless_the_camera_asks_for_it(service, browser):
    from selenium.webdriver.common.by import By

    lobby = card(browser, "lobby")
    assert lobby.find_elements(By.CSS_SELECTOR, ".preview-off") and not lobby.find_elements(By.CSS_SELECTOR, "img.preview")
    refused = api_get(service, "/streams/lobby/preview.jpg")
    assert refused.status_code == 403 and "preview is off" in refused.text
    assert api_get(service, "/streams/lobby/summary").json()["preview"] is False
    # Not only unserved: no frame of it was ever written out of the ingest process.
    assert redis.Redis.from_url(service.redis_url).exists("ferstream:preview:lobby") == 0
    assert api_get(service, "/streams/nope/preview.jpg").status_code == 404


def test_a_camera_added_on_the_page_with_a_preview_shows_frames_and_is_removed_there(service, camera_server, browser):
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "add-id").send_keys("door")
    browser.find_element(By.ID, "add-url").send_keys(camera_server.url)
    fps = browser.find_element(By.ID, "add-fps")
    fps.clear()
    fps.send_keys("2")
    browser.find_element(By.ID, "add-preview").click()
    browser.find_element(By.ID, "add-submit").click()
    wait_in_browser(service, browser, lambda: "Added door" in browser.find_element(By.ID, "add-message").text, 20, "the add message")
    door = streams(service)["door"]
    assert door["target_fps"] == 2
    assert api_get(service, "/streams/door/summary").json()["preview"] is True

    def preview_width() -> int:
        images = in_card(browser, "door", "img.preview")
        return int(images[0].get_attribute("naturalWidth") or 0) if images else 0

    width = wait_in_browser(service, browser, preview_width, 240, "the annotated preview on the page")
    assert 0 < width <= 640
    jpeg = api_get(service, "/streams/door/preview.jpg")
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg" and jpeg.content[:2] == b"\xff\xd8"

    wait_in_browser(service, browser, lambda: len(bar_columns(browser, "door")) >= 2, 120, "door's chart in two columns")
    screenshot = Path(os.environ.get("FERSTREAM_LIVE_PAGE_SCREENSHOT") or service.log_path.parent / "live-page.png")
    browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000

    card(browser, "door").find_element(By.CSS_SELECTOR, "button.remove").click()
    wait_in_browser(service, browser, lambda: card(browser, "door") is None, 20, "door's card to go")
    assert set(streams(service)) == {"lobby"}
    assert "Removed door" in browser.find_element(By.ID, "add-message").text
    assert card(browser, "lobby") is not None
