"""``sigec dump --format svg``: per-resolution block maps and the input mask, one self-contained SVG."""
from __future__ import annotations

import collections
import html

import torch

from sigec.frontends.dump.model import Dump, macs_text, res_text
from sigec.runtime import masks as M


PANEL = 192   # px, the longer side of a block-map panel
GAP = 24
CAPTION = 46


def escape(text: str) -> str:
    return html.escape(str(text), quote=True)


def _runs(pixels: torch.Tensor):
    """Horizontal runs ``(row, start, length)`` of the set pixels of an H x W bool mask."""
    if not pixels.numel():
        return
    padded = torch.nn.functional.pad(pixels.to(torch.int8), (1, 1))
    edges = padded[:, 1:] - padded[:, :-1]
    starts = (edges == 1).nonzero().tolist()
    ends = (edges == -1).nonzero().tolist()
    for (r, s), (_, e) in zip(starts, ends):
        yield r, s, e - s


def _panel(x: float, y: float, res, pixels: torch.Tensor, caption: list[str], block=None,
           active=()) -> list[str]:
    h, w = res
    scale = PANEL / max(h, w)
    pw, ph = w * scale, h * scale
    out = [f'<g transform="translate({x:.1f},{y:.1f})">',
           f'<rect x="0" y="0" width="{pw:.1f}" height="{ph:.1f}" fill="#ffffff" stroke="#888888"/>']
    for r, s, n in _runs(pixels):
        out.append(f'<rect x="{s * scale:.2f}" y="{r * scale:.2f}" width="{n * scale:.2f}" '
                   f'height="{scale:.2f}" fill="#f5a623"/>')
    if block is not None:
        bh, bw = block
        for r, c in active:
            out.append(f'<rect x="{c * bw * scale:.2f}" y="{r * bh * scale:.2f}" '
                       f'width="{min(bw, w - c * bw) * scale:.2f}" height="{min(bh, h - r * bh) * scale:.2f}" '
                       f'fill="#2e8b57" fill-opacity="0.35" stroke="#2e8b57" stroke-width="0.8"/>')
        gh, gw = M.grid_shape(res, block)
        if gh <= 64 and gw <= 64:
            lines = [f"M{c * bw * scale:.2f} 0V{ph:.1f}" for c in range(1, gw)]
            lines += [f"M0 {r * bh * scale:.2f}H{pw:.1f}" for r in range(1, gh)]
            if lines:
                out.append(f'<path d="{" ".join(lines)}" stroke="#cccccc" stroke-width="0.5" fill="none"/>')
    for i, text in enumerate(caption):
        out.append(f'<text x="0" y="{ph + 16 + 14 * i:.1f}" font-size="{12 if i == 0 else 11}">{escape(text)}</text>')
    out.append("</g>")
    return out


def render_svg(d: Dump, standalone: bool = True) -> str:
    """Block maps after a row with the input mask and the totals: one row of grids when each
    resolution has one grid (``sige``), else a row per resolution (largest first).
    Orange: the grid's pixel mask; green: active blocks; grey lines: the block grid."""
    maps = d.block_maps()
    by_res: dict = collections.OrderedDict()
    for b in sorted(maps, key=lambda b: (-b.resolution[0] * b.resolution[1], b.index)):
        by_res.setdefault(b.resolution, []).append(b)
    if all(len(v) == 1 for v in by_res.values()):
        rows = [[v[0] for v in by_res.values()]] if by_res else []   # one grid per resolution: one row
    else:
        rows = list(by_res.values())                                  # a row per resolution
    totals = d.totals()
    cols = max([1] + [len(r) for r in rows])
    width = max(cols * (PANEL + GAP) + GAP, 2 * (PANEL + GAP) + GAP + 260)
    row_h = PANEL + CAPTION + GAP
    height = GAP + 24 + row_h * (1 + len(rows))
    parts = []
    if standalone:
        parts.append('<?xml version="1.0" encoding="UTF-8"?>')
    parts.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                 f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">')
    parts.append(f"<title>{escape('sigec block maps: ' + d.target)}</title>")
    parts.append(f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa"/>')
    title = f"sigec block maps: {d.target} (policy {d.settings()['policy']})"
    parts.append(f'<text x="{GAP}" y="{GAP + 6}" font-size="15" font-weight="bold">{escape(title)}</text>')
    y = GAP + 24
    res = d.engine.context.input_resolution
    parts += _panel(GAP, y, res, d.mask, [f"input mask {res_text(res)}", f"{d.mask_source}",
                                          f"{int(d.mask.sum())} pixels ({float(d.mask.float().mean()):.1%})"])
    inc = totals["incremental_macs"]
    ratio = f"{totals['ratio']:.2f}x fewer" if totals["ratio"] else "-"
    dec = totals["decisions"]
    text = [f"dense MACs: {totals['dense_macs']:,}", f"incremental MACs: {macs_text(inc)}", f"({ratio})",
            f"nodes: {totals['nodes']} ({dec['sparse']} sparse, {dec['dense']} dense,",
            f"{dec['fallback']} fallback, {dec['static']} static)", f"block grids: {len(maps)}",
            "orange: mask pixels; green: active blocks"]
    tx = GAP + PANEL + GAP
    for i, t in enumerate(text):
        parts.append(f'<text x="{tx}" y="{y + 16 + 18 * i}" font-size="13">{escape(t)}</text>')
    for r, grids in enumerate(rows):
        y = GAP + 24 + row_h * (r + 1)
        for c, b in enumerate(grids):
            mask_label = b.mask if len(b.mask) <= 30 else b.mask[:27] + "..."
            parts += _panel(GAP + c * (PANEL + GAP), y, b.resolution, b.pixels,
                            [f"grid {b.index}: {res_text(b.resolution)}, block {res_text(b.block)}",
                             f"{len(b.active)}/{b.grid[0] * b.grid[1]} blocks ({b.fraction:.1%}), "
                             f"{len(b.nodes)} nodes", f"mask {mask_label}"], b.block, b.active)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
