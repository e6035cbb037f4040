"""Temporal reuse across denoising steps: DeepCache, FasterDiffusion and any other cut, as one pass.

A denoising loop calls the same network at every step, and parts of it barely change between
consecutive steps. A *cut* names the values a step may take from an earlier step instead of
computing them. ``passes/specialize_cut.py`` turns the captured graph and the cut into two
GraphModules: the *full* graph (the model, also returning the cut values) and the *partial* graph
(the backward slice from the outputs that stops at the cut). A *schedule*, keyed by the step
index within the trajectory, says which steps are *key* steps (run the full graph and cache the
cut values) and which reuse them (run the partial graph).

Cuts and schedules::

    DeepCache(interval=3, branch=0)        # the deep up-path feature DeepCache's cache_branch_id selects
    FasterDiffusion()                      # encoder skips + mid-block output; the paper's DDIM-50 key steps
    Reuse(cut=["up_blocks.0", "up_blocks.1"], schedule=4)           # module names, uniform interval
    Reuse(cut=[...], schedule=[0, 1, 2, 5, 9])                      # explicit key steps
    Reuse(cut=[...], schedule="auto")      # key steps placed where reuse was measured to hurt least

**Step index.** ``engine.step(i)`` sets it explicitly (for the calls that follow, until the next
``step``). Otherwise it comes from the scheduler given to ``sigec.compile``: its ``step_index``
when it keeps one (Euler, Heun, DPM-Solver: repeated timestep values stay distinct), else the
position of the call's timestep in ``scheduler.timesteps``, as DeepCache does; a repeated value
takes its first position after the previous step's. The schedule is applied to the index relative
to the trajectory's first step (img2img trajectories start part-way).

**Streams.** Calls are grouped into streams by the values of their other inputs (text embeddings):
a classifier-free-guidance loop that calls the model once for the unconditional and once for the
conditional half keeps one cache per half. A guidance *batch* (both halves in one call) keeps both
halves in one cached tensor, each in its own rows.

**New trajectory (the reset rule).** A call starts a new trajectory for its stream, drops the
stream's cached cut values and runs as a key step when: the stream has not been seen, or
``engine.reset()`` was called, or its step index is not after the stream's previous one, or the
scheduler's ``timesteps`` were set again since the trajectory began.

**Cache.** Cut values live in a ``sigec.runtime.cache.SlotStore`` (one slot per stream) under the
engine's ``cache_budget_bytes`` / ``on_cache_full``, stored in ``cache_dtype``. A partial step
whose slot was evicted, or whose weights changed since it was recorded (``on_stale="rerecord"``),
runs as a key step instead; ``on_stale="raise"`` raises.

**Composition.** ``edits=True`` runs every step through a spatial engine (``sigec.compile``'s
pipeline on the full and on the partial graph): a recorded trajectory followed by an edited one
(SDEdit) recomputes only the edited region, on key and partial steps alike. That needs the
partial graph's image inputs (latent and cut values) at one resolution; other cuts raise
``TemporalCompositionError``. ``batch_partial_steps=True`` evaluates the partial steps between two
key steps as one batch when the partial graph does not read the latent (FasterDiffusion's cut).
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
import math
import re
import threading
from typing import Any, Hashable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from sigec import inputs
from sigec.capture import capture
from sigec.engine import EngineError
from sigec.macs import node_macs
from sigec.passes.pass_base import UserInputError, run_passes
from sigec.passes.specialize_cut import CutContext, CutError, CutSpecialization, specialize_cut
from sigec.runtime.cache import Slot, SlotStore, fingerprint
from sigec.settings import CompileSettings

log = logging.getLogger("sigec.temporal")

aten = torch.ops.aten

#: FasterDiffusion's key steps for DDIM with 50 steps (Li et al., "Faster Diffusion").
FASTER_DIFFUSION_DDIM50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)


class TemporalCompositionError(UserInputError):
    """Two features that cannot be combined were asked for together."""


# ------------------------------------------------------------------------------------------------
# schedules: which steps of an n-step trajectory are key steps


@dataclasses.dataclass(frozen=True)
class Uniform:
    """Every ``interval``-th step is a key step, starting with the first (DeepCache's ``uniform``)."""

    interval: int

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"the reuse interval must be an integer >= 1, got {self.interval!r}")

    def key_steps(self, num_steps: Optional[int]) -> Optional[frozenset]:
        if num_steps is None:
            return None
        return frozenset(range(0, num_steps, self.interval))

    def is_key(self, step: int, num_steps: Optional[int]) -> bool:
        return step % self.interval == 0


@dataclasses.dataclass(frozen=True)
class KeySteps:
    """Explicit key steps; with ``reference_steps`` they are positions in a trajectory of that many
    steps, scaled to the trajectory at hand (step ``k`` becomes ``round(k * n / reference_steps)``)."""

    steps: tuple[int, ...]
    reference_steps: Optional[int] = None

    def __post_init__(self):
        steps = tuple(sorted(set(int(s) for s in self.steps)))
        if not steps or steps[0] != 0 or any(s < 0 for s in steps):
            raise ValueError(f"key steps must be non-negative and include step 0 (the first step has nothing to "
                             f"reuse), got {list(self.steps)}")
        object.__setattr__(self, "steps", steps)
        if self.reference_steps is not None and self.reference_steps <= steps[-1]:
            raise ValueError(f"reference_steps={self.reference_steps} must exceed the last key step {steps[-1]}")

    def key_steps(self, num_steps: Optional[int]) -> Optional[frozenset]:
        if self.reference_steps is None:
            return frozenset(s for s in self.steps if num_steps is None or s < num_steps)
        if num_steps is None:
            return None
        scale = num_steps / self.reference_steps
        return frozenset(min(int(math.floor(s * scale + 0.5)), num_steps - 1) for s in self.steps)

    def is_key(self, step: int, num_steps: Optional[int]) -> bool:
        keys = self.key_steps(num_steps)
        if keys is None:
            raise EngineError("this schedule is scaled to the trajectory's length, which is unknown: pass "
                              "scheduler= to sigec.compile, or engine.step(i, num_steps=n)")
        return step in keys


