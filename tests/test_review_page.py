"""The review page in headless Chromium (Debian's, as test_serve.py drives it): keyboard review written to the
CV Studio file, and two reviewers deciding on one entry at once."""

import contextlib
import json
import shutil
import threading
import time

import pytest
import uvicorn

from stopsign.data.datasets import load_data
from stopsign.deploy.review import create_review_app
from stopsign.training.review import Review, Suspect

from test_serve import CHROMIUM, CHROMIUM_ARGS, free_port


@pytest.fixture
def chromium():
    if not CHROMIUM.is_file():
        pytest.skip(f"no browser at {CHROMIUM}: install Debian's chromium (make test does)")
    return CHROMIUM


@pytest.fixture
def served(tmp_path, make_images):
    """A review server (uvicorn in a thread) over 4 + 4 images, its first four the suspects; (url, root, out)."""
    root = make_images(tmp_path / "data", {"stop": 4, "not_stop": 4}, layout="cvstudio", size=(160, 120))
    data = load_data(root)
    names = data.class_names
    samples = sorted(data.samples, key=lambda s: s.path.name)  # not_stop-0..3 first
    suspects = [Suspect(s.path, names[s.label], names[1 - s.label], 0.2, ["held-out probability is 0.200"],
                        {names[s.label]: 0.2, names[1 - s.label]: 0.8},
                        [(other.path, names[other.label], 0.9 - k / 10) for k, other in enumerate(samples[4:7])])
                for s in samples[:4]]
    out = tmp_path / "review"
    app = create_review_app(Review(root, data, suspects, 5, out / "label_issues.csv", 0.0), out=out)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the review server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", root, out
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def open_page(context, url):
    page = context.new_page()
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='true']")
    return page


def entries(root):
    return json.loads((root / "_annotations.json").read_text())["annotations"]


@pytest.mark.slow
def test_three_suspects_reviewed_by_keyboard_are_in_the_file(chromium, served, tmp_path):
    url, root, out = served
    original = entries(root)
    with browser(chromium) as launched:
        page = open_page(launched.new_context(viewport={"width": 1100, "height": 760}), url)
        assert page.locator("#progress").inner_text() == "0 of 4 reviewed"
        assert page.locator("#name").inner_text() == "images/not_stop-0.png"
        assert page.locator("#neighbours figure").count() == 3
        assert page.evaluate("document.getElementById('photo').naturalWidth") == 160  # the photo itself
        for key, progress in (("2", "1 of 4"), ("k", "2 of 4"), ("x", "3 of 4")):  # set stop, keep, exclude
            page.keyboard.press(key)
            page.wait_for_function(f"document.getElementById('progress').textContent === '{progress} reviewed'")
        assert page.locator("#name").inner_text() == "images/not_stop-3.png"  # moved on after each decision
        page.screenshot(path=str(tmp_path / "review_page.png"), full_page=True)
        after = entries(root)
        assert after["not_stop-0.png"] == [{"label": "stop", "id": original["not_stop-0.png"][0]["id"]}]
        assert after["not_stop-1.png"] == original["not_stop-1.png"]  # kept
        assert after["not_stop-2.png"][0]["stopsign_excluded"] is True and (root / "images/not_stop-2.png").is_file()
        assert {k: v for k, v in after.items() if k not in ("not_stop-0.png", "not_stop-2.png")} == \
            {k: v for k, v in original.items() if k not in ("not_stop-0.png", "not_stop-2.png")}
        log = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
        assert [(r["file"], r["action"]) for r in log] == [("not_stop-0.png", "set"), ("not_stop-1.png", "keep"),
                                                          ("not_stop-2.png", "exclude")]
        page.keyboard.press("u")  # takes back the exclusion, and shows that suspect again
        page.wait_for_function("document.getElementById('progress').textContent === '2 of 4 reviewed'")
        assert page.locator("#name").inner_text() == "images/not_stop-2.png"
        assert entries(root)["not_stop-2.png"] == original["not_stop-2.png"]
    shutil.copy(tmp_path / "review_page.png", "/tmp/review_page.png")


@pytest.mark.slow
def test_two_reviewers_deciding_at_once_get_one_conflict_and_lose_no_update(chromium, served):
    url, root, out = served
    with browser(chromium) as launched:
        alice, bob = (open_page(launched.new_context(), url) for _ in range(2))
        alice.keyboard.press("2")  # not_stop-0 → stop
        bob.keyboard.press("x")  # not_stop-0 excluded, sent before alice's answer came back
        for page in (alice, bob):
            page.wait_for_function("document.getElementById('banner').textContent !== ''")
        banners = {name: (page.locator("#banner").get_attribute("class"), page.locator("#banner").inner_text())
                   for name, page in (("alice", alice), ("bob", bob))}
        assert sorted(kind for kind, _ in banners.values()) == ["conflict", "info"], banners
        winner = next(name for name, (kind, _) in banners.items() if kind == "info")
        loser_text = next(text for kind, text in banners.values() if kind == "conflict")
        assert "Conflict" in loser_text and "changed meanwhile" in loser_text
        entry = entries(root)["not_stop-0.png"][0]
        if winner == "alice":
            assert entry["label"] == "stop" and "stopsign_excluded" not in entry
        else:
            assert entry["label"] == "not_stop" and entry["stopsign_excluded"] is True
        log = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
        assert len(log) == 1 and log[0]["action"] == ("set" if winner == "alice" else "exclude")
        # the loser sees the entry as it is now and can decide again, against it
        loser = bob if winner == "alice" else alice
        loser.keyboard.press("k")
        loser.wait_for_function("document.getElementById('progress').textContent === '1 of 4 reviewed'")
        assert len((out / "decisions.jsonl").read_text().splitlines()) == 2
