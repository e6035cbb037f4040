"""The editor in a real browser: Playwright drives Debian's Chromium (``apt-get install chromium``;
Playwright's own browser download is not used) against a live uvicorn server on 127.0.0.1.

It paints a stroke with mouse events, waits for the re-rendered picture, reads the picture's pixels
in the page, checks they changed under the stroke and nowhere far from it, that the page shows an
incremental latency, that the overlay toggles and undo restores the picture, and saves a screenshot
to ``out/editor-screenshot.png``. Skips, saying why, only where no Chromium executable exists.
"""
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sigec.frontends.edits import brush_stroke_mask
from sigec.models.landscape import CLASSES, default_scene
from tests.frontends.conftest import HEIGHT, WIDTH

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser",
                       "/usr/lib/chromium-browser/chromium-browser", "/usr/bin/google-chrome")


def chromium_executable():
    """The Chromium binary: $SIGEC_CHROMIUM, Debian's (the real binary, not /usr/bin's wrapper
    script, when both exist), or one on PATH."""
    env = os.environ.get("SIGEC_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM = chromium_executable()
playwright_sync = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium executable (looked for $SIGEC_CHROMIUM, " + ", ".join(CHROMIUM_CANDIDATES)
    + " and chromium on PATH): install it with `apt-get install -y chromium` (.ci/run does)")


@pytest.fixture(scope="module")
def server_url(editor_model):
    import uvicorn

    from sigec.frontends.editor.server import create_app

    app = create_app(editor_model, max_sessions=4)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def page(server_url):
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            pg = browser.new_context(viewport={"width": 1180, "height": 820}).new_page()
            messages = []
            pg.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
            pg.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
            pg.goto(server_url)
            pg.wait_for_selector('body[data-ready="true"]', timeout=120_000)
            pg.messages = messages
            yield pg
        finally:
            browser.close()


READ_PIXELS = """(id) => {
  const img = document.getElementById(id);
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0);
  return {w: c.width, h: c.height, data: Array.from(ctx.getImageData(0, 0, c.width, c.height).data)};
}"""


def read_pixels(page, element_id="image") -> np.ndarray:
    got = page.evaluate(READ_PIXELS, element_id)
    return np.array(got["data"], dtype=int).reshape(got["h"], got["w"], 4)


def test_painting_a_stroke_in_chromium_updates_the_picture_near_it_only(page):
    assert (page.title(), page.locator("#status").get_attribute("class")) == ("sigec editor", None)
    before = read_pixels(page)
    assert before.shape == (HEIGHT, WIDTH, 4)
    assert page.locator("#stat-dense").inner_text().endswith("ms")

    # a stroke in label-map pixels, of a class found nowhere under it
    points = [(18.0, 40.0), (26.0, 41.0), (34.0, 43.0), (42.0, 44.0)]
    radius = 4
    mask = brush_stroke_mask(points, radius, HEIGHT, WIDTH).numpy()
    under = set(default_scene(HEIGHT, WIDTH)[mask].tolist())
    cls = next(name for i, name in enumerate(CLASSES) if i not in under and name != "sky")
    page.click(f'.swatch[data-class="{cls}"]')
    assert page.get_attribute(f'.swatch[data-class="{cls}"]', "aria-checked") == "true"
    page.evaluate("(r) => { const b = document.getElementById('brush'); b.value = r;"
                  " b.dispatchEvent(new Event('input')); }", str(radius))

    box = page.locator("#labels").bounding_box()
    sx, sy = box["width"] / WIDTH, box["height"] / HEIGHT
    to_page = [(box["x"] + x * sx, box["y"] + y * sy) for x, y in points]
    page.mouse.move(*to_page[0])
    page.mouse.down()
    for x, y in to_page[1:]:
        page.mouse.move(x, y, steps=4)
    page.mouse.up()
    page.wait_for_selector('body[data-strokes="1"]', timeout=60_000)

    after = read_pixels(page)
    changed = np.abs(after[..., :3] - before[..., :3]).max(axis=2) > 0
    assert changed[mask].mean() > 0.5, "the picture did not change under the stroke"
    far = np.ones((HEIGHT, WIDTH), bool)
    far[:, :64] = False          # the stroke ends at x = 46; the tiny model sees 4 pixels around
    assert not changed[far].any(), "the picture changed far from the stroke"

    latency = page.locator("#stat-incremental").inner_text()
    assert re.fullmatch(r"\d+(\.\d+)? ms", latency), latency
    assert re.fullmatch(r"\d+(\.\d+)? ms", page.locator("#stat-dense").inner_text())
    assert page.locator("#stat-edit").inner_text().endswith("%")
    assert page.locator("#log li").count() == 1

    # the overlay of recomputed blocks covers the change and toggles
    overlay = read_pixels(page, "overlay")
    assert (overlay[..., 3] > 0)[changed].all()
    assert page.locator("#overlay").is_visible()
    (ROOT / "out").mkdir(exist_ok=True)
    page.screenshot(path=str(ROOT / "out" / "editor-screenshot.png"), full_page=True)
    page.uncheck("#overlay-toggle")
    assert not page.locator("#overlay").is_visible()
    page.check("#overlay-toggle")

    # a second tab gets a session of its own: the scene as it was, not the first tab's picture
    other = page.context.new_page()
    try:
        other.goto(page.url)
        other.wait_for_selector('body[data-ready="true"]', timeout=120_000)
        assert np.abs(read_pixels(other)[..., :3] - before[..., :3]).max() <= 1
    finally:
        other.close()
    assert np.array_equal(read_pixels(page), after)

    # undo restores the picture from before the stroke
    page.click("#undo")
    page.wait_for_selector('body[data-strokes="2"]', timeout=60_000)
    restored = read_pixels(page)
    assert np.abs(restored[..., :3] - before[..., :3]).max() <= 1
    assert not [m for m in page.messages if m.startswith(("error", "pageerror"))], page.messages
