"""``sigec.diffusion.incremental(pipe)``: a diffusers pipeline whose calls on an edited image
recompute only the edit.

The returned ``IncrementalPipeline`` is called exactly like the pipeline (same arguments, same
output), plus an optional ``mask=``. It runs the pipeline's own code - its scheduler, callbacks,
guidance, pre- and post-processing - and routes the models through sigec engines:

* ``unet`` and ``controlnet``: their ``forward`` (one engine per call structure, one cache slot per
  call of a pipeline call, so step ``i`` of an edit reads step ``i`` of the recording);
* ``vae``: ``encode`` and ``decode`` (the encoder to the latent distribution's parameters, the
  decoder from the latent).

The models are patched only for the duration of a call: outside it the pipeline is the user's,
untouched.

**Record, then edit.** The first call records (dense, filling every engine's slots). A later call
with the same settings is an *edit*: the pixels where the editable inputs (``EDITABLE``: ``image``,
``control_image``, ``mask_image``) differ from the recorded ones, or an explicit ``mask=`` (H x W
bool tensor or PIL image, white = edited, at the editable image's size), are recomputed. Every engine
gets that mask at its own resolution (the latent mask is the pixel mask max-pooled by the VAE's
factor) and it is authoritative, as in ``DiffusionEditor``: outside it the recorded trajectory is
kept. An empty edit replays the recording bit for bit.

**The rule for other changes** (``on_change``). Everything else the result depends on is compared
with the recording: every other argument (prompt, embeddings, ``strength``, ``num_inference_steps``,
``guidance_scale``, ``controlnet_conditioning_scale``, sizes, ``output_type``...), the seed (the
state of ``generator`` when the call starts), the scheduler (class and configuration) and the weights
of every model of the pipeline (their tensors, a sampled checksum of their values, and LoRA adapter
scales: a LoRA loaded, fused or re-weighted after recording counts). Only the callbacks
(``IGNORED``) are not compared. When something differs, ``on_change="rerecord"`` (default) runs the
call densely as a new recording (logged, and named in ``last.changed``), ``on_change="raise"`` raises
``PipelineChangedError`` naming what changed. Recording needs ``generator=`` (or ``latents=``):
without it every call draws new noise and nothing could be reused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import logging
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

import sigec
from sigec.core.engine import EngineError
from sigec.diffusion.images import mask_tensor

log = logging.getLogger("sigec")

#: arguments whose edits are recomputed incrementally (images; the mask is their difference)
EDITABLE = ("image", "control_image", "mask_image")
#: arguments that do not change the computation and are not compared
IGNORED = ("callback_on_step_end", "callback_on_step_end_tensor_inputs", "callback", "callback_steps", "return_dict")
CHANGE_RULES = ("rerecord", "raise")


class PipelineChangedError(EngineError):
    """A call differs from the recorded one in more than the editable images (``on_change="raise"``)."""


@dataclasses.dataclass
class CallInfo:
    """What the last call of an ``IncrementalPipeline`` did.

    Attributes:
        kind: ``"record"`` (dense, fills the caches) or ``"edit"`` (incremental).
        changed: for a recording that replaced an earlier one, what differed from it.
        mask: the pixel mask of an edit (``None`` for a recording).
        seconds: the whole call, end to end.
        engine_calls: engine calls per model (``"unet"``, ``"controlnet"``, ``"vae_encoder"``, ``"vae_decoder"``).
    """

    kind: str
    changed: list
    mask: Optional[torch.Tensor]
    seconds: float
    engine_calls: dict

    @property
    def edited_fraction(self) -> Optional[float]:
        return None if self.mask is None else float(self.mask.float().mean())


# -- the models sigec compiles ---------------------------------------------------------------------
class _Wrapper(torch.nn.Module):
    """Holds one of the pipeline's models; in eval mode exactly when the model is (sigec checks it)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.training = model.training


class _ClassForward(_Wrapper):
    """Calls the model's class ``forward``: the instance's own ``forward`` is patched during a call."""

    def forward(self, *args, **kwargs):
        return type(self.model).forward(self.model, *args, **kwargs)


