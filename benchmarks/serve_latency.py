"""Cold start and latency of inference: `fer predict` on one photo, `fer serve` to its first
answer, then POST /predict latency p50/p95 at 1 and 8 concurrent clients and requests/s; beside
the `fer` PyPI package (justinshenk/fer) on the same photo when it is importable.

    PYTHONPATH=tests python benchmarks/serve_latency.py --model release/model.onnx --model release/model.keras
        [--photo P] [--requests 40]
        [--fer-package-path DIR]   # a `pip install --no-deps --target DIR fer` (optional)

Results are appended to experiments/journal.md. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import cv2
import httpx
import numpy as np

from sandbox import free_port

FER = [sys.executable, "-m", "fer_pipeline.cli"]


def photo(path: Path) -> Path:
    """A 640x480 photo: the happy test face upscaled to 200x200 on a gray background."""
    face = cv2.imread(str(common.ROOT / "tests/fixtures/happy_48.jpg"), cv2.IMREAD_GRAYSCALE)
    canvas = np.full((480, 640), 190, np.uint8)
    canvas[120:320, 220:420] = cv2.resize(face, (200, 200), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR))
    return path


def timed(cmd: list[str], env: dict | None = None, repeats: int = 3
          ) -> tuple[list[float], float]:
    """Wall seconds of each run, and the largest peak resident memory (MB) among them."""
    out, peak = [], 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        out.append(time.perf_counter() - t0)
        peak = max(peak, usage.ru_maxrss / 1024)        # Linux: KiB
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode(errors="replace")
        if proc.returncode != 0:
            raise SystemExit(f"{cmd} failed:\n{err[-2000:]}")
    return out, peak


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _portable_command() -> str:
    """The command with paths outside the project named only by their file name."""
    out = []
    for a in sys.argv[1:]:
        p = Path(a)
        if p.is_absolute() or p.exists():
            try:
                a = str(p.resolve().relative_to(common.ROOT))
            except ValueError:
                a = f"<{p.name}>"
        out.append(a)
    return " ".join(["python", "benchmarks/serve_latency.py", *out])


def serve_figures(model: str, img: Path, env: dict, requests: int, cwd: Path) -> dict:
    """fer serve with `model`: seconds to its first answer, then latency at 1 and 8 clients."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    server = subprocess.Popen([*FER, "serve", "--model", model, "--tta", "none", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=cwd)
    data = img.read_bytes()
    headers = {"content-type": "image/jpeg"}
    out: dict = {}
    try:
        while True:
            try:
                r = httpx.post(f"{url}/predict", content=data, headers=headers, timeout=60)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
            if time.perf_counter() - t0 > 300 or server.poll() is not None:
                raise SystemExit("fer serve did not answer")
        out["first"] = time.perf_counter() - t0
        assert r.json()["results"][0]["faces"], r.text
        with httpx.Client() as c:
            for _ in range(3):
                c.post(f"{url}/predict", content=data, headers=headers)

        def client(n: int) -> list[float]:
            lat = []
            with httpx.Client(timeout=120) as c:
                for _ in range(n):
                    s = time.perf_counter()
                    assert c.post(f"{url}/predict", content=data, headers=headers).status_code == 200
                    lat.append(time.perf_counter() - s)
            return lat

        for clients in (1, 8):
            t = time.perf_counter()
            with cf.ThreadPoolExecutor(clients) as ex:
                lat = [x for f in [ex.submit(client, requests) for _ in range(clients)]
                       for x in f.result()]
            wall = time.perf_counter() - t
            out[clients] = (1000 * pct(lat, 50), 1000 * pct(lat, 95), len(lat) / wall)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True,
                    help="a model file (.keras or .onnx); repeat to compare")
    ap.add_argument("--photo", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=40, help="per client")
    ap.add_argument("--fer-package-path", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fer-bench-"))
    img = args.photo or photo(tmp / "photo.jpg")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    lines = [f"- machine: {common.machine()}", "- photo: 640x480 JPEG with one face (the happy "
             "test face upscaled), tta none; cold starts are the median of 3 process runs"]
    import_tf, _ = timed([sys.executable, "-c", "import tensorflow"], env)
    lines.append(f"- `import tensorflow` alone: {statistics.median(import_tf):.2f} s")
    if args.fer_package_path:
        code = ("import cv2; from fer.fer import FER; d = FER(); "
                f"print(d.detect_emotions(cv2.imread({str(img)!r})))")
        fer_env = {**env, "PYTHONPATH": args.fer_package_path}
        fer_pkg, fer_rss = timed([sys.executable, "-c", code], fer_env)
        lines.append(f"- `fer` PyPI package (25.10.3, Haar + its bundled CNN), same photo, same "
                     f"interpreter: **{statistics.median(fer_pkg):.2f} s**, peak memory "
                     f"{fer_rss:.0f} MB")
    lines += ["", "| model file | `fer predict` cold start | peak memory | `fer serve` first "
              "answer | p50 / p95 @1 client | req/s @1 | p50 / p95 @8 clients | req/s @8 |",
              "|---|---|---|---|---|---|---|---|"]
    for model in [str(Path(m).resolve()) if Path(m).exists() else m for m in args.model]:
        cold, rss = timed([*FER, "predict", "--model", model, "--tta", "none", str(img)], env)
        sv = serve_figures(model, img, env, args.requests, tmp)
        lines.append(f"| `{Path(model).name}` | **{statistics.median(cold):.2f} s** | "
                     f"{rss:.0f} MB | {sv['first']:.2f} s | {sv[1][0]:.0f} / {sv[1][1]:.0f} ms | "
                     f"{sv[1][2]:.1f} | {sv[8][0]:.0f} / {sv[8][1]:.0f} ms | {sv[8][2]:.1f} |")
        print(lines[-1], flush=True)
    print(common.append_results("inference cold start and service latency", "\n".join(lines),
                                command=_portable_command()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
