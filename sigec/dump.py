"""``sigec dump``: load a model, compile it and show the plan for an edit mask.

A *target* is either ``package.module:factory`` (or ``path/to/file.py:factory``), where
``factory()`` returns ``(model, args)`` or ``(model, args, kwargs)`` (or an ``ExportedProgram``
alone), or a ``.pt2`` file written by ``torch.export.save``. The model is compiled with
``sigec.compile``, the mask (a PNG / ``.npy`` file, or an ellipse over a given fraction) is
evaluated with ``engine.mask_stats`` and ``engine.report``, and the result is rendered as:

* ``text`` - a table of every node, ASCII block maps, totals and the two generated graphs;
* ``json`` - the same, machine-readable (totals equal ``engine.report(mask=...)``'s);
* ``dot``  - the analysed graph, nodes coloured by decision (Graphviz DOT);
* ``svg``  - per-resolution block maps and the input mask, one self-contained SVG;
* ``html`` - one self-contained page: settings, totals, block maps, node table, graphs.

``dump_passes`` prints the graph after each pass instead (``sigec dump --passes``).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import html
import importlib
import importlib.util
import json
import logging
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch.utils import _pytree as pytree

import sigec
from sigec import meta_keys as K
from sigec.runtime import masks as M

FORMATS = ("text", "json", "dot", "svg", "html")

#: fill colours of the decisions (DOT, SVG, HTML)
DECISION_COLOURS = {"sparse": "#b6e3a8", "dense": "#d3d3d3", "fallback": "#f4a3a3", "static": "#ffffff"}
INPUT_COLOUR = "#c6dcff"


class CliError(ValueError):
    """A problem with what the user gave the command line; its message is one line (exit 1)."""


class UsageError(CliError):
    """A wrong combination of options (exit 2, as argparse's own errors)."""


# -- targets ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Target:
    """A loaded TARGET: the model (``nn.Module`` or ``ExportedProgram``) and its example inputs."""

    spec: str
    model: Any
    args: tuple
    kwargs: dict

    @property
    def is_program(self) -> bool:
        return isinstance(self.model, torch.export.ExportedProgram)

    def dense_callable(self) -> Callable:
        """The model as a plain callable (an exported program's ``module()``)."""
        return self.model.module() if self.is_program else self.model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Silence a logger that prints tracebacks as warnings (``torch.export.load`` does)."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _load_program(spec: str) -> Target:
    path = Path(spec)
    if not path.exists():
        raise CliError(f"TARGET {spec!r}: no such file")
    if path.is_dir():
        raise CliError(f"TARGET {spec!r} is a directory, not a torch.export program (.pt2)")
    if not zipfile.is_zipfile(path):
        raise CliError(f"TARGET {spec!r} is not a torch.export program (.pt2): not a zip archive")
    with zipfile.ZipFile(path) as archive:
        if not any(name.endswith("archive_format") for name in archive.namelist()):
            raise CliError(f"TARGET {spec!r} is not a torch.export program (.pt2): the archive has no "
                           "'archive_format' record (a torch.save checkpoint? save with torch.export.save)")
    try:
        with _quiet_logger("torch.export"):
            program = torch.export.load(str(path))
    except Exception as exc:
        raise CliError(f"TARGET {spec!r} could not be loaded as a torch.export program: "
                       f"{_first_line(exc)}") from exc
    if not isinstance(program, torch.export.ExportedProgram):
        raise CliError(f"TARGET {spec!r} is not a torch.export program (.pt2): loaded a "
                       f"{type(program).__name__}")
    args, kwargs = program.example_inputs or ((), {})
    return Target(spec, program, tuple(args), dict(kwargs or {}))


def _import_module(spec: str, module_name: str):
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise CliError(f"cannot import {module_name!r} from TARGET {spec!r}: no such file")
        name = "_sigec_target_" + path.stem.replace("-", "_")
        file_spec = importlib.util.spec_from_file_location(name, path)
        if file_spec is None or file_spec.loader is None:
            raise CliError(f"cannot import {module_name!r} from TARGET {spec!r}: not a Python file")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        try:
            file_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise CliError(f"importing {module_name!r} from TARGET {spec!r} failed: {_first_line(exc)}") from exc
        return module
    # as `python -m` and most app runners do: modules of the working directory are importable
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import module {module_name!r} from TARGET {spec!r}: {exc}") from exc
    except Exception as exc:
        raise CliError(f"importing module {module_name!r} from TARGET {spec!r} failed: "
                       f"{_first_line(exc)}") from exc


def _load_factory(spec: str) -> Target:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise CliError(f"TARGET {spec!r} must be package.module:factory or a .pt2 file")
    module = _import_module(spec, module_name)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"module {module_name!r} has no attribute {attr!r} (TARGET {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{attr!r} in module {module_name!r} is not callable (TARGET {spec!r}); it must be "
                       "a factory returning (model, args) or (model, args, kwargs)")
    try:
        result = obj()
    except Exception as exc:
        raise CliError(f"factory {spec!r} raised {_first_line(exc)}") from exc
    return _target_from_result(spec, result)