class VaeMoments(_Wrapper):
    """``AutoencoderKL.encode`` up to the latent distribution's parameters (mean and log-variance)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.model.encoder(image)
        return moments if self.model.quant_conv is None else self.model.quant_conv(moments)


class VaeSample(_Wrapper):
    """``AutoencoderKL.decode``: latent (already divided by the scaling factor) to image."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z if self.model.post_quant_conv is None else self.model.post_quant_conv(z)
        return self.model.decoder(z)


def _structure(args: tuple, kwargs: dict) -> str:
    """The call's structure: tensor shapes and dtypes, and the values of everything else (which
    ``torch.export`` specializes the graph to)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    parts = [f"T{tuple(v.shape)}{v.dtype}{v.device}" if isinstance(v, torch.Tensor) else repr(v) for v in leaves]
    return f"{spec}|{'|'.join(parts)}"


class _Model:
    """One model of the pipeline run through engines: one engine per call structure, and within a
    pipeline call one cache slot per call (``calls`` counts them)."""

    def __init__(self, name: str, module: torch.nn.Module, options: dict):
        self.name, self.module, self.options = name, module, options
        self.engines: dict[str, sigec.Engine] = {}
        self.calls = 0
        self.compile_s = 0.0

    def __call__(self, session: "IncrementalPipeline", args: tuple, kwargs: dict):
        index, self.calls = self.calls, self.calls + 1
        key = _structure(args, kwargs)
        engine = self.engines.get(key)
        if session.recording:
            if engine is None:
                start = time.perf_counter()
                engine = self.engines[key] = sigec.compile(self.module, args, kwargs, **self.options)
                self.compile_s += time.perf_counter() - start
                log.info("compiled the pipeline's %s in %.1f s", self.name, time.perf_counter() - start)
            with engine.slot(index):
                return engine(*args, **kwargs)
        if engine is None or ("named", index) not in engine.store:
            raise PipelineChangedError(
                f"call {index} of the {self.name} has no recorded counterpart (the edit calls the {self.name} with "
                "other shapes or options, or more often, than the recording did); record again with this call's "
                "settings")
        with engine.slot(index):
            try:
                return engine(*args, mask=session.mask_at(engine.context.input_resolution), **kwargs)
            except EngineError as exc:
                if "non-spatial" not in str(exc):
                    raise
                raise PipelineChangedError(
                    f"call {index} of the {self.name} got inputs that are not images (or are images of 1x1 "
                    "pixels) with other values than when recorded; only image inputs may follow an edit. Record "
                    "again, or use a larger image so that no edited input is 1x1") from exc

    def clear(self) -> None:
        for engine in self.engines.values():
            engine.clear()


# -- fingerprints of what the result depends on --------------------------------------------------
def _digest(value: Any) -> str:
    """A stable digest of an argument: tensors, arrays and PIL images by their bytes, generators by
    their state, containers item by item, anything else by ``repr``."""
    h = hashlib.sha1()

    def visit(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"T{tuple(v.shape)}{v.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, torch.Generator):
            h.update(f"G{v.device}".encode())
            h.update(v.get_state().numpy().tobytes())
        elif hasattr(v, "tobytes") and hasattr(v, "shape"):  # numpy
            h.update(f"A{v.shape}{v.dtype}".encode())
            h.update(v.tobytes())
        elif hasattr(v, "convert") and hasattr(v, "size") and hasattr(v, "tobytes"):  # PIL
            h.update(f"P{v.size}{v.mode}".encode())
            h.update(v.tobytes())
        elif isinstance(v, (list, tuple)):
            h.update(f"L{len(v)}[".encode())
            for item in v:
                visit(item)
            h.update(b"]")
        elif isinstance(v, dict):
            h.update(b"D{")
            for k in sorted(v, key=repr):
                h.update(repr(k).encode())
                visit(v[k])
            h.update(b"}")
        else:
            h.update(repr(v).encode())
        h.update(b";")

    visit(value)
    return h.hexdigest()


def _weights_state(module: torch.nn.Module) -> tuple[str, str]:
    """``(structure, values)`` digests of a model's weights. The structure is the names, storage and
    version counters of its tensors; the values a sampled checksum (about 64 elements per tensor),
    which sees in-place updates made through ``.data`` (as LoRA fusing does), which version
    counters miss; and the LoRA adapters' scales and active adapters."""
    structure, values = hashlib.sha1(), []
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            structure.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{t.device}|{t.data_ptr()}|{t._version};".encode())
            flat = t.detach().reshape(-1)
            if flat.numel() and t.is_floating_point():
                values.append(flat[:: max(1, flat.numel() // 64)].double().sum())
    adapters = [(name, getattr(m, "scaling", None), getattr(m, "active_adapters", None),
                 getattr(m, "merged_adapters", None), getattr(m, "disable_adapters", None))
                for name, m in module.named_modules() if hasattr(m, "scaling")]
    checksum = torch.stack(values).cpu().numpy().tobytes() if values else b""
    return structure.hexdigest(), hashlib.sha1(checksum + repr(adapters).encode()).hexdigest()


# -- masks ---------------------------------------------------------------------------------------
def _image_batch(value: Any) -> torch.Tensor:
    """An editable input (PIL image, array, tensor, or a list of them) as a float ``(N, C, H, W)`` tensor."""
    if isinstance(value, (list, tuple)):
        return torch.cat([_image_batch(v) for v in value])
    if hasattr(value, "convert") and hasattr(value, "size"):  # PIL
        import numpy as np
        arr = np.asarray(value, dtype=np.float32)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]
    if hasattr(value, "shape") and not isinstance(value, torch.Tensor):  # numpy: (N,) H, W, C
        import numpy as np
        arr = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        arr = arr[None] if arr.dim() == 3 else arr
        return arr.permute(0, 3, 1, 2)
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu", torch.float32)
        return t.reshape(1, 1, *t.shape) if t.dim() == 2 else (t[None] if t.dim() == 3 else t)
    raise TypeError(f"an editable input must be a PIL image, a numpy array, a tensor or a list of them, got "
                    f"{type(value).__name__}")


def _resize_mask(mask: torch.Tensor, res: tuple[int, int]) -> torch.Tensor:
    """A boolean mask at ``res``: any covered pixel counts when shrinking, nearest when growing."""
    if tuple(mask.shape) == tuple(res):
        return mask
    m = mask[None, None].float()
    if res[0] <= mask.shape[0] and res[1] <= mask.shape[1]:
        return F.adaptive_max_pool2d(m, res)[0, 0] > 0
    return F.interpolate(m, size=res, mode="nearest")[0, 0] > 0


def _difference_mask(recorded: dict, current: dict) -> torch.Tensor:
    """Pixels where any editable input differs from its recording (at the largest input's size)."""
    diffs = []
    for name, old in recorded.items():
        new = current[name]
        if new.shape != old.shape:
            raise PipelineChangedError(f"{name!r} is {tuple(new.shape)} but was {tuple(old.shape)} when recorded; an "
                                       "edit keeps the image's size")
        diffs.append((new != old).any(dim=1).any(dim=0))
    res = max((tuple(d.shape) for d in diffs), key=lambda r: r[0] * r[1])
    out = torch.zeros(res, dtype=torch.bool)
    for d in diffs:
        out |= _resize_mask(d, res)
    return out


def _explicit_mask(mask: Any, recorded: dict) -> torch.Tensor:
    """``mask=`` as a boolean tensor at the size of the (largest) editable image."""
    if not recorded:
        raise ValueError(f"mask= marks an edit of the images ({', '.join(EDITABLE)}), but the recording had none")
    size = max((tuple(t.shape[-2:]) for t in recorded.values()), key=lambda r: r[0] * r[1])
    return mask_tensor(mask, size).cpu()


# -- the pipeline --------------------------------------------------------------------------------
class IncrementalPipeline:
    """A diffusers pipeline whose calls on an edited image recompute only the edit (module docstring).

    Args:
        pipe: a diffusers pipeline with a ``unet`` (Stable Diffusion or SDXL; img2img, inpainting,
            ControlNet, text-to-image), optionally a ``controlnet`` and a ``vae``.
        policy: ``sigec.compile`` policy of every engine (``"sige"`` or ``"exact"``).
        on_change: ``"rerecord"`` or ``"raise"``: what a call that differs in more than the editable
            images does.
        compile_options: further ``sigec.compile`` options for every engine (``cache_dtype``, ...).

    Attributes:
        last: ``CallInfo`` of the last call.
        models: the models routed through engines, by name; each has ``engines`` (by call structure).
    """

    def __init__(self, pipe, *, policy: str = "sige", on_change: str = "rerecord", **compile_options):
        if on_change not in CHANGE_RULES:
            raise ValueError(f"on_change must be one of {CHANGE_RULES}, got {on_change!r}")
        unet = getattr(pipe, "unet", None)
        if not isinstance(unet, torch.nn.Module):
            raise TypeError(f"{type(pipe).__name__} has no unet; sigec.diffusion.incremental takes a diffusers "
                            "pipeline with a UNet (Stable Diffusion, SDXL, their img2img, inpainting and ControlNet "
                            "pipelines)")
        self.pipe, self.on_change = pipe, on_change
        self._signature = inspect.signature(type(pipe).__call__)
        options = dict(policy=policy, **compile_options)
        self.models: dict[str, _Model] = {"unet": _Model("unet", _ClassForward(unet), options)}
        controlnet = getattr(pipe, "controlnet", None)
        if controlnet is not None:
            if type(controlnet).__name__ == "MultiControlNetModel":
                raise TypeError("several ControlNets (MultiControlNetModel) are not supported yet; use one ControlNet")
            self.models["controlnet"] = _Model("controlnet", _ClassForward(controlnet), options)
        vae = getattr(pipe, "vae", None)
        if vae is not None:
            self.models["vae_encoder"] = _Model("vae encoder", VaeMoments(vae), options)
            self.models["vae_decoder"] = _Model("vae decoder", VaeSample(vae), options)
        self.recording = False
        self.last: Optional[CallInfo] = None
        self._recorded: Optional[dict] = None  # settings digests, weights, editable inputs of the recording
        self._mask: Optional[torch.Tensor] = None
        self._masks: dict = {}

    # -- what a call depends on --------------------------------------------------------------
    def _components(self) -> dict[str, torch.nn.Module]:
        return {name: m for name, m in getattr(self.pipe, "components", {}).items() if isinstance(m, torch.nn.Module)}

    def _weights(self) -> dict:
        return {name: _weights_state(m) for name, m in self._components().items()}

    def _state(self, arguments: dict) -> dict:
        settings = {name: _digest(v) for name, v in arguments.items() if name not in EDITABLE and name not in IGNORED}
        scheduler = self.pipe.scheduler
        settings["scheduler"] = _digest([type(scheduler).__name__, dict(scheduler.config)])
        return {"settings": settings, "weights": self._weights()}

    @staticmethod
    def _changes(old: dict, new: dict) -> list[str]:
        keys = sorted(set(old["settings"]) | set(new["settings"]))
        changed = [k for k in keys if old["settings"].get(k) != new["settings"].get(k)]
        for name in sorted(set(old["weights"]) | set(new["weights"])):
            if old["weights"].get(name) != new["weights"].get(name):
                changed.append(f"weights of {name}")
        return changed

    # -- calling -------------------------------------------------------------------------------
    def __call__(self, *args, mask=None, **kwargs):
        """Call the pipeline: record (first call, or after a change, by ``on_change``) or edit."""
        try:
            bound = self._signature.bind(self.pipe, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{type(self.pipe).__name__}: {exc}") from exc
        arguments = dict(list(bound.arguments.items())[1:])
        arguments.update(arguments.pop("kwargs", {}) or {})
        editable = {name: _image_batch(arguments[name]) for name in EDITABLE if arguments.get(name) is not None}
        state = self._state(arguments)
        # which images are given, and their sizes, are settings too: an edit keeps them
        state["settings"]["editable images"] = _digest([(name, tuple(t.shape)) for name, t in editable.items()])
        changed = [] if self._recorded is None else self._changes(self._recorded["state"], state)
        start = time.perf_counter()
        if self._recorded is None or changed:
            if changed and self.on_change == "raise":
                raise PipelineChangedError(
                    f"{', '.join(changed)} changed since the recorded call; only the editable images "
                    f"({', '.join(EDITABLE)}) may differ in an edit. Call with the recorded settings, or use "
                    "on_change='rerecord' to record this call as the new original")
            if mask is not None:
                raise EngineError("mask= is for edits; this call records (" +
                                  (f"{', '.join(changed)} changed" if changed else "the first call") + ")")
            if arguments.get("generator") is None and arguments.get("latents") is None:
                raise ValueError("an incremental pipeline needs generator= (a fresh torch.Generator seeded the same "
                                 "way on every call) or latents=: without it every call draws new noise and nothing "
                                 "can be reused")
            if changed:
                log.info("%s changed since the recorded call: recording again", ", ".join(changed))
            out = self._record(args, kwargs, state, editable)
            kind, pixel_mask = "record", None
        else:
            pixel_mask = (_explicit_mask(mask, self._recorded["editable"]) if mask is not None
                          else _difference_mask(self._recorded["editable"], editable))
            out = self._run(args, kwargs, recording=False, mask=pixel_mask)
            kind = "edit"
        self.last = CallInfo(kind, changed, pixel_mask, time.perf_counter() - start,
                             {name: m.calls for name, m in self.models.items()})
        return out

    def _record(self, args, kwargs, state: dict, editable: dict):
        if self._recorded is not None and any(old[0] != state["weights"].get(name, ("",))[0]
                                              for name, old in self._recorded["state"]["weights"].items()):
            for model in self.models.values():  # other tensors or modules (a LoRA loaded): compile again
                model.engines.clear()
        for model in self.models.values():
            model.clear()
        self._recorded = None
        out = self._run(args, kwargs, recording=True, mask=None)
        # the weights as they are after the call (a pipeline may move or cast its models while running)
        self._recorded = {"state": {**state, "weights": self._weights()}, "editable": editable}
        return out

    def mask_at(self, res: tuple[int, int]) -> torch.Tensor:
        """The edit's mask at an engine's input resolution (on the device of the pipeline's UNet)."""
        res = tuple(int(r) for r in res)
        if res not in self._masks:
            device = next(self.pipe.unet.parameters()).device
            self._masks[res] = _resize_mask(self._mask, res).to(device)
        return self._masks[res]

    def _run(self, args, kwargs, *, recording: bool, mask: Optional[torch.Tensor]):
        self.recording, self._mask, self._masks = recording, mask, {}
        for model in self.models.values():
            model.calls = 0
        try:
            with self._patched():
                return self.pipe(*args, **kwargs)
        finally:
            self._mask, self._masks = None, {}

    @contextlib.contextmanager
    def _patched(self):
        """Route the pipeline's models through the engines for the duration of one call."""
        patched: list[tuple[torch.nn.Module, str]] = []

        def patch(obj: torch.nn.Module, attr: str, fn: Callable) -> None:
            object.__setattr__(obj, attr, fn)
            patched.append((obj, attr))

        def through(name: str) -> Callable:
            return lambda *args, **kwargs: self.models[name](self, args, kwargs)

        try:
            patch(self.pipe.unet, "forward", through("unet"))
            if "controlnet" in self.models:
                patch(self.pipe.controlnet, "forward", through("controlnet"))
            vae = getattr(self.pipe, "vae", None)
            if vae is not None:
                if getattr(vae, "use_tiling", False):
                    log.info("the VAE is tiled (vae.enable_tiling()): it runs densely")
                else:
                    patch(vae, "encode", self._encode)
                    patch(vae, "decode", self._decode)
            yield
        finally:
            for obj, attr in reversed(patched):
                obj.__dict__.pop(attr, None)

    def _encode(self, x: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(self.models["vae_encoder"](self, (x,), {}))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        from diffusers.models.autoencoders.vae import DecoderOutput

        image = self.models["vae_decoder"](self, (z,), {})
        return DecoderOutput(sample=image) if return_dict else (image,)

    def reset(self) -> None:
        """Forget the recording (the engines stay compiled); the next call records."""
        for model in self.models.values():
            model.clear()
        self._recorded = None


def incremental(pipe, *, policy: str = "sige", on_change: str = "rerecord", **compile_options) -> IncrementalPipeline:
    """Make a diffusers pipeline incremental: ``IncrementalPipeline(pipe, ...)`` (see its docstring)."""
    return IncrementalPipeline(pipe, policy=policy, on_change=on_change, **compile_options)
