"""The web page of pmod serve in headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
load it, upload an image, ask, read the streamed answer, see the routing map. Skips where Chromium is absent;
.ci/setup installs it on CI."""
from __future__ import annotations

import shutil

import httpx
import pytest
from serve_util import PMOD, QUESTIONS, Reference, running_server, user_message, write_images

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Chromium or chromedriver is absent "
                                "(Debian: apt-get install chromium chromium-driver)")


def browser():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)


def test_page_uploads_asks_streams_and_draws_the_routing_map(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = write_images(tmp_path, 1)[0]
    question = QUESTIONS[3]
    ref = Reference(PMOD)
    with running_server(PMOD) as srv:
        direct = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "messages": user_message(question, image), "temperature": 0, "max_tokens": 24, "pmod": {"routing": True}}).json()
        drv = browser()
        try:
            drv.get(srv.url + "/")
            wait = WebDriverWait(drv, 60)
            wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny-synth-pmod")
            drv.find_element(By.ID, "image").send_keys(str(image))
            wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("image: "))
            q = drv.find_element(By.ID, "question")
            q.clear()
            q.send_keys(question)
            drv.find_element(By.ID, "max-tokens").clear()
            drv.find_element(By.ID, "max-tokens").send_keys("24")
            drv.find_element(By.ID, "ask").click()
            wait.until(lambda d: d.find_element(By.ID, "status").text in ("done",) or "error" in d.find_element(By.ID, "status").text)
            assert drv.find_element(By.ID, "status").text == "done"
            answer = drv.find_element(By.ID, "answer").text
            maps = drv.find_elements(By.CSS_SELECTOR, "#routing canvas")
            kept = [int(c.get_attribute("data-kept")) for c in maps]
            eff = drv.find_element(By.ID, "efficiency").text
            # a kept patch is drawn as it is, a skipped one dimmed: compare the two in the deepest layer's panel
            dimmed = drv.execute_script("""
                const c = document.querySelectorAll('#routing canvas'); const last = c[c.length - 1];
                const d = last.getContext('2d').getImageData(0, 0, last.width, last.height).data;
                let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2]; return s / (d.length / 4);""")
            plain = drv.execute_script("""
                const c = document.getElementById('preview'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2]; return s / (d.length / 4);""")
        finally:
            drv.quit()
    assert answer == direct["choices"][0]["message"]["content"] == ref.answer(question, image, 24)
    routing = direct["usage"]["pmod"]["routing"]
    assert kept == [len(layer["kept"]) for layer in routing["layers"]] and len(kept) == 4
    assert "KV" in eff and "vs dense" in eff and "prefill" in eff
    assert dimmed < 0.6 * plain  # the deepest layer keeps 15 %: most of its panel is dimmed


def test_page_draws_every_images_routing_map(tmp_path):
    """Two images in one question: the page sends both and draws a row of layer panels per image, each with the
    kept counts the server's routing map gives that image (usage.pmod.routing.images)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pics = write_images(tmp_path, 2)
    question = QUESTIONS[0]
    model = _longer_context(tmp_path / "model", 1024)  # two 256-token images do not fit the shipped 512
    content = [{"type": "image_url", "image_url": {"url": user_message("", p)[0]["content"][0]["image_url"]["url"]}}
               for p in pics] + [{"type": "text", "text": question}]
    with running_server(model) as srv:
        direct = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 6,
            "pmod": {"routing": True}}).json()
        drv = browser()
        try:
            drv.get(srv.url + "/")
            wait = WebDriverWait(drv, 60)
            wait.until(lambda d: d.find_element(By.ID, "model").text == "model")
            drv.find_element(By.ID, "image").send_keys("\n".join(str(p) for p in pics))
            wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("2 images: "))
            drv.find_element(By.ID, "max-tokens").clear()
            drv.find_element(By.ID, "max-tokens").send_keys("6")
            drv.find_element(By.ID, "ask").click()
            wait.until(lambda d: d.find_element(By.ID, "status").text == "done" or "error" in d.find_element(By.ID, "status").text)
            assert drv.find_element(By.ID, "status").text == "done"
            answer = drv.find_element(By.ID, "answer").text
            drawn = {int(c.get_attribute("data-image")): [] for c in drv.find_elements(By.CSS_SELECTOR, "#routing canvas")}
            for c in drv.find_elements(By.CSS_SELECTOR, "#routing canvas"):
                drawn[int(c.get_attribute("data-image"))].append(int(c.get_attribute("data-kept")))
            titles = [h.text for h in drv.find_elements(By.CSS_SELECTOR, "#routing h3")]
        finally:
            drv.quit()
    assert answer == direct["choices"][0]["message"]["content"]
    routing = direct["usage"]["pmod"]["routing"]
    assert [im["image"] for im in routing["images"]] == [0, 1] and titles == ["image 1", "image 2"]
    assert drawn == {im["image"]: [len(layer["kept"]) for layer in im["layers"]] for im in routing["images"]}
    assert drawn[0] != drawn[1] or routing["images"][0]["layers"] != routing["images"][1]["layers"]  # two maps, each its own


def _longer_context(folder, n: int):
    """The shipped tiny p-MoD model with a context of `n` positions (RoPE has no table to outgrow)."""
    import json

    shutil.copytree(PMOD, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_max_length"] = cfg["text"]["max_position_embeddings"] = n
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder
