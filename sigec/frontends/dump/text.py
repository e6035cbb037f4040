"""``sigec dump --format text``: a table of every node, ASCII block maps, totals and the two graphs."""
from __future__ import annotations

import collections

import sigec
from sigec.frontends.dump.model import Dump, format_shape, macs_text, pct_text, res_text, short_op


def _table(header: list[str], rows: list[list[str]], right: set) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells):
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    head = line(header)
    return [head, "-" * len(head)] + [line(r) for r in rows]


def _settings_line(d: Dump) -> str:
    s = d.settings()
    block = "auto" if s["block_size"] is None else s["block_size"]
    return (f"policy={s['policy']} eps={s['eps']:g} dilation={s['dilation']} threshold={s['threshold']:g} "
            f"block_size={block} expected_active_fraction={s['expected_active_fraction']:g}")


def inputs_line(d: Dump) -> str:
    parts = []
    for i in d.inputs():
        text = " ".join(p for p in (i["name"], format_shape(i["shape"]), i["dtype"]) if p)
        parts.append(text + (" (spatial)" if i["spatial"] else ""))
    return "; ".join(parts)


def mask_line(d: Dump) -> str:
    h, w = d.mask.shape
    return f"{d.mask_source}: {int(d.mask.sum())} of {h}x{w} pixels ({float(d.mask.float().mean()):.1%})"


def fallback_summary(fallbacks: dict, names: int = 4) -> list[str]:
    """Fallback nodes grouped by reason, most frequent first: ``count x reason: a, b, ...``."""
    groups: dict = collections.defaultdict(list)
    for name, reason in fallbacks.items():
        groups[reason].append(name)
    lines = []
    for reason, group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(group[:names]) + (f", ... (+{len(group) - names})" if len(group) > names else "")
        lines.append(f"{len(group):3d} x {reason}: {shown}")
    return lines


def render_text(d: Dump, graphs: bool = True) -> str:
    totals = d.totals()
    dec = totals["decisions"]
    out = [f"sigec {sigec.__version__} dump of {d.target}",
           f"settings: {_settings_line(d)}",
           f"inputs: {inputs_line(d)}",
           f"edit mask: {mask_line(d)}",
           "",
           f"== nodes ({totals['nodes']}: {dec['sparse']} sparse, {dec['dense']} dense, "
           f"{dec['fallback']} fallback, {dec['static']} static) =="]
    header = ["node", "op", "shape", "res", "mask%", "decision", "block", "halo", "blocks",
              "dense MACs", "incr MACs", "reason"]
    rows = []
    for n in d.nodes():
        rows.append([n["name"], short_op(n["op"]), format_shape(n["shape"]), res_text(n["resolution"]),
                     pct_text(n["mask_fraction"]), n["decision"], res_text(n["block"]), res_text(n["halo"]),
                     str(n["active_blocks"]) if n["active_blocks"] is not None else "-",
                     macs_text(n["dense_macs"]), macs_text(n["incremental_macs"]), n["reason"]])
    out += _table(header, rows, right={4, 8, 9, 10})
    out += ["", f"== block maps ({len(d.engine.signature.blocks)} grids; '#' active block, '.' inactive) =="]
    for b in d.block_maps():
        out.append(f"grid {b.index}: mask {b.mask} at {res_text(b.resolution)}, block {res_text(b.block)}, "
                   f"{b.grid[0]}x{b.grid[1]} blocks, {len(b.active)} active ({b.fraction:.1%}), "
                   f"{len(b.nodes)} sparse nodes")
        out += ["    " + r for r in b.rows()]
    inc = totals["incremental_macs"]
    ratio = f"{totals['ratio']:.2f}x fewer" if totals["ratio"] else "-"
    out += ["", "== totals ==",
            f"dense MACs:        {totals['dense_macs']:>15,}",
            f"incremental MACs:  {macs_text(inc):>15}  ({ratio})",
            f"input mask:        {pct_text(totals['input_mask_fraction']):>15}",
            f"fallbacks:         {len(totals['fallbacks']):>15}"]
    out += [f"  {line}" for line in fallback_summary(totals["fallbacks"])]
    if graphs:
        g = d.graphs()
        out += ["", "== recording graph ==", g["recording"], "", "== incremental graph ==", g["incremental"]]
    return "\n".join(out) + "\n"
