"""`blip demo` as a user meets it: the server started as a subprocess on a free 127.0.0.1 port with a tiny model,
driven from headless Chromium (Selenium + Debian's chromium-driver): upload, caption, answer, Grad-CAM overlays,
search, a broken upload that gets a message while the server stays up; then 20 concurrent API requests.

Screenshots go to the test's tmp folder; with BLIP_DEMO_SCREENSHOTS=docs/demo they are copied there for README."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import blip
from blip.__main__ import main
from data.shapes import render
from tests._tiny import scrambled_model

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_thread")]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ROOT = Path(__file__).resolve().parents[1]
MAX_PIXELS = 1_000_000


def _need_browser_stack():
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -r requirements-demo.txt)")
    pytest.importorskip("gradio_client", reason="gradio_client is not installed (pip install -r requirements-demo.txt)")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium / chromedriver not on PATH (apt-get install chromium chromium-driver)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny pretraining checkpoint (every tab loads from it), a gallery of 6 shapes images embedded by it, and
    `blip demo` serving them. Yields (url, process, folder)."""
    _need_browser_stack()
    tmp = tmp_path_factory.mktemp("demo")
    model = scrambled_model("pretrain", preset="micro", queue_size=8, med_config={"num_hidden_layers": 2})
    blip.save_weights(model, tmp / "tiny.safetensors")
    rng = np.random.default_rng(0)
    (tmp / "gallery").mkdir()
    for i, (kind, color, position) in enumerate([("circle", "red", "left"), ("square", "blue", "right"),
                                                 ("triangle", "green", "top"), ("cross", "yellow", "bottom"),
                                                 ("circle", "purple", "center"), ("square", "orange", "left")]):
        scene = dict(kind=kind, color=color, count=1, size="large", position=position, background="white")
        render(scene, 96, rng).save(tmp / "gallery" / f"{i}_{color}_{kind}.png")
    assert main(["embed", str(tmp / "gallery"), "--checkpoint", str(tmp / "tiny.safetensors"), "--device", "cpu",
                 "--workers", "0", "--no-progress", "-o", str(tmp / "gallery.safetensors")]) == 0
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(ROOT))
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "blip", "demo", "--checkpoint", str(tmp / "tiny.safetensors"),
                             "--gallery", str(tmp / "gallery.safetensors"), "--device", "cpu", "--port", str(port),
                             "--max-pixels", str(MAX_PIXELS), "--concurrency", "2"],
                            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the demo did not answer within 120 s"
                time.sleep(0.5)
        yield url, proc, tmp
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def browser():
    _need_browser_stack()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _shapes_photo(path, kind="circle", color="red", position="left"):
    scene = dict(kind=kind, color=color, count=1, size="large", position=position, background="white")
    render(scene, 96, np.random.default_rng(1)).save(path)
    return path


