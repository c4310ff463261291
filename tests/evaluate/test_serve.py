"""`fer serve` as a real process (uvicorn on 127.0.0.1): the API, its limits and errors, and the
web page in a real headless browser (Debian's chromium driven by Selenium)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from faces import rolled_face
from fer_pipeline import params as P
from sandbox import free_port

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CLASSES = P.Params().data.classes


def _photo_bytes() -> bytes:
    face = cv2.imread(str(FIXTURES / "happy_48.jpg"), cv2.IMREAD_GRAYSCALE)
    canvas = np.full((480, 640), 190, np.uint8)
    canvas[120:320, 220:420] = cv2.resize(face, (200, 200), interpolation=cv2.INTER_CUBIC)
    return cv2.imencode(".jpg", canvas)[1].tobytes()


@pytest.fixture(scope="module")
def server(trained_project, tmp_path_factory):
    root, _ = trained_project
    d = tmp_path_factory.mktemp("serve")
    (d / "params.yaml").write_text("serve:\n  max_request_mb: 2\n  max_images: 4\n"
                                   "predict:\n  max_pixels: 4000000\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = (d / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "fer_pipeline.cli", "serve", "--model",
                             str(root / "models/small/model.keras"), "--port", str(port)],
                            cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    else:
        proc.kill()
    if proc.poll() is not None:
        pytest.fail("fer serve did not start:\n" + (d / "serve.log").read_text()[-3000:])
    yield url, d / "serve.log"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_predict_raw_and_batch_with_class_names(server):
    url, _ = server
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"]["classes"] == CLASSES
    r = httpx.post(f"{url}/predict", content=_photo_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200
    (res,) = r.json()["results"]
    assert res["ok"] and len(res["faces"]) == 1
    face = res["faces"][0]
    assert face["emotion"] in CLASSES and set(face["probabilities"]) == set(CLASSES)
    assert abs(face["box"]["x"] + face["box"]["w"] / 2 - 320) < 40
    assert r.json()["model"]["source"].endswith("model.keras")

    files = [("file", ("a.jpg", (FIXTURES / "happy_48.jpg").read_bytes(), "image/jpeg")),
             ("file", ("b.jpg", (FIXTURES / "surprise_48.jpg").read_bytes(), "image/jpeg")),
             ("file", ("notes.txt", b"not an image", "text/plain"))]
    r = httpx.post(f"{url}/predict", files=files)
    assert r.status_code == 200                      # a batch: per-image errors inside
    by = {x["name"]: x for x in r.json()["results"]}
    assert by["a.jpg"]["faces"][0]["emotion"] in CLASSES and by["b.jpg"]["mode"] == "crop"
    assert not by["notes.txt"]["ok"] and "not an image" in by["notes.txt"]["error"]
    card = httpx.get(f"{url}/model").json()
    assert card["classes"] == CLASSES and "48x48" in card["input"]


def test_limits_and_errors_are_clear_4xx_without_tracebacks(server):
    url, log = server
    cases = {
        "empty": (httpx.post(f"{url}/predict", content=b""), 400),
        "not an image": (httpx.post(f"{url}/predict", content=b"hello", headers={
            "content-type": "application/octet-stream"}), 415),
        "pixels": (httpx.post(f"{url}/predict", content=_png(3000, 2000)), 413),
        "bytes": (httpx.post(f"{url}/predict", content=os.urandom(2_500_000)), 413),
        "images": (httpx.post(f"{url}/predict", files=[
            ("file", (f"{k}.jpg", (FIXTURES / "happy_48.jpg").read_bytes(), "image/jpeg"))
            for k in range(5)]), 413),
        "no file": (httpx.post(f"{url}/predict", files={"x": (None, "1")}), 400),
    }
    for what, (resp, status) in cases.items():
        assert resp.status_code == status, (what, resp.status_code, resp.text[:300])
        body = resp.json()
        assert body["error"] and "Traceback" not in resp.text, what
    assert "6,000,000 pixels" in cases["pixels"][0].json()["error"]
    assert "serve.max_images 4" in cases["images"][0].json()["error"]
    assert "Traceback" not in log.read_text()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_it_binds_to_localhost_by_default(server):
    url, _ = server
    assert url.startswith("http://127.0.0.1:")
    assert P.Params().serve.host == "127.0.0.1"


@pytest.mark.skipif(not shutil.which("chromium") or not shutil.which("chromedriver"),
                    reason="needs Debian's chromium + chromium-driver (.ci/run installs them)")
@pytest.mark.slow
def test_the_web_page_in_a_real_browser(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(_photo_bytes())
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(url + "/")
        WebDriverWait(driver, 30).until(
            lambda d: "model:" in d.find_element(By.ID, "model").text
            and "loading" not in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "file").send_keys(str(photo))
        labels = WebDriverWait(driver, 60).until(
            lambda d: d.find_elements(By.CLASS_NAME, "face-label"))
        text = labels[0].text
        assert text.startswith("Face 1: ") and any(c in text for c in CLASSES), text
        bars = driver.find_elements(By.CSS_SELECTOR, ".face .row")
        assert len(bars) == len(CLASSES)
        assert driver.find_element(By.ID, "error").text == ""
        # Boxes are drawn: the canvas is no longer the plain photo at the face's edge.
        shot = tmp_path / "fer-serve-page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        # A rolled head: found by the roll search, its tilt said on the page.
        tilted = tmp_path / "tilted.png"
        tilted.write_bytes(cv2.imencode(".png", rolled_face("surprise_48.jpg", -30))[1].tobytes())
        driver.find_element(By.ID, "file").send_keys(str(tilted))
        label = WebDriverWait(driver, 60).until(
            lambda d: [e.text for e in d.find_elements(By.CLASS_NAME, "face-label")
                       if "tilted" in e.text])
        assert label[0].startswith("Face 1: ") and "tilted about" in label[0], label
        assert driver.find_element(By.ID, "error").text == ""
        artifacts = os.environ.get("FER_TEST_ARTIFACTS")
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(artifacts) / shot.name)
    finally:
        driver.quit()
