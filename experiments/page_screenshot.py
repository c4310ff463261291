"""Screenshot of `fer serve`'s page classifying a photo with the bundled release, as a new user
sees it on a fresh clone (no tracking store: the release answers).

    PYTHONPATH=benchmarks:tests python experiments/page_screenshot.py \
        [--out docs/images/fer-serve-page.png] [--photo P]

Needs Debian's chromium + chromium-driver (as the browser test). The default photo puts the two
test faces (happy, surprise) side by side, upscaled, on a plain background.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import cv2
import httpx
import numpy as np
import yaml

from fer_pipeline.release import find_release
from sandbox import free_port


def two_faces(path: Path) -> Path:
    canvas = np.full((420, 760), 200, np.uint8)
    for k, name in enumerate(("happy_48.jpg", "surprise_48.jpg")):
        face = cv2.imread(str(common.ROOT / "tests/fixtures" / name), cv2.IMREAD_GRAYSCALE)
        # FER crops are tight; a margin (edges repeated) lets the detector see a whole head
        face = cv2.copyMakeBorder(face, 8, 8, 8, 8, cv2.BORDER_REPLICATE)
        x = 40 + k * 380
        canvas[60:360, x:x + 300] = cv2.resize(face, (300, 300), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR))
    return path


def main() -> int:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=common.ROOT / "docs/images/fer-serve-page.png")
    ap.add_argument("--photo", type=Path, default=None)
    args = ap.parse_args()
    release = find_release(common.ROOT / "release")
    if release is None:
        raise SystemExit("no release/ bundle: run `fer export` first")
    tmp = Path(tempfile.mkdtemp(prefix="fer-shot-"))
    photo = args.photo or two_faces(tmp / "two-faces.jpg")
    params = tmp / "params.yaml"       # no tracking store here: the release answers
    params.write_text(yaml.safe_dump({"mlflow": {"tracking_uri": f"sqlite:///{tmp / 'none.db'}"},
                                      "predict": {"release_dir": str(release)}}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    server = subprocess.Popen([sys.executable, "-m", "fer_pipeline.cli", "--params", str(params),
                               "serve", "--port", str(port)], cwd=tmp, env=env)
    url = f"http://127.0.0.1:{port}"
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,1100"):
        opts.add_argument(arg)
    driver = None
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
        driver.get(url + "/")
        WebDriverWait(driver, 30).until(lambda d: "release" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "file").send_keys(str(photo))
        labels = WebDriverWait(driver, 60).until(
            lambda d: d.find_elements(By.CLASS_NAME, "face-label"))
        print("\n".join(label.text for label in labels))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"screenshot: {args.out}")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
