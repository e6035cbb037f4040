"""``DiffusionEditor``: SDEdit or inpainting recorded once and edited incrementally (the rules are
in ``sigec.diffusion``'s docstring)."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Optional

import torch
from tqdm import tqdm

import sigec
from sigec.core.engine import EngineError
from sigec.diffusion.images import image_tensor, latent_mask, mask_tensor
from sigec.diffusion.parts import VaeDecoder, VaeEncoder, ddim_scheduler
from sigec.runtime.cache import CacheBudgetError

log = logging.getLogger("sigec")

TASKS = ("sdedit", "inpaint")
MISSING_SLOT_RULES = ("dense", "rerecord", "raise")


class SlotEvictedError(EngineError):
    """An edit reached a step whose cache slot was evicted, under ``on_missing_slot="raise"``."""


@dataclasses.dataclass
class EditResult:
    """What ``DiffusionEditor.edit`` returns.

    Images are ``(1, 3, H, W)`` in about [-1, 1] (the latents when there is no VAE). Times are
    seconds, end to end (encode, every step, decode). ``slot_bytes`` is the size of one cache slot
    per engine (``"unet"`` is the largest of its step slots), ``cache_bytes`` what each engine holds.
    """

    image: torch.Tensor
    latents: torch.Tensor
    original_image: torch.Tensor
    original_latents: torch.Tensor
    record_s: float
    edited_s: float
    steps: list[int]
    slot_bytes: dict[str, int]
    cache_bytes: dict[str, int]
    dense_image: Optional[torch.Tensor] = None
    dense_latents: Optional[torch.Tensor] = None
    dense_edited_s: Optional[float] = None
    #: steps of the edit whose slot had been evicted, and what was done (``on_missing_slot``)
    dense_fallback_steps: list[int] = dataclasses.field(default_factory=list)
    rerecorded_steps: list[int] = dataclasses.field(default_factory=list)

    @property
    def speedup(self) -> Optional[float]:
        """Dense edited run time over incremental edited run time (``None`` without ``dense=True``)."""
        return self.dense_edited_s / self.edited_s if self.dense_edited_s else None


Denoise = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class DiffusionEditor:
    """SDEdit or inpainting with Stable Diffusion's UNet (and VAE), recorded once, edited incrementally.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` in eval mode (for example ``sigec.models.sd_unet("sd1")``).
        text_embeddings: ``(1, L, D)`` or ``(L, D)`` tensor, ``D`` the UNet's ``cross_attention_dim``.
        vae: optional ``AutoencoderKL``; without it images are latents.
        uncond_embeddings: the unconditional embedding, same shape: turns on classifier-free guidance.
        guidance_scale: the guidance weight (used with ``uncond_embeddings``).
        task: ``"sdedit"`` or ``"inpaint"`` (see the module docstring).
        scheduler: a diffusers scheduler whose ``step`` is deterministic (default: DDIM with SD's
            configuration); its timesteps are set to ``steps``.
        steps: steps of the full schedule; ``strength`` of them run (SDEdit default 0.8, inpaint 1.0).
        seed: seeds the noise, which the recorded and the edited trajectories share.
        policy: ``sigec.compile`` policy (``"sige"`` or ``"exact"``).
        cache_budget_bytes, on_cache_full, cache_dtype, offload, on_missing_slot: the cache
            controls of the module docstring.
        progress: tqdm progress bars over the steps.
        compile_options: further ``sigec.compile`` keyword arguments for every engine.
    """

    def __init__(self, unet: torch.nn.Module, text_embeddings: torch.Tensor, *, vae: Optional[torch.nn.Module] = None,
                 uncond_embeddings: Optional[torch.Tensor] = None, guidance_scale: float = 7.5, task: str = "sdedit",
                 scheduler=None, steps: int = 50, strength: Optional[float] = None, seed: int = 0,
                 policy: str = "sige", cache_budget_bytes: Optional[int] = None, on_cache_full: str = "evict",
                 cache_dtype: Optional[torch.dtype] = None, offload: Optional[str] = None,
                 on_missing_slot: str = "dense", progress: bool = True, **compile_options):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if on_missing_slot not in MISSING_SLOT_RULES:
            raise ValueError(f"on_missing_slot must be one of {MISSING_SLOT_RULES}, got {on_missing_slot!r}")
        if offload not in (None, "cpu"):
            raise ValueError(f"offload must be None or 'cpu', got {offload!r}")
        strength = (0.8 if task == "sdedit" else 1.0) if strength is None else float(strength)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        for module, name in ((unet, "unet"), (vae, "vae")):
            if module is not None and module.training:
                raise ValueError(f"the {name} is in training mode; call .eval() first")
        self.unet, self.vae, self.task = unet, vae, task
        self.dtype = next(unet.parameters()).dtype
        self.device = next(unet.parameters()).device
        self.cond = self._embedding(text_embeddings, "text_embeddings")
        self.uncond = self._embedding(uncond_embeddings, "uncond_embeddings") if uncond_embeddings is not None else None
        if self.uncond is not None and self.uncond.shape != self.cond.shape:
            raise ValueError(f"uncond_embeddings {tuple(self.uncond.shape)} and text_embeddings "
                             f"{tuple(self.cond.shape)} must have the same shape")
        self.guidance_scale = float(guidance_scale)
        self.scheduler = scheduler if scheduler is not None else ddim_scheduler()
        self.scheduler.set_timesteps(steps)
        self.strength, self.seed = strength, seed
        # diffusers' img2img convention (int, not round), at least one step
        count = min(len(self.scheduler.timesteps), max(1, int(len(self.scheduler.timesteps) * strength)))
        self.first_step = len(self.scheduler.timesteps) - count
        #: indices in the scheduler's timesteps of the steps this editor runs (the UNet slots' names)
        self.steps = list(range(self.first_step, len(self.scheduler.timesteps)))
        self.compile_options = dict(policy=policy, cache_dtype=cache_dtype, **compile_options)
        self.cache_budget_bytes, self.on_cache_full = cache_budget_bytes, on_cache_full
        self.offload, self.on_missing_slot, self.progress = offload, on_missing_slot, progress
        self.engines: dict[str, sigec.Engine] = {}
        self.compile_s: dict[str, float] = {}
        self._encoder = VaeEncoder(vae) if vae is not None else None
        self._decoder = VaeDecoder(vae) if vae is not None else None
        self._original: Optional[dict] = None
        self._compiled_for: Optional[tuple] = None

    # -- set-up ------------------------------------------------------------------------------
    def _embedding(self, emb: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(emb, torch.Tensor):
            raise TypeError(f"{name} must be a tensor (batch, tokens, dim), got {type(emb).__name__}")
        emb = emb[None] if emb.dim() == 2 else emb
        dim = self.unet.config.cross_attention_dim
        if emb.dim() != 3 or emb.shape[0] != 1 or emb.shape[-1] != dim:
            raise ValueError(f"{name} must be (1, tokens, {dim}) or (tokens, {dim}) for this UNet "
                             f"(cross_attention_dim {dim}), got {tuple(emb.shape)}")
        return emb.to(device=self.device, dtype=self.dtype)

    @property
    def batch(self) -> int:
        return 2 if self.uncond is not None else 1

    def _compile(self, name: str, model: torch.nn.Module, args: tuple, kwargs: Optional[dict] = None,
                 budget: Optional[int] = None) -> sigec.Engine:
        start = time.perf_counter()
        engine = sigec.compile(model, args, kwargs, cache_budget_bytes=budget, on_cache_full=self.on_cache_full,
                               **self.compile_options)
        engine.store.offload = self.offload
        self.compile_s[name] = time.perf_counter() - start
        log.info("compiled %s in %.2f s", name, self.compile_s[name])
        self.engines[name] = engine
        return engine

    def _unet_inputs(self, x: torch.Tensor, t: torch.Tensor) -> tuple:
        if self.uncond is None:
            return x, t.reshape(1).to(self.device), self.cond
        return torch.cat([x, x]), t.reshape(1).repeat(2).to(self.device), torch.cat([self.uncond, self.cond])

    def _guided(self, eps: torch.Tensor) -> torch.Tensor:
        if self.uncond is None:
            return eps
        uncond, cond = eps.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    # -- the two denoisers: the plain UNet and the engine ------------------------------------
    def _dense_denoise(self, step: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sample, timestep, emb = self._unet_inputs(x, t)
        with torch.no_grad():
            return self._guided(self.unet(sample, timestep, encoder_hidden_states=emb).sample)

    def _engine_denoise(self, mask: Optional[torch.Tensor], fallbacks: dict) -> Denoise:
        engine = self.engines["unet"]

        def denoise(step: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            sample, timestep, emb = self._unet_inputs(x, t)
            if mask is not None and ("named", step) not in engine.store:  # the engine's key of a named slot
                if self.on_missing_slot == "raise":
                    raise SlotEvictedError(
                        f"the cache slot of step {step} was evicted ({len(engine.store)} of {len(self.steps)} slots "
                        f"fit the budget of {self.cache_budget_bytes} bytes); raise cache_budget_bytes, store the "
                        "cache in float16 (cache_dtype), or pass on_missing_slot='dense' or 'rerecord'")
                if self.on_missing_slot == "dense":
                    fallbacks["dense"].append(step)
                    return self._dense_denoise(step, x, t)
                fallbacks["rerecord"].append(step)
                with engine.slot(step):  # the original trajectory's state at this step records the slot again
                    engine(*self._unet_inputs(self._original["states"][step], t)[:2], encoder_hidden_states=emb)
                    out = engine(sample, timestep, encoder_hidden_states=emb, mask=mask).sample
                # dropped after use: kept, it would evict a held slot of a later step at the next re-recording
                engine.store.discard(("named", step))
                return self._guided(out)
            with engine.slot(step):
                out = engine(sample, timestep, encoder_hidden_states=emb, mask=mask).sample
            return self._guided(out)

        return denoise

    # -- the loops -----------------------------------------------------------------------------
    def _noise(self, latents: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)

    def _trajectory(self, denoise: Denoise, start: torch.Tensor, known: torch.Tensor, mask: Optional[torch.Tensor],
                    desc: str, states: Optional[dict] = None) -> torch.Tensor:
        """Denoise from ``start`` (clean latents: the edited ones for SDEdit's start and the inpainted
        region) over ``self.steps``; ``known`` are the original latents, kept outside ``mask`` when
        inpainting. ``states`` (if given) receives the latents each step's UNet call sees."""
        sched = self.scheduler
        sched.set_timesteps(len(sched.timesteps))  # resets schedulers that keep state between steps
        timesteps = sched.timesteps
        noise = self._noise(known)
        t0 = timesteps[self.first_step:self.first_step + 1]
        x = sched.add_noise(start, noise, t0)
        if self.task == "inpaint":
            x = self._keep_known(x, known, noise, t0, mask)
        for step in tqdm(self.steps, desc=desc, unit="step", disable=not self.progress, leave=False):
            t = timesteps[step]
            if states is not None:
                states[step] = x
            x = sched.step(denoise(step, x, t), t, x).prev_sample
            if self.task == "inpaint":
                if step + 1 < len(timesteps):
                    x = self._keep_known(x, known, noise, timesteps[step + 1:step + 2], mask)
                else:
                    x = self._keep_known(x, known, None, None, mask)
        return x

    def _keep_known(self, x: torch.Tensor, known: torch.Tensor, noise: Optional[torch.Tensor],
                    t: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Inpainting: outside ``mask`` (everywhere when recording, ``mask=None``) the original latents
        noised to ``t`` (clean after the last step, ``noise=None``)."""
        target = known if noise is None else self.scheduler.add_noise(known, noise, t)
        return target if mask is None else torch.where(mask, x, target)

    def _encode(self, image: torch.Tensor, engine_mask: Optional[torch.Tensor], dense: bool) -> torch.Tensor:
        return self._vae_half("encoder", "encode", self._encoder, image, engine_mask, dense)

    def _decode(self, latents: torch.Tensor, engine_mask: Optional[torch.Tensor], dense: bool) -> torch.Tensor:
        return self._vae_half("decoder", "decode", self._decoder, latents, engine_mask, dense)

    def _vae_half(self, half: str, slot: str, module, x: torch.Tensor, engine_mask: Optional[torch.Tensor],
                  dense: bool) -> torch.Tensor:
        """One VAE half on ``x``: the plain module (``dense``) or its engine, in its one slot."""
        if self.vae is None:
            return x
        if dense:
            with torch.no_grad():
                return module(x)
        engine = self.engines[f"vae_{half}"]
        with engine.slot(slot):
            return engine(x, mask=engine_mask)

    def _check_image(self, image) -> torch.Tensor:
        if self.vae is None:
            if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[:2] != (1, self.unet.config.in_channels):
                raise ValueError(f"without a VAE the image is the latent: a (1, {self.unet.config.in_channels}, h, w) "
                                 f"tensor, got {getattr(image, 'shape', type(image).__name__)}")
            return image.to(device=self.device, dtype=self.dtype)
        image = image_tensor(image, self.dtype).to(self.device)
        if image.shape[1] != self.vae.config.in_channels:
            raise ValueError(f"the VAE takes {self.vae.config.in_channels}-channel images, got {image.shape[1]} channels")
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if image.shape[-2] % factor or image.shape[-1] % factor:
            raise ValueError(f"image sides must be multiples of the VAE's down-sampling factor {factor}, got "
                             f"{tuple(image.shape[-2:])}")
        return image

    # -- public --------------------------------------------------------------------------------
    def record(self, image) -> torch.Tensor:
        """Run the original trajectory densely, filling the caches (one UNet slot per step); returns
        the original's final image. Recording again replaces the previous recording."""
        image = self._check_image(image)
        self._compile_engines(image)
        for engine in self.engines.values():
            engine.clear()
        start = time.perf_counter()
        latents = self._encode(image, None, dense=False)
        engine = self.engines["unet"]
        checked = []

        def denoise(step: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            sample, timestep, emb = self._unet_inputs(x, t)
            with engine.slot(step):
                out = engine(sample, timestep, encoder_hidden_states=emb).sample
            if not checked:
                checked.append(True)
                self._check_budget(engine, step)
            return self._guided(out)

        states: dict = {}
        final = self._trajectory(denoise, latents, latents, None, "record", states)
        out = self._decode(final, None, dense=False)
        self._original = {"image": image, "latents": latents, "final": final, "output": out, "states": states,
                          "record_s": time.perf_counter() - start}
        return out

    def _compile_engines(self, image: torch.Tensor) -> None:
        """Compile the engines once, for ``image``'s size (``compile_s`` has the seconds each took)."""
        if self.engines:
            if self._compiled_for != tuple(image.shape):
                raise ValueError(f"this editor was compiled for images of shape {self._compiled_for}, got "
                                 f"{tuple(image.shape)}; make a new DiffusionEditor for another size")
            return
        self._compiled_for = tuple(image.shape)
        if self.vae is not None:
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            latent_shape = (1, self.vae.config.latent_channels, image.shape[-2] // factor, image.shape[-1] // factor)
            self._compile("vae_encoder", self._encoder, (image,))
            self._compile("vae_decoder", self._decoder, (torch.zeros(latent_shape, dtype=self.dtype, device=self.device),))
        else:
            latent_shape = tuple(image.shape)
        example = torch.zeros(latent_shape, dtype=self.dtype, device=self.device)
        sample, timestep, emb = self._unet_inputs(example, self.scheduler.timesteps[self.first_step])
        self._compile("unet", self.unet, (sample, timestep), {"encoder_hidden_states": emb}, budget=self.cache_budget_bytes)

    def _check_budget(self, engine: sigec.Engine, step: int) -> None:
        """Under ``on_cache_full="raise"``, fail before recording the rest when the slots cannot all fit."""
        if self.cache_budget_bytes is None or self.on_cache_full != "raise":
            return
        need = engine.store.describe()[-1]["bytes"] * len(self.steps)
        if need > self.cache_budget_bytes:
            engine.clear()
            raise CacheBudgetError(
                f"recording {len(self.steps)} steps needs about {need} bytes of UNet cache (one slot: "
                f"{need // len(self.steps)} bytes) but cache_budget_bytes is {self.cache_budget_bytes}; raise the "
                "budget, store the cache in float16 (cache_dtype=torch.float16), run fewer steps, or use "
                "on_cache_full='evict'")

    def edit(self, edited_image=None, mask=None, dense: bool = False) -> EditResult:
        """Run the edited trajectory incrementally against the recording.

        Args:
            edited_image: the edited image (same size); for inpainting optional (default: the
                original, whose masked region is regenerated).
            mask: where the image was edited, ``(H, W)`` bool tensor or PIL image; authoritative
                (outside it the recorded trajectory is kept).
            dense: also run the plain models on the edited input (``dense_image``, ``dense_edited_s``).
        """
        if self._original is None:
            raise EngineError("edit() needs a recorded original: call record(image) first")
        original = self._original
        if edited_image is None:
            if self.task == "sdedit":
                raise ValueError("SDEdit needs the edited image: edit(edited_image, mask)")
            edited_image = original["image"]
        image = self._check_image(edited_image)
        if image.shape != original["image"].shape:
            raise ValueError(f"the edited image is {tuple(image.shape)} but the recorded one {tuple(original['image'].shape)}")
        if mask is None:
            raise ValueError("edit() needs the edit mask: an (H, W) bool tensor or a PIL image (white = edited)")
        mask = mask_tensor(mask, tuple(image.shape[-2:])).to(self.device)
        lmask = latent_mask(mask, tuple(original["latents"].shape[-2:]))

        fallbacks: dict = {"dense": [], "rerecord": []}
        start = time.perf_counter()
        if self.vae is None:
            latents = torch.where(lmask, image, original["image"])
        elif self.task == "inpaint" and torch.equal(image, original["image"]):
            latents = original["latents"]  # nothing to encode: the masked region starts from the original
        else:
            latents = self._encode(image, mask, dense=False)
        final = self._trajectory(self._engine_denoise(lmask, fallbacks), latents, original["latents"], lmask, "edit")
        out = self._decode(final, lmask, dense=False)
        edited_s = time.perf_counter() - start
        result = EditResult(image=out, latents=final, original_image=original["output"],
                            original_latents=original["final"], record_s=original["record_s"], edited_s=edited_s,
                            steps=list(self.steps), slot_bytes=self.slot_bytes(), cache_bytes=self.cache_bytes(),
                            dense_fallback_steps=fallbacks["dense"], rerecorded_steps=fallbacks["rerecord"])
        if dense:
            result.dense_image, result.dense_latents, result.dense_edited_s = self.run_dense(image, mask)
        return result

    def run_dense(self, image, mask=None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The plain models' whole run on ``image`` (inpainting keeps the recorded original outside
        ``mask``): ``(image, final latents, seconds)``. With the original image it is the plain
        dense run that recording is compared with."""
        image = self._check_image(image)
        start = time.perf_counter()
        latents = self._encode(image, None, dense=True)
        known = latents
        lmask = None
        if self.task == "inpaint":
            if self._original is None or mask is None:
                raise EngineError("dense inpainting needs the recorded original and the mask")
            mask = mask_tensor(mask, tuple(image.shape[-2:])).to(self.device)
            lmask = latent_mask(mask, tuple(latents.shape[-2:]))
            with torch.no_grad():
                known = self._encoder(self._original["image"]) if self.vae is not None else self._original["image"]
        final = self._trajectory(self._dense_denoise, latents, known, lmask, "dense")
        out = self._decode(final, None, dense=True)
        return out, final, time.perf_counter() - start

    def slot_bytes(self) -> dict[str, int]:
        """Bytes of one cache slot per engine (the largest, for the UNet's step slots)."""
        return {name: max((d["bytes"] for d in e.store.describe()), default=0) for name, e in self.engines.items()}

    def cache_bytes(self) -> dict[str, int]:
        """Bytes each engine's cache holds now."""
        return {name: e.store.nbytes() for name, e in self.engines.items()}
