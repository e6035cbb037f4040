"""Runs a ``TilePlan`` (passes/schedule_tiles.py): phases of tile programs and whole steps.

Per phase: the values that run whole are computed on full tensors; then each tile runs its
program, computing every value over the region the plan gave it (image operands are sliced from
their producer's region; window ops pad exactly as the whole op would at the image border);
norm statistics are summed over each tile's owned pixels (per-channel mean and M2 in the
compute dtype, merged in float64 with Chan's formula); values later phases read are written to
their held copy (in the plan's storage dtype); outputs are written to their buffers. Held and
whole values are freed after the last phase that reads them.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from sigec.ir import meta_keys as K
from sigec.passes.tile_geometry import Role, TileKind
from sigec.passes.tile_plan import TileGrid, TilePlan, bands, layout_of, resolution
from sigec.ir.plan import NCHW

log = logging.getLogger("sigec.tiling")


def _release_freed_memory():
    """glibc keeps the freed buffers of a tile in its heaps, so the resident set would stay at
    the largest tile's peak plus fragmentation; ``malloc_trim`` hands them back to the OS
    between tiles. A no-op where there is no glibc."""
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


release_freed_memory = _release_freed_memory()


def crop(value, have, want, layout: str = NCHW):
    """The part ``want`` of a value that covers ``have`` (both regions in its own pixels)."""
    if isinstance(value, (tuple, list)):
        return type(value)(crop(v, have, want, layout) for v in value)
    (r0, r1), (c0, c1) = ((w[0] - h[0], w[1] - h[0]) for w, h in zip(want, have))
    if (r0, c0) == (0, 0) and (r1, c1) == (have[0][1] - have[0][0], have[1][1] - have[1][0]):
        return value
    if layout == NCHW:
        return value[..., r0:r1, c0:c1]
    return value[..., r0:r1, c0:c1, :]


def _full(res) -> tuple:
    return ((0, res[0]), (0, res[1]))


class BandedValue:
    """A value held between phases, stored in row bands (allocated when first written, freed when
    the plan says no later tile reads them), in the plan's storage dtype."""

    def __init__(self, node: Node, layout: list, dtype: torch.dtype, device):
        v = node.meta["val"]
        self.shape, self.dtype, self.device = tuple(v.shape), dtype, device
        self.row_dim = 2 if layout_of(node) == NCHW else 1
        # tiles compute NCHW images in NHWC memory (classify_tiling.channels_last): store them so
        self.memory_format = torch.channels_last if self.row_dim == 2 and len(self.shape) == 4 else torch.contiguous_format
        self.layout = layout
        self.bands: list = [None] * len(layout)

    def _band(self, k: int) -> torch.Tensor:
        if self.bands[k] is None:
            shape = list(self.shape)
            shape[self.row_dim] = self.layout[k][1] - self.layout[k][0]
            self.bands[k] = torch.empty(shape, dtype=self.dtype, device=self.device, memory_format=self.memory_format)
        return self.bands[k]

    def write(self, region, value: torch.Tensor, layout: str) -> None:
        (r0, r1), cols = region
        for k, (lo, hi) in enumerate(self.layout):
            if lo < r1 and r0 < hi:
                a, b = max(lo, r0), min(hi, r1)
                dst = crop(self._band(k), ((lo, hi), (0, self.shape[self.row_dim + 1])), ((a, b), cols), layout)
                dst.copy_(crop(value, region, ((a, b), cols), layout))

    def read(self, region, dtype: torch.dtype, layout: str) -> torch.Tensor:
        (r0, r1), cols = region
        parts = []
        for k, (lo, hi) in enumerate(self.layout):
            if lo < r1 and r0 < hi:
                if self.bands[k] is None:
                    raise RuntimeError("tiled plan: a held band was read after it was freed")
                a, b = max(lo, r0), min(hi, r1)
                parts.append(crop(self.bands[k], ((lo, hi), (0, self.shape[self.row_dim + 1])), ((a, b), cols), layout))
        if len(parts) == 1:
            return parts[0].to(dtype)
        # one copy, converting as it goes (not a cat in the storage dtype, then a conversion)
        shape = list(parts[0].shape)
        shape[self.row_dim] = sum(part.shape[self.row_dim] for part in parts)
        out = torch.empty(shape, dtype=dtype, device=self.device, memory_format=self.memory_format)
        at = 0
        for part in parts:
            out.narrow(self.row_dim, at, part.shape[self.row_dim]).copy_(part)
            at += part.shape[self.row_dim]
        return out

    def full(self, dtype: torch.dtype, layout: str) -> torch.Tensor:
        """The whole value in the standard layout (whole ops may view or reshape it)."""
        whole = self.read(((0, self.shape[self.row_dim]), (0, self.shape[self.row_dim + 1])), dtype, layout)
        return whole.contiguous()

    def free(self, k: int) -> None:
        self.bands[k] = None


