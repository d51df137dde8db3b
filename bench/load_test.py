"""Load test of ``cxr serve`` on loopback: N requests from C concurrent clients, per engine.

The service runs as ``cxr serve`` in a child process on 127.0.0.1 (a real uvicorn server), and the clients are
httpx coroutines in this process, each posting one X-ray per request to ``/v1/predict`` and waiting for the answer
before sending the next. Printed per engine: requests, errors, wall time, throughput, latency p50 / p95 / p99 /
max, and how the server batched them (model calls, mean images per call, from ``/v1/health``; with several
``--workers`` that is the one worker that answered the health request).

The model is ``--run`` or, without one, a throwaway MobileNetV2 run at 224 px trained for one step on a few
synthetic images (the weights do not change the speed). The uploads are real X-rays from
``$CXR_SHARED/data/chest_xray`` when present (JPEGs of the Kermany set, 224x224 in that copy), else, or with
``--large SIDE``, synthetic SIDE x SIDE JPEGs (quality 90) the size of a real radiograph. The request count and
the time are both bounded (``--requests``, ``--max-seconds``).

    python bench/load_test.py                                   # 500 requests, 16 clients, engines onnx and torch
    python bench/load_test.py --large 2048                      # full-size uploads: decoding and resizing count
    python bench/load_test.py --run runs/pneumonia-mobilenetv2-... --engines auto --requests 1000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from options import positive

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXR_SHARED", REPO.parent / "shared"))
CXR = [sys.executable, "-m", "cxrkit.cli.main"]


def _throwaway_run(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("NORMAL", "PNEUMONIA"):
        (folder / "data" / "train" / label).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (256, 256), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "data" / "train" / label / f"person{i}_{label.lower()}_{i}.jpeg")
    out = subprocess.run([*CXR, "train", "--data", str(folder / "data"), "--out", str(folder / "runs"),
                          "--backbone", "mobilenet_v2", "--weights", "none", "--set", "stages.0.epochs=1",
                          "--set", "stages.1.trainable=head", "--set", "stages.1.epochs=1",
                          "--set", "runtime.batch_size=8"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _uploads(folder: Path, count: int, large: int | None) -> list[tuple[str, bytes]]:
    real = SHARED / "data" / "chest_xray" / "train"
    files = sorted(real.glob("*/*.jpeg"))[:count] if real.is_dir() and not large else []
    if files:
        return [(f.name, f.read_bytes()) for f in files]
    import numpy as np
    from PIL import Image

    side = large or 1024
    rng = np.random.default_rng(1)
    ramp = np.linspace(40, 200, side)[None, :] + np.linspace(0, 30, side)[:, None]
    for i in range(count):  # smooth like a radiograph, with noise, so JPEG sizes are realistic
        pixels = np.clip(ramp + rng.normal(0, 12, (side, side)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"synthetic{i}.jpeg", quality=90)
    return [(p.name, p.read_bytes()) for p in sorted(folder.glob("synthetic*.jpeg"))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, uploads: list[tuple[str, bytes]], requests: int, clients: int,
                max_seconds: float) -> tuple[list[float], list[str], float]:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    stop_at = time.perf_counter() + max_seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < stop_at:
            name, data = uploads[sent % len(uploads)]
            sent += 1
            start = time.perf_counter()
            try:
                response = await http.post(url, files={"file": (name, data, "application/octet-stream")})
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:120]}")
            except httpx.HTTPError as err:
                errors.append(f"{type(err).__name__}: {err}")
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, errors, time.perf_counter() - start


def _serve(run: Path, engine: str, port: int, workers: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([*CXR, "serve", str(run), "--port", str(port), "--engine", engine,
                             "--workers", str(workers), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # the first ONNX export of a run takes a while
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"cxr serve exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("cxr serve did not answer /v1/health within 300 s")


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="run to serve (default: a throwaway MobileNetV2 run)")
    parser.add_argument("--engines", nargs="+", default=["onnx", "torch"])
    parser.add_argument("--requests", type=positive, default=500)
    parser.add_argument("--clients", type=positive, default=16)
    parser.add_argument("--workers", type=positive, default=1)
    parser.add_argument("--max-seconds", type=float, default=600, help="stop sending after this long (> 0)")
    parser.add_argument("--large", type=int, metavar="SIDE", help="upload synthetic SIDE x SIDE JPEGs instead")
    args = parser.parse_args()
    if args.max_seconds <= 0:
        parser.error(f"--max-seconds {args.max_seconds:g} must be above 0")

    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or _throwaway_run(Path(tmp))
        uploads = _uploads(Path(tmp), 16 if args.large else 64, args.large)
        size = statistics.mean(len(d) for _, d in uploads) / 1024
        print(f"run {run.name}; {len(uploads)} distinct uploads, mean {size:.0f} KiB; {args.requests} requests from "
              f"{args.clients} clients; {os.cpu_count()} cores; loopback")
        print(f"{'engine':<9} {'ok':>5} {'errors':>6} {'wall s':>7} {'req/s':>6} {'p50 ms':>7} {'p95 ms':>7} "
              f"{'p99 ms':>7} {'max ms':>7} {'calls':>6} {'img/call':>8}")
        for engine in args.engines:
            port = _free_port()
            server = _serve(run, engine, port, args.workers)
            try:
                url = f"http://127.0.0.1:{port}"
                latencies, errors, wall = asyncio.run(
                    _load(url + "/v1/predict", uploads, args.requests, args.clients, args.max_seconds))
                health = httpx.get(url + "/v1/health").json()
            finally:
                server.terminate()
                server.wait(timeout=60)
            ms = [v * 1000 for v in latencies]
            if not ms:
                print(f"{health['engine']:<9} no request finished within --max-seconds {args.max_seconds:g}")
                continue
            print(f"{health['engine']:<9} {len(ms) - len(errors):>5} {len(errors):>6} {wall:>7.1f} "
                  f"{len(ms) / wall:>6.1f} {_percentile(ms, 50):>7.0f} {_percentile(ms, 95):>7.0f} "
                  f"{_percentile(ms, 99):>7.0f} {max(ms):>7.0f} {health['batches']:>6} "
                  f"{health['images'] / max(1, health['batches']):>8.1f}", flush=True)
            for err in errors[:5]:
                print(f"  error: {err}")


if __name__ == "__main__":
    main()