def _target_from_result(spec: str, result: Any) -> Target:
    expected = "(model, args) or (model, args, kwargs)"
    if isinstance(result, torch.export.ExportedProgram):
        args, kwargs = result.example_inputs or ((), {})
        return Target(spec, result, tuple(args), dict(kwargs or {}))
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise CliError(f"factory {spec!r} must return {expected}, got {type(result).__name__}")
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else None
    if not isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        raise CliError(f"factory {spec!r} returned a {type(model).__name__} as the model; expected a "
                       "torch.nn.Module or an ExportedProgram")
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise CliError(f"factory {spec!r} returned {type(args).__name__} as args; expected a tensor or a tuple")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise CliError(f"factory {spec!r} returned {type(kwargs).__name__} as kwargs; expected a dict")
    if isinstance(model, torch.nn.Module):
        model.eval()
    return Target(spec, model, tuple(args), dict(kwargs or {}))


def load_target(spec: str) -> Target:
    """Load ``package.module:factory``, ``path/file.py:factory`` or a ``.pt2`` export program."""
    if spec.endswith(".py") and ":" not in spec:
        raise CliError(f"TARGET {spec!r} is a Python file; name its factory too: {spec}:FACTORY")
    if os.path.isfile(spec) or (":" not in spec and (spec.endswith(".pt2") or os.path.exists(spec))):
        return _load_program(spec)
    if ":" in spec:
        return _load_factory(spec)
    if spec.endswith(".pt2") or os.sep in spec or "/" in spec:
        raise CliError(f"TARGET {spec!r}: no such file")
    raise CliError(f"TARGET {spec!r} must be package.module:factory (a callable returning "
                   "(model, args) or (model, args, kwargs)) or a .pt2 file from torch.export.save")


def compile_target(target: Target, policy: str = "sige", block_size: Optional[int] = None):
    """``sigec.compile`` the target with its example inputs."""
    return sigec.compile(target.model, target.args, target.kwargs or None, policy=policy,
                         block_size=block_size)


# -- masks ------------------------------------------------------------------------------------
def read_mask_file(path: str) -> torch.Tensor:
    """An H x W bool mask from a PNG (or any image PIL reads; light pixels are edited) or a
    ``.npy`` array (bool, or numbers: values above 0.5 are edited)."""
    p = Path(path)
    if not p.exists():
        raise CliError(f"mask file {path!r} does not exist")
    if p.is_dir():
        raise CliError(f"mask {path!r} is a directory, not a PNG or .npy file")
    if p.suffix.lower() == ".npy":
        import numpy as np

        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as exc:
            raise CliError(f"cannot read mask {path!r} as a .npy array: {_first_line(exc)}") from exc
        if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
            arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
        if arr.ndim != 2:
            raise CliError(f"mask {path!r} has shape {tuple(arr.shape)}; expected a 2-D H x W array")
        if arr.dtype == np.bool_:
            return torch.from_numpy(arr.copy())
        if not np.issubdtype(arr.dtype, np.number):
            raise CliError(f"mask {path!r} has dtype {arr.dtype}; expected bool or numbers")
        return torch.from_numpy(np.asarray(arr, dtype=np.float64) > 0.5)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as img:
            gray = img.convert("L")
    except (UnidentifiedImageError, OSError) as exc:
        raise CliError(f"cannot read mask {path!r}: not a PNG image or a .npy array") from exc
    import numpy as np

    return torch.from_numpy(np.asarray(gray) > 127)


def resolve_mask(engine, mask_path: Optional[str], fraction: float,
                 preloaded: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, str]:
    """The edit mask at the engine's input resolution and a description of where it came from."""
    res = tuple(engine.context.input_resolution)
    if mask_path is not None:
        mask = preloaded if preloaded is not None else read_mask_file(mask_path)
        if tuple(mask.shape) != res:
            raise CliError(f"mask {mask_path!r} is {mask.shape[0]}x{mask.shape[1]} (height x width) but the "
                           f"model's input resolution is {res[0]}x{res[1]}")
        return mask.bool(), f"file {mask_path}"
    from sigec.edits import ellipse_mask

    return ellipse_mask(res[0], res[1], fraction), f"ellipse (--mask-fraction {fraction:g})"


# -- the dump ---------------------------------------------------------------------------------
def _shape(value) -> Any:
    if isinstance(value, torch.Tensor):
        return [int(d) for d in value.shape]
    if isinstance(value, (tuple, list)):
        return [_shape(v) for v in value]
    return None


def format_shape(shape) -> str:
    if shape is None:
        return "-"
    if shape and isinstance(shape[0], list) or shape and shape[0] is None:
        return "(" + ", ".join(format_shape(s) for s in shape) + ")"
    return "x".join(str(d) for d in shape) if shape else "scalar"


def short_op(op: str) -> str:
    """``aten.conv2d.default`` -> ``conv2d``; ``aten.add.Tensor`` -> ``add.Tensor``."""
    if op.startswith("<built-in function "):
        return op[len("<built-in function "):-1]
    for prefix in ("aten.", "sigec."):
        if op.startswith(prefix):
            op = op[len(prefix):]
    return op[: -len(".default")] if op.endswith(".default") else op


def _res(res) -> str:
    return f"{res[0]}x{res[1]}" if res else "-"


def _pct(frac: Optional[float]) -> str:
    return f"{frac:.1%}" if frac is not None else "-"


def _macs(value: Optional[int]) -> str:
    return f"{value:,}" if value is not None else "-"


@dataclasses.dataclass
class BlockMap:
    """One block grid of the incremental graph for the dumped mask."""

    index: int
    mask: str
    resolution: tuple[int, int]
    block: tuple[int, int]
    grid: tuple[int, int]
    active: list            #: [(row, col)] of the active blocks
    pixels: torch.Tensor    #: H x W bool: the grid's pixel mask
    nodes: list             #: names of the sparse nodes computed on this grid

    @property
    def fraction(self) -> float:
        return len(self.active) / max(1, self.grid[0] * self.grid[1])

    def rows(self) -> list[str]:
        """The grid as text, ``#`` for an active block and ``.`` for an inactive one."""
        cells = [["."] * self.grid[1] for _ in range(self.grid[0])]
        for r, c in self.active:
            cells[r][c] = "#"
        return ["".join(row) for row in cells]

    def to_json(self) -> dict:
        return {"index": self.index, "mask": self.mask, "resolution": list(self.resolution),
                "block": list(self.block), "grid": list(self.grid), "active_blocks": len(self.active),
                "total_blocks": self.grid[0] * self.grid[1], "active_fraction": self.fraction,
                "mask_fraction": float(self.pixels.float().mean()) if self.pixels.numel() else 0.0,
                "active": [list(rc) for rc in self.active], "rows": self.rows(), "nodes": list(self.nodes)}


