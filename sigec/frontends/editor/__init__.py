"""``sigec editor``: paint a label map in the browser and watch the picture re-render incrementally.

``create_app(model, height=..., width=...)`` builds the FastAPI app (``server.py``: the HTTP API,
its limits and error statuses); ``serve(name, port=...)`` runs it under uvicorn on 127.0.0.1;
``session.py`` holds the per-session state and the locking rules. Needs the ``editor`` extra
(``pip install sigec[editor]``: fastapi and uvicorn).
"""
from sigec.frontends.editor.session import EditorModel, SessionManager

__all__ = ["EditorModel", "SessionManager", "create_app", "serve"]


def __getattr__(name):   # the server imports fastapi: only when asked for
    if name in ("create_app", "serve", "resolve_model", "EditorError"):
        from sigec.frontends.editor import server
        return getattr(server, name)
    raise AttributeError(name)
