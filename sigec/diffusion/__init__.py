"""Editing with latent diffusion (Stable Diffusion): SDEdit and inpainting, run incrementally.

Two front doors:

* ``incremental(pipe)`` (``sigec.diffusion.pipelines``) makes a diffusers pipeline incremental:
  img2img, inpainting, ControlNet and SDXL, called exactly as the pipeline, with its own scheduler
  and callbacks. The rules are in that module's docstring.
* ``DiffusionEditor`` (below) runs its own SDEdit or inpainting loop over a bare UNet and VAE.

A ``DiffusionEditor`` holds a ``UNet2DConditionModel``, optionally an ``AutoencoderKL`` and text
embeddings given as tensors (no tokenizer or text encoder is needed), and three engines compiled
with ``sigec.compile``: the UNet, the VAE encoder and the VAE decoder.

1. ``record(image)`` runs the *original* trajectory densely: the encoder on the image, one UNet
   call per denoising step, each into its own cache slot named by the step's index in the
   scheduler's schedule (``with engine.slot(i)``), then the decoder.
2. ``edit(edited_image, mask)`` runs the *edited* trajectory incrementally: every engine call gets
   the edit mask (the image mask, and its max-pooled latent mask for the UNet and the decoder),
   which is authoritative - outside it the recorded trajectory is kept (the SIGE paper's
   protocol). With ``dense=True`` it also runs the plain models on the edited input, for reference.

Two tasks (``task=``):

* ``"sdedit"``: noise the encoded image to the timestep ``strength`` of the way into the schedule,
  then denoise with the scheduler (DDIM, 50 steps by default), ``int(steps * strength)`` of them.
* ``"inpaint"``: regenerate the masked region and keep the rest: after every step the latents
  outside the mask are replaced by the original's latents noised to the next timestep (blended
  latent diffusion, which works with the ordinary 4-channel UNet). The recorded trajectory is the
  UNet on the noised original at every timestep, and the edited one differs from it only inside
  the mask. ``strength`` (default 1.0) sets where the masked region starts: pure noise at 1.0, or
  the noised ``edited_image`` below it.

Classifier-free guidance: give ``uncond_embeddings`` and the UNet runs a batch of two (unconditional
first) combined with ``guidance_scale``.

**Cache controls** (the UNet engine holds one slot per step; each VAE engine one slot):

* ``cache_budget_bytes`` - the UNet engine's budget. Past it, ``on_cache_full="evict"`` drops the
  least recently used slot, ``"raise"`` raises ``CacheBudgetError`` (before recording starts, when
  the first slot shows that the steps cannot fit).
* ``cache_dtype`` - storage dtype of the cached activations (``torch.float16`` or ``bfloat16``
  halve an fp32 model's cache), for every engine.
* ``offload="cpu"`` - slots live on the host between uses and are copied to the compute device
  for the call that uses them (``sigec.runtime.cache.SlotStore``).
* ``on_missing_slot`` - what an edit does at a step whose slot was evicted: ``"dense"`` runs that
  step with the plain UNet (exact for the step, nothing else is evicted), ``"rerecord"`` records
  the slot again from the original trajectory's latents (kept by ``record``, a few KiB per step),
  runs incrementally and drops it (so that re-recording evicts at most one held slot, instead of
  the later steps' slots one after another); it gives the unbudgeted result exactly, at the cost
  of a recording plus an incremental run per such step. ``"raise"`` raises ``SlotEvictedError``.
  A step is never served another step's slot: slots are named by step index, and the engine
  refuses a slot recorded with other non-spatial inputs (timestep, embeddings).
"""
from sigec.diffusion.editor import MISSING_SLOT_RULES, TASKS, DiffusionEditor, EditResult, SlotEvictedError
from sigec.diffusion.images import image_tensor, latent_mask, mask_tensor
from sigec.diffusion.pipelines import CallInfo, IncrementalPipeline, PipelineChangedError, incremental
from sigec.diffusion.parts import SD_SCHEDULER_CONFIG, SD_VAE_CONFIGS, VaeDecoder, VaeEncoder, ddim_scheduler, sd_vae

__all__ = ["CallInfo", "DiffusionEditor", "EditResult", "IncrementalPipeline", "PipelineChangedError", "incremental", "MISSING_SLOT_RULES", "SD_SCHEDULER_CONFIG", "SD_VAE_CONFIGS",
           "SlotEvictedError", "TASKS", "VaeDecoder", "VaeEncoder", "ddim_scheduler", "image_tensor", "latent_mask",
           "mask_tensor", "sd_vae"]