@dataclasses.dataclass
class Dump:
    """Everything the renderers show; ``build_dump`` makes one."""

    target: str
    engine: Any
    report: Any
    stats: dict
    mask: torch.Tensor
    mask_source: str

    # -- pieces ---------------------------------------------------------------------------
    def settings(self) -> dict:
        s = self.engine.context.settings
        block = s.block_size
        return {"policy": s.policy, "eps": s.eps, "dilation": s.dilation, "threshold": s.threshold,
                "block_size": dict(block) if isinstance(block, Mapping) else block,
                "expected_active_fraction": s.expected_active_fraction,
                "spatial_inputs": list(self.engine.context.spatial_inputs)}

    def inputs(self) -> list[dict]:
        spatial = set(self.engine.context.spatial_inputs)
        out = []
        for node in self.engine.graph_module.graph.nodes:
            if node.op != "placeholder":
                continue
            val = node.meta.get("val")
            out.append({"name": node.name, "shape": _shape(val),
                        "dtype": str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else None,
                        "spatial": node.name in spatial})
        return out

    def nodes(self) -> list[dict]:
        by_name = {n.name: n for n in self.engine.graph_module.graph.nodes}
        rows = []
        for n in self.report.nodes:
            row = dataclasses.asdict(n)
            row["shape"] = _shape(by_name[n.name].meta.get("val")) if n.name in by_name else None
            for key in ("resolution", "block", "halo"):
                row[key] = list(row[key]) if row[key] is not None else None
            rows.append(row)
        return rows

    def block_maps(self) -> list[BlockMap]:
        users: dict = collections.defaultdict(list)
        for node in self.engine.graph_module.graph.nodes:
            decision = node.meta.get(K.DECISION)
            if decision is not None and decision.kind.value == "sparse" and node.meta.get(K.GRID) is not None:
                users[(node.meta.get(K.MASK), node.meta[K.GRID])].append(node.name)
        maps = []
        for i, key in enumerate(self.engine.signature.blocks):
            expr, block = key
            res = tuple(expr.res)
            indices = self.stats["blocks"][key]
            maps.append(BlockMap(i, M.describe(expr), res, tuple(block), M.grid_shape(res, block),
                                 [(int(r), int(c)) for r, c in indices.tolist()], self.stats["masks"][expr],
                                 users.get(key, [])))
        return maps

    def totals(self) -> dict:
        rep = self.report
        inc = rep.incremental_macs
        counts = collections.Counter(n.decision for n in rep.nodes)
        return {"dense_macs": rep.dense_macs, "incremental_macs": inc,
                "ratio": (rep.dense_macs / inc) if inc else None,
                "input_mask_fraction": rep.input_mask_fraction,
                "nodes": len(rep.nodes),
                "decisions": {k: counts.get(k, 0) for k in ("sparse", "dense", "fallback", "static")},
                "fallbacks": rep.fallbacks()}

    def graphs(self) -> dict:
        return {"recording": self.engine.recording.code.strip("\n"),
                "incremental": self.engine.incremental.code.strip("\n")}

    def to_json(self) -> dict:
        res = self.engine.context.input_resolution
        return {"sigec_version": sigec.__version__, "target": self.target, "settings": self.settings(),
                "inputs": self.inputs(), "input_resolution": list(res),
                "mask": {"source": self.mask_source, "fraction": float(self.mask.float().mean()),
                         "pixels": int(self.mask.sum())},
                "totals": self.totals(), "nodes": self.nodes(),
                "block_maps": [b.to_json() for b in self.block_maps()], "graphs": self.graphs()}


def build_dump(target: Target, engine, mask: torch.Tensor, mask_source: str) -> Dump:
    """Evaluate ``mask`` on a compiled engine: ``report(mask=)`` and ``mask_stats(every_node=True)``."""
    report = engine.report(mask=mask)
    stats = engine.mask_stats(mask, every_node=True)
    return Dump(target.spec, engine, report, stats, mask, mask_source)


# -- text -------------------------------------------------------------------------------------
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


def _inputs_line(d: Dump) -> str:
    parts = []
    for i in d.inputs():
        text = " ".join(p for p in (i["name"], format_shape(i["shape"]), i["dtype"]) if p)
        parts.append(text + (" (spatial)" if i["spatial"] else ""))
    return "; ".join(parts)


def _mask_line(d: Dump) -> str:
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
           f"inputs: {_inputs_line(d)}",
           f"edit mask: {_mask_line(d)}",
           "",
           f"== nodes ({totals['nodes']}: {dec['sparse']} sparse, {dec['dense']} dense, "
           f"{dec['fallback']} fallback, {dec['static']} static) =="]
    header = ["node", "op", "shape", "res", "mask%", "decision", "block", "halo", "blocks",
              "dense MACs", "incr MACs", "reason"]
    rows = []
    for n in d.nodes():
        rows.append([n["name"], short_op(n["op"]), format_shape(n["shape"]), _res(n["resolution"]),
                     _pct(n["mask_fraction"]), n["decision"], _res(n["block"]), _res(n["halo"]),
                     str(n["active_blocks"]) if n["active_blocks"] is not None else "-",
                     _macs(n["dense_macs"]), _macs(n["incremental_macs"]), n["reason"]])
    out += _table(header, rows, right={4, 8, 9, 10})
    out += ["", f"== block maps ({len(d.engine.signature.blocks)} grids; '#' active block, '.' inactive) =="]
    for b in d.block_maps():
        out.append(f"grid {b.index}: mask {b.mask} at {_res(b.resolution)}, block {_res(b.block)}, "
                   f"{b.grid[0]}x{b.grid[1]} blocks, {len(b.active)} active ({b.fraction:.1%}), "
                   f"{len(b.nodes)} sparse nodes")
        out += ["    " + r for r in b.rows()]
    inc = totals["incremental_macs"]
    ratio = f"{totals['ratio']:.2f}x fewer" if totals["ratio"] else "-"
    out += ["", "== totals ==",
            f"dense MACs:        {totals['dense_macs']:>15,}",
            f"incremental MACs:  {_macs(inc):>15}  ({ratio})",
            f"input mask:        {_pct(totals['input_mask_fraction']):>15}",
            f"fallbacks:         {len(totals['fallbacks']):>15}"]
    out += [f"  {line}" for line in fallback_summary(totals["fallbacks"])]
    if graphs:
        g = d.graphs()
        out += ["", "== recording graph ==", g["recording"], "", "== incremental graph ==", g["incremental"]]
    return "\n".join(out) + "\n"