#: channels are reduced in chunks of about this many bytes (a cache-resident contiguous copy)
MOMENTS_CHUNK_BYTES = 1 << 20


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) mean and population variance of ``x`` (N, C, h, w), in float64.

    ``var_mean`` over the last two dims of a strided crop is several times slower than ATen's
    group-norm moments kernel, which needs contiguous input: ``x`` goes through it in small
    contiguous chunks (of channels for NCHW memory, of rows for NHWC), one group per channel (its
    output is discarded); row chunks are merged like tiles."""
    n, c, h, w = x.shape
    nhwc = x.stride(1) == 1 and c > 1
    if not nhwc:
        chunk = max(1, MOMENTS_CHUNK_BYTES // (4 * h * w * n))
        parts = [_moments(x[:, c0:c0 + chunk], torch.contiguous_format) for c0 in range(0, c, chunk)]
        return torch.cat([m for m, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)
    rows = max(1, MOMENTS_CHUNK_BYTES // (4 * w * c * n))
    mean = m2 = None
    count = 0
    for r0 in range(0, h, rows):
        part = x[:, :, r0:r0 + rows]
        k = part.shape[2] * w
        mean_k, var_k = _moments(part, torch.channels_last)
        if mean is None:
            mean, m2, count = mean_k, var_k * k, k
            continue
        total = count + k
        delta = mean_k - mean
        mean = mean + delta * (k / total)
        m2 = m2 + var_k * k + delta ** 2 * (count * k / total)
        count = total
    return mean, m2 / count


def _moments(part: torch.Tensor, memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    n, k, h, w = part.shape
    part = part.to(torch.float32 if part.dtype != torch.float64 else part.dtype).contiguous(memory_format=memory_format)
    if part.stride(0) != k * h * w:  # contiguous but for a size-1 batch's stride, which ATen's kernel checks
        part = part.clone(memory_format=memory_format)
    _, mean, rstd = torch.ops.aten.native_group_norm(part, None, None, n, k, h * w, k, 0.0)
    return mean.double(), rstd.double().pow(-2)  # rstd = 1 / sqrt(var): inf (var 0) gives 0


class NormStatistics:
    """Per-(sample, group) mean and M2 merged over tiles in float64."""

    def __init__(self, groups: int):
        self.groups = groups
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor) -> None:
        """``x``: (N, C, h, w), the owned pixels of one tile."""
        n, c = x.shape[:2]
        pixels = x.shape[2] * x.shape[3]
        if pixels == 0:
            return
        mean_c, var_c = channel_moments(x)
        mean_c, m2_c = mean_c.view(n, self.groups, -1), (var_c * pixels).view(n, self.groups, -1)
        per_group = c // self.groups
        mean_t = mean_c.mean(dim=2)
        m2_t = m2_c.sum(dim=2) + pixels * ((mean_c - mean_t[..., None]) ** 2).sum(dim=2)
        count_t = pixels * per_group
        if self.mean is None:
            self.count, self.mean, self.m2 = count_t, mean_t, m2_t
            return
        total = self.count + count_t
        delta = mean_t - self.mean
        self.mean = self.mean + delta * (count_t / total)
        self.m2 = self.m2 + m2_t + delta ** 2 * (self.count * count_t / total)
        self.count = total

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.m2 / self.count


def apply_norm(node: Node, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight, bias) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with per-(sample, group) ``mean``/``var``;
    ``weight``/``bias`` are per channel or already cropped to ``x``'s region."""
    geometry = node.meta[K.TILE].geometry
    n, c = x.shape[:2]
    rstd = (var + geometry.eps).rsqrt()
    per = c // geometry.groups
    mean_c = mean.repeat_interleave(per, dim=1).to(x.dtype)
    rstd_c = rstd.repeat_interleave(per, dim=1).to(x.dtype)
    spatial = isinstance(weight, torch.Tensor) and weight.dim() >= 2
    if not spatial and not (isinstance(bias, torch.Tensor) and bias.dim() >= 2):
        scale = rstd_c if weight is None else rstd_c * weight.view(1, c)
        shift = -mean_c * scale + (0 if bias is None else bias.view(1, c))
        return torch.addcmul(shift.view(n, c, 1, 1), x, scale.view(n, c, 1, 1))
    y = (x - mean_c.view(n, c, 1, 1)) * rstd_c.view(n, c, 1, 1)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


