"""The playground (`GET /`) in a real headless browser: Debian's chromium driven by Selenium through
Debian's chromium-driver, against the real server. Skips, naming the packages, where they are absent."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import API_KEY, Server
from tests.conftest import needs

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "playground.png"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

needs_chromium = needs("chromium", "chromedriver", packages="chromium chromium-driver")

PROMPT = "The weather today is"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,1250"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def test_page_is_static_public_and_self_contained(keyed_server: Server) -> None:
    r = httpx.get(keyed_server.url + "/")  # no key: the page itself is public, the API behind it is not
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script src" not in r.text and "http://" not in r.text and "https://" not in r.text  # no CDN
    assert httpx.get(keyed_server.url + "/info").status_code == 401


@needs_chromium
def test_playground_streams_tokens_and_classifies(browser, keyed_server: Server) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(keyed_server.url + "/")
    # Without the key, /info is refused and the page says so.
    wait_for(d, lambda d: "401" in d.find_element(By.ID, "info-status").text)
    d.find_element(By.ID, "api-key").send_keys(API_KEY, Keys.TAB)
    wait_for(d, lambda d: d.find_element(By.ID, "info-backend").text == "onnxruntime")
    info = httpx.get(keyed_server.url + "/info", headers=AUTH).json()["generation"]
    assert (d.find_element(By.ID, "info-device").text, d.find_element(By.ID, "info-precision").text) == (
        info["device"], info["precision"]) == ("cpu", "fp32")

    # Generation: count the token spans each time the page adds some, in the page itself.
    prompt = d.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    n = d.find_element(By.ID, "max-new-tokens")
    n.clear()
    n.send_keys("100")
    d.execute_script("""
        window.arrivals = [];
        new MutationObserver(() => window.arrivals.push(document.querySelectorAll('#output .token').length))
            .observe(document.getElementById('output'), {childList: true});""")
    d.find_element(By.ID, "generate").click()
    wait_for(d, lambda d: "finished: length" in d.find_element(By.ID, "gen-status").text)
    arrivals = [a for a in d.execute_script("return window.arrivals") if a > 0]
    assert arrivals[-1] == 100 and len(set(arrivals)) >= 2, arrivals  # tokens arrived over time, not at once
    spans = d.find_elements(By.CSS_SELECTOR, "#output .token")
    want = httpx.post(keyed_server.url + "/generate", headers=AUTH, timeout=60,
                      json={"inputs": PROMPT, "parameters": {"max_new_tokens": 100, "details": True}}).json()
    assert [s.get_attribute("title").split(",")[0] for s in spans] == [
        f"id {t['id']}" for t in want["details"]["tokens"]]
    assert d.find_element(By.ID, "output").text == PROMPT + want["generated_text"]
    assert d.find_element(By.ID, "gen-status").text.startswith("100 tokens in ")

    # Classification: the labels show up with the server's scores.
    text = d.find_element(By.ID, "classify-text")
    text.clear()
    text.send_keys("The judge read the verdict.")
    d.find_element(By.ID, "classify").click()
    wait_for(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#labels li")) == 3)
    shown = [(li.find_element(By.CLASS_NAME, "name").text, li.find_element(By.CLASS_NAME, "score").text)
             for li in d.find_elements(By.CSS_SELECTOR, "#labels li")]
    scores = httpx.post(keyed_server.url + "/classify", headers=AUTH, json={"inputs": "The judge read the verdict."})
    assert shown == [(x["label"], f"{x['score']:.3f}") for x in scores.json()]
    assert {name for name, _ in shown} == {"negative", "neutral", "positive"}

    # A bad value is the server's 422, shown on the page.
    n.clear()
    n.send_keys("5000")
    d.find_element(By.ID, "generate").click()
    wait_for(d, lambda d: "422" in d.find_element(By.ID, "gen-status").text)
    assert "max_new_tokens" in d.find_element(By.ID, "gen-status").text
    n.clear()
    n.send_keys("100")
    d.find_element(By.ID, "generate").click()
    wait_for(d, lambda d: "finished: length" in d.find_element(By.ID, "gen-status").text)
    d.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000
