"""Screenshot of ``sigec editor`` after one painted stroke, for the README (``docs/editor.png``).

Serves the editor on a free local port with the shipped ``landscape`` model (seeded random
weights when it is not there yet: the page works, the picture is noise), drives Debian's
Chromium through Playwright, paints a stroke of water across the meadow with mouse events, waits
for the re-rendered picture and saves a screenshot of the page.

    python examples/editor_screenshot.py --out docs/editor.png --threads 2
"""
from __future__ import annotations

import argparse
import os
import shutil
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import uvicorn  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from sigec.frontends.editor.server import RANDOM_MODEL, EditorError, create_app, resolve_model  # noqa: E402

CHROMIUM = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")

#: the stroke, in label-map pixels of the 256x512 default scene: a stream of water across the meadow
STROKE = [(150, 222), (190, 214), (230, 218), (270, 226), (310, 222), (350, 214)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/editor.png")
    parser.add_argument("--model", default="landscape")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--class", dest="cls", default="water")
    parser.add_argument("--radius", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        model = resolve_model(args.model)
    except EditorError as exc:
        print(f"note: {exc}\nnote: using {RANDOM_MODEL} (the picture will be noise)")
        model = resolve_model(RANDOM_MODEL)
    app = create_app(model, height=256, width=512)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/"
    executable = next((p for p in CHROMIUM if os.access(p, os.X_OK)), shutil.which("chromium"))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1100, "height": 700}, device_scale_factor=1)
            page.goto(url)
            page.wait_for_selector('body[data-ready="true"]', timeout=600_000)
            page.click(f'.swatch[data-class="{args.cls}"]')
            page.evaluate("(r) => { const b = document.getElementById('brush'); b.value = r;"
                          " b.dispatchEvent(new Event('input')); }", str(args.radius))
            box = page.locator("#labels").bounding_box()
            sx, sy = box["width"] / 512, box["height"] / 256
            pts = [(box["x"] + x * sx, box["y"] + y * sy) for x, y in STROKE]
            page.mouse.move(*pts[0])
            page.mouse.down()
            for x, y in pts[1:]:
                page.mouse.move(x, y, steps=6)
            page.mouse.up()
            page.wait_for_selector('body[data-strokes="1"]', timeout=600_000)
            page.mouse.move(pts[-1][0] + 40, pts[-1][1] - 60)     # the brush ring off the stroke
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            print(f"wrote {args.out}: {page.locator('#log li').first.inner_text()}")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


if __name__ == "__main__":
    main()