class TiledRunner:
    """Executes a plan on flat inputs; ``norm_stats`` gives (mean, var) per norm node name when the
    statistics come from elsewhere (the preview pass)."""

    def __init__(self, gm: GraphModule, plan: TilePlan, grid: TileGrid, norm_stats: Optional[dict] = None):
        self.gm = gm
        self.plan = plan
        self.grid = grid
        self.norm_stats = norm_stats
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.statics = [n for n in gm.graph.nodes
                        if n.op in ("call_function", "get_attr") and n.meta[K.SCHEDULE].mode == "source"]

    # -- whole values --------------------------------------------------------------------------
    def _whole_value(self, u: Node, env: dict, held: dict, dtype_of: dict):
        if u in env:
            return env[u]
        if u in held:
            return held[u].full(dtype_of[u], layout_of(u))
        raise RuntimeError(f"tiled plan: {u.name} is not available whole")

    def run(self, flat_inputs: list) -> list:
        plan = self.plan
        env: dict = dict(zip(self.placeholders, flat_inputs))
        for n in self.gm.graph.nodes:
            if n.op == "get_attr":
                env[n] = getattr(self.gm, n.target) if not isinstance(n.target, str) else _attr(self.gm, n.target)
        for n in self.statics:
            if n.op == "call_function":
                args, kwargs = map_arg((n.args, n.kwargs), lambda u: env[u])
                env[n] = n.target(*args, **kwargs)
        held: dict = {}
        outputs: dict = {}
        stats: dict = {}
        dtype_of = {n: _dtype(n) for n in self.gm.graph.nodes if n.op != "output"}
        for p in range(plan.phases):
            for n in plan.whole.get(p, []):
                args, kwargs = map_arg((n.args, n.kwargs), lambda u: self._whole_value(u, env, held, dtype_of))
                env[n] = n.target(*args, **kwargs)
                for u in plan.whole_free.get(n, ()):
                    env.pop(u, None)
            accumulators: dict = {}
            for index, prog in enumerate(plan.programs.get(p, [])):
                self._run_program(prog, env, held, outputs, stats, accumulators, dtype_of)
                for v, k in plan.band_frees.get((p, index), ()):
                    held[v].free(k)
                release_freed_memory()
            for norm, acc in accumulators.items():
                stats[norm] = acc.mean_var()
            for v in plan.release.get(p, []):
                env.pop(v, None)
                held.pop(v, None)
        result = []
        for v in plan.outputs:
            if v is None:
                result.append(None)
            elif v in outputs:
                result.append(outputs[v])
            else:
                result.append(env[v] if v in env else held[v].full(dtype_of[v], layout_of(v)))
        return result

    # -- tiles ---------------------------------------------------------------------------------
    def _run_program(self, prog, env, held, outputs, stats, accumulators, dtype_of) -> None:
        tenv: dict = {}
        for step in prog.steps:
            n = step.node
            layout = layout_of(n)
            if step.action == "read":
                value = crop(env[n], _full(resolution(n)), step.region, layout)
            elif step.action == "held":
                value = held[n].read(step.region, dtype_of[n], layout)
            else:
                value = self._compute(step, tenv, env, stats)
            tenv[n] = (value, step.region)
            if step.stats or step.write_held or step.outputs:
                owned = crop(value, step.region, step.owned, layout)
                for norm in step.stats:
                    acc = accumulators.get(norm)
                    if acc is None:
                        acc = accumulators[norm] = NormStatistics(norm.meta[K.TILE].geometry.groups)
                    acc.add(owned)
                if step.write_held:
                    if n not in held:
                        held[n] = BandedValue(n, bands(self.grid, resolution(n)),
                                              self.plan.hold_dtype or n.meta["val"].dtype, owned.device)
                    held[n].write(step.owned, owned, layout)
                if step.outputs:
                    if n not in outputs:
                        v = n.meta["val"]
                        outputs[n] = torch.empty(tuple(v.shape), dtype=v.dtype, device=owned.device)
                    crop(outputs[n], _full(resolution(n)), step.owned, layout).copy_(owned)
            for u in step.free_after:
                tenv.pop(u, None)

    def _compute(self, step, tenv: dict, env: dict, stats: dict):
        n = step.node
        rule = n.meta[K.TILE]
        region = step.region
        layout = layout_of(n)
        images = [u for u, role in zip(n.all_input_nodes, rule.roles) if role is Role.IMAGE]
        wants = dict(zip(images, step.wants))
        values: dict = {}
        for u, role in zip(n.all_input_nodes, rule.roles):
            if role is Role.IMAGE and u not in tenv:  # the op reads none of it here (all padding)
                start = tuple((w[0], w[0]) for w in wants[u])
                tenv[u] = (torch.zeros((*u.meta["val"].shape[:2], 0, 0), dtype=u.meta["val"].dtype), start)
                values[u] = tenv[u][0]
            elif role is Role.IMAGE:
                value, have = tenv[u]
                values[u] = crop(value, have, _clip(wants[u], have), layout_of(u))
            elif role is Role.SPATIAL:
                values[u] = _crop_spatial(env[u], region, layout)
            else:
                values[u] = env[u]
        args, kwargs = map_arg((n.args, n.kwargs), lambda u: values[u])
        if rule.kind is TileKind.POINTWISE:
            return n.target(*args, **kwargs)
        if rule.kind in (TileKind.WINDOW, TileKind.GATHER):
            x = images[0]
            have = _clip(wants[x], tenv[x][1])
            return rule.geometry.run(values[x], have, wants[x], region, args, kwargs)
        if rule.kind is TileKind.NORM:
            geometry = rule.geometry
            mean, var = self._stats(n, stats, env)
            weight = values.get(geometry.weight) if isinstance(geometry.weight, Node) else None
            bias = values.get(geometry.bias) if isinstance(geometry.bias, Node) else None
            return apply_norm(n, values[images[0]], mean, var, weight, bias)
        raise RuntimeError(f"tiled plan: {n.name} ({rule.kind.value}) cannot run in a tile")

    def _stats(self, norm: Node, stats: dict, env: dict):
        if norm in stats:
            return stats[norm]
        if norm.args[0] in env:  # a whole input (say, attention's output): exact statistics at once
            stats[norm] = _whole_stats(norm, env[norm.args[0]])
            return stats[norm]
        if self.norm_stats is not None and norm.name in self.norm_stats:
            return self.norm_stats[norm.name]
        raise RuntimeError(f"tiled plan: statistics of {norm.name} are not available")


def _clip(want, have):
    return tuple((max(w[0], h[0]), min(w[1], h[1])) for w, h in zip(want, have))


def _crop_spatial(value: torch.Tensor, region, layout: str) -> torch.Tensor:
    (r0, r1), (c0, c1) = region
    if layout == NCHW:
        return value[..., r0:r1, c0:c1]
    return value[..., r0:r1, c0:c1, :]


def _whole_stats(norm: Node, x: torch.Tensor):
    acc = NormStatistics(norm.meta[K.TILE].geometry.groups)
    acc.add(x)
    return acc.mean_var()


def _dtype(node: Node):
    v = node.meta.get("val")
    return v.dtype if isinstance(v, torch.Tensor) else None


def _attr(gm: GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
