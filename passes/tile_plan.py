"""The vocabulary of a tiled execution: the grid (``TileGrid``), the pass context (``TilingContext``),
the per-node schedule and the plan ``schedule_tiles`` writes (``TileSchedule``, ``Step``,
``TileProgram``, ``TilePlan``), and the measures the planner and the runner share (value sizes,
regions, row bands, halos, the untiled estimate). Holds no pass."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from sigec.ir import meta_keys as K
from sigec.ir.macs import macs_per_output_pixel
from sigec.ir.plan import NCHW, SpatialKind
from sigec.passes.pass_base import PassContext, UserInputError
from sigec.passes.tile_geometry import Role, TileKind


Region = tuple[tuple[int, int], tuple[int, int]]
#: held values are stored in row bands, this many per tile row, so a value read for the last time
#: is freed band by band while the next one is written
BANDS_PER_TILE_ROW = 4
#: with preview statistics, resolutions whose largest value is within this share of the model's
#: largest run whole (exact statistics) at any grid
PREVIEW_WHOLE_SHARES = 16
#: the elementwise work of one output element, in multiply-accumulates (memory-bound ops cost
#: about this many MACs per element on CPU); only used to rank plans
ELEMENT_COST = 20.0


class TilingError(UserInputError):
    """The model or the tile grid cannot be tiled as asked; the message names what and why."""


# ---------------------------------------------------------------------------------------------
# the grid


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Tile boundaries on the reference output (``output`` = H, W); scaled to every resolution."""

    output: tuple[int, int]
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @classmethod
    def split(cls, output: tuple[int, int], tiles=None, tile_size=None) -> "TileGrid":
        h, w = output
        if (tiles is None) == (tile_size is None):
            raise TilingError("give either tiles=(rows, cols) or tile_size=(height, width) in output pixels, not "
                              f"{'both' if tiles is not None else 'neither'}")
        if tiles is not None:
            pair = _as_pair(tiles, "tiles")
            if pair[0] > h or pair[1] > w:
                raise TilingError(f"tiles={pair} does not fit the {h}x{w} output: at most {h} rows and {w} "
                                  "columns of tiles (one pixel each)")
            rows = tuple(i * h // pair[0] for i in range(pair[0] + 1))
            cols = tuple(j * w // pair[1] for j in range(pair[1] + 1))
        else:
            th, tw = _as_pair(tile_size, "tile_size")
            rows = tuple(sorted({*range(0, h, th), h}))
            cols = tuple(sorted({*range(0, w, tw), w}))
        return cls((h, w), rows, cols)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows) - 1, len(self.cols) - 1

    @property
    def n_tiles(self) -> int:
        return self.shape[0] * self.shape[1]

    def tiles(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(self.shape[0]) for j in range(self.shape[1])]

    def owned(self, res: tuple[int, int], tile: tuple[int, int]) -> Region:
        """The pixels tile ``tile`` owns at resolution ``res``: the tiles partition every resolution."""
        (h, w), (oh, ow) = res, self.output
        i, j = tile
        return ((self.rows[i] * h // oh, self.rows[i + 1] * h // oh),
                (self.cols[j] * w // ow, self.cols[j + 1] * w // ow))


def _as_pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TilingError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < 1:
        raise TilingError(f"{name} must be at least 1 in each direction, got {pair}")
    return pair


# ---------------------------------------------------------------------------------------------
# context and results


@dataclasses.dataclass
class TilingContext(PassContext):
    """``PassContext`` plus the tiling settings and the plan (written by schedule_tiles).

    Attributes:
        tiles, tile_size: the grid the user asked for: ``(rows, cols)``, or a tile size in output pixels.
        grid: the tile grid on the largest image output (written by schedule_tiles).
        norm_stats: ``"exact"`` (synchronized) or ``"preview"`` (given before the run: no phases).
        whole_below_bytes: resolutions whose largest value is at most this run untiled
            (``None``: the model's largest value divided by the number of tiles).
        budget_bytes: target for the estimated peak; ``None`` minimizes time x memory.
        on_full: ``"evict"`` (recompute to fit the budget) or ``"raise"`` (never recompute; raise
            when holding everything exceeds the budget).
        hold_dtype: storage dtype of held values (``None``: their own).
        representative_only: plan with the middle tile only (the full plan is built at the end).
    """

    tiles: Optional[tuple] = None
    tile_size: object = None
    grid: Optional[TileGrid] = None
    norm_stats: str = "exact"
    whole_below_bytes: Optional[int] = None
    budget_bytes: Optional[int] = None
    on_full: str = "evict"
    hold_dtype: Optional[torch.dtype] = None
    plan: Optional["TilePlan"] = None
    #: per tainted resolution: whether it runs whole (written by schedule_tiles)
    whole_resolutions: dict = dataclasses.field(default_factory=dict)
    whole_threshold: int = 0
    resolution_bytes: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TileSchedule:
    """``mode``: ``source`` / ``whole`` / ``tiled`` / ``ignored``; ``phase``; ``held`` (a full copy
    kept for later phases); ``reason`` says why a value runs whole."""

    mode: str
    phase: int = 0
    held: bool = False
    reason: str = ""


@dataclasses.dataclass
class Step:
    """One value in a tile program: read it (``read``: a whole or source value; ``held``: its held
    copy) or ``compute`` it, over ``region``. ``wants`` gives, per image operand of a computed
    window or gather op, the unclipped input region it reads."""

    node: Node
    action: str
    region: Region
    wants: tuple = ()
    free_after: tuple = ()
    stats: tuple = ()
    write_held: bool = False
    outputs: tuple = ()
    owned: Optional[Region] = None


@dataclasses.dataclass
class TileProgram:
    phase: int
    tile: tuple[int, int]
    steps: list
    macs: float
    peak_bytes: int


@dataclasses.dataclass
class TilePlan:
    """What runs when, and what it is estimated to cost.

    ``programs[p]`` are the tile programs of phase ``p`` (one per tile); ``whole[p]`` the values
    computed whole at the start of phase ``p``; ``stats_of[p]`` the norms whose statistics phase
    ``p`` sums; ``held`` the values kept for later phases (``dropped``: recomputed instead).
    """

    phases: int
    programs: dict
    whole: dict
    stats_of: dict
    held: set
    dropped: set
    forced: set
    outputs: list
    estimated_peak_bytes: int
    estimated_macs: float
    peak_phase: int
    phase_bytes: dict
    held_bytes: dict
    hold_dtype: Optional[torch.dtype]
    choice: str = ""
    path: list = dataclasses.field(default_factory=list)
    #: phase -> held and whole values freed after it (their last reader)
    release: dict = dataclasses.field(default_factory=dict)
    #: phase -> estimated peak bytes during it
    phase_total: dict = dataclasses.field(default_factory=dict)
    #: whole node -> values of its step that no later node reads, freed right after it
    whole_free: dict = dataclasses.field(default_factory=dict)
    #: (phase, program index) -> [(held value, band)] no later program reads: freed after it
    band_frees: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# helpers


def node_value(node: Node):
    return node.meta.get("val")


def tensors_of(v) -> list:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for t in v if isinstance(t, torch.Tensor)]
    return []


def value_bytes(node: Node, dtype: Optional[torch.dtype] = None) -> int:
    return sum(t.numel() * (dtype or t.dtype).itemsize for t in tensors_of(node_value(node)))


def resolution(node: Node) -> Optional[tuple[int, int]]:
    info = node.meta.get(K.SPATIAL)
    return info.resolution if info is not None and info.kind is SpatialKind.IMAGE else None


def clip_region(region: Region, res: tuple[int, int]) -> Region:
    return tuple((max(0, lo), min(size, hi)) for (lo, hi), size in zip(region, res))


def union_region(a: Optional[Region], b: Region) -> Region:
    if a is None:
        return b
    return tuple((min(x[0], y[0]), max(x[1], y[1])) for x, y in zip(a, b))


def is_empty(region: Region) -> bool:
    return any(hi <= lo for lo, hi in region)


def wants_of(node: Node, region: Region) -> tuple:
    """Per image operand of a tiled op: the (unclipped) region it reads for output ``region``."""
    rule = node.meta[K.TILE]
    wants = []
    for operand, role in zip(node.all_input_nodes, rule.roles):
        if role is not Role.IMAGE:
            continue
        if rule.kind in (TileKind.WINDOW, TileKind.GATHER):
            wants.append(tuple(rule.geometry.needs(axis, *region[axis]) for axis in range(2)))
        else:
            wants.append(region)
    return tuple(wants)


def per_pixel_bytes(node: Node, dtype: Optional[torch.dtype] = None) -> float:
    res = resolution(node)
    return value_bytes(node, dtype) / (res[0] * res[1]) if res else 0.0


def compute_cost(node: Node, pixels: int) -> float:
    res = resolution(node)
    elements = value_bytes(node) / max(1, itemsize(node)) / (res[0] * res[1]) if res else 0
    return (macs_per_output_pixel(node) + ELEMENT_COST * elements) * pixels


def itemsize(node: Node) -> int:
    ts = tensors_of(node_value(node))
    return ts[0].dtype.itemsize if ts else 4


def bands(grid: TileGrid, res: tuple[int, int]) -> list:
    """Row bands ``[(lo, hi)]`` a held value at ``res`` is stored in: each tile row split in
    ``BANDS_PER_TILE_ROW`` (a tile's owned rows are whole bands)."""
    out = []
    for i in range(grid.shape[0]):
        (lo, hi), _ = grid.owned(res, (i, 0))
        cuts = sorted({lo + (hi - lo) * k // BANDS_PER_TILE_ROW for k in range(BANDS_PER_TILE_ROW)} | {hi})
        out += [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    return out


def reference_output(gm: GraphModule) -> tuple[int, int]:
    """The tile grid lives on the largest image output."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    best = None
    for leaf in leaves(output.args[0]):
        res = resolution(leaf) if isinstance(leaf, Node) else None
        if res is not None and (best is None or res[0] * res[1] > best[0] * best[1]):
            best = res
    if best is None:
        raise TilingError("the model has no image output (an N x C x H x W tensor computed from an image input) "
                          "to tile; tiled execution splits the output into patches")
    return best


def leaves(x):
    if isinstance(x, (list, tuple)):
        for a in x:
            yield from leaves(a)
    elif isinstance(x, dict):
        for a in x.values():
            yield from leaves(a)
    else:
        yield x


def halos(plan: TilePlan) -> dict:
    """Per computed node: the largest distance its tile regions reach past the owned pixels (rows, cols)."""
    out: dict = {}
    for progs in plan.programs.values():
        for prog in progs:
            for s in prog.steps:
                if s.action != "compute":
                    continue
                # reach past the owned pixels, but never more than the extra pixels (a flip or roll
                # displaces a tile's region without growing it)
                h = tuple(min(max(o[0] - r[0], r[1] - o[1], 0), max(0, (r[1] - r[0]) - (o[1] - o[0])))
                          for r, o in zip(s.region, s.owned))
                old = out.get(s.node, (0, 0))
                out[s.node] = (max(old[0], h[0]), max(old[1], h[1]))
    return out


def halo_violation(plan: TilePlan, grid: TileGrid):
    """The first tiled value whose tiles are smaller than the halo they need:
    ``(node, resolution, tile size, halo, "high" or "wide")``, or ``None``."""
    for node, (hh, hw) in halos(plan).items():
        res = resolution(node)
        extent = [min(o[axis][1] - o[axis][0] for o in (grid.owned(res, t) for t in grid.tiles()))
                  for axis in range(2)]
        for axis, (halo, size) in enumerate(zip((hh, hw), extent)):
            if halo > size:
                return node, res, size, halo, "high" if axis == 0 else "wide"
    return None


def untiled_estimate(gm: GraphModule) -> tuple[float, int]:
    """(cost, peak bytes) of running the graph untiled: values freed after their last use."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    last: dict = {}
    for n in nodes:
        for u in n.all_input_nodes:
            last[u] = n
    live, peak, cost = 0, 0, 0.0
    sizes: dict = {}
    for n in nodes:
        b = value_bytes(n)
        sizes[n] = b
        live += b
        peak = max(peak, live)
        res = resolution(n)
        cost += compute_cost(n, res[0] * res[1]) if res else 0.0
        for u in [u for u in n.all_input_nodes if last.get(u) is n]:
            live -= sizes.pop(u, 0)
        if not n.users:
            live -= sizes.pop(n, 0)
    return cost, peak


def layout_of(node: Node) -> str:
    info = node.meta.get(K.SPATIAL)
    return info.layout if info is not None else NCHW


__all__ = ["TileGrid", "TilingContext", "TileSchedule", "TilePlan", "TileProgram", "Step", "TilingError", "bands",
           "halo_violation", "halos", "layout_of", "reference_output", "resolution", "untiled_estimate", "value_bytes", "wants_of"]
