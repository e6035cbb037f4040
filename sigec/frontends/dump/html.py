"""``sigec dump --format html``: one self-contained page with settings, totals, block maps, the node
table and the graphs."""
from __future__ import annotations

import sigec
from sigec.frontends.dump.model import Dump, format_shape, macs_text, pct_text, res_text, short_op
from sigec.frontends.dump.svg import escape, render_svg
from sigec.frontends.dump.text import inputs_line, mask_line


_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.sparse td { background: #e3f4dd; } tr.dense td { background: #eeeeee; }
tr.fallback td { background: #fbdcdc; } tr.static td { background: #ffffff; }
td.reason { white-space: normal; min-width: 20em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 11px; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 1em; }
dt { font-weight: bold; } dd { margin: 0; }
"""


def render_html(d: Dump) -> str:
    totals = d.totals()
    inc = totals["incremental_macs"]
    ratio = f"{totals['ratio']:.2f}x fewer" if totals["ratio"] else "-"
    dec = totals["decisions"]
    settings = d.settings()
    res = d.engine.context.input_resolution

    def dl(items) -> str:
        return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items) + "</dl>"

    body = [f"<h1>sigec dump of <code>{escape(d.target)}</code></h1>",
            '<section id="settings"><h2>Settings</h2>',
            dl([("sigec", sigec.__version__)]
               + [(k, "auto" if v is None and k == "block_size" else ", ".join(v) if isinstance(v, list) else v)
                  for k, v in settings.items()]
               + [("inputs", inputs_line(d)), ("input resolution", res_text(res)), ("edit mask", mask_line(d))]),
            "</section>",
            '<section id="totals"><h2>Totals</h2>',
            dl([("dense MACs", f"{totals['dense_macs']:,}"), ("incremental MACs", f"{macs_text(inc)} ({ratio})"),
                ("input mask", pct_text(totals["input_mask_fraction"])),
                ("nodes", f"{totals['nodes']}: {dec['sparse']} sparse, {dec['dense']} dense, "
                          f"{dec['fallback']} fallback, {dec['static']} static"),
                ("fallbacks", str(len(totals["fallbacks"])))]),
            "</section>",
            '<section id="block-maps"><h2>Block maps</h2>',
            "<p>Orange: the pixels of each grid's mask; green: the blocks the incremental graph computes.</p>",
            render_svg(d, standalone=False), "</section>",
            '<section id="nodes"><h2>Nodes</h2><table>',
            "<tr><th>node</th><th>op</th><th>shape</th><th>res</th><th>mask</th><th>mask %</th>"
            "<th>decision</th><th>block</th><th>halo</th><th>blocks</th><th>dense MACs</th>"
            "<th>incr MACs</th><th>reason</th><th>approximation</th></tr>"]
    for n in d.nodes():
        cells = [f"<td>{escape(n['name'])}</td>", f"<td title=\"{escape(n['op'])}\">{escape(short_op(n['op']))}</td>",
                 f"<td>{escape(format_shape(n['shape']))}</td>", f"<td>{res_text(n['resolution'])}</td>",
                 f"<td>{escape(n['mask'])}</td>", f"<td class=\"num\">{pct_text(n['mask_fraction'])}</td>",
                 f"<td>{escape(n['decision'])}</td>", f"<td>{res_text(n['block'])}</td>", f"<td>{res_text(n['halo'])}</td>",
                 f"<td class=\"num\">{n['active_blocks'] if n['active_blocks'] is not None else '-'}</td>",
                 f"<td class=\"num\">{macs_text(n['dense_macs'])}</td>",
                 f"<td class=\"num\">{macs_text(n['incremental_macs'])}</td>",
                 f"<td class=\"reason\">{escape(n['reason'])}</td>", f"<td>{escape(n['approximation'])}</td>"]
        body.append(f"<tr class=\"{escape(n['decision'])}\">{''.join(cells)}</tr>")
    body.append("</table></section>")
    body.append('<section id="fallbacks"><h2>Fallbacks</h2>')
    if totals["fallbacks"]:
        body.append("<ul>" + "".join(f"<li><code>{escape(k)}</code>: {escape(v)}</li>"
                                     for k, v in totals["fallbacks"].items()) + "</ul>")
    else:
        body.append("<p>None.</p>")
    body.append("</section>")
    g = d.graphs()
    body += ['<section id="recording-graph"><h2>Recording graph</h2>',
             f"<details><summary>{len(g['recording'].splitlines())} lines</summary>"
             f"<pre>{escape(g['recording'])}</pre></details></section>",
             '<section id="incremental-graph"><h2>Incremental graph</h2>',
             f"<details><summary>{len(g['incremental'].splitlines())} lines</summary>"
             f"<pre>{escape(g['incremental'])}</pre></details></section>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape('sigec dump: ' + d.target)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