@dataclasses.dataclass(frozen=True)
class Auto:
    """Key steps chosen from errors measured on a first trajectory, which runs every step in full.

    As many key steps as ``Uniform(interval)`` uses (so the same MACs), placed where reuse hurts
    least. At each step ``j`` of the calibration trajectory the partial graph also runs with the cut
    values of each of the ``window`` previous steps ``k``: ``E[k, j]``, the relative error of the
    model's output if step ``j`` reused key step ``k``, is measured, not guessed from feature change
    rates alone (the Block Caching idea, made direct). Each error is weighted by how much of the
    model's output the sampler carries into the next latent (``step_weights``), and a dynamic
    program places the key steps (``choose_key_steps``).
    """

    interval: int = 3

    def __post_init__(self):
        Uniform(self.interval)  # same validation

    def budget(self, num_steps: int) -> int:
        return len(Uniform(self.interval).key_steps(num_steps))

    @property
    def window(self) -> int:
        """How many steps back a partial step may reach for its key step (the calibration runs the
        partial graph that many times per step)."""
        return 2 * self.interval + 2


def step_weights(scheduler, timesteps: Sequence[float]) -> list[float]:
    """How strongly an error in the model's output at each of ``timesteps`` moves the next latent.

    For a sampler over ``scheduler.alphas_cumprod`` (DDIM, DDPM, PNDM, DPM-Solver, Euler: the
    deterministic update they share to first order), writing ``a`` for alpha-bar and
    ``s = sqrt((1 - a) / a)``, a noise-prediction error ``e`` at step ``j`` moves the next latent
    by ``sqrt(a[j+1]) * (s[j] - s[j+1]) * e`` (the step after the last reaches the clean sample,
    ``a = 1``). Errors at early, noisy steps move the latent far more than late ones. Without
    ``alphas_cumprod`` every step weighs 1.
    """
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        return [1.0] * len(timesteps)
    last = len(alphas) - 1
    abar = [float(alphas[min(max(int(round(float(t))), 0), last)]) for t in timesteps] + [1.0]
    ratio = [math.sqrt((1 - a) / a) if a > 0 else float("inf") for a in abar]
    return [math.sqrt(abar[j + 1]) * abs(ratio[j] - ratio[j + 1]) if math.isfinite(ratio[j]) else 1.0
            for j in range(len(timesteps))]


def choose_key_steps(stale_error: dict, num_steps: int, budget: int,
                     weights: Optional[Sequence[float]] = None) -> frozenset:
    """Key steps (``budget`` of them, step 0 included) minimising the estimated error of the result.

    ``stale_error[(k, j)]`` is the error of step ``j``'s output when it reuses key step ``k``'s cut
    values; pairs that are missing cannot be chosen. The partial steps that reuse one key step err
    the same way (the same stale features), so their weighted errors add up; the errors of different
    key steps are independent, so they add in quadrature. A placement therefore costs
    ``sum over key steps k of (sum over its partial steps j of weights[j] * stale_error[(k, j)]) ** 2``,
    and a dynamic program finds the cheapest exactly.
    """
    n = num_steps
    if budget >= n:
        return frozenset(range(n))
    w = list(weights) if weights is not None else [1.0] * n
    inf = float("inf")
    # segment[a][b]: squared error of steps a+1..b reusing a key at a
    segment = [[inf] * n for _ in range(n)]
    for a in range(n):
        total = 0.0
        segment[a][a] = 0.0
        for b in range(a + 1, n):
            total += w[b] * stale_error.get((a, b), inf)
            segment[a][b] = total * total
    # best[c][a]: cost of steps a..n-1 with a key at a and c more keys after it
    best = [[segment[a][n - 1] for a in range(n)]]
    choice: list[list[int]] = [[-1] * n]
    for c in range(1, budget):
        row, pick = [inf] * n, [-1] * n
        for a in range(n):
            for b in range(a + 1, n):
                cost = segment[a][b - 1] + best[c - 1][b]
                if cost < row[a]:
                    row[a], pick[a] = cost, b
        best.append(row)
        choice.append(pick)
    if not math.isfinite(best[budget - 1][0]):
        raise EngineError(f"no placement of {budget} key steps in {n} steps keeps every partial step within the "
                          "measured reuse window")
    keys, a = [0], 0
    for c in range(budget - 1, 0, -1):
        a = choice[c][a]
        if a < 0:
            break
        keys.append(a)
    return frozenset(keys)


def _schedule(value: Any) -> "Uniform | KeySteps | Auto":
    if isinstance(value, (Uniform, KeySteps, Auto)):
        return value
    if isinstance(value, bool):
        raise TypeError(f"schedule must be an interval, key steps or 'auto', got {value!r}")
    if isinstance(value, int):
        return Uniform(value)
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"schedule string must be 'auto', got {value!r}")
        return Auto()
    if isinstance(value, (list, tuple, range, set, frozenset)):
        return KeySteps(tuple(value))
    raise TypeError(f"schedule must be an int interval, a sequence of key steps, 'auto' or a Uniform/KeySteps/Auto, "
                    f"got {type(value).__name__}")


# ------------------------------------------------------------------------------------------------
# cuts: which values of the captured graph a partial step reuses

_DYNAMO_ROOT = re.compile(r"^[A-Z]\['[^']*'\]")


