"""The output formats of ``sigec dump`` by name (JSON is the dump's own ``to_json``)."""
from __future__ import annotations

import json

from sigec.frontends.dump.dot import render_dot
from sigec.frontends.dump.html import render_html
from sigec.frontends.dump.model import Dump
from sigec.frontends.dump.svg import render_svg
from sigec.frontends.dump.targets import UsageError
from sigec.frontends.dump.text import render_text

FORMATS = ("text", "json", "dot", "svg", "html")


def render_json(d: Dump) -> str:
    return json.dumps(d.to_json(), indent=1) + "\n"


RENDERERS = {"text": render_text, "json": render_json, "dot": render_dot, "svg": render_svg, "html": render_html}


def render(d: Dump, fmt: str) -> str:
    if fmt not in RENDERERS:
        raise UsageError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return RENDERERS[fmt](d)
