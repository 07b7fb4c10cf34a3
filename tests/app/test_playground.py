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


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@needs_chromium
def test_playground_sends_a_json_schema_as_tgis_grammar(browser, keyed_server: Server) -> None:
    """The "JSON schema" box: a schema goes out as TGI's `parameters.grammar` ({"type": "json",
    "value": schema}); one that does not parse, or is not an object, is an error on the page and
    nothing is sent."""
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(keyed_server.url + "/")
    key = d.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys(API_KEY, Keys.TAB)
    d.execute_script("""
        window.sent = [];
        const f = window.fetch;
        window.fetch = (url, init) => {
            if (url === '/generate_stream') window.sent.push(JSON.parse(init.body));
            return f(url, init);
        };""")
    status, schema = d.find_element(By.ID, "gen-status"), d.find_element(By.ID, "json-schema")
    n = d.find_element(By.ID, "max-new-tokens")
    n.clear()
    n.send_keys("16")
    for text, error in (('{"type": "object",', "JSON schema: not valid JSON"), ("[1, 2]", "must be a JSON object")):
        schema.clear()
        schema.send_keys(text)
        d.find_element(By.ID, "generate").click()
        wait_for(d, lambda d, error=error: error in status.text)
        assert "error" in status.get_attribute("class")
    assert d.execute_script("return window.sent") == []  # nothing went out
    schema.clear()
    schema.send_keys(json.dumps(SCHEMA))
    d.find_element(By.ID, "generate").click()
    wait_for(d, lambda d: len(d.execute_script("return window.sent")) == 1)
    assert d.execute_script("return window.sent")[0]["parameters"]["grammar"] == {"type": "json", "value": SCHEMA}
    wait_for(d, lambda d: "finished:" in status.text)
    generated = d.find_element(By.ID, "output").text[len(d.find_element(By.ID, "prompt").get_attribute("value")):]
    assert "".join(generated.split()).startswith('{"city":"'), generated  # the server followed the schema
    schema.clear()
    d.find_element(By.ID, "generate").click()
    wait_for(d, lambda d: "finished:" in status.text)
    assert "grammar" not in d.execute_script("return window.sent")[-1]["parameters"]


SCORING_SHOT = REPO / "docs" / "playground-scoring.png"
SCORED_TEXT = ("Q: What is the difference between a duck? A: One of its legs is both the same. "
               "The best way to predict the future is to invent it.")


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory, onnx_cache) -> Server:
    """The demo LM (trained on fortunes, so the shading shows a trained model's view of a text)."""
    from tests.app.conftest import base_env, start_server, stop_server

    demo = REPO / "model" / "demo" / "lm"
    srv = start_server(tmp_path_factory.mktemp("demo"), base_env(demo, demo, onnx_cache, CLASSIFIER_PATH="",
                                                                 MAX_INPUT_TOKENS="256", MAX_TOTAL_TOKENS="512"))
    yield srv
    stop_server(srv)


def rank(token: str, logprob: float, top: dict[str, float]) -> int:
    """1 + the alternatives more likely than the token; 21 stands for "past the 20 returned"."""
    better = sum(1 for text, lp in top.items() if text != token and lp > logprob)
    return 21 if better >= 20 else better + 1


