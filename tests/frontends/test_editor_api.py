"""The editor's HTTP API (FastAPI TestClient, in-process): sessions, strokes, undo, reset, isolation
between sessions, eviction, and every bad request answered with a 4xx while the server keeps serving."""
import base64
import io
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from sigec.frontends.editor.server import EditorError, create_app, resolve_model  # noqa: E402
from sigec.frontends.edits import brush_stroke_mask  # noqa: E402
from sigec.frontends.editor.session import SessionManager  # noqa: E402
from sigec.models.landscape import CLASSES, default_scene, one_hot  # noqa: E402
from tests.frontends.conftest import HEIGHT, WIDTH  # noqa: E402

LEFT = {"points": [[20, 40], [30, 42], [40, 44]], "radius": 4, "class": "brick"}
RIGHT = {"points": [[100, 40], [110, 45]], "radius": 4, "class": "snow"}


@pytest.fixture(scope="module")
def app(editor_model):
    return create_app(editor_model, max_sessions=4, max_points=64, max_body_bytes=4096, max_radius=16)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def decode(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")).astype(int)


def dense_pixels(editor_model, labels: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        y = editor_model.model(one_hot(labels), editor_model.noise)[0]
    return ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy().astype(int)


def new_session(client) -> dict:
    r = client.post("/api/sessions")
    assert r.status_code == 201, r.text
    return r.json()


def stroke(client, sid: str, body: dict, status: int = 200) -> dict:
    r = client.post(f"/api/sessions/{sid}/strokes", json=body)
    assert r.status_code == status, r.text
    return r.json()


def labels_of(app, sid: str) -> torch.Tensor:
    return app.state.sessions.get(sid).labels


# -- the page and the basics ----------------------------------------------------------------------

def test_page_and_config(client):
    page = client.get("/")
    assert page.status_code == 200 and "sigec editor" in page.text and "/static/editor.js" in page.text
    assert client.get("/static/editor.js").status_code == 200
    cfg = client.get("/api/config").json()
    assert (cfg["height"], cfg["width"]) == (HEIGHT, WIDTH)
    assert cfg["classes"] == list(CLASSES) and set(cfg["palette"]) == set(CLASSES)
    assert cfg["max_points"] == 64 and cfg["policy"] == "exact"


def test_session_starts_on_the_default_scene_with_a_dense_latency(client, app, editor_model):
    s = new_session(client)
    assert s["dense_ms"] > 0 and s["strokes"] == 0 and s["undo_depth"] == 0
    assert s["stats"]["kind"] == "dense recording"
    assert torch.equal(labels_of(app, s["session"]), default_scene(HEIGHT, WIDTH))
    image = decode(s["image"])
    assert image.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(image - dense_pixels(editor_model, default_scene(HEIGHT, WIDTH))).max() <= 1
    png = client.get(f"/api/sessions/{s['session']}/image.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"


def test_stroke_changes_the_picture_near_it_only_and_reports_the_engine_blocks(client, app, editor_model):
    s = new_session(client)
    before = decode(s["image"])
    out = stroke(client, s["session"], LEFT)
    after = decode(out["image"])
    mask = brush_stroke_mask(LEFT["points"], LEFT["radius"], HEIGHT, WIDTH)
    labels = labels_of(app, s["session"])
    assert (labels[mask] == CLASSES.index("brick")).all()
    assert np.abs(after - dense_pixels(editor_model, labels)).max() <= 1            # exact: equals dense
    changed = np.abs(after - before).max(axis=2) > 0
    assert changed[mask.numpy()].mean() > 0.5                                       # changed under the stroke
    far = np.ones((HEIGHT, WIDTH), bool)
    far[:, :60] = False
    assert not changed[far].any()                                                   # not far from it
    st = out["stats"]
    assert st["kind"] == "incremental" and st["engine_ms"] > 0 and st["dense_ms"] == out["dense_ms"]
    edited = (labels != default_scene(HEIGHT, WIDTH)).float().mean().item()
    assert st["edit_fraction"] == pytest.approx(edited)
    # the overlay is the engine's active blocks at the output: they cover the edit and its halo,
    # in whole 4x4 blocks, and far less than the canvas
    assert edited < st["recomputed_fraction"] < 0.5
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["overlay"].split(",", 1)[1]))))
    assert overlay.shape == (HEIGHT, WIDTH, 4)
    assert (overlay[..., 3] > 0)[changed].all()
    assert (overlay[..., 3] > 0).mean() == pytest.approx(st["recomputed_fraction"])
    assert st["incremental_macs"] < st["dense_macs"]
    assert out["strokes"] == 1 and out["undo_depth"] == 1