def module_path(raw: str) -> str:
    """A module's dotted name from an ``nn_module_stack`` entry, export style (``up_blocks.3.resnets.1``)
    or dynamo style (``L['self'].__dict__['_modules']['up_blocks'].3...``)."""
    path = _DYNAMO_ROOT.sub("", raw)
    path = re.sub(r"\.__dict__\['_modules'\]\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]|\[(\d+)\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.strip(".")


def _scope(node: Node) -> list[str]:
    """Module paths a node was computed in, outermost first (the root module left out)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [p for p in (module_path(v[0]) for v in stack.values()) if p]


def module_names(gm: GraphModule) -> list[str]:
    """Every module path that appears in the graph's ``nn_module_stack``, in first-use order."""
    return list(dict.fromkeys(p for n in gm.graph.nodes for p in _scope(n)))


def module_outputs(gm: GraphModule, modules: Sequence[str]) -> dict[str, list[Node]]:
    """The tensors each module hands to the rest of the graph: nodes computed inside it with a
    user outside it (users kept only for their side effects, such as shape asserts, do not count)."""
    wanted = set(modules)
    scopes = {n: set(_scope(n)) for n in gm.graph.nodes}
    outputs: dict[str, list[Node]] = {m: [] for m in modules}
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        for m in scopes[n] & wanted:
            if any(u.op == "output" or (u.users and m not in scopes[u]) for u in n.users):
                outputs[m].append(n)
    return outputs


@dataclasses.dataclass(frozen=True)
class ModuleCut:
    """The outputs of named modules (``fnmatch`` patterns over ``nn_module_stack`` names)."""

    modules: tuple[str, ...]

    def resolve(self, gm: GraphModule) -> list[str]:
        names = module_names(gm)
        matched: list[str] = []
        for pattern in self.modules:
            hits = [m for m in names if fnmatch.fnmatchcase(m, pattern)]
            if not hits:
                close = difflib.get_close_matches(pattern, names, n=5)
                raise CutError(f"cut module {pattern!r} is not in the captured graph"
                               + (f"; close names: {close}" if close else f"; modules include {names[:8]}..."))
            matched += hits
        nodes = [n.name for ns in module_outputs(gm, list(dict.fromkeys(matched))).values() for n in ns]
        if not nodes:
            raise CutError(f"modules {list(self.modules)} have no tensor outputs in the captured graph")
        return list(dict.fromkeys(nodes))


def _unet_prefix(gm: GraphModule, what: str) -> tuple[str, list[str]]:
    """``(prefix, module names)`` of the diffusers UNet in the graph (the prefix is empty unless the
    UNet was called from inside another module)."""
    names = module_names(gm)
    prefixes = {m.group(1) for p in names if (m := re.fullmatch(r"(.*?)up_blocks\.\d+", p))}
    if not prefixes:
        raise CutError(f"{what} needs a diffusers UNet2DModel or UNet2DConditionModel (modules up_blocks.N, "
                       f"down_blocks.N, mid_block); the captured graph has modules {names[:6]}...")
    if len(prefixes) > 1:
        raise CutError(f"{what}: the graph holds several UNets ({sorted(prefixes)}); compile one UNet")
    return prefixes.pop(), names


def _indices(names: Sequence[str], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for p in names if (m := re.fullmatch(pattern, p))})


@dataclasses.dataclass(frozen=True)
class DeepCacheCut:
    """The value DeepCache's ``cache_branch_id`` caches: block ``branch // 3``, layer ``branch % 3``
    counted from the shallow end of the up path. It is the hidden state that enters layer
    ``len(resnets) - 1 - layer`` of up block ``len(up_blocks) - 1 - block``, before its
    concatenation with the skip (the block's input when that layer does not exist)."""

    branch: int

    def resolve(self, gm: GraphModule) -> list[str]:
        prefix, names = _unet_prefix(gm, "DeepCache")
        ups = _indices(names, re.escape(prefix) + r"up_blocks\.(\d+)")
        block, layer = divmod(self.branch, 3)
        if block >= len(ups):
            raise CutError(f"DeepCache branch {self.branch} is out of range: this UNet has {len(ups)} up blocks, "
                           f"so branches 0..{3 * len(ups) - 1}")
        up = f"{prefix}up_blocks.{len(ups) - 1 - block}"
        resnets = _indices(names, re.escape(up) + r"\.resnets\.(\d+)")
        target = f"{up}.resnets.{max(len(resnets) - 1 - layer, 0)}"
        scopes = {n: _scope(n) for n in gm.graph.nodes}
        for n in gm.graph.nodes:
            if (n.op == "call_function" and n.target == aten.cat.default and scopes[n] and scopes[n][-1] == up
                    and any(target in scopes[u] for u in n.users)):
                return [n.args[0][0].name]
        raise CutError(f"DeepCache: no concatenation of hidden state and skip feeds {target} in {up}; the up "
                       "block does not have the diffusers structure DeepCache patches")


@dataclasses.dataclass(frozen=True)
class EncoderCut:
    """FasterDiffusion's cut: the output of ``conv_in``, every down block (the skips) and the mid block."""

    def resolve(self, gm: GraphModule) -> list[str]:
        prefix, names = _unet_prefix(gm, "FasterDiffusion")
        downs = _indices(names, re.escape(prefix) + r"down_blocks\.(\d+)")
        modules = [f"{prefix}conv_in"] + [f"{prefix}down_blocks.{i}" for i in downs] + [f"{prefix}mid_block"]
        missing = [m for m in modules if m not in names]
        if missing:
            raise CutError(f"FasterDiffusion: the UNet has no {missing}")
        return ModuleCut(tuple(modules)).resolve(gm)


# ------------------------------------------------------------------------------------------------
# what users pass as ``temporal=``


