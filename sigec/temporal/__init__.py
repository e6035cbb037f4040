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

**Composition.** ``edits=True`` runs every step through a spatial engine (``sigec.spatial``'s
pipeline on the full and on the partial graph): a recorded trajectory followed by an edited one
(SDEdit) recomputes only the edited region, on key and partial steps alike. That needs the
partial graph's image inputs (latent and cut values) at one resolution; other cuts raise
``TemporalCompositionError``. ``batch_partial_steps=True`` evaluates the partial steps between two
key steps as one batch when the partial graph does not read the latent (FasterDiffusion's cut).
"""
from sigec.temporal.auto import Auto, choose_key_steps, step_weights
from sigec.temporal.cuts import DeepCacheCut, EncoderCut, ModuleCut, module_names, module_outputs, module_path
from sigec.temporal.engine import FULL, PARTIAL, TemporalCompositionError, TemporalEngine
from sigec.temporal.mode import TemporalMode, compile_temporal
from sigec.temporal.schedules import KeySteps, Uniform
from sigec.temporal.specs import FASTER_DIFFUSION_DDIM50, DeepCache, FasterDiffusion, Reuse, TemporalSpec, as_schedule

__all__ = ["Auto", "DeepCache", "DeepCacheCut", "EncoderCut", "FASTER_DIFFUSION_DDIM50", "FULL", "FasterDiffusion",
           "KeySteps", "ModuleCut", "PARTIAL", "Reuse", "TemporalCompositionError", "TemporalEngine", "TemporalMode",
           "TemporalSpec", "Uniform", "as_schedule", "choose_key_steps", "compile_temporal", "module_names",
           "module_outputs", "module_path", "step_weights"]