# -- json -------------------------------------------------------------------------------------
def render_json(d: Dump) -> str:
    return json.dumps(d.to_json(), indent=1) + "\n"


# -- dot --------------------------------------------------------------------------------------
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
             f"incremental {_macs(inc)} MACs; green sparse, grey dense, red fallback, white static")
    lines = ["digraph sigec {",
             f"  graph {_dot_attrs({'rankdir': 'TB', 'label': title, 'labelloc': 't', 'fontname': 'Helvetica'})};",
             f"  node {_dot_attrs({'shape': 'box', 'style': 'rounded,filled', 'fontname': 'Helvetica', 'fontsize': '10'})};"]
    rows = {n.name: n for n in d.report.nodes}
    kept = set()
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "call_function", "output"):
            continue
        kept.add(node.name)
        shape = format_shape(_shape(node.meta.get("val")))
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
                label.append(f"{_res(res)}" + (f" block {_res(grid)}" if grid and kind == "sparse" else ""))
            row = rows.get(node.name)
            label.append(kind if row is None or row.incremental_macs is None or not row.dense_macs
                         else f"{kind} {row.incremental_macs:,}/{row.dense_macs:,} MACs")
            attrs = {"label": "\n".join(label), "fillcolor": DECISION_COLOURS.get(kind, "#ffffff"),
                     "tooltip": reason or kind, "decision": kind, "op": str(node.target),
                     "resolution": _res(res), "reason": reason}
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


# -- svg --------------------------------------------------------------------------------------
PANEL = 192   # px, the longer side of a block-map panel
GAP = 24
CAPTION = 46


