"""``sigec editor``: a local web page that paints label maps and re-renders them incrementally.

The server is FastAPI on uvicorn. Why: both are widely used and actively maintained; FastAPI
validates request bodies against typed pydantic models, so malformed strokes get a 422 with the
offending field named instead of reaching the engine; its ``TestClient`` tests the whole HTTP
surface in-process without a socket; plain ``def`` endpoints run in a worker thread pool, so
torch never runs on the event loop's thread; and it serves the two static files the page needs
with no front-end build step. (gradio would have given a page for free but hides the pointer
events, per-stroke timings and overlay this editor is about behind its own components, and
pulls in far more dependencies.)

HTTP API (JSON; every error is ``{"detail": "<message>"}`` with a 4xx status):

====================================  ==========================================================
``GET  /``                            the editor page
``GET  /api/config``                  canvas size, classes and palette, request limits
``POST /api/sessions``                a new session on the default scene (201): its dense
                                      latency is measured here, once
``GET  /api/sessions/{id}``           the session's current picture, label map and figures
``GET  /api/sessions/{id}/image.png`` the current picture as a PNG
``POST /api/sessions/{id}/strokes``   ``{"points": [[x, y], ...], "radius": r, "class": "water"}``
                                      paints, runs the engine incrementally and commits
``POST /api/sessions/{id}/undo``      restores the label map before the last stroke (409 when none)
``POST /api/sessions/{id}/reset``     back to the default scene
``DELETE /api/sessions/{id}``         ends the session (204)
====================================  ==========================================================

Strokes: ``x`` runs along the width and ``y`` down the height, in label-map pixels (pixel
``(row i, col j)`` spans ``j <= x < j + 1``, ``i <= y < i + 1``). **Coordinates outside the
canvas are rejected** (422 naming the first bad point), not clipped: the page clamps the pointer
to the canvas before sending, so an out-of-range point means a client bug or a wrong canvas size,
and painting somewhere else than asked would hide it. A brush disc that reaches past the border
is cut at the border. ``class`` is a class name or its index; ``radius`` lies in
``[0.5, max_radius]``.

Limits: a body over ``max_body_bytes`` or a stroke of more than ``max_points`` points gets 413;
an unknown or evicted session gets 404; the server holds at most ``max_sessions`` sessions and
evicts the least recently used past that (each holds its own recorded activations: about 630 MB
for the landscape generator at 256x512, so the default is 4).
"""
from __future__ import annotations

import base64
import io
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from PIL import Image

from sigec.frontends.editor.session import (EditorModel, EditResult, NothingToUndo, Session, SessionManager,
                                            SessionNotFound)
from sigec.frontends.edits import brush_stroke_mask
from sigec.models.landscape import PALETTE, colorize, picture_pixels

STATIC_DIR = Path(__file__).parent / "static"

#: defaults of the request limits
MAX_POINTS = 4096
MAX_BODY_BYTES = 256 * 1024
MAX_RADIUS = 64.0


class EditorError(RuntimeError):
    """The editor cannot start (for example: no such model, or not a label-map generator)."""


# -- pictures -----------------------------------------------------------------------------------

