"""serve: the HTTP API through FastAPI's TestClient, a real uvicorn process, and the page in a real browser."""

import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from stopsign import load_classifier, train
from stopsign.data.datasets import load_data
from stopsign.deploy.export import export
from stopsign.deploy.serve import create_app

from conftest import SHARED_PHOTOS

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def trained(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture
def client(trained):
    return TestClient(create_app(trained[0], max_upload_bytes=20_000))


def test_predict_one_image_as_multipart_or_raw_body(client, trained):
    checkpoint, data = trained
    path = data / "stop" / "stop-0.png"
    expected = load_classifier(checkpoint).predict([path])[0]
    for response in (client.post("/predict", files={"file": ("stop-0.png", path.read_bytes(), "image/png")}),
                     client.post("/predict", content=path.read_bytes(), headers={"content-type": "image/png"})):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["label"] == expected.label and answer["latency_ms"] > 0
        assert answer["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)


def test_batch_answers_each_file_and_isolates_a_bad_one(client, trained):
    _, data = trained
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in sorted((data / "stop").glob("*.png"))[:3]]
    files.insert(1, ("files", ("notes.txt", b"not an image", "text/plain")))
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 200, response.text
    rows = response.json()["results"]
    assert [r["filename"] for r in rows] == ["stop-0.png", "notes.txt", "stop-1.png", "stop-2.png"]
    assert rows[1]["label"] is None and "not an image file" in rows[1]["error"] and rows[1]["status"] == 415
    assert all(r["label"] in ("stop", "not_stop") and abs(sum(r["probabilities"].values()) - 1) < 1e-5
               for r in rows if r is not rows[1])


def test_health_model_and_an_offline_page(client):
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/model").json()
    assert info["class_names"] == ["not_stop", "stop"] and info["backbone"] == "tiny"
    assert info["preprocessing"]["size"] == 32 and info["format"] == "checkpoint"
    assert 0 <= info["metrics"]["accuracy"] <= 1 and info["metrics"]["best_epoch"] >= 1
    assert info["metrics"]["baseline"]["majority_class"] in info["class_names"]  # the figure beside its baseline
    page = client.get("/")
    assert page.status_code == 200 and "<input id=\"picker\"" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works without internet
    assert client.get("/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]


def test_too_large_is_413_not_an_image_is_415_and_the_next_request_is_fine(client, trained):
    _, data = trained
    good = (data / "stop" / "stop-0.png").read_bytes()
    assert client.post("/predict", content=b"\0" * 30_000).status_code == 413  # declared length
    chunked = client.post("/predict", content=iter([b"\0" * 8_000] * 4))  # no length declared
    assert chunked.status_code == 413 and "limit" in chunked.json()["detail"]
    large_part = client.post("/predict/batch", files=[("files", ("big.png", b"\0" * 25_000, "image/png"))])
    assert large_part.json()["results"][0]["status"] == 413
    for bad, reason in [(b"hello", "not an image file"), (good[: len(good) // 2], "truncated"),
                        (b"<html>page</html>", "HTML")]:
        response = client.post("/predict", files={"file": ("x.png", bad, "image/png")})
        assert response.status_code == 415 and reason in response.json()["detail"]
        assert client.post("/predict", files={"file": ("stop-0.png", good, "image/png")}).status_code == 200
    assert client.post("/predict", files={"other": ("x.png", good, "image/png")}).status_code == 422


def test_an_onnx_model_serves_the_same_answers(trained, tmp_path):
    checkpoint, data = trained
    onnx_path, _ = export(checkpoint, out=tmp_path / "model.onnx")
    image = (data / "not_stop" / "not_stop-3.png").read_bytes()
    answers = []
    for model in (checkpoint, onnx_path):
        client = TestClient(create_app(model))
        answers.append(client.post("/predict", files={"file": ("a.png", image, "image/png")}).json())
    assert client.get("/model").json()["format"] == "onnx"
    assert answers[0]["label"] == answers[1]["label"]
    assert answers[0]["probabilities"] == pytest.approx(answers[1]["probabilities"], abs=1e-4)


# --- a real server ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(model: Path, *options: str):
    """`stopsign serve MODEL` in a subprocess on a free loopback port; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "stopsign.cli", "-q", "serve", str(model), "--port", str(port), *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited: {process.stdout.read()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not answer /health within 120 s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_real_uvicorn_server(trained, tmp_path):
    checkpoint, data = trained
    onnx_path, _ = export(checkpoint, out=tmp_path / "model.onnx")  # self-contained: the tiny backbone travels
    images = sorted((data / "stop").glob("*.png")) + sorted((data / "not_stop").glob("*.png"))
    expected = {r.path: r.label for r in load_classifier(checkpoint).predict(images)}
    with running_server(onnx_path, "--max-upload-mb", "0.01") as url, httpx.Client(base_url=url) as http:
        assert http.get("/model").json()["format"] == "onnx"

        def ask(path: Path) -> str:
            return httpx.post(f"{url}/predict", files={"file": (path.name, path.read_bytes())}).json()["label"]

        with ThreadPoolExecutor(4) as pool:  # concurrent clients each get their own image's answer
            assert list(pool.map(ask, images)) == [expected[str(p)] for p in images]
        assert http.post("/predict", content=b"\0" * 40_000).status_code == 413
        assert http.post("/predict", content=b"not an image").status_code == 415
        assert http.post("/predict", content=images[0].read_bytes()).json()["label"] == expected[str(images[0])]


# --- the page in a real browser ---------------------------------------------------------------------------

def data_is_shared() -> bool:
    return (SHARED_PHOTOS / "_annotations.json").is_file()


@pytest.fixture(scope="module")
def stop_model(tmp_path_factory, request):
    """efficientnet_lite0 trained on the shared real photos (else on demo scenes), a stop and a non-stop image."""
    out = tmp_path_factory.mktemp("browser")
    if data_is_shared():
        data = SHARED_PHOTOS
        stop, other = SHARED_PHOTOS / "test_images/stop-1.jpeg", SHARED_PHOTOS / "test_images/not-stop-1.jpeg"
    else:
        from stopsign.data.demo import make_demo_data

        data = make_demo_data(out / "demo", per_class=40, seed=0)
        held = load_data(make_demo_data(out / "held-out", per_class=1, seed=1))
        by_label = {held.class_names[s.label]: s.path for s in held.samples}
        stop, other = by_label["stop"], by_label["not_stop"]
    # The pytest cache keeps the backbone features between sessions: a rerun trains in seconds.
    cache = (request.config.cache.mkdir("stopsign-features") if hasattr(request.config, "cache")
             else out / "features")  # pytest run with -p no:cacheprovider
    # the seed's recipe: one pass per image keeps this test's cold run short; tiles are served in test_inference
    result = train(data, backbone="efficientnet_lite0", epochs=10, augment=False, out=str(out / "runs"),
                   pooling="avg", tiles=1, head="sgd",
                   progress=False, cache_dir=str(cache))
    return result.run_dir / "best.pt", stop, other


@pytest.fixture
def chromium():
    if not CHROMIUM.is_file():
        pytest.skip(f"no browser at {CHROMIUM}: install Debian's chromium (make test does)")
    return CHROMIUM


@pytest.mark.slow
def test_the_page_in_a_real_browser(chromium, stop_model, tmp_path):
    from playwright.sync_api import sync_playwright

    checkpoint, stop, other = stop_model
    with running_server(checkpoint) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('efficientnet_lite0')")
            header = page.locator("#model").inner_text()
            page.set_input_files("#picker", [str(stop), str(other)])
            page.wait_for_selector(".card[data-done='true'] >> nth=1", timeout=60_000)
            labels = {name: page.locator(f".card[data-file='{name}'] .label").inner_text()
                      for name in (stop.name, other.name)}
            bars = page.locator(f".card[data-file='{stop.name}'] .bar").count()
            outlined = page.locator(f".card[data-file='{stop.name}'] svg").get_attribute("data-box")
            page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
        finally:
            browser.close()
    shutil.copy(tmp_path / "serve_page.png", "/tmp/serve_page.png")
    # the page shows what the model says (on the demo's fallback scenes a small model may be wrong about one)
    said = {Path(row.path).name: row.label for row in load_classifier(checkpoint).predict([stop, other])}
    assert labels == said
    assert re.search(r"validation (balanced )?accuracy \d+\.\d% \(n=\d+; always \w+: \d+\.\d%\)", header), header
    if data_is_shared():
        assert labels == {stop.name: "stop", other.name: "not_stop"}
    assert bars == 2  # one probability bar per class
    looked = load_classifier(checkpoint).predict([stop], explain=True)[0].explanation
    assert outlined == ",".join(map(str, looked.box))  # the page outlines where the model looked


@pytest.mark.slow
def test_the_page_shows_the_threshold_and_a_label_its_bars_agree_with(chromium, stop_model, tmp_path):
    from playwright.sync_api import sync_playwright

    checkpoint, stop, other = stop_model
    p_stop = load_classifier(checkpoint).predict([other])[0].probabilities["stop"]
    threshold = int(p_stop * 90) / 100  # two decimals, under p(stop): the non-stop photo is called stop
    with running_server(checkpoint, "--threshold", str(threshold)) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('threshold')")
            header = page.locator("#model").inner_text()
            page.set_input_files("#picker", [str(other)])
            page.wait_for_selector(f".card[data-file='{other.name}'][data-done='true']", timeout=60_000)
            card = page.locator(f".card[data-file='{other.name}']")
            label = card.locator(".label").inner_text()
            first_bar = card.locator(".bar").first
            first = (first_bar.get_attribute("data-class"), first_bar.get_attribute("class"))
            ticks = card.locator(".bar[data-class='stop'] .tick").count()
            page.screenshot(path=str(tmp_path / "serve_threshold.png"), full_page=True)
        finally:
            browser.close()
    assert f"threshold {threshold:.2f} (--threshold): stop when p(stop) ≥ {threshold:.2f}" in header
    assert label == f"stop (p(stop)={p_stop:.2f} ≥ threshold {threshold:.2f})"
    assert first == ("stop", "bar top") and ticks == 1  # the decided class's bar leads, the threshold marked on it


def test_the_413_message_names_the_limit_the_model_route_shows(client):
    limit = client.get("/model").json()["max_upload_bytes"]
    for body in (b"\0" * 30_000, b"\0" * 200_000):  # past the image limit; past the route's limit with framing
        detail = client.post("/predict", content=body).json()["detail"]
        assert f"the limit is {limit} bytes per image" in detail, detail


def test_the_startup_line_comes_once_the_model_has_loaded(trained, tmp_path, monkeypatch, capsys):
    from stopsign.cli import main

    served = []
    monkeypatch.setattr("stopsign.deploy.serve.run_app", lambda app, **kwargs: served.append(kwargs))
    checkpoint, _ = trained
    port = free_port()
    assert main(["serve", str(checkpoint), "--port", str(port)]) == 0
    out = capsys.readouterr().out
    assert out == f"serving {checkpoint} (not_stop, stop) at http://127.0.0.1:{port}/ (Ctrl+C stops)\n"
    assert served == [{"host": "127.0.0.1", "port": port, "log_level": "info"}]
    (tmp_path / "bad.pt").write_text("not a model")
    assert main(["serve", str(tmp_path / "bad.pt")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "not a stopsign checkpoint" in captured.err and len(served) == 1


def test_a_tiled_model_serves_the_answers_it_predicts(tmp_path, make_images, tiny_backbone):
    data = make_images(tmp_path / "data", {"stop": 6, "not_stop": 6}, layout="folders", size=(48, 40))
    result = train(data, backbone="tiny", tiles=2, pooling="max", head="logistic", out=str(tmp_path / "runs"),
                   progress=False, num_workers=0, val_fraction=0.3)
    client = TestClient(create_app(result.run_dir))
    images = sorted((data / "stop").glob("*.png")) + sorted((data / "not_stop").glob("*.png"))
    for row in load_classifier(result.run_dir).predict(images):
        answer = client.post("/predict", files={"file": ("x.png", Path(row.path).read_bytes())}).json()
        assert answer["label"] == row.label
        assert max(abs(answer["probabilities"][k] - v) for k, v in row.probabilities.items()) < 1e-4


def test_a_port_in_use_is_one_line_naming_it_and_nothing_says_serving(trained, capsys):
    from stopsign.cli import main

    checkpoint, _ = trained
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(checkpoint), "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert "serving" not in captured.out + captured.err
    assert captured.err.count("\n") == 1 and f"port {port} is in use" in captured.err and "--port N" in captured.err


def stop_probability_below_half(trained) -> tuple[bytes, float]:
    """An image the model calls not_stop, and its probability of stop."""
    checkpoint, data = trained
    rows = load_classifier(checkpoint).predict(sorted((data / "not_stop").glob("*.png")))
    row = min(rows, key=lambda r: r.probabilities["stop"])
    assert row.label == "not_stop"
    return Path(row.path).read_bytes(), row.probabilities["stop"]


def test_the_answer_and_the_model_route_carry_the_threshold_in_force(trained):
    image, p_stop = stop_probability_below_half(trained)
    threshold = p_stop * 0.9  # under p(stop): stop, though not_stop is the likelier class
    thresholded = TestClient(create_app(trained[0], threshold=threshold))
    answer = thresholded.post("/predict", files={"file": ("a.png", image, "image/png")}).json()
    assert answer["label"] == "stop" and answer["probabilities"]["not_stop"] > 0.5
    assert answer["threshold"] == threshold
    info = thresholded.get("/model").json()
    assert info["threshold"] == threshold and info["positive"] == "stop"
    row = thresholded.post("/predict/batch", files=[("files", ("a.png", image, "image/png"))]).json()["results"][0]
    assert row["label"] == "stop" and row["threshold"] == threshold
    assert info["threshold_from"] == "--threshold"
    own = load_classifier(trained[0]).threshold  # without --threshold: the model's own, chosen in training
    plain_app = TestClient(create_app(trained[0]))
    plain = plain_app.post("/predict", files={"file": ("a.png", image, "image/png")}).json()
    assert plain["threshold"] == pytest.approx(own) and plain["label"] == ("stop" if p_stop >= own else "not_stop")
    assert plain_app.get("/model").json()["threshold_from"] == "the model's, chosen out of fold in training"


class Gate:
    """image_probabilities that wait until opened, counting how many run at once."""

    def __init__(self, predict):
        self.predict, self.opened, self.running, self.most = predict, threading.Event(), 0, 0
        self.lock = threading.Lock()

    def __call__(self, images):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            assert self.opened.wait(30), "the test never opened the gate"
            return self.predict(images)
        finally:
            with self.lock:
                self.running -= 1


async def post_all(app, image: bytes, count: int, gate: Gate, *, answered: int = 0, running: int = 0
                   ) -> list[httpx.Response]:
    """`count` concurrent POST /predict; the gate opens once `answered` of them have answered and `running` are
    held by it, and a moment more for any others to reach it."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
        tasks = [asyncio.create_task(http.post("/predict", content=image)) for _ in range(count)]
        deadline = time.monotonic() + 30
        while (sum(task.done() for task in tasks) < answered or gate.running < running) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        gate.opened.set()
        return list(await asyncio.gather(*tasks))


def gated_app(trained, *, workers: int, queue: int):
    """An app whose classifier waits at a Gate, and a stop photo to send it."""
    checkpoint, data = trained
    app = create_app(checkpoint, workers=workers, queue=queue)
    gate = Gate(app.state.classifier.image_probabilities)
    app.state.classifier.image_probabilities = gate
    return app, gate, (data / "stop" / "stop-0.png").read_bytes()


def test_a_full_queue_answers_503_with_retry_after_and_the_queued_requests_are_answered(trained):
    app, gate, image = gated_app(trained, workers=1, queue=1)
    # one runs (held by the gate), one waits in the queue, the third is refused at once
    responses = asyncio.run(post_all(app, image, 3, gate, answered=1))
    assert sorted(r.status_code for r in responses) == [200, 200, 503]
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
    assert all(r.json()["label"] == "stop" for r in responses if r.status_code == 200)
    assert TestClient(app).post("/predict", content=image).status_code == 200  # the slots were given back


def test_sixteen_clients_at_once_are_classified_two_at_a_time(trained):
    app, gate, image = gated_app(trained, workers=2, queue=32)
    responses = asyncio.run(post_all(app, image, 16, gate, running=2))
    assert [r.status_code for r in responses] == [200] * 16
    assert gate.most == 2  # not 16 decodes and forward passes at once: memory stays bounded