def test_strokes_accumulate_undo_and_reset(client, app, editor_model):
    sid = new_session(client)["session"]
    scene = default_scene(HEIGHT, WIDTH)
    stroke(client, sid, LEFT)
    after_one = labels_of(app, sid).clone()
    out = stroke(client, sid, {**LEFT, "points": [[30, 30], [35, 50]], "class": "water"})
    after_two = labels_of(app, sid).clone()
    assert (after_two != after_one).any() and out["undo_depth"] == 2
    # commit: the second stroke kept the first one, and the picture is the dense picture of both
    assert np.abs(decode(out["image"]) - dense_pixels(editor_model, after_two)).max() <= 1
    # the second stroke's engine run covered only its own change, not the first stroke again
    only_second = (after_two != after_one).float().mean().item()
    assert out["stats"]["edit_fraction"] == pytest.approx(only_second)

    undo = client.post(f"/api/sessions/{sid}/undo")
    assert undo.status_code == 200
    assert torch.equal(labels_of(app, sid), after_one)
    assert undo.json()["stats"]["edit_fraction"] == pytest.approx(only_second)
    assert np.abs(decode(undo.json()["image"]) - dense_pixels(editor_model, after_one)).max() <= 1
    undo = client.post(f"/api/sessions/{sid}/undo").json()
    assert torch.equal(labels_of(app, sid), scene) and undo["undo_depth"] == 0
    assert np.abs(decode(undo["image"]) - dense_pixels(editor_model, scene)).max() <= 1
    nothing = client.post(f"/api/sessions/{sid}/undo")
    assert nothing.status_code == 409 and nothing.json()["detail"] == "nothing to undo"

    # painting after undo starts from the restored state
    out = stroke(client, sid, RIGHT)
    assert np.abs(decode(out["image"]) - dense_pixels(editor_model, labels_of(app, sid))).max() <= 1
    reset = client.post(f"/api/sessions/{sid}/reset")
    assert reset.status_code == 200 and reset.json()["undo_depth"] == 0
    assert torch.equal(labels_of(app, sid), scene)
    assert np.abs(decode(reset.json()["image"]) - dense_pixels(editor_model, scene)).max() <= 1
    out = stroke(client, sid, LEFT)                      # and incremental editing goes on after reset
    assert out["stats"]["kind"] == "incremental"
    assert np.abs(decode(out["image"]) - dense_pixels(editor_model, labels_of(app, sid))).max() <= 1


def test_two_sessions_interleaving_never_see_each_others_picture(client, app, editor_model):
    a, b = new_session(client)["session"], new_session(client)["session"]
    scene = default_scene(HEIGHT, WIDTH)
    ra = stroke(client, a, LEFT)
    rb = stroke(client, b, RIGHT)
    ra2 = stroke(client, a, {**LEFT, "points": [[50, 20]], "class": "tree"})
    rb2 = stroke(client, b, {**RIGHT, "points": [[80, 10], [90, 12]], "class": "water"})
    la, lb = labels_of(app, a), labels_of(app, b)
    left = brush_stroke_mask(LEFT["points"], LEFT["radius"], HEIGHT, WIDTH)
    right = brush_stroke_mask(RIGHT["points"], RIGHT["radius"], HEIGHT, WIDTH)
    assert torch.equal(la[right], scene[right]) and torch.equal(lb[left], scene[left])
    for out, labels in ((ra2, la), (rb2, lb)):
        assert np.abs(decode(out["image"]) - dense_pixels(editor_model, labels)).max() <= 1
    # each picture is its own session's: it differs from the other session's dense picture
    assert np.abs(decode(ra2["image"]) - dense_pixels(editor_model, lb)).max() > 10
    assert np.abs(decode(rb2["image"]) - dense_pixels(editor_model, la)).max() > 10
    # the stored picture and GET agree with the last response
    for sid, out in ((a, ra2), (b, rb2)):
        assert client.get(f"/api/sessions/{sid}").json()["image"] == out["image"]
    assert ra["strokes"] == 1 and rb["strokes"] == 1


def test_sessions_are_safe_under_concurrent_threads(editor_model):
    manager = SessionManager(editor_model, max_sessions=4)
    ids = [manager.create()[0].id for _ in range(2)]
    strokes = {ids[0]: [(LEFT["points"], 4, 6), ([[50, 20]], 3, 3)],
               ids[1]: [(RIGHT["points"], 4, 7), ([[80, 10], [90, 12]], 3, 1)]}
    errors = []

    def paint(sid):
        try:
            for points, radius, cls in strokes[sid]:
                manager.stroke(sid, brush_stroke_mask(points, radius, HEIGHT, WIDTH), cls)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=paint, args=(sid,)) for sid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for sid in ids:
        session = manager.get(sid)
        expected = default_scene(HEIGHT, WIDTH)
        for points, radius, cls in strokes[sid]:
            expected[brush_stroke_mask(points, radius, HEIGHT, WIDTH)] = cls
        assert torch.equal(session.labels, expected)
        with torch.no_grad():
            dense = editor_model.model(one_hot(expected), editor_model.noise)[0]
        assert (session.image - dense).abs().max() < 1e-4
    for sid in ids:
        manager.delete(sid)


def test_least_recently_used_sessions_are_evicted(editor_model):
    app = create_app(editor_model, max_sessions=2)
    with TestClient(app) as client:
        first, second = new_session(client)["session"], new_session(client)["session"]
        client.get(f"/api/sessions/{first}")                # first is now the more recently used
        third = new_session(client)["session"]
        assert client.get(f"/api/sessions/{second}").status_code == 404
        assert ("named", second) not in editor_model.engine.store
        for sid in (first, third):
            assert stroke(client, sid, LEFT)["strokes"] == 1
        assert len(app.state.sessions) == 2
        assert client.delete(f"/api/sessions/{first}").status_code == 204
        assert ("named", first) not in editor_model.engine.store
        assert client.post(f"/api/sessions/{first}/strokes", json=LEFT).status_code == 404
        client.delete(f"/api/sessions/{third}")


