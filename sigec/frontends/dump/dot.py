"""``sigec dump --format dot``: the analysed graph, nodes coloured by decision (Graphviz DOT)."""
from __future__ import annotations

from sigec.frontends.dump.model import (DECISION_COLOURS, INPUT_COLOUR, Dump, format_shape, macs_text, res_text,
                                        shape_of, short_op)
from sigec.ir import meta_keys as K


def _dot_str(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_attrs(attrs: dict) -> str:
    return "[" + ", ".join(f"{k}={_dot_str(v)}" for k, v in attrs.items()) + "]"


def render_dot(d: Dump) -> str:
    """The analysed graph: inputs, every ``call_function`` node and the output; weights are left
    out. Nodes carry ``decision``, ``op``, ``resolution`` and ``reason`` attributes."""
    gm = d.engine.graph_module
    totals = d.totals()
    inc = totals["incremental_macs"]
    title = (f"sigec dump of {d.target} (policy {d.settings()['policy']}); dense {totals['dense_macs']:,} MACs, "
             f"incremental {macs_text(inc)} MACs; green sparse, grey dense, red fallback, white static")
    lines = ["digraph sigec {",
             f"  graph {_dot_attrs({'rankdir': 'TB', 'label': title, 'labelloc': 't', 'fontname': 'Helvetica'})};",
             f"  node {_dot_attrs({'shape': 'box', 'style': 'rounded,filled', 'fontname': 'Helvetica', 'fontsize': '10'})};"]
    rows = {n.name: n for n in d.report.nodes}
    kept = set()
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "call_function", "output"):
            continue
        kept.add(node.name)
        shape = format_shape(shape_of(node.meta.get("val")))
        if node.op == "placeholder":
            attrs = {"label": f"{node.name}\ninput {shape}", "shape": "ellipse", "fillcolor": INPUT_COLOUR,
                     "decision": "input", "op": "placeholder"}
        elif node.op == "output":
            attrs = {"label": "output", "shape": "ellipse", "fillcolor": INPUT_COLOUR, "decision": "output",
                     "op": "output"}
        else:
            decision = node.meta.get(K.DECISION)
            kind = decision.kind.value if decision is not None else "static"
            reason = decision.reason if decision is not None else ""
            res = node.meta[K.SPATIAL].resolution if node.meta.get(K.SPATIAL) is not None else None
            grid = node.meta.get(K.GRID)
            label = [node.name, f"{short_op(str(node.target))} {shape}"]
            if res:
                label.append(f"{res_text(res)}" + (f" block {res_text(grid)}" if grid and kind == "sparse" else ""))
            row = rows.get(node.name)
            label.append(kind if row is None or row.incremental_macs is None or not row.dense_macs
                         else f"{kind} {row.incremental_macs:,}/{row.dense_macs:,} MACs")
            attrs = {"label": "\n".join(label), "fillcolor": DECISION_COLOURS.get(kind, "#ffffff"),
                     "tooltip": reason or kind, "decision": kind, "op": str(node.target),
                     "resolution": res_text(res), "reason": reason}
            if kind == "fallback":
                attrs["color"] = "#b00000"
        lines.append(f"  {_dot_str(node.name)} {_dot_attrs(attrs)};")
    for node in gm.graph.nodes:
        if node.name not in kept:
            continue
        for src in dict.fromkeys(node.all_input_nodes):
            if src.name in kept:
                lines.append(f"  {_dot_str(src.name)} -> {_dot_str(node.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