@dataclasses.dataclass(frozen=True, kw_only=True)
class TemporalSpec:
    """A cut and a schedule. Options shared by every spec (keyword-only):

    Attributes:
        edits: also compile spatial engines, so that re-running a recorded trajectory with an
            edited input recomputes only the edited region (SDEdit with temporal reuse).
        batch_partial_steps: evaluate the partial steps between two key steps as one batch
            (needs a cut whose partial graph does not read the latent, and a scheduler).
    """

    edits: bool = False
    batch_partial_steps: bool = False

    def make_cut(self):
        """The cut: an object whose ``resolve(gm)`` names the cut nodes of a captured graph."""
        raise NotImplementedError

    def make_schedule(self):
        """The schedule: ``Uniform``, ``KeySteps`` or ``Auto``."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class DeepCache(TemporalSpec):
    """DeepCache (Ma et al., CVPR 2024): reuse the deep up-path feature of ``branch`` for
    ``interval - 1`` steps after each full step; equal to ``DeepCache.DeepCacheSDHelper`` with
    ``set_params(cache_interval=interval, cache_branch_id=branch)``."""

    interval: int = 3
    branch: int = 0

    def __post_init__(self):
        Uniform(self.interval)
        if not isinstance(self.branch, int) or self.branch < 0:
            raise ValueError(f"DeepCache branch must be an integer >= 0, got {self.branch!r}")

    def make_cut(self):
        return DeepCacheCut(self.branch)

    def make_schedule(self):
        return Uniform(self.interval)


@dataclasses.dataclass(frozen=True)
class FasterDiffusion(TemporalSpec):
    """FasterDiffusion (Li et al.): at key steps cache the encoder's skips and the mid-block output;
    other steps run the decoder only. ``key_steps=None`` uses the paper's DDIM-50 key steps
    (0, 1, 2, 3, 5, 10, 15, 25, 35), scaled to the trajectory's length; an explicit sequence is used
    as it is. Prior noise injection (a sampler change) is not part of it."""

    key_steps: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        if self.key_steps is not None:
            object.__setattr__(self, "key_steps", tuple(self.key_steps))
            KeySteps(self.key_steps)

    def make_cut(self):
        return EncoderCut()

    def make_schedule(self):
        if self.key_steps is None:
            return KeySteps(FASTER_DIFFUSION_DDIM50, reference_steps=50)
        return KeySteps(self.key_steps)


@dataclasses.dataclass(frozen=True)
class Reuse(TemporalSpec):
    """Any cut, given by module names (``fnmatch`` patterns over the ``nn_module_stack`` names, such
    as ``"up_blocks.0"`` or ``"down_blocks.*"``), with a schedule: an int (uniform interval), a
    sequence of key steps, ``"auto"`` or a ``Uniform`` / ``KeySteps`` / ``Auto``."""

    cut: Union[str, Sequence[str]] = ()
    schedule: Any = 3

    def __post_init__(self):
        modules = (self.cut,) if isinstance(self.cut, str) else tuple(self.cut)
        if not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(f"cut must name at least one module, got {self.cut!r}")
        object.__setattr__(self, "cut", modules)
        object.__setattr__(self, "schedule", _schedule(self.schedule))

    def make_cut(self):
        return ModuleCut(self.cut)

    def make_schedule(self):
        return self.schedule


# ------------------------------------------------------------------------------------------------
# batched partial steps: vmap over the timestep, with attention batched by hand


@torch.library.custom_op("sigec_temporal::sdpa", mutates_args=())
def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
          dropout_p: float, is_causal: bool, scale: Optional[float]) -> torch.Tensor:
    """``scaled_dot_product_attention`` as an op with a batching rule (aten's has none under vmap)."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)


@_sdpa.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


def _fold(x: Optional[torch.Tensor], dim: Optional[int], size: int) -> Optional[torch.Tensor]:
    if x is None:
        return None
    x = x.unsqueeze(0).expand(size, *x.shape) if dim is None else x.movedim(dim, 0)
    return x.reshape(size * x.shape[1], *x.shape[2:])


@_sdpa.register_vmap
def _(info, in_dims, query, key, value, attn_mask, dropout_p, is_causal, scale):
    n = info.batch_size
    q, k, v, m = (_fold(t, d, n) for t, d in zip((query, key, value, attn_mask), in_dims[:4]))
    out = _sdpa(q, k, v, m, dropout_p, is_causal, scale)
    return out.reshape(n, -1, *out.shape[1:]), 0


def _batchable(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` whose attention calls go through ``sigec_temporal::sdpa``."""
    g = torch.fx.Graph()
    env: dict = {}
    out = g.graph_copy(gm.graph, env)
    g.output(out)
    for n in g.nodes:
        if n.op == "call_function" and n.target == aten.scaled_dot_product_attention.default:
            args = list(n.args) + [None, 0.0, False][len(n.args) - 3:]
            n.target = torch.ops.sigec_temporal.sdpa.default
            n.args = (*args[:6], n.kwargs.get("scale"))
            n.kwargs = {}
    return GraphModule(gm, g, class_name="SigecPartialBatched")


# ------------------------------------------------------------------------------------------------
# compile


def compile_temporal(model, example_args=None, example_kwargs: Optional[dict] = None, *, temporal: TemporalSpec,
                     scheduler=None, policy: str = "sige", eps: float = 1e-6, dilation: int = 1,
                     threshold: float = 0.0, block_size=None, expected_active_fraction: float = 0.15,
                     spatial_inputs=None, kernel_costs=None, cache_budget_bytes: Optional[int] = None,
                     on_cache_full: str = "evict", on_stale: str = "rerecord",
                     cache_dtype: Optional[torch.dtype] = None) -> "TemporalEngine":
    """Capture ``model``, specialize the cut of ``temporal`` and return a ``TemporalEngine``.

    The spatial options (``policy`` ... ``kernel_costs``) configure the spatial engines of
    ``edits=True``; ``spatial_inputs`` also names the latent inputs (default: every 4-D floating
    input). The cache options apply to the cut values.
    """
    if not isinstance(temporal, TemporalSpec):
        raise TypeError(f"temporal= must be a sigec.temporal spec (DeepCache, FasterDiffusion or Reuse), got "
                        f"{type(temporal).__name__}")
    if on_stale not in ("rerecord", "raise"):
        raise ValueError(f"on_stale must be 'rerecord' or 'raise', got {on_stale!r}")
    settings = CompileSettings(policy=policy, eps=eps, dilation=dilation, threshold=threshold,
                               block_size=block_size, expected_active_fraction=expected_active_fraction,
                               spatial_inputs=tuple(spatial_inputs) if spatial_inputs is not None else None,
                               kernel_costs=kernel_costs)
    if isinstance(model, torch.nn.Module) and model.training:
        raise ValueError(f"{type(model).__name__} is in training mode: call model.eval() before sigec.compile")
    if example_kwargs and "mask" in example_kwargs:
        raise ValueError("the model takes a keyword input named 'mask', which is the engine's own edit-mask "
                         "argument; pass the model's mask positionally")
    if example_args is not None and not isinstance(example_args, tuple):
        example_args = (example_args,)
    captured = capture(model, example_args, example_kwargs)
    cut = temporal.make_cut().resolve(captured.gm)
    ctx = CutContext(settings, cut=tuple(cut))
    run_passes(captured.gm, ctx, [specialize_cut])
    spec = ctx.specialization
    log.info("temporal cut %s: partial graph reads %s of the inputs %s", spec.cut, spec.reads, spec.inputs)
    engine = TemporalEngine(captured.gm, spec, temporal, scheduler, captured.in_spec, captured.out_spec,
                            captured.input_names, settings.spatial_inputs,
                            SlotStore(cache_budget_bytes, on_cache_full), on_stale=on_stale, cache_dtype=cache_dtype,
                            source=model if isinstance(model, torch.nn.Module) else None)
    if temporal.edits:
        engine._compile_spatial(dict(policy=policy, eps=eps, dilation=dilation, threshold=threshold,
                                     block_size=block_size, expected_active_fraction=expected_active_fraction,
                                     cache_budget_bytes=cache_budget_bytes, on_cache_full=on_cache_full,
                                     on_stale=on_stale, cache_dtype=cache_dtype))
    return engine


# ------------------------------------------------------------------------------------------------
# the engine

FULL, PARTIAL = "full", "partial"


@dataclasses.dataclass
class _Trajectory:
    """What the engine knows about one stream's current trajectory."""

    start: int                       # absolute step index of its first step
    last: int                        # absolute index of its latest step
    num_steps: Optional[int]         # its length (None: unknown, explicit steps without a count)
    timesteps: Any = None            # the scheduler's timesteps tensor when it began
    keys: Optional[frozenset] = None  # key steps (relative), when the schedule gives them up front
    calibrating: bool = False         # an Auto schedule measuring reuse errors on this trajectory
    recent_cuts: list = dataclasses.field(default_factory=list)  # (step, cut values) of the last steps
    stale_error: dict = dataclasses.field(default_factory=dict)  # (key step, step) -> relative output error
    pending: dict = dataclasses.field(default_factory=dict)  # batched partial results by absolute index
    history: list = dataclasses.field(default_factory=list)  # (relative step, FULL | PARTIAL)


class TemporalEngine(torch.nn.Module):
    """Runs a denoising network with reuse across steps (see the module docstring for the rules).

    Attributes:
        specialization: the cut, the full and partial GraphModules and the partial graph's reads.
        full, partial: the two GraphModules.
        store: the ``SlotStore`` holding the cut values, one slot per stream.
        last_kind: ``"full"`` or ``"partial"``, what the latest call ran.
    """

    def __init__(self, graph_module: GraphModule, specialization: CutSpecialization, temporal: TemporalSpec,
                 scheduler, in_spec, out_spec, input_names: list[str], latent_names: Optional[Sequence[str]],
                 store: SlotStore, on_stale: str = "rerecord", cache_dtype: Optional[torch.dtype] = None,
                 source: Optional[torch.nn.Module] = None):
        super().__init__()
        self.specialization = specialization
        self.full = specialization.full
        self.partial = specialization.partial
        self.temporal = temporal
        self.schedule = temporal.make_schedule()
        self.scheduler = scheduler
        self.store = store
        self.on_stale = on_stale
        self.cache_dtype = cache_dtype
        self.input_names = list(input_names)
        self._in_spec, self._out_spec = in_spec, out_spec
        placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        self._examples = [n.meta.get("val") for n in placeholders]
        self._latent_pos = self._find_latents(latent_names)
        self._timestep_pos = self._find_timestep()
        self._stream_pos = [i for i in range(len(self._examples))
                            if i not in self._latent_pos and i != self._timestep_pos]
        # the model's own parameters and buffers, as the graphs read them; where each lives in the
        # user's model (weakly: the engine must not own the model nor become its parent module)
        self._watched = [(name, t, id(t)) for name, t in
                         list(graph_module.named_parameters()) + list(graph_module.named_buffers())]
        self._placement = [(t.dtype, t.device) for _, t, _ in self._watched]
        self._owners = inputs.owners(source, [name for name, _, _ in self._watched]) if source is not None else []
        self._device = self._watched[0][1].device if self._watched else None
        self._cut_dtypes = [n.meta["val"].dtype for n in self.partial.graph.nodes
                            if n.op == "placeholder"][len(self._examples):]
        self._lock = threading.RLock()
        self._explicit: Optional[tuple[int, Optional[int]]] = None
        self._streams: dict[Hashable, _Trajectory] = {}
        self._auto_keys: dict[int, frozenset] = {}
        self._full_engine = self._partial_engine = None
        self._batched: Optional[GraphModule] = None
        self.last_kind: Optional[str] = None
        self._macs = {FULL: sum(node_macs(n) for n in self.full.graph.nodes),
                      PARTIAL: sum(node_macs(n) for n in self.partial.graph.nodes)}
        if temporal.batch_partial_steps:
            self._check_batchable()

    # -- set-up -------------------------------------------------------------------------------
    def _find_latents(self, names: Optional[Sequence[str]]) -> list[int]:
        if names is not None:
            unknown = [n for n in names if n not in self.input_names]
            if unknown:
                raise UserInputError(f"spatial_inputs names {unknown} that are not inputs; inputs are "
                                     f"{self.input_names}")
            return [self.input_names.index(n) for n in names]
        return [i for i, v in enumerate(self._examples) if isinstance(v, torch.Tensor) and v.dim() == 4
                and v.is_floating_point() and tuple(v.shape[-2:]) != (1, 1)]

    def _find_timestep(self) -> Optional[int]:
        """The input holding the timestep: named so, else the one scalar-like non-latent tensor."""
        named = [i for i, n in enumerate(self.input_names) if n in ("timestep", "timesteps", "t")]
        if len(named) == 1:
            return named[0]
        batch = int(self._examples[self._latent_pos[0]].shape[0]) if self._latent_pos else 1
        scalar = [i for i, v in enumerate(self._examples) if i not in self._latent_pos
                  and isinstance(v, torch.Tensor) and v.dim() <= 1 and v.numel() <= batch]
        return scalar[0] if len(scalar) == 1 else None

    def _check_batchable(self) -> None:
        latents = [self.input_names[i] for i in self._latent_pos]
        read = [n for n in latents if self.specialization.reads_input(n)]
        if read:
            raise TemporalCompositionError(
                f"batch_partial_steps needs a partial graph that does not read the latent, but this cut's partial "
                f"graph reads {read}: a partial step then depends on the previous step's result. FasterDiffusion's "
                "cut (encoder and mid block) does not read it; DeepCache's cuts do")
        if self.temporal.edits:
            raise TemporalCompositionError("batch_partial_steps and edits=True cannot be combined: an edit runs each "
                                           "partial step through its own spatial cache slot")
        if self.scheduler is None or self._timestep_pos is None:
            raise TemporalCompositionError("batch_partial_steps needs scheduler= (the timesteps of the steps ahead) "
                                           "and a model input that is the timestep")

    def _compile_spatial(self, options: dict) -> None:
        """The spatial engines of ``edits=True``: ``sigec.compile`` on the full and the partial graph."""
        from sigec.api import compile as sigec_compile

        cut_vals = [n.meta["val"] for n in self.partial.graph.nodes if n.op == "placeholder"][len(self._examples):]
        latent_vals = [self._examples[i] for i in self._latent_pos
                       if self.specialization.reads_input(self.input_names[i])]
        images = [v for v in latent_vals + cut_vals if v.dim() == 4 and tuple(v.shape[-2:]) != (1, 1)]
        resolutions = sorted({tuple(int(s) for s in v.shape[-2:]) for v in images})
        if len(resolutions) != 1:
            raise TemporalCompositionError(
                f"edits=True needs the partial graph's image inputs (latent and cut values) at one resolution, but "
                f"they are at {resolutions}: spatial engines mask one input resolution. Use a cut at the input "
                f"resolution (DeepCache branch 0, or a Reuse cut of modules at full resolution), or edits=False")

        def zeros(vals) -> tuple:
            return tuple(torch.zeros(v.shape, dtype=v.dtype, device=v.device) for v in vals)

        latents = [self.input_names[i] for i in self._latent_pos]
        cut_names = [n.name for n in self.partial.graph.nodes if n.op == "placeholder"][len(self._examples):]
        self.full.eval(), self.partial.eval()
        self._full_engine = sigec_compile(self.full, zeros(self._examples), spatial_inputs=latents, **options)
        self._partial_engine = sigec_compile(
            self.partial, zeros(self._examples) + zeros(cut_vals),
            spatial_inputs=[n for n in latents if self.specialization.reads_input(n)] + cut_names, **options)

    # -- public controls ----------------------------------------------------------------------
    def step(self, index: int, num_steps: Optional[int] = None) -> "TemporalEngine":
        """Set the step index of the calls that follow (until the next ``step``); returns the engine,
        so ``engine.step(i)(x, t)`` works. ``num_steps`` is the trajectory's length, needed by
        schedules scaled to it when no scheduler was given."""
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"step index must be an integer >= 0, got {index!r}")
        self._explicit = (index, num_steps)
        return self

    def reset(self) -> None:
        """Forget every trajectory and cached cut value: the next call of each stream is a key step."""
        with self._lock:
            self._streams.clear()
            self.store.clear()
            for engine in (self._full_engine, self._partial_engine):
                if engine is not None:
                    engine.clear()

    @property
    def spatial_engines(self) -> Optional[dict]:
        """``{"full": Engine, "partial": Engine}`` of ``edits=True`` (``None`` otherwise)."""
        if self._full_engine is None:
            return None
        return {FULL: self._full_engine, PARTIAL: self._partial_engine}

    def macs(self) -> dict[str, int]:
        """Dense MACs of one full step and of one partial step, counted from the graphs."""
        return dict(self._macs)

    def key_steps(self, num_steps: int) -> frozenset:
        """The key steps (relative to the trajectory's start) of an ``num_steps``-step trajectory."""
        if isinstance(self.schedule, Auto):
            if num_steps not in self._auto_keys:
                raise EngineError(f"the 'auto' schedule has not measured a {num_steps}-step trajectory yet "
                                  "(its first trajectory runs every step in full)")
            return self._auto_keys[num_steps]
        return self.schedule.key_steps(num_steps)

    def loop_macs(self, num_steps: int) -> int:
        """MACs of an ``num_steps``-step trajectory under the schedule."""
        keys = self.key_steps(num_steps)
        return len(keys) * self._macs[FULL] + (num_steps - len(keys)) * self._macs[PARTIAL]

    def history(self) -> dict[Hashable, list]:
        """``(relative step, "full" | "partial")`` of every call of each stream's current trajectory."""
        return {k: list(t.history) for k, t in self._streams.items()}

    def cut_modules(self) -> list[str]:
        """The module each cut value comes out of (``Reuse(cut=engine.cut_modules())`` names the same cut
        when each of those modules has that one output)."""
        by_name = {n.name: n for n in self.full.graph.nodes}
        return list(dict.fromkeys(_scope(by_name[name])[-1] for name in self.specialization.cut
                                  if _scope(by_name[name])))

    def describe(self) -> str:
        """The cut, the dependence analysis and the MACs, in a few lines."""
        spec = self.specialization
        by_name = {n.name: n for n in self.full.graph.nodes}
        lines = [f"temporal reuse: {self.temporal}",
                 f"cut values ({len(spec.cut)}):"]
        for name in spec.cut:
            n = by_name[name]
            where = _scope(n)[-1] if _scope(n) else "-"
            lines.append(f"  {name:24s} {'x'.join(map(str, n.meta['val'].shape)):>16s}  from {where}")
        lines.append(f"partial graph reads: {list(spec.reads)} (of {list(spec.inputs)})")
        f, p = self._macs[FULL], self._macs[PARTIAL]
        lines.append(f"MACs per step: full {f:,}, partial {p:,} ({f / max(p, 1):.2f}x fewer)")
        return "\n".join(lines)

    def _apply(self, fn, recurse=True):
        inputs.refuse_move(self._watched[0][1] if getattr(self, "_watched", None) else None, fn, EngineError)
        return super()._apply(fn, recurse)

    # -- calling ------------------------------------------------------------------------------
    def forward(self, *args, mask: Optional[torch.Tensor] = None, **kwargs) -> Any:
        with self._lock:
            return self._call(args, kwargs, mask, self._explicit)

    def _check_identity(self) -> None:
        inputs.check_identity(self._watched, self._placement, self._owners, EngineError)

    def _flatten(self, args, kwargs) -> list:
        return inputs.flatten_inputs(args, kwargs, self._in_spec, self.input_names, self._examples, self._device,
                                     EngineError)

    def _state_versions(self) -> tuple:
        return inputs.state_versions(self._watched)

    def _scheduler_index(self, flat: list, previous: Optional[int]) -> int:
        s = self.scheduler
        index = getattr(s, "step_index", None)
        if index is not None:
            return int(index)
        if self._timestep_pos is None:
            raise EngineError(f"cannot tell which input is the timestep (inputs {self.input_names}): call "
                              "engine.step(i) before each step")
        t = flat[self._timestep_pos].reshape(-1)[0]
        timesteps = s.timesteps
        hits = (timesteps.to(t.device) == t.to(timesteps.dtype)).nonzero().flatten().tolist()
        if not hits:
            raise EngineError(f"timestep {t.item()} is not in scheduler.timesteps: pass the scheduler the loop uses, "
                              "or call engine.step(i)")
        begin = getattr(s, "begin_index", None) or 0
        hits = [h for h in hits if h >= begin] or hits
        later = [h for h in hits if previous is not None and h > previous]
        return later[0] if later else hits[0]

    def _resolve(self, flat: list, stream: Hashable, explicit) -> tuple[int, Optional[int], Any]:
        """``(absolute step index, trajectory length or None, timesteps tensor or None)``."""
        if explicit is not None:
            index, num_steps = explicit
            if num_steps is None and self.scheduler is not None:
                num_steps = len(self.scheduler.timesteps)
            return index, num_steps, None
        if self.scheduler is None:
            raise EngineError("no step index: pass scheduler= to sigec.compile (its timesteps give the index), or "
                              "call engine.step(i) before each step")
        trajectory = self._streams.get(stream)
        index = self._scheduler_index(flat, trajectory.last if trajectory is not None else None)
        return index, len(self.scheduler.timesteps), self.scheduler.timesteps

    def _begin(self, stream: Hashable, index: int, num_steps: Optional[int], timesteps) -> _Trajectory:
        length = None if num_steps is None else max(num_steps - index, 1)
        trajectory = _Trajectory(start=index, last=index, num_steps=length, timesteps=timesteps)
        if isinstance(self.schedule, Auto):
            if length is None:
                raise EngineError("the 'auto' schedule needs the trajectory's length: pass scheduler= to "
                                  "sigec.compile, or engine.step(i, num_steps=n)")
            trajectory.keys = self._auto_keys.get(length)
            trajectory.calibrating = trajectory.keys is None
        else:
            trajectory.keys = self.schedule.key_steps(length)
        self._streams[stream] = trajectory
        log.debug("stream %s: new trajectory at step %d (%s steps)", str(stream)[:8], index, length)
        return trajectory

    def _is_key(self, trajectory: _Trajectory, step: int) -> bool:
        if trajectory.calibrating:
            return True
        if trajectory.keys is not None:
            return step in trajectory.keys
        return self.schedule.is_key(step, trajectory.num_steps)

    def _call(self, args, kwargs, mask, explicit) -> Any:
        self._check_identity()
        flat = self._flatten(args, kwargs)
        if mask is not None and self._full_engine is None:
            raise EngineError("mask= needs an engine compiled with edits=True (temporal=...(edits=True))")
        stream = fingerprint([flat[i] for i in self._stream_pos])
        index, num_steps, timesteps = self._resolve(flat, stream, explicit)
        trajectory = self._streams.get(stream)
        timesteps_reset = timesteps is not None and trajectory is not None and trajectory.timesteps is not None \
            and timesteps is not trajectory.timesteps
        if trajectory is None or index <= trajectory.last or timesteps_reset:
            trajectory = self._begin(stream, index, num_steps, timesteps)
        trajectory.last = index
        step = index - trajectory.start
        with torch.no_grad():
            if index in trajectory.pending:
                outputs = trajectory.pending.pop(index)
                kind = PARTIAL
            else:
                kind = FULL if self._is_key(trajectory, step) else PARTIAL
                slot = self._cut_slot(stream) if kind == PARTIAL else None
                if kind == PARTIAL and slot is None:
                    kind = FULL  # evicted or stale: recompute (never reuse what may be wrong)
                if kind == FULL:
                    outputs = self._run_full(flat, stream, trajectory, step, mask)
                else:
                    outputs = self._run_partial(flat, slot, trajectory, index, mask)
        trajectory.history.append((step, kind))
        self.last_kind = kind
        return pytree.tree_unflatten(list(outputs), self._out_spec)

    def _cut_slot(self, stream: Hashable) -> Optional[Slot]:
        slot = self.store.get(("cut", stream))
        if slot is None:
            log.info("cut values of stream %s are not cached (evicted); running the step in full", str(stream)[:8])
            return None
        if slot.state_versions != self._state_versions():
            if self.on_stale == "raise":
                raise EngineError("weights changed since the cut values were cached: call engine.reset(), or compile "
                                  "with on_stale='rerecord'")
            log.info("weights changed since the cut values were cached; running the step in full")
            return None
        return slot

    def _run_full(self, flat: list, stream: Hashable, trajectory: _Trajectory, step: int, mask) -> list:
        if self._full_engine is not None:
            results = list(self._full_engine(*flat, mask=mask))
        else:
            results = list(self.full(*flat))
        n = self.specialization.num_outputs
        outputs, cut = results[:n], results[n:]
        ids = {id(o) for o in outputs}
        cut = [c.clone() if id(c) in ids else c for c in cut]  # never alias what the caller receives
        stored = [c.to(self.cache_dtype) if self.cache_dtype is not None and c.is_floating_point() else c for c in cut]
        self.store.put(("cut", stream), Slot([], stored, [], str(stream), self._state_versions()))
        if trajectory.calibrating:
            self._measure(trajectory, step, flat, outputs, cut)
        return outputs

    def _measure(self, trajectory: _Trajectory, step: int, flat: list, outputs: list, cut: list) -> None:
        """The 'auto' schedule's calibration: the error of this step's outputs had it reused the cut
        values of each recent step (one partial run each), then, at the last step, the key steps."""
        if step != (trajectory.recent_cuts[-1][0] + 1 if trajectory.recent_cuts else 0):
            trajectory.calibrating = False  # steps were skipped: this trajectory cannot calibrate
            log.warning("the 'auto' calibration trajectory skipped steps; it will calibrate on the next one")
            return
        reference = torch.cat([o.detach().reshape(-1).double() for o in outputs if isinstance(o, torch.Tensor)])
        scale = float(reference.norm()) or 1.0
        for k, old in trajectory.recent_cuts:
            reused = list(self.partial(*flat, *old))
            got = torch.cat([o.detach().reshape(-1).double() for o in reused if isinstance(o, torch.Tensor)])
            trajectory.stale_error[(k, step)] = float((got - reference).norm()) / scale
        trajectory.recent_cuts.append((step, [c.clone() for c in cut]))
        del trajectory.recent_cuts[:-self.schedule.window]
        n = trajectory.num_steps
        if n is not None and step == n - 1:
            timesteps = trajectory.timesteps if trajectory.timesteps is not None else getattr(self.scheduler,
                                                                                           "timesteps", None)
            weights = (step_weights(self.scheduler, timesteps[trajectory.start:trajectory.start + n].tolist())
                       if timesteps is not None else None)
            keys = choose_key_steps(trajectory.stale_error, n, self.schedule.budget(n), weights)
            self._auto_keys[n] = keys
            trajectory.calibrating, trajectory.recent_cuts = False, []
            log.info("auto schedule for %d steps: key steps %s", n, sorted(keys))

    def _widen(self, slot: Slot) -> list:
        return [c.to(d) if c.dtype != d else c for c, d in zip(slot.caches, self._cut_dtypes)]

    def _run_partial(self, flat: list, slot: Slot, trajectory: _Trajectory, index: int, mask) -> list:
        cut = self._widen(slot)
        if self._partial_engine is not None:
            return list(self._partial_engine(*flat, *cut, mask=mask))
        if self.temporal.batch_partial_steps:
            return self._run_batched(flat, cut, trajectory, index)
        return list(self.partial(*flat, *cut))

    def _run_batched(self, flat: list, cut: list, trajectory: _Trajectory, index: int) -> list:
        """This partial step and the following ones up to the next key step, as one batch."""
        timesteps = self.scheduler.timesteps
        end = index
        while (end + 1 < len(timesteps) and end + 1 - trajectory.start < (trajectory.num_steps or 0)
               and not self._is_key(trajectory, end + 1 - trajectory.start)):
            end += 1
        if end == index:
            return list(self.partial(*flat, *cut))
        current = flat[self._timestep_pos]
        stacked = torch.stack([timesteps[i].to(current.dtype).to(current.device).expand(current.shape)
                               for i in range(index, end + 1)])
        if self._batched is None:
            self._batched = _batchable(self.partial)
        pos = self._timestep_pos

        def one(t):
            inputs = list(flat)
            inputs[pos] = t
            return tuple(self._batched(*inputs, *cut))

        results = torch.func.vmap(one)(stacked)
        for k, i in enumerate(range(index + 1, end + 1), start=1):
            trajectory.pending[i] = [r[k] for r in results]
        log.debug("batched partial steps %d..%d", index, end)
        return [r[0] for r in results]
