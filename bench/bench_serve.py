"""A bounded load check of `stopsign serve`: concurrent clients against a real uvicorn process.

    .venv/bin/python bench/bench_serve.py [MODEL ...] [--clients 8] [--seconds 20] [--max-growth-mb 50]

Each MODEL (.pt or .onnx) is served by `stopsign serve` in its own process on a free 127.0.0.1 port; N client
threads (httpx, keep-alive) POST real photos to /predict for a fixed time. It prints requests per second,
p50/p99 latency, errors and the server's resident memory after warm-up and after the load. PASS needs zero
errors and RSS growth under the bound; the exit status is 1 otherwise. Without MODEL it trains
efficientnet_lite0 for 2 epochs on generated demo scenes and benches that checkpoint and its ONNX export.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

PHOTOS = Path(__file__).resolve().parents[2] / "shared/data/cvstudio-stop-signs/test_images"


def rss_mb(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:  # /proc is enough on Linux
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"cannot read the memory of process {pid}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def server(model: Path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "stopsign.cli", "-q", "serve", str(model), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    yield url, process.pid
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the server for {model} did not start")
    finally:
        process.terminate()
        process.wait(timeout=30)


def load(url: str, photos: list[tuple[str, bytes]], clients: int, seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            i = offset
            while time.monotonic() < stop_at:
                name, data = photos[i % len(photos)]
                started = time.perf_counter()
                try:
                    ok = http.post("/predict", files={"file": (name, data, "image/jpeg")}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - started
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        errors[0] += 1
                i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0]


def bench(model: Path, photos, clients: int, seconds: float, bound_mb: float) -> dict:
    with server(model) as (url, pid):
        load(url, photos, clients, 2.0)  # warm-up: allocator pools and thread pools reach their working size
        before = rss_mb(pid)
        latencies, errors = load(url, photos, clients, seconds)
        after = rss_mb(pid)
    ms = np.array(latencies) * 1000
    growth = after - before
    return {"model": model.name, "requests": len(latencies), "req/s": len(latencies) / seconds,
            "p50 ms": np.percentile(ms, 50) if len(ms) else float("nan"),
            "p99 ms": np.percentile(ms, 99) if len(ms) else float("nan"), "errors": errors,
            "RSS before MB": before, "RSS after MB": after, "growth MB": growth,
            "result": "PASS" if errors == 0 and growth < bound_mb and latencies else "FAIL"}


def demo_models(folder: Path) -> list[Path]:
    from stopsign import train
    from stopsign.data.demo import make_demo_data
    from stopsign.deploy.export import export

    data = make_demo_data(folder / "data", per_class=12, seed=0)
    run = train(data, backbone="efficientnet_lite0", epochs=2, augment=False, out=str(folder / "runs"),
                name="bench", progress=False, cache_dir=str(folder / "cache"))
    onnx_path, _ = export(run.run_dir / "best.pt")
    return [run.run_dir / "best.pt", onnx_path]


def photo_files(folder: Path) -> list[Path]:
    if PHOTOS.is_dir():
        return sorted(PHOTOS.glob("*.jpeg"))
    return sorted((folder / "data" / "images").glob("*.jpg"))[:8]  # the generated demo scenes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", type=Path, help=".pt checkpoints or .onnx files (default: a demo model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-growth-mb", type=float, default=50, help="PASS bound on the server's RSS growth")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as temporary:
        folder = Path(temporary)
        models = args.models or demo_models(folder)
        photos = [(p.name, p.read_bytes()) for p in photo_files(folder)]
        print(f"{args.clients} clients x {args.seconds:g} s per model, {len(photos)} photos "
              f"({sum(len(d) for _, d in photos) / len(photos) / 1e3:.0f} kB average), POST /predict")
        rows = [bench(model, photos, args.clients, args.seconds, args.max_growth_mb) for model in models]
    columns = list(rows[0])
    widths = {c: max(len(c), 10) for c in columns}
    print("  ".join(f"{c:>{widths[c]}}" for c in columns))
    for row in rows:
        print("  ".join(f"{row[c]:>{widths[c]}.1f}" if isinstance(row[c], float) else f"{row[c]:>{widths[c]}}"
                        for c in columns))
    print(f"bound: 0 errors and RSS growth < {args.max_growth_mb:g} MB")
    return 0 if all(row["result"] == "PASS" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