def png_bytes(pixels: torch.Tensor) -> bytes:
    """``(H, W, 3|4)`` uint8 -> PNG bytes (fast compression: these travel to a local browser)."""
    mode = "RGBA" if pixels.shape[-1] == 4 else "RGB"
    buf = io.BytesIO()
    Image.fromarray(pixels.contiguous().numpy(), mode).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def overlay_pixels(mask: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` bool -> ``(H, W, 4)`` RGBA: the recomputed blocks tinted, their outline solid."""
    h, w = mask.shape
    out = torch.zeros(h, w, 4, dtype=torch.uint8)
    if not mask.any():
        return out
    inner = -F.max_pool2d(-mask[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0.5   # eroded
    edge = mask & ~inner
    out[mask] = torch.tensor([255, 60, 40, 70], dtype=torch.uint8)
    out[edge] = torch.tensor([255, 40, 20, 230], dtype=torch.uint8)
    return out


# -- request bodies -----------------------------------------------------------------------------

def _models():
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

    class StrokeIn(BaseModel):
        """One brush stroke: the pointer's path, the brush radius and the class painted."""

        model_config = ConfigDict(extra="forbid", populate_by_name=True)
        points: list[tuple[float, float]] = Field(min_length=1, description="[[x, y], ...] in label-map pixels")
        radius: float = Field(description="brush radius in pixels")
        cls: Union[StrictInt, StrictStr] = Field(alias="class", description="class name or index")

    return StrokeIn


StrokeIn = _models()


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before anything parses it, by
    its Content-Length or, without one (chunked), by the bytes actually received."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, scope, receive, send, status: int, message: str) -> None:
        from starlette.responses import JSONResponse
        await JSONResponse({"detail": message}, status_code=status)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = f"request body larger than {self.max_bytes} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return await self._refuse(scope, receive, send, 400, "invalid Content-Length header")
            if length > self.max_bytes:
                return await self._refuse(scope, receive, send, 413, too_big)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, 413, too_big)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


# -- the app ------------------------------------------------------------------------------------

def create_app(model: Union[torch.nn.Module, Callable[[], torch.nn.Module], EditorModel], *, height: int = 256,
               width: int = 512, policy: str = "exact", max_sessions: int = 4, max_points: int = MAX_POINTS,
               max_body_bytes: int = MAX_BODY_BYTES, max_radius: float = MAX_RADIUS, dense_runs: int = 3,
               noise_seed: int = 0, report_macs: bool = False, title: str = "sigec editor"):
    """The editor's FastAPI app for ``model`` (a label-map generator, a factory of one, or an
    ``EditorModel`` already compiled). The model is compiled here, once; sessions share it
    through named cache slots (see ``sigec.frontends.editor.session``). ``report_macs`` adds each
    edit's MAC count to its figures (an ``engine.report`` per stroke, tens of milliseconds)."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles

    editor = model if isinstance(model, EditorModel) else EditorModel(
        model, height=height, width=width, policy=policy, noise_seed=noise_seed, dense_runs=dense_runs,
        report_macs=report_macs)
    sessions = SessionManager(editor, max_sessions=max_sessions)
    classes = editor.classes
    H, W = editor.height, editor.width

    app = FastAPI(title=title, docs_url=None, redoc_url=None)
    app.state.editor, app.state.sessions = editor, sessions

    # -- errors: always {"detail": "<one message>"} ------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse({"detail": "invalid request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(SessionNotFound)
    async def _missing(request: Request, exc: SessionNotFound):
        return JSONResponse({"detail": f"unknown session {exc.args[0]!r} (expired, deleted or never created); "
                                       "create one with POST /api/sessions"}, status_code=404)

    @app.exception_handler(NothingToUndo)
    async def _nothing(request: Request, exc: NothingToUndo):
        return JSONResponse({"detail": "nothing to undo"}, status_code=409)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    # -- responses -------------------------------------------------------------------------
    def payload(session: Session, result: Optional[EditResult], server_start: Optional[float] = None) -> dict:
        out: dict[str, Any] = {
            "session": session.id,
            "image": data_url(png_bytes(picture_pixels(session.image))),
            "labels": data_url(png_bytes(colorize(session.labels))),
            "dense_ms": round(session.dense_ms, 2),
            "strokes": session.strokes,
            "undo_depth": len(session.history),
        }
        if result is not None:
            total = H * W
            edit = float(result.edit_mask.sum()) / total
            recomputed = float(result.recomputed.sum()) / total
            stats = {
                "kind": "dense recording" if result.recorded else "incremental",
                "engine_ms": round(result.engine_ms, 2),
                "dense_ms": round(session.dense_ms, 2),
                "speedup": round(session.dense_ms / result.engine_ms, 2) if result.engine_ms > 0 else None,
                "edit_fraction": edit,
                "recomputed_fraction": recomputed,
                "incremental_macs": result.macs[0] if result.macs else None,
                "dense_macs": result.macs[1] if result.macs else None,
            }
            out["stats"] = stats
            out["overlay"] = data_url(png_bytes(overlay_pixels(result.recomputed)))
        if server_start is not None:
            out["server_ms"] = round((time.perf_counter() - server_start) * 1e3, 2)
        return out

    # -- routes ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/config")
    def config() -> dict:
        return {"height": H, "width": W, "classes": list(classes),
                "palette": {name: list(PALETTE.get(name, (128, 128, 128))) for name in classes},
                "max_points": max_points, "max_radius": max_radius, "max_body_bytes": max_body_bytes,
                "policy": editor.policy, "max_sessions": sessions.max_sessions}

    @app.post("/api/sessions", status_code=201)
    def create_session() -> dict:
        start = time.perf_counter()
        session, result = sessions.create()
        return payload(session, result, start)

    @app.get("/api/sessions/{session_id}")
    def get_session(session_id: str) -> dict:
        return payload(sessions.get(session_id), None)

    @app.get("/api/sessions/{session_id}/image.png")
    def get_image(session_id: str):
        return Response(png_bytes(picture_pixels(sessions.get(session_id).image)), media_type="image/png")

    @app.delete("/api/sessions/{session_id}", status_code=204)
    def delete_session(session_id: str):
        sessions.delete(session_id)
        return Response(status_code=204)

    def class_index(cls: Union[int, str]) -> int:
        if isinstance(cls, int):
            if 0 <= cls < len(classes):
                return cls
            raise HTTPException(422, f"unknown class index {cls}; indices run from 0 to {len(classes) - 1}")
        if cls in classes:
            return classes.index(cls)
        raise HTTPException(422, f"unknown class {cls!r}; choose from {', '.join(classes)}")

    @app.post("/api/sessions/{session_id}/strokes")
    def stroke(session_id: str, body: StrokeIn) -> dict:
        start = time.perf_counter()
        sessions.get(session_id)    # 404 before judging the stroke
        if len(body.points) > max_points:
            raise HTTPException(413, f"stroke has {len(body.points)} points; at most {max_points} are accepted "
                                     "(send a long stroke as several)")
        if not (math.isfinite(body.radius) and 0.5 <= body.radius <= max_radius):
            raise HTTPException(422, f"radius must lie in [0.5, {max_radius:g}] pixels, got {body.radius}")
        cls = class_index(body.cls)
        for i, (x, y) in enumerate(body.points):
            if not (0 <= x < W and 0 <= y < H):   # also false for NaN
                raise HTTPException(422, f"point {i} ({x}, {y}) lies outside the {W}x{H} canvas "
                                         f"(0 <= x < {W}, 0 <= y < {H}); coordinates are rejected, not clipped")
        mask = brush_stroke_mask(body.points, body.radius, H, W)
        result = sessions.stroke(session_id, mask, cls)
        return payload(sessions.get(session_id), result, start)

    @app.post("/api/sessions/{session_id}/undo")
    def undo(session_id: str) -> dict:
        start = time.perf_counter()
        result = sessions.undo(session_id)
        return payload(sessions.get(session_id), result, start)

    @app.post("/api/sessions/{session_id}/reset")
    def reset(session_id: str) -> dict:
        start = time.perf_counter()
        result = sessions.reset(session_id)
        return payload(sessions.get(session_id), result, start)

    return app


# -- models and serving -------------------------------------------------------------------------

#: a random-weight landscape generator: noise pictures, but real timings (no trained weights needed)
RANDOM_MODEL = "landscape-random"


def resolve_model(name: str) -> torch.nn.Module:
    """The label-map generator called ``name``: a shipped trained model (``sigec.models.load``)
    or ``landscape-random``. Raises ``EditorError`` with what to do instead."""
    from sigec.models.landscape import LandscapeGenerator

    if name == RANDOM_MODEL:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return LandscapeGenerator().eval()
    from sigec.models import load
    try:
        loaded = load(name)
    except Exception as exc:   # WeightsError, missing files, a model this sigec cannot build
        raise EditorError(f"cannot load model {name!r}: {exc}. (For timings without trained weights use "
                          f"--model {RANDOM_MODEL}.)") from exc
    model = getattr(loaded, "model", loaded)
    if not isinstance(model, LandscapeGenerator):
        raise EditorError(f"model {name!r} is a {type(model).__name__}, not a label-map generator: the editor "
                          "paints classes onto a label map and needs one such as 'landscape' "
                          f"(or {RANDOM_MODEL}); the digits DDPM's SDEdit brush is not part of this editor yet")
    return model.eval()


def serve(model: str = "landscape", *, host: str = "127.0.0.1", port: int = 8000, threads: Optional[int] = None,
          policy: str = "exact", height: int = 256, width: int = 512, max_sessions: int = 4,
          log_level: str = "warning") -> None:
    """Compile ``model``, then serve the editor on ``http://host:port/`` until interrupted."""
    import uvicorn

    if threads is not None:
        torch.set_num_threads(threads)
    module = resolve_model(model)
    print(f"sigec editor: compiling {model!r} for a {height}x{width} canvas (policy {policy}, "
          f"{torch.get_num_threads()} threads)...", flush=True)
    app = create_app(module, height=height, width=width, policy=policy, max_sessions=max_sessions)
    print(f"sigec editor: open http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