def test_browser_caption_answer_gradcam_search_and_a_broken_upload(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    url, proc, folder = server
    wait = WebDriverWait(browser, 60)
    shots = tmp_path / "screens"
    shots.mkdir()

    def css(selector):
        return browser.find_elements(By.CSS_SELECTOR, selector)

    def field(elem_id):  # a gradio Textbox's value
        return css(f"#{elem_id} textarea, #{elem_id} input")[0].get_attribute("value")

    def status(name):
        return css(f"#{name}-status")[0].text

    def tab(label):
        next(b for b in css("button[role=tab]") if b.text == label).click()

    def ask(label, input_id, text, button_id):
        tab(label)
        css(f"#{input_id} textarea")[0].send_keys(text)
        css(f"#{button_id}")[0].click()

    def upload(path):
        clear = css("#upload button[aria-label=Clear]")
        if clear:
            clear[0].click()
        wait.until(lambda d: css("#upload input[type=file]"))
        css("#upload input[type=file]")[0].send_keys(str(path))

    def shot(name):
        browser.save_screenshot(str(shots / f"{name}.png"))

    browser.get(url)
    wait.until(lambda d: css("#upload input[type=file]"))
    upload(_shapes_photo(tmp_path / "red_circle.png"))
    wait.until(lambda d: css("#preview img"))
    css("#caption-button")[0].click()
    wait.until(lambda d: field("caption").strip())
    caption = field("caption")
    assert status("caption") == ""
    shot("caption")

    ask("VQA", "question", "what color is the circle?", "answer-button")
    wait.until(lambda d: field("answer").strip())
    assert status("answer") == ""

    ask("Match + Grad-CAM", "match-text", "a red circle on the left", "match-button")
    wait.until(lambda d: field("match-score").startswith("match probability"))
    wait.until(lambda d: len(css("#gradcam img")) >= 7)  # the whole text + 6 words
    overlays = css("#gradcam img")
    assert all(im.get_attribute("naturalWidth") not in (None, "0") for im in overlays)
    assert "whole text" in css("#gradcam")[0].text and "circle" in css("#gradcam")[0].text
    shot("gradcam")

    ask("Search", "query", "a blue square on the right", "search-button")
    wait.until(lambda d: len(css("#search-results img")) >= 5)
    ranking = field("search-ranking").splitlines()
    assert len(ranking) == 5 and ranking[0].startswith("1. ") and ".png" in ranking[0]
    shot("search")

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"<html>this is not a picture</html>")
    upload(broken)
    wait.until(lambda d: "cannot read image" in status("upload"))
    assert status("upload").startswith("error: cannot read image broken.png") and "Traceback" not in browser.page_source
    tab("Caption")
    css("#caption-button")[0].click()
    wait.until(lambda d: "broken.png" in status("caption"))
    shot("broken_upload")
    assert proc.poll() is None  # the server stays up, and serves the next good upload
    upload(_shapes_photo(tmp_path / "blue_square.png", "square", "blue", "right"))
    wait.until(lambda d: status("upload") == "")
    css("#caption-button")[0].click()
    wait.until(lambda d: status("caption") == "" and field("caption").strip())
    print("caption:", caption)

    for png in shots.glob("*.png"):
        assert png.stat().st_size < 300_000, png
    if os.environ.get("BLIP_DEMO_SCREENSHOTS"):
        out = Path(os.environ["BLIP_DEMO_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        for png in shots.glob("*.png"):
            shutil.copy(png, out / png.name)


def test_twenty_concurrent_requests_are_all_answered(server, tmp_path):
    from gradio_client import Client, handle_file
    url, proc, _ = server
    photo = handle_file(str(_shapes_photo(tmp_path / "photo.png")))
    huge = tmp_path / "huge.png"
    Image.new("RGB", (1100, 1000), "white").save(huge)  # 1.1 million pixels, over the server's --max-pixels
    client = Client(url, verbose=False)
    before = peak_rss_mb(proc.pid)
    requests = [((photo, "beam search", 3, 0.9), "/caption"), ((photo, "what color is it?"), "/answer"),
                ((photo, "a red circle on the left"), "/match"), (("a red circle", 3), "/search")] * 5
    started = time.time()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda r: client.predict(*r[0], api_name=r[1]), requests))
    seconds = time.time() - started
    after = peak_rss_mb(proc.pid)
    errors = [r[-1] for r in results if r[-1]]
    print(json.dumps({"requests": len(results), "errors": len(errors), "seconds": round(seconds, 1),
                      "server_peak_rss_mb_before": round(before), "server_peak_rss_mb_after": round(after)}))
    assert len(results) == 20 and not errors, errors
    assert all(r[0] for r in results)  # every caption, answer, match score and gallery is there
    assert proc.poll() is None
    text, message = client.predict(handle_file(str(huge)), "beam search", 3, 0.9, api_name="/caption")
    assert text is None and message == f"error: huge.png: 1100x1000 pixels, over this demo's limit of " \
                                       f"{MAX_PIXELS:,} (--max-pixels)"


def test_without_gradio_the_demo_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert main(["demo", "--device", "cpu", "--port", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: blip demo needs gradio: pip install -r requirements-demo.txt"


def test_a_tab_whose_model_the_checkpoint_lacks_says_why(tmp_path):
    from argparse import Namespace

    from blip.models.checkpoint import CheckpointMismatchError
    from blip.inference.demo import load_models
    torch.manual_seed(0)
    blip.save_weights(blip.load_model("caption", preset="micro"), tmp_path / "caption.safetensors")
    args = Namespace(checkpoint=str(tmp_path / "caption.safetensors"), caption_checkpoint=None, vqa_checkpoint=None,
                     itm_checkpoint=None, set=[], bf16=False)
    models = load_models(args, "cpu")
    assert models["caption"].task == "caption"
    assert isinstance(models["itm"], str) and models["itm"].startswith(f"no model: {args.checkpoint} does not load "
                                                                       f"as a 'itm' model")
    args.itm_checkpoint = args.checkpoint  # the tab's own checkpoint: an error, not a message
    with pytest.raises((CheckpointMismatchError, ValueError)):
        load_models(args, "cpu")


def test_output_images_are_own_files_and_old_ones_go(tmp_path, monkeypatch):
    # a path per output (gradio copies a path into its cache atomically; a PIL output is rewritten in place), and
    # a long-running page does not keep every image it ever showed
    import blip.inference.demo as demo_module
    demo = demo_module.Demo({}, "cpu", "fp32", max_pixels=100)
    first = demo.shown(Image.new("RGB", (8, 8), "red"))
    second = demo.shown(Image.new("RGB", (8, 8), "red"))
    assert first != second and Image.open(first).size == (8, 8)
    monkeypatch.setattr(demo_module, "OUTBOX_SECONDS", -1)
    third = demo.shown(Image.new("RGB", (8, 8), "blue"))
    assert not Path(first).exists() and not Path(second).exists() and Path(third).exists()