# -- bad requests ---------------------------------------------------------------------------------

def _post(client, sid, content, headers=None):
    return client.post(f"/api/sessions/{sid}/strokes", content=content,
                       headers={"Content-Type": "application/json", **(headers or {})})


def _chunked(data: bytes):
    for i in range(0, len(data), 1000):
        yield data[i:i + 1000]


BAD = {
    # name: (body, status, words the message must contain)
    "not json": (b"{points: [[1, 2]", 422, "json"),
    "not an object": (b"[1, 2, 3]", 422, "invalid request"),
    "missing class": (json.dumps({"points": [[1, 2]], "radius": 3}), 422, "class"),
    "points not a list": (json.dumps({**LEFT, "points": "here"}), 422, "points"),
    "point not a pair": (json.dumps({**LEFT, "points": [[1, 2, 3]]}), 422, "points"),
    "point not numbers": (json.dumps({**LEFT, "points": [["a", 2]]}), 422, "points"),
    "no points": (json.dumps({**LEFT, "points": []}), 422, "points"),
    "extra field": (json.dumps({**LEFT, "colour": "red"}), 422, "colour"),
    "radius zero": (json.dumps({**LEFT, "radius": 0}), 422, "radius"),
    "radius too big": (json.dumps({**LEFT, "radius": 1000}), 422, "radius"),
    "x past the right edge": (json.dumps({**LEFT, "points": [[10, 10], [WIDTH, 10]]}), 422, "point 1"),
    "negative y": (json.dumps({**LEFT, "points": [[10, -0.5]]}), 422, "outside"),
    "huge coordinate": (json.dumps({**LEFT, "points": [[1e300, 5]]}), 422, "outside"),
    "nan coordinate": ('{"points": [[NaN, 5]], "radius": 3, "class": "sky"}', 422, "outside"),
    "unknown class": (json.dumps({**LEFT, "class": "lava"}), 422, "unknown class 'lava'"),
    "class index out of range": (json.dumps({**LEFT, "class": len(CLASSES)}), 422, "unknown class index"),
    "class of wrong type": (json.dumps({**LEFT, "class": 2.5}), 422, "class"),
    "too many points": (json.dumps({**LEFT, "points": [[1, 1]] * 65}), 413, "at most 64"),
    "body too large": (json.dumps({**LEFT, "pad": "x" * 5000}), 413, "larger than 4096"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_strokes_get_4xx_and_the_server_keeps_serving(client, app, case):
    sid = new_session(client)["session"]
    body, status, words = BAD[case]
    r = _post(client, sid, body if isinstance(body, bytes) else body.encode())
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["detail"].lower()
    assert torch.equal(labels_of(app, sid), default_scene(HEIGHT, WIDTH))     # nothing was painted
    assert stroke(client, sid, LEFT)["strokes"] == 1                           # still serving
    client.delete(f"/api/sessions/{sid}")


def test_a_large_body_without_content_length_is_refused(client):
    sid = new_session(client)["session"]
    data = json.dumps({**LEFT, "pad": "x" * 20000}).encode()
    r = client.post(f"/api/sessions/{sid}/strokes", content=_chunked(data),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than 4096" in r.json()["detail"]
    assert stroke(client, sid, LEFT)["strokes"] == 1
    client.delete(f"/api/sessions/{sid}")


@pytest.mark.parametrize("method,path", [
    ("post", "/api/sessions/{}/strokes"), ("post", "/api/sessions/{}/undo"), ("post", "/api/sessions/{}/reset"),
    ("get", "/api/sessions/{}"), ("get", "/api/sessions/{}/image.png"), ("delete", "/api/sessions/{}"),
])
def test_unknown_sessions_get_404(client, method, path):
    kwargs = {"json": LEFT} if path.endswith("strokes") else {}
    r = getattr(client, method)(path.format("0123456789abcdef"), **kwargs)
    assert r.status_code == 404 and "unknown session '0123456789abcdef'" in r.json()["detail"]
    sid = new_session(client)["session"]
    assert stroke(client, sid, LEFT)["strokes"] == 1
    client.delete(f"/api/sessions/{sid}")


# -- pieces -------------------------------------------------------------------------------------

def test_resolve_model_refuses_what_is_not_a_label_map_generator():
    with pytest.raises(EditorError, match="no-such-model"):
        resolve_model("no-such-model")
    with pytest.raises(EditorError, match="not a label-map generator"):
        resolve_model("digits-ddpm")


def test_cli_editor_refuses_a_missing_model_clearly():
    r = subprocess.run([sys.executable, "-m", "sigec.frontends.cli", "editor", "--model", "no-such-model"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "cannot load model 'no-such-model'" in r.stderr and "landscape-random" in r.stderr
