"""The viewer and /docs in a real browser: Debian's Chromium, headless, driven by Selenium.

Nothing downloads a browser: the test uses /usr/bin/chromium and its chromedriver (`make test`
installs them). WARN_SCREENSHOT_DIR, when set, keeps the screenshots (`make screenshot`).
"""

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from models import checkpoint
from tests.serving.conftest import ROOT, Server

DIGIT = ROOT / "docs" / "digit.png"
LOADED = "return [...document.images].filter(i => i.dataset.src).every(i => i.complete && i.naturalWidth > 0)"
FAILED = (
    "return performance.getEntriesByType('resource')"
    ".filter(e => e.responseStatus >= 400).map(e => e.responseStatus + ' ' + e.name)"
)


def chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert browser and driver, "Chromium is missing: `make test` installs Debian's chromium and chromium-driver"
    return browser, driver


@pytest.fixture
def browser():
    binary, driver = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a browser online
    d = webdriver.Chrome(service=Service(driver), options=options)
    d.set_page_load_timeout(30)
    try:
        yield d
    finally:
        d.quit()


def wait(d, condition, timeout: float = 30):
    return WebDriverWait(d, timeout).until(condition)


def screenshot(d, name: str, tmp_path: Path) -> Path:
    path = tmp_path / name
    d.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    if keep := os.environ.get("WARN_SCREENSHOT_DIR"):  # for the README: 256 colours are plenty
        Image.open(path).convert("RGB").quantize(256).save(Path(keep) / name, optimize=True)
    return path


def upload(d, path: Path) -> None:
    d.find_element(By.ID, "file").send_keys(str(path))
    wait(d, lambda d: d.find_element(By.ID, "top").get_attribute("data-label"))
    wait(d, lambda d: d.execute_script(LOADED))


def no_errors(d, allowed: str = "\0") -> None:
    assert d.execute_script(FAILED) == []
    severe = [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE" and allowed not in e["message"]]
    assert severe == []


def test_viewer_shows_the_prediction_and_its_maps(browser, server, tmp_path):
    d = browser
    d.get(server.url + "/")
    wait(d, lambda d: "warn-cluttered-digits" in d.find_element(By.ID, "model").text)
    upload(d, DIGIT)
    # the label, the bars, and every overlay <img> loaded
    assert d.find_element(By.ID, "top").get_attribute("data-label") == "5"
    assert d.find_element(By.CSS_SELECTOR, "#top li .name").text == "5"
    assert len(d.find_elements(By.CSS_SELECTOR, "#global li")) == 4  # three attended layers and the backbone
    assert len(d.find_elements(By.CSS_SELECTOR, "#gates .layer-gates")) == 3
    overlay = d.find_element(By.ID, "overlay")
    first = overlay.get_attribute("data-src")
    assert "/attention/combined.png" in first and d.execute_script("return arguments[0].naturalWidth", overlay) > 0
    grid = d.find_elements(By.CSS_SELECTOR, "#grid img")
    assert len(grid) == 1 + 3 * (1 + 4)  # combined, and each layer mixed and per head
    tabs = d.find_elements(By.CSS_SELECTOR, "#layers button")
    assert [b.get_attribute("data-value") for b in tabs] == ["combined", "0", "1", "2"]
    measured = checkpoint.read(ROOT / "default_model/model.pt")["metrics"]["pointing_game"]["layer_0"]
    assert tabs[1].text == f"layer 0 · {round(100 * measured)}% on target"  # its Pointing Game, via GET /v1/model
    screenshot(d, "viewer.png", tmp_path)
    # switching layers and heads changes the image
    d.find_element(By.CSS_SELECTOR, '#layers button[data-value="1"]').click()
    wait(d, lambda d: "/attention/1.png" in overlay.get_attribute("data-src"))
    d.find_element(By.CSS_SELECTOR, '#heads button[data-value="2"]').click()
    wait(d, lambda d: "head=2" in overlay.get_attribute("data-src"))
    d.find_element(By.ID, "heatmap").click()
    wait(d, lambda d: "mode=heatmap" in overlay.get_attribute("data-src"))
    wait(d, lambda d: d.execute_script(LOADED))
    assert overlay.get_attribute("data-src") != first
    no_errors(d)
    # a stored prediction opens from its URL
    d.get(server.url + "/")
    d.find_element(By.ID, "url").send_keys(first)
    d.find_element(By.CSS_SELECTOR, "#by-url button").click()
    wait(d, lambda d: d.find_element(By.ID, "top").get_attribute("data-label") == "5")
    wait(d, lambda d: d.execute_script(LOADED))
    no_errors(d)


def test_viewer_at_phone_width(browser, server, tmp_path):
    d = browser
    d.set_window_size(390, 844)
    d.get(server.url + "/")
    upload(d, DIGIT)
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(d, "viewer-phone.png", tmp_path)


@pytest.mark.parametrize("signed", [True, False])
def test_viewer_sends_the_api_key(browser, model_path, signed):
    env = {"WARN_MODEL_PATH": str(model_path), "WARN_API_KEY": "s3cret", "WARN_SIGNED_URLS": str(signed).lower()}
    server = Server(env)
    try:
        server.wait_ready()
        d = browser
        d.get(server.url + "/")
        wait(d, lambda d: "401" in d.find_element(By.ID, "model").text)  # says why, and opens the key field
        assert d.find_element(By.ID, "auth").get_attribute("open") is not None
        d.find_element(By.ID, "key").send_keys("s3cret\n")
        wait(d, lambda d: "warn-cluttered-digits" in d.find_element(By.ID, "model").text)
        upload(d, DIGIT)  # every overlay loaded: signed URLs straight into <img>, else blobs fetched with the key
        src = d.find_element(By.ID, "overlay").get_attribute("src")
        assert ("signature=" in src and src.startswith(server.url)) if signed else src.startswith("blob:")
        if signed:  # a signed overlay URL, pasted into a fresh viewer without the key, opens its prediction
            d.execute_script("sessionStorage.clear()")
            d.get(server.url + "/")
            d.find_element(By.ID, "url").send_keys(src)
            d.find_element(By.CSS_SELECTOR, "#by-url button").click()
            wait(d, lambda d: d.find_element(By.ID, "top").get_attribute("data-label") == "5")
            wait(d, lambda d: d.execute_script(LOADED))
    finally:
        server.stop()


def test_docs_work_offline(browser, server):
    d = browser
    d.get(server.url + "/docs")
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 10)
    paths = {e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {
        "/v1/predict",
        "/v2/models/{name}/infer",
        "/v1/predictions/{prediction_id}/attention/{layer}.{ext}",
    } <= paths
    no_errors(d)
    d.get(server.url + "/redoc")
    wait(d, lambda d: "Classify an image" in d.find_element(By.TAG_NAME, "body").text)
    no_errors(d, allowed="cdn.redoc.ly/redoc/logo-mini.svg")  # ReDoc's "by Redocly" badge; the page works without it


def test_viewer_says_why_a_prediction_has_no_maps(browser, server):
    """While the prediction store is down, /v1/predict answers without overlay URLs and says why."""
    import httpx

    p = httpx.post(f"{server.url}/v1/predict", content=DIGIT.read_bytes(), headers={"content-type": "image/png"}).json()
    p["attention_urls"], p["warnings"] = None, ["no overlay URLs: the prediction store failed"]
    d = browser
    d.get(server.url + "/")
    wait(d, lambda d: "warn-cluttered-digits" in d.find_element(By.ID, "model").text)
    d.execute_script("render(arguments[0])", p)
    status = d.find_element(By.ID, "status")
    assert "the prediction store failed" in status.text and "error" in status.get_attribute("class")
    assert not d.find_element(By.ID, "maps").is_displayed()
    assert d.find_element(By.ID, "top").get_attribute("data-label") == "5"  # the prediction itself is shown
    no_errors(d)