def _esc(text: str) -> str:
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
        out.append(f'<text x="0" y="{ph + 16 + 14 * i:.1f}" font-size="{12 if i == 0 else 11}">{_esc(text)}</text>')
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
    parts.append(f"<title>{_esc('sigec block maps: ' + d.target)}</title>")
    parts.append(f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa"/>')
    title = f"sigec block maps: {d.target} (policy {d.settings()['policy']})"
    parts.append(f'<text x="{GAP}" y="{GAP + 6}" font-size="15" font-weight="bold">{_esc(title)}</text>')
    y = GAP + 24
    res = d.engine.context.input_resolution
    parts += _panel(GAP, y, res, d.mask, [f"input mask {_res(res)}", f"{d.mask_source}",
                                          f"{int(d.mask.sum())} pixels ({float(d.mask.float().mean()):.1%})"])
    inc = totals["incremental_macs"]
    ratio = f"{totals['ratio']:.2f}x fewer" if totals["ratio"] else "-"
    dec = totals["decisions"]
    text = [f"dense MACs: {totals['dense_macs']:,}", f"incremental MACs: {_macs(inc)}", f"({ratio})",
            f"nodes: {totals['nodes']} ({dec['sparse']} sparse, {dec['dense']} dense,",
            f"{dec['fallback']} fallback, {dec['static']} static)", f"block grids: {len(maps)}",
            "orange: mask pixels; green: active blocks"]
    tx = GAP + PANEL + GAP
    for i, t in enumerate(text):
        parts.append(f'<text x="{tx}" y="{y + 16 + 18 * i}" font-size="13">{_esc(t)}</text>')
    for r, grids in enumerate(rows):
        y = GAP + 24 + row_h * (r + 1)
        for c, b in enumerate(grids):
            mask_label = b.mask if len(b.mask) <= 30 else b.mask[:27] + "..."
            parts += _panel(GAP + c * (PANEL + GAP), y, b.resolution, b.pixels,
                            [f"grid {b.index}: {_res(b.resolution)}, block {_res(b.block)}",
                             f"{len(b.active)}/{b.grid[0] * b.grid[1]} blocks ({b.fraction:.1%}), "
                             f"{len(b.nodes)} nodes", f"mask {mask_label}"], b.block, b.active)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# -- html -------------------------------------------------------------------------------------
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
        return "<dl>" + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items) + "</dl>"

    body = [f"<h1>sigec dump of <code>{_esc(d.target)}</code></h1>",
            '<section id="settings"><h2>Settings</h2>',
            dl([("sigec", sigec.__version__)]
               + [(k, "auto" if v is None and k == "block_size" else ", ".join(v) if isinstance(v, list) else v)
                  for k, v in settings.items()]
               + [("inputs", _inputs_line(d)), ("input resolution", _res(res)), ("edit mask", _mask_line(d))]),
            "</section>",
            '<section id="totals"><h2>Totals</h2>',
            dl([("dense MACs", f"{totals['dense_macs']:,}"), ("incremental MACs", f"{_macs(inc)} ({ratio})"),
                ("input mask", _pct(totals["input_mask_fraction"])),
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
        cells = [f"<td>{_esc(n['name'])}</td>", f"<td title=\"{_esc(n['op'])}\">{_esc(short_op(n['op']))}</td>",
                 f"<td>{_esc(format_shape(n['shape']))}</td>", f"<td>{_res(n['resolution'])}</td>",
                 f"<td>{_esc(n['mask'])}</td>", f"<td class=\"num\">{_pct(n['mask_fraction'])}</td>",
                 f"<td>{_esc(n['decision'])}</td>", f"<td>{_res(n['block'])}</td>", f"<td>{_res(n['halo'])}</td>",
                 f"<td class=\"num\">{n['active_blocks'] if n['active_blocks'] is not None else '-'}</td>",
                 f"<td class=\"num\">{_macs(n['dense_macs'])}</td>",
                 f"<td class=\"num\">{_macs(n['incremental_macs'])}</td>",
                 f"<td class=\"reason\">{_esc(n['reason'])}</td>", f"<td>{_esc(n['approximation'])}</td>"]
        body.append(f"<tr class=\"{_esc(n['decision'])}\">{''.join(cells)}</tr>")
    body.append("</table></section>")
    body.append('<section id="fallbacks"><h2>Fallbacks</h2>')
    if totals["fallbacks"]:
        body.append("<ul>" + "".join(f"<li><code>{_esc(k)}</code>: {_esc(v)}</li>"
                                     for k, v in totals["fallbacks"].items()) + "</ul>")
    else:
        body.append("<p>None.</p>")
    body.append("</section>")
    g = d.graphs()
    body += ['<section id="recording-graph"><h2>Recording graph</h2>',
             f"<details><summary>{len(g['recording'].splitlines())} lines</summary>"
             f"<pre>{_esc(g['recording'])}</pre></details></section>",
             '<section id="incremental-graph"><h2>Incremental graph</h2>',
             f"<details><summary>{len(g['incremental'].splitlines())} lines</summary>"
             f"<pre>{_esc(g['incremental'])}</pre></details></section>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_esc('sigec dump: ' + d.target)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


RENDERERS = {"text": render_text, "json": render_json, "dot": render_dot, "svg": render_svg, "html": render_html}


def render(d: Dump, fmt: str) -> str:
    if fmt not in RENDERERS:
        raise UsageError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return RENDERERS[fmt](d)


# -- passes -----------------------------------------------------------------------------------
def pass_names() -> tuple[list[str], list[str]]:
    from sigec.passes import ANALYSIS_PASSES, INCREMENTAL_PASSES

    return ([p.sigec_pass.name for p in ANALYSIS_PASSES], [p.sigec_pass.name for p in INCREMENTAL_PASSES])


def _fmt_arg(arg) -> str:
    if isinstance(arg, torch.fx.Node):
        return arg.name
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_fmt_arg(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, torch.dtype):
        return str(arg)
    return repr(arg)


def _meta_summary(node) -> str:
    parts = []
    spatial = node.meta.get(K.SPATIAL)
    if spatial is not None:
        parts.append(spatial.kind.value + (f" {_res(spatial.resolution)}" if spatial.resolution else ""))
    mask = node.meta.get(K.MASK)
    if mask is not None:
        text = M.describe(mask)
        parts.append("mask " + (text if len(text) <= 40 else text[:37] + "..."))
    grid = node.meta.get(K.GRID)
    if grid is not None:
        parts.append(f"block {_res(grid)}")
    window = node.meta.get(K.WINDOW)
    if window is not None and any(window.halo):
        parts.append(f"halo {_res(window.halo)}")
    decision = node.meta.get(K.DECISION)
    if decision is not None:
        parts.append(decision.kind.value + (f" ({decision.reason})" if decision.reason else ""))
    prologue = node.meta.get(K.PROLOGUE)
    if prologue is not None:
        parts.append(f"prologue {prologue.norm.name if prologue.norm is not None else '-'}+{prologue.activation}")
    origin = node.meta.get(K.ORIGIN)
    if origin is not None:
        parts.append(f"from {origin}")
    return " | ".join(parts)


def format_graph(gm) -> str:
    """One line per node (weights counted, not listed): ``name = op(args) shape | meta``."""
    lines = []
    attrs = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            attrs += 1
            continue
        shape = format_shape(_shape(node.meta.get("val")))
        if node.op == "placeholder":
            head = f"{node.name}: input"
        elif node.op == "output":
            head = f"return {_fmt_arg(node.args[0])}"
        else:
            args = ", ".join([_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()])
            if len(args) > 90:
                args = args[:87] + "..."
            head = f"{node.name} = {short_op(str(node.target))}({args})"
        meta = _meta_summary(node) if node.op != "output" else ""
        extra = " | ".join(p for p in ((shape if shape != "-" else ""), meta) if p)
        lines.append(f"  {head}" + (f"  # {extra}" if extra else ""))
    if attrs:
        lines.insert(0, f"  ({attrs} get_attr nodes: weights and constants, not listed)")
    return "\n".join(lines)


def dump_pass_graphs(target: Target, policy: str, block_size: Optional[int], after: Optional[str],
                     write: Callable[[str], None]) -> None:
    """Print the pipeline, then the graph after capture and after each pass (up to ``after``)."""
    from sigec.capture import capture
    from sigec.codegen import emit_incremental, emit_recording
    from sigec.passes import ANALYSIS_PASSES, INCREMENTAL_PASSES, PassContext, dump_passes, run_passes
    from sigec.settings import CompileSettings

    analysis, incremental = pass_names()
    if after is not None and after not in analysis + incremental:
        raise UsageError(f"unknown pass {after!r} for --after; passes: {', '.join(analysis + incremental)}")
    settings = CompileSettings(policy=policy, block_size=block_size)
    write("== pipeline ==\n" + dump_passes() + "\n")
    captured = capture(target.model, target.args, target.kwargs or None)
    write(f"\n== captured graph ({len(captured.gm.graph.nodes)} nodes) ==\n{format_graph(captured.gm)}\n")
    ctx = PassContext(settings)

    def observer(stage: str):
        def show(name: str, gm) -> None:
            write(f"\n== after {stage} pass {name} ({ctx.timings.get(name, 0.0) * 1e3:.1f} ms) ==\n"
                  f"{format_graph(gm)}\n")
        return show

    gm = run_passes(captured.gm, ctx, ANALYSIS_PASSES, observer=observer("analysis"),
                    stop_after=after if after in analysis else None)
    if after in analysis:
        return
    inc, signature = emit_incremental(gm, ctx.batch)
    ctx.dense_graph = gm
    write(f"\n== codegen: emitted incremental graph ({len(signature.blocks)} block grids) ==\n{format_graph(inc)}\n")
    inc = run_passes(inc, ctx, INCREMENTAL_PASSES, observer=observer("incremental"),
                     stop_after=after if after in incremental else None)
    if after in incremental:
        return
    rec = emit_recording(gm, signature.caches)
    write(f"\n== codegen: recording graph ==\n{format_graph(rec)}\n")


def flat_inputs(target: Target) -> tuple[list, Any]:
    """The target's example inputs as the flat leaves the engine sees, and their spec."""
    return pytree.tree_flatten((tuple(target.args), dict(target.kwargs)))