@needs_chromium
def test_playground_scores_a_text(browser, demo_server: Server) -> None:
    """The scoring panel: each token shaded by its rank among the model's alternatives (GLTR's
    buckets) or by its log-probability, the text's perplexity, and a token's alternatives on hover,
    all as the server computed them; the perplexity is transformers' too."""
    import base64
    import math

    import torch
    import transformers
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    d = browser
    d.get(demo_server.url + "/")
    text = d.find_element(By.ID, "score-text")
    text.clear()
    text.send_keys(SCORED_TEXT)
    d.find_element(By.ID, "score").click()
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#scored .stok") and d.find_element(By.ID,
                                                                                            "score-perplexity"))
    want = httpx.post(demo_server.url + "/v1/completions", timeout=60, json={
        "prompt": SCORED_TEXT, "max_tokens": 0, "echo": True, "logprobs": 20}).json()["choices"][0]["logprobs"]
    spans = d.find_elements(By.CSS_SELECTOR, "#scored .stok")
    assert [s.get_attribute("textContent") for s in spans] == want["tokens"]
    assert d.find_element(By.ID, "scored").get_attribute("textContent") == SCORED_TEXT
    assert spans[0].get_attribute("data-logprob") == "" and "first" in spans[0].get_attribute("class")
    ranks = [rank(t, lp, top) for t, lp, top in zip(want["tokens"][1:], want["token_logprobs"][1:],
                                                    want["top_logprobs"][1:], strict=True)]
    shown = [(s.get_attribute("data-logprob"), s.get_attribute("data-rank"), s.get_attribute("class").split()[-1])
             for s in spans[1:]]
    buckets = {1: "r1", 2: "r5", 3: "r5", 4: "r5", 5: "r5", 21: "rmore"}
    assert shown == [(f"{lp:.4f}", ">20" if r > 20 else str(r), buckets.get(r, "r20"))
                     for lp, r in zip(want["token_logprobs"][1:], ranks, strict=True)]
    assert len(set(ranks)) > 3  # the demo model's view: some tokens expected, some not
    counts = [li.text for li in d.find_elements(By.CSS_SELECTOR, "#score-legend .bucket")]
    assert counts == [f"rank 1: {ranks.count(1)}", f"rank 2–5: {sum(2 <= r <= 5 for r in ranks)}",
                      f"rank 6–20: {sum(6 <= r <= 20 for r in ranks)}", f"rank > 20: {ranks.count(21)}"]
    mean = sum(want["token_logprobs"][1:]) / len(ranks)
    assert d.find_element(By.ID, "score-perplexity").text == f"{math.exp(-mean):.2f}"
    assert d.find_element(By.ID, "score-tokens").text == str(len(spans))
    hf = transformers.GPT2LMHeadModel.from_pretrained(REPO / "model" / "demo" / "lm").eval()
    ids = transformers.AutoTokenizer.from_pretrained(REPO / "model" / "demo" / "lm")(SCORED_TEXT).input_ids
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].double(), -1)
    ref = math.exp(-float(lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()))
    assert abs(float(d.find_element(By.ID, "score-perplexity").text) - ref) < 0.01

    # Hover: the token's alternatives, best first, the token itself marked.
    k = max(range(1, len(spans)), key=lambda i: ranks[i - 1] if ranks[i - 1] <= 20 else 0)  # one with a rank > 1
    ActionChains(d).move_to_element(spans[k]).perform()
    wait_for(d, lambda d: d.find_element(By.ID, "alt").is_displayed())
    rows = d.find_elements(By.CSS_SELECTOR, "#alt tr")
    alternatives = sorted(want["top_logprobs"][k].items(), key=lambda kv: -kv[1])
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == [f"{lp:.3f}" for _, lp in alternatives]
    assert [r.get_attribute("class") for r in rows].index("me") == ranks[k - 1] - 1
    assert f"rank {ranks[k - 1]}" in d.find_element(By.CSS_SELECTOR, "#alt .head").text
    # The screenshot: the scoring panel and the hovered token's alternatives (Chrome's DevTools
    # capture, clipped to both).
    clip = d.execute_script("""
        const a = document.getElementById('scoring').getBoundingClientRect();
        const b = document.getElementById('alt').getBoundingClientRect();
        const x = Math.min(a.left, b.left) - 8 + window.scrollX, y = Math.min(a.top, b.top) - 8 + window.scrollY;
        return {x: x, y: y, width: Math.max(a.right, b.right) + 8 + window.scrollX - x,
                height: Math.max(a.bottom, b.bottom) + 8 + window.scrollY - y, scale: 1};""")
    shot = d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
    SCORING_SHOT.write_bytes(base64.b64decode(shot["data"]))
    assert SCORING_SHOT.stat().st_size > 10_000

    # Shading by log-probability: a red whose strength follows the log-probability (the browser keeps
    # the alpha in 1/255 steps).
    from selenium.webdriver.support.ui import Select

    Select(d.find_element(By.ID, "shade")).select_by_value("logprob")
    styles = [s.value_of_css_property("background-color") for s in spans[1:]]
    alphas = [float(s.split(",")[-1].rstrip(")")) if s.startswith("rgba") else 1.0 for s in styles]
    assert alphas == pytest.approx([min(1, -lp / 10) * 0.8 for lp in want["token_logprobs"][1:]], abs=4e-3)

    # A bad request is the server's 400, shown on the page.
    text.clear()
    d.find_element(By.ID, "score").click()
    wait_for(d, lambda d: "400" in d.find_element(By.ID, "score-status").text)
    assert "prompt" in d.find_element(By.ID, "score-status").text
