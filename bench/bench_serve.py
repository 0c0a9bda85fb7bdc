"""A bounded load check of `stopsign serve`: concurrent clients against a real uvicorn process.

    .venv/bin/python bench/bench_serve.py [MODEL ...] [--clients 8,16] [--seconds 20] [--max-growth-mb 50]

Each MODEL (.pt or .onnx) is served by `stopsign serve` in its own process on a free 127.0.0.1 port, a fresh one
for each number of clients; N client threads (httpx, keep-alive) POST real photos to /predict for a fixed time.
It prints a row per model and number of clients: requests answered per second, p50/p99 latency, errors,
answers 503 (busy: the server's queue was full), the server's CPU time per answer (on a machine shared with other
work requests per second measure the share of the cores the server got; this does not), and its resident memory
once the model has loaded (start), after warm-up (before), at its highest during warm-up and load (peak, sampled
every 50 ms) and after the load. PASS needs zero errors and RSS growth from before to after under the bound;
the exit status is 1 otherwise. Without MODEL it trains efficientnet_lite0 for 2 epochs on generated demo scenes
and benches that checkpoint and its ONNX export.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far: on a machine shared with other work, CPU per request is the
    figure that does not depend on what else runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


class PeakMemory:
    """The highest RSS of a process, sampled every 50 ms by a thread while the block runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.done = pid, rss_mb(pid), threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


def load(url: str, photos: list[tuple[str, bytes]], clients: int, seconds: float) -> tuple[list[float], int, int]:
    latencies: list[float] = []
    errors, busy = [0], [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            i = offset
            while time.monotonic() < stop_at:
                name, data = photos[i % len(photos)]
                started = time.perf_counter()
                try:
                    status = http.post("/predict", files={"file": (name, data, "image/jpeg")}).status_code
                except httpx.HTTPError:
                    status = None
                elapsed = time.perf_counter() - started
                with lock:
                    if status == 200:
                        latencies.append(elapsed)
                    elif status == 503:  # refused by a full queue: the client waits as Retry-After asks
                        busy[0] += 1
                    else:
                        errors[0] += 1
                if status == 503:
                    time.sleep(1)
                i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0], busy[0]


def bench(model: Path, photos, clients: int, seconds: float, bound_mb: float) -> dict:
    with server(model) as (url, pid):
        start = rss_mb(pid)
        with PeakMemory(pid) as memory:
            load(url, photos, clients, 2.0)  # warm-up: allocator pools and thread pools reach their working size
            before, cpu_before = rss_mb(pid), cpu_seconds(pid)
            latencies, errors, busy = load(url, photos, clients, seconds)
            cpu = cpu_seconds(pid) - cpu_before
        after = rss_mb(pid)
    ms = np.array(latencies) * 1000
    growth = after - before
    return {"model": model.name, "clients": clients, "requests": len(latencies), "req/s": len(latencies) / seconds,
            "p50 ms": np.percentile(ms, 50) if len(ms) else float("nan"),
            "p99 ms": np.percentile(ms, 99) if len(ms) else float("nan"), "errors": errors, "busy 503": busy,
            "CPU ms/answer": 1000 * cpu / max(1, len(latencies)),
            "RSS start MB": start, "RSS before MB": before, "RSS peak MB": memory.peak, "RSS after MB": after,
            "growth MB": growth, "result": "PASS" if errors == 0 and growth < bound_mb and latencies else "FAIL"}


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
    parser.add_argument("--clients", type=lambda text: [int(n) for n in text.split(",")], default=[8, 16],
                        help="concurrent clients, a comma list: a row for each (default 8,16)")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-growth-mb", type=float, default=50, help="PASS bound on the server's RSS growth")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as temporary:
        folder = Path(temporary)
        models = args.models or demo_models(folder)
        photos = [(p.name, p.read_bytes()) for p in photo_files(folder)]
        print(f"{'/'.join(map(str, args.clients))} clients x {args.seconds:g} s per model, {len(photos)} photos "
              f"({sum(len(d) for _, d in photos) / len(photos) / 1e3:.0f} kB average), POST /predict")
        rows = [bench(model, photos, clients, args.seconds, args.max_growth_mb)
                for model in models for clients in args.clients]
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
