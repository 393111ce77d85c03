"""The pipelines: one per task of the paper, glue around samplers.py, no new math.

    txt2img            LDMTextToImagePipeline      prompt -> LDMBert context -> sampler -> decode
    unconditional      LDMPipeline                 noise -> sampler -> decode (celebahq, ffhq, lsun)
    superres           LDMSuperResolutionPipeline  low-res image concatenated to z_t at every step -> decode
    class_conditional  the cin256-v2 notebook      class label -> embedding context, guided by "no class"
    semantic_synthesis (no script)                 segmentation map -> rescaled map concatenated to z_t
    layout_to_image    (no script)                 boxes + classes -> layout tokens -> LDMBert context
    inpaint            scripts/inpaint.py          masked image's latent + mask concatenated -> composite

The first three follow diffusers' pipelines (the rest of this paragraph); the others follow the CompVis
repo's own script or notebook for the model, which the tests check against the original code.

Same argument names, meanings and random draws as diffusers 0.42.1, so the same seed gives the same image:
x_T = torch.randn(shape, generator=generator), then (DDIM with eta > 0, DDPM) one draw of the step noise
per step from the same generator. Everything after the prompt (or batch size, or image) is keyword-only, so
`txt2img(m, prompt, 256, 256)` is an error rather than 256 steps at guidance 256.

Defaults. A setting left as None comes from the weight file's recommended settings (m.recommended, e.g. the
embedded shapes model's 20 steps at guidance 2), else from diffusers' pipeline defaults (DEFAULTS below);
the image size defaults to the size the model was trained at (m.default_size: 256 for the published models,
64 for the shapes model). The command line resolves its settings with the same function, `settings`, before
it reads any weight, so a call from Python and from the command line give the same image.

Where diffusers is wrong, ldm_mini is right:
  - eta > 0: diffusers' pipelines never pass their generator to scheduler.step(), so the step noise
    comes from the global RNG; here it comes from `generator` (or from `noise`, given explicitly).
  - txt2img latent size: diffusers hard-codes height // 8; here height // m.downsample_factor.
  - LMS: LDMTextToImagePipeline never applies the scheduler's init_noise_sigma / scale_model_input,
    so LMS through it is wrong; samplers.lms does both. (LDMSuperResolutionPipeline does apply
    scale_model_input, but to the concatenation, scaling the low-res image too; here only z_t.)
  - inpaint's PNG: scripts/inpaint.py truncates the composite to uint8 (astype), which puts about one in
    five KEPT pixel values one level below the input's; here it is rounded, as every pipeline's, and the
    kept pixels are the input's exactly (the float composite is the script's: output_type "pt" / "np").
  - VQ latents: LDMPipeline divides by vqvae.config.scaling_factor, 0.18215 when the config lacks the key
    (diffusers issue 6725); here m.decode divides by m.scale_factor, 1.0 for the VQ models of the paper.
The timestep conventions of the weights' source (m.schedule) can be overridden per call: steps_offset,
set_alpha_to_one (DDIM, PLMS) and timestep_spacing; the sigma-space samplers (samplers.SIGMA_SPACE: lms,
euler, euler_ancestral, heun, dpm_2, dpmpp_2m, dpmpp_2m_sde, unipc) default to the "linspace" spacing that
diffusers' schedulers and k-diffusion use for them, and take sigmas="karras" | "exponential".
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from . import samplers
from .model import RECOMMENDABLE
from .tiling import TiledModel

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SIDE = 4096  # pixels: the published models make 256, the paper's largest samples 1024 (f = 8: 128 latent)
PIPELINE_OF = {"txt2img": "ldm_mini.txt2img", "unconditional": "ldm_mini.unconditional",
               "superres": "ldm_mini.superres", "class": "ldm_mini.class_conditional",
               "semantic": "ldm_mini.semantic_synthesis", "layout": "ldm_mini.layout_to_image",
               "inpaint": "ldm_mini.inpaint"}  # fmt: skip
GUIDED = ("txt2img", "class")  # the kinds with an unconditional input for classifier-free guidance
# diffusers 0.42.1's defaults (LDMTextToImagePipeline, LDMPipeline, LDMSuperResolutionPipeline), used when
# neither the call nor the weight file's recommended settings give a value.
DEFAULTS = {
    "txt2img": {"num_inference_steps": 50, "guidance_scale": 1.0, "eta": 0.0, "sampler": "ddim"},
    "unconditional": {"num_inference_steps": 50, "eta": 0.0, "sampler": "ddim"},
    "superres": {"num_inference_steps": 100, "eta": 0.0, "sampler": "ddim"},
    # no diffusers pipeline: the sampler defaults of the others (the cin256-v2 notebook's 20 steps at guidance
    # 3.0 are the converted file's recommended settings)
    "class": {"num_inference_steps": 50, "guidance_scale": 1.0, "eta": 0.0, "sampler": "ddim"},
    "semantic": {"num_inference_steps": 50, "eta": 0.0, "sampler": "ddim"},
    "layout": {"num_inference_steps": 50, "eta": 0.0, "sampler": "ddim"},
    "inpaint": {"num_inference_steps": 50, "eta": 0.0, "sampler": "ddim"},  # scripts/inpaint.py --steps 50
}
FILE_NAME = {"num_inference_steps": "steps", "guidance_scale": "guidance", "eta": "eta", "sampler": "sampler"}
assert set(FILE_NAME.values()) == set(RECOMMENDABLE)


# --- settings: every check before any compute ----------------------------------------------------------
def settings(m, kind: str, *, num_inference_steps=None, guidance_scale=None, eta=None, sampler=None,
             height=None, width=None, steps_offset=None, set_alpha_to_one=None, timestep_spacing=None,
             sigmas=None, noise=None, output_type="pil") -> dict:  # fmt: skip
    """The settings of one pipeline call, each as given, else m.recommended, else DEFAULTS[kind]; checked.

    m may be a model on the meta device (the command line checks its arguments before reading any weight):
    only its kind, schedule, sizes and recommended settings are read. Raises a ValueError naming the bad
    setting and the fix (noise: the per-step noise a call passes; only its presence is checked here). ->
    {"num_inference_steps", "eta", "sampler", ["guidance_scale"], ["height",
    "width"], "options": the sampler's own options (eta, the conventions and sigmas given)}.
    """
    if m.kind != kind:
        raise ValueError(f"{PIPELINE_OF[kind]} needs a {kind!r} model; this one is {m.kind!r}: "
                         f"use {PIPELINE_OF[m.kind]}(m, ...)")  # fmt: skip
    given = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "eta": eta,
             "sampler": sampler}  # fmt: skip
    s = {}
    for name, default in DEFAULTS[kind].items():  # as given, else the file's, else diffusers'
        value = given[name]
        s[name] = value if value is not None else m.recommended.get(FILE_NAME[name], default)
    if kind not in GUIDED and guidance_scale is not None:
        raise ValueError(f"{PIPELINE_OF[kind]} takes no guidance_scale: only text-to-image and class-"
                         "conditional models are guided")  # fmt: skip

    guidance = s.get("guidance_scale", 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not math.isfinite(guidance):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}: use one of {OUTPUT_TYPES}")
    given = dict(steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one,
                 timestep_spacing=timestep_spacing, sigmas=sigmas)  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    known = s["sampler"] in samplers.SAMPLER_OPTIONS  # (check_settings names an unknown one)
    used = samplers.conventions(m.schedule, s["sampler"]) if known else {}  # what the sampler will use
    T, steps = m.schedule.num_train_timesteps, s["num_inference_steps"]
    try:  # the sampler's own checks (one place: samplers.check_settings), with the conventions it will use
        samplers.check_settings(T, steps, sampler=s["sampler"], eta=s["eta"], noise=noise,
                                **{**used, **given})  # fmt: skip
    except ValueError as e:
        raise ValueError(str(e).replace("num_steps", "num_inference_steps")) from None
    s["options"] = {"eta": s["eta"], **given} if s["sampler"] == "ddim" else given

    if kind != "superres":  # super-resolution takes its size from the image
        f = m.downsample_factor
        s["height"], s["width"] = _or(height, m.default_size), _or(width, m.default_size)
        for name in ("height", "width"):
            v = s[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < f or v % f:
                raise ValueError(f"{name} must be a positive multiple of {f}, got {v!r} (height and width: "
                                 f"multiples of {f}, the autoencoder factor; the model was trained at "
                                 f"{m.default_size})")  # fmt: skip
            if v > MAX_SIDE:  # refused now: the allocation would fail (or the OOM killer strike) mid-sample
                raise ValueError(f"{name} {v} is over {MAX_SIDE} pixels: a latent that large does not "
                                 "fit in memory; super-resolve a smaller image (superres)")  # fmt: skip
    return s


def _check_tensor(name, x, shape) -> None:
    if x is not None and (not isinstance(x, Tensor) or tuple(x.shape) != tuple(shape)):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got {got}")


def _check_generator(generator, batch: int) -> None:
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"generator is a list of {len(generator)} generators for a batch of {batch}: "
                         "give one per image, or a single generator")  # fmt: skip


def _or(value, default):
    return default if value is None else value


# --- the shared body -------------------------------------------------------------------------------
def _initial_noise(m, shape, generator, latents) -> Tensor:
    """x_T ~ N(0, I): drawn on the generator's device in the model's dtype, as diffusers' randn_tensor; with
    a list of generators, image i is drawn from generator[i] alone (so it equals a batch-of-one call)."""
    if latents is not None:
        return latents.to(m.device, m.dtype)
    return samplers.randn(shape, generator, m.device, m.dtype)


def _sample(m, x_T, s, cond, uncond, noise, generator, callback, progress, return_intermediates,
            attention_layer):  # fmt: skip
    """Run one sampler; optionally record x_t, predicted x_0 and one layer's cross-attention per step."""
    sampler = s["sampler"]
    kwargs = dict(cond=cond, uncond=uncond, guidance_scale=s.get("guidance_scale", 1.0), progress=progress,
                  **s["options"])  # fmt: skip
    if "noise" in samplers.SAMPLER_OPTIONS[sampler]:  # the per-step noise: explicit, or from x_T's generator
        kwargs.update(noise=None if noise is None else noise.to(x_T.device, x_T.dtype),
                      generator=generator if noise is None else None)  # fmt: skip
    trace = {"timesteps": [], "x_t": [], "x0": []} if return_intermediates else {}  # {}: nothing asked
    layer, handle, maps = None, None, []  # maps: the attention of each UNet call of the current step
    if attention_layer is not None:
        layer = dict(m.unet.cross_attention_layers())[attention_layer]
        layer.keep_attention, trace["attention"] = True, []
        # (B, heads, h*w, L); with guidance the UNet batch is [uncond, cond]: keep the conditional half
        handle = layer.register_forward_hook(lambda mod, i, o: maps.append(mod.attention_probs[-len(x_T) :]))

    def on_step(info):  # samplers call this after each step with {"i", "t", "z", "x0"}
        if return_intermediates:
            trace["timesteps"].append(info["t"])
            trace["x_t"].append(info["z"])
            trace["x0"].append(info["x0"])
        if layer is not None:  # the first call of a step sees x_t at t (PLMS's step 0 makes two)
            trace["attention"].append(maps[0].cpu())
            maps.clear()
        if callback is not None:
            callback(info)

    wanted = return_intermediates or layer is not None or callback is not None
    try:
        z0 = samplers.SAMPLERS[sampler](
            m, x_T, s["num_inference_steps"], callback=on_step if wanted else None, **kwargs
        )
    finally:  # nothing is kept when the call is over
        if layer is not None:
            handle.remove()
            layer.keep_attention, layer.attention_probs = False, None
    return z0, trace or None


def _output(m, z0, output_type, trace, keep=None):
    """Final latent -> "latent" z0, "pt" (B, 3, H, W) / "np" (B, H, W, 3) float in [0, 1], "pil" list.

    keep: (image, mask), image (B, 3, H, W) in [0, 1] and mask (B, 1, H, W) with 1 = filled: inpainting's
    final composite (1 - mask) * image + mask * sample (scripts/inpaint.py), so the kept pixels are the
    input's."""
    out = z0 if output_type == "latent" else m.decode(z0)  # D(z0 / scale_factor) in [-1, 1]
    if not torch.isfinite(out).all():  # clamp would turn NaN into a black picture that looks like a result
        raise RuntimeError("the sample has NaN or infinite values: the weights or a setting overflowed "
                           "(float16? use float32 or bfloat16); no image is made of it")  # fmt: skip
    if output_type != "latent":
        out = (out / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1]
        if keep is not None:
            image, mask = (x.to(out.device, out.dtype) for x in keep)
            out = (1 - mask) * image + mask * out
        if output_type != "pt":
            out = out.permute(0, 2, 3, 1).float().cpu().numpy()  # (B, H, W, 3)
        if output_type == "pil":
            out = [PIL.Image.fromarray(a) for a in (out * 255).round().astype(np.uint8)]
    return out if trace is None else (out, trace)


def _latent_shape(m, batch, s, generator, latents, noise) -> tuple[int, int, int, int]:
    """The latent (B, c, h, w) of a call, with the tensors and generators it was given checked against it:
    called before any encoder runs, so a wrong shape is a ValueError before any compute."""
    f = m.downsample_factor
    shape = (batch, m.latent_channels, s["height"] // f, s["width"] // f)  # diffusers' txt2img: height // 8
    _check_tensor("latents", latents, shape)
    _check_tensor("noise", noise, (s["num_inference_steps"], *shape))
    _check_generator(generator, batch)
    return shape


def _run(m, shape, cond, uncond, s, generator, latents, noise, output_type, callback, progress,
         return_intermediates, attention_layer=None, keep=None):  # fmt: skip
    """Draw x_T, sample, decode: the body of every pipeline after its conditioning is built (cond, uncond:
    what predict_noise is given; None for unconditional models; shape from _latent_shape)."""
    x_T = _initial_noise(m, shape, generator, latents)
    z0, trace = _sample(m, x_T, s, cond, uncond, noise, generator, callback, progress, return_intermediates,
                        attention_layer)  # fmt: skip
    return _output(m, z0, output_type, trace, keep)


# --- the pipelines ---------------------------------------------------------------------------------
@torch.no_grad()
def txt2img(m, prompt: str | list[str], *, num_inference_steps=None, guidance_scale=None, eta=None,
            height=None, width=None, sampler=None, generator=None, latents=None, noise=None,
            output_type="pil", callback=None, progress=True, return_intermediates=False, attention_layer=None,
            steps_offset=None, set_alpha_to_one=None, timestep_spacing=None, sigmas=None):  # fmt: skip
    """Text to image (LDMTextToImagePipeline). A list of prompts makes a batch. guidance_scale != 1 runs
    classifier-free guidance with "" as the unconditional prompt (the model card: 6.0, eta 0.3).

    None settings: m.recommended, else diffusers' defaults (50 DDIM steps, guidance 1.0, eta 0); height and
    width: m.default_size. generator: a torch.Generator, or a list of one per prompt (image i then equals
    the batch-of-one image of generator[i]). latents: x_T (B, c, h, w) instead of a draw; noise: the
    per-step noise (num_inference_steps, B, c, h, w) of DDIM (eta > 0), DDPM, Euler ancestral and DPM++ 2M
    SDE. sampler: a name of samplers.SAMPLERS ("ddim", "plms", "ddpm", "lms", "euler", "euler_ancestral",
    "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "unipc"); sigmas: None (the model's own), "karras" or
    "exponential", for the sigma-space samplers (all from "lms" on). return_intermediates: also return
    {"timesteps", "x_t", "x0"} (one entry per step); attention_layer: a name from
    m.unet.cross_attention_layers(): also return its maps (B, heads, h*w, 77) per step in ["attention"]. With
    either, the result is (images, intermediates).
    """
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list | tuple) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    s = settings(m, "txt2img", num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                 eta=eta, sampler=sampler, height=height, width=width, steps_offset=steps_offset,
                 set_alpha_to_one=set_alpha_to_one, timestep_spacing=timestep_spacing, sigmas=sigmas,
                 noise=noise, output_type=output_type)  # fmt: skip
    if m.tokenizer is None:
        raise ValueError("this model has no tokenizer: build the context with m.encode_text(ids) and call "
                         "samplers.ddim(m, x_T, cond=context) directly")  # fmt: skip
    names = [name for name, _ in m.unet.cross_attention_layers()]
    if attention_layer is not None and attention_layer not in names:
        raise ValueError(f"no cross-attention layer {attention_layer!r}: use one of {names}")
    shape = _latent_shape(m, len(prompts), s, generator, latents, noise)
    cond = m.encode_text(m.tokenize(list(prompts)))  # (B, 77, D)
    uncond = m.encode_text(m.tokenize([""] * len(prompts))) if s["guidance_scale"] != 1.0 else None
    return _run(m, shape, cond, uncond, s, generator, latents, noise, output_type, callback, progress,
                return_intermediates, attention_layer)  # fmt: skip


@torch.no_grad()
def unconditional(m, batch_size: int = 1, *, num_inference_steps=None, eta=None, height=None, width=None,
                  sampler=None, generator=None, latents=None, noise=None, output_type="pil", callback=None,
                  progress=True, return_intermediates=False, steps_offset=None, set_alpha_to_one=None,
                  timestep_spacing=None, sigmas=None):  # fmt: skip
    """Unconditional samples (LDMPipeline; the ldm-celebahq-256 card uses 200 steps).

    height/width default to the size the model was trained at, m.default_size, as diffusers
    (unet.config.sample_size times the autoencoder factor: 256 for ldm-celebahq-256). Others as txt2img.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    s = settings(m, "unconditional", num_inference_steps=num_inference_steps, eta=eta, sampler=sampler,
                 height=height, width=width, steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one,
                 timestep_spacing=timestep_spacing, sigmas=sigmas, noise=noise,
                 output_type=output_type)  # fmt: skip
    shape = _latent_shape(m, batch_size, s, generator, latents, noise)
    return _run(m, shape, None, None, s, generator, latents, noise, output_type, callback, progress,
                return_intermediates)  # fmt: skip


@torch.no_grad()
def class_conditional(m, class_labels, *, num_inference_steps=None, guidance_scale=None, eta=None,
                      height=None, width=None, sampler=None, generator=None, latents=None, noise=None,
                      output_type="pil", callback=None, progress=True, return_intermediates=False,
                      steps_offset=None, set_alpha_to_one=None, timestep_spacing=None,
                      sigmas=None):  # fmt: skip
    """Class-conditional ImageNet samples (cin256-v2; CompVis scripts/latent_imagenet_diffusion.ipynb).
    class_labels: an int or a list of ints (one image each), 0 .. 999 for ImageNet. guidance_scale != 1 runs
    classifier-free guidance with the model's "no class" label (m.class_embedder.config.unconditional_class,
    1000 for cin256-v2) as the unconditional input, e = e_uc + s (e_c - e_uc), as the notebook does (20 DDIM
    steps, scale 3.0, eta 0: the converted file's recommended settings). Others as txt2img."""
    labels = [class_labels] if isinstance(class_labels, int) else class_labels
    if isinstance(labels, Tensor):
        labels = labels.tolist()
    if (
        not isinstance(labels, list | tuple)
        or not labels
        or not all(isinstance(c, int) and not isinstance(c, bool) for c in labels)
    ):
        raise ValueError(f"class_labels must be an int or a non-empty list of ints, got {class_labels!r}")
    s = settings(m, "class", num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                 eta=eta, sampler=sampler, height=height, width=width, steps_offset=steps_offset,
                 set_alpha_to_one=set_alpha_to_one, timestep_spacing=timestep_spacing, sigmas=sigmas,
                 noise=noise, output_type=output_type)  # fmt: skip
    uc_label = unconditional_label(m, s["guidance_scale"])
    shape = _latent_shape(m, len(labels), s, generator, latents, noise)
    cond = m.encode_class(torch.tensor(labels))  # (B, 1, D); checks the range
    uncond = None if uc_label is None else m.encode_class(torch.full((len(labels),), uc_label))
    return _run(m, shape, cond, uncond, s, generator, latents, noise, output_type, callback, progress,
                return_intermediates)  # fmt: skip


def unconditional_label(m, guidance_scale: float) -> int | None:
    """The "no class" label that guidance needs (None unguided), or a ValueError if the model has none."""
    if guidance_scale == 1.0:
        return None
    if m.class_embedder.config.unconditional_class is None:
        raise ValueError("this class-conditional model has no unconditional label, so it cannot be guided: "
                         "use guidance_scale=1.0")  # fmt: skip
    return m.class_embedder.config.unconditional_class


@torch.no_grad()
def semantic_synthesis(m, segmentation, *, num_inference_steps=None, eta=None, sampler=None, generator=None,
                       latents=None, noise=None, output_type="pil", callback=None, progress=True,
                       return_intermediates=False, steps_offset=None, set_alpha_to_one=None,
                       timestep_spacing=None, sigmas=None):  # fmt: skip
    """Segmentation map -> image (semantic_synthesis256, the paper's landscapes, Fig. 8). segmentation: a
    label map (B, H, W) int64 or its one-hot (B, C, H, W) at the image's size (H, W multiples of 4 and of the
    UNet's levels); the image has its size. m.encode_segmentation rescales it to the latent (B, 3, H/4, W/4),
    which is concatenated to z_t at every step. The repo has no sampling script for this model (its README
    points to a notebook); the settings default to DDIM 50 steps, eta 0. Others as txt2img."""
    s = settings(m, "semantic", num_inference_steps=num_inference_steps, eta=eta, sampler=sampler,
                 steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one,
                 timestep_spacing=timestep_spacing, sigmas=sigmas, noise=noise,
                 output_type=output_type)  # fmt: skip
    # (B, 3, h, w); checks classes and size first. The only encoder that runs before the shape checks below:
    # it is one interpolation and a 1x1 conv, and it is what tells a label map's size from a one-hot's.
    cond = m.encode_segmentation(segmentation)
    s["height"], s["width"] = (side * m.downsample_factor for side in cond.shape[-2:])
    shape = _latent_shape(m, cond.shape[0], s, generator, latents, noise)
    return _run(m, shape, cond, None, s, generator, latents, noise, output_type, callback, progress,
                return_intermediates)  # fmt: skip


@torch.no_grad()
def layout_to_image(m, layout, *, num_inference_steps=None, eta=None, height=None, width=None, sampler=None,
                    generator=None, latents=None, noise=None, output_type="pil", callback=None, progress=True,
                    return_intermediates=False, steps_offset=None, set_alpha_to_one=None,
                    timestep_spacing=None, sigmas=None):  # fmt: skip
    """Layout -> image (layout2img-openimages256, Fig. 4 of the paper). layout: one image's list of objects
    (class, (x0, y0, w, h)) or (class, (x0, y0, w, h), is_group_of), box coordinates relative to the image in
    [0, 1] from the top left; a list of such lists makes a batch; or token ids (B, 92) as
    m.layout_tokens builds them (conditioning.LayoutTokenizer documents the format). The README's setting
    for this model is 200 DDIM steps, eta 0; None settings default to 50. Others as txt2img."""
    s = settings(
        m,
        "layout",
        num_inference_steps=num_inference_steps,
        eta=eta,
        sampler=sampler,
        height=height,
        width=width,
        steps_offset=steps_offset,
        set_alpha_to_one=set_alpha_to_one,
        timestep_spacing=timestep_spacing,
        sigmas=sigmas,
        noise=noise,
        output_type=output_type,
    )  # fmt: skip (first: it names a model of another kind)
    if isinstance(layout, Tensor):
        tokens = layout
    else:  # one image's objects, or a list of them (an object starts with its int class)
        one = isinstance(layout, list | tuple) and (
            not layout
            or (isinstance(layout[0], list | tuple) and layout[0] and isinstance(layout[0][0], int))
        )
        tokens = m.layout_tokens([layout] if one else layout)  # checks every box and class
    want = m.layout_tokenizer.config.length
    if tokens.ndim != 2 or tokens.shape[1] != want or tokens.is_floating_point():
        raise ValueError(f"layout token ids must be an integer tensor (B, {want}), got {tuple(tokens.shape)}")
    shape = _latent_shape(m, tokens.shape[0], s, generator, latents, noise)
    cond = m.encode_layout(tokens)  # (B, 92, D)
    return _run(m, shape, cond, None, s, generator, latents, noise, output_type, callback, progress,
                return_intermediates)  # fmt: skip


def inpaint_inputs(m, image, mask) -> tuple[Tensor, Tensor]:
    """An image and its mask -> image (B, 3, H, W) in [-1, 1] and mask (B, 1, H, W) in {0, 1}, 1 = fill,
    checked against the model m (which may be on the meta device: the command line checks before loading).

    PIL inputs are read as scripts/inpaint.py's make_batch reads its PNGs: the image as RGB / 255, the mask
    as L / 255 binarised at 0.5 (127 -> keep, 128 -> fill). Tensors are used as they are: the image in
    [-1, 1], the mask binary (a soft mask is refused by m.inpaint_condition, not silently thresholded)."""
    if isinstance(image, PIL.Image.Image):
        image = _pil_to_tensor(image.convert("RGB")) * 2 - 1  # (1, 3, H, W) in [-1, 1]
    else:
        _check_image_tensor(image, "inpaint")
    if isinstance(mask, PIL.Image.Image):
        mask = (_pil_to_tensor(mask.convert("L")) >= 0.5).float()  # (1, 1, H, W)
    elif not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a PIL image or a tensor (B, 1, H, W), got {type(mask).__name__}")
    if mask.shape != (image.shape[0], 1, *image.shape[2:]):
        raise ValueError(f"the mask must be (B, 1, H, W) = {(image.shape[0], 1, *image.shape[2:])}, the "
                         f"image's size, got {tuple(mask.shape)}")  # fmt: skip
    f = m.downsample_factor
    if image.shape[-1] % f or image.shape[-2] % f or 0 in image.shape:
        raise ValueError(f"the image's height and width must be positive multiples of {f} (the "
                         f"autoencoder factor), got {tuple(image.shape[-2:])}: crop or resize image and "
                         "mask")  # fmt: skip
    return image, mask.float()


def _pil_to_tensor(image: PIL.Image.Image) -> Tensor:
    """uint8 (H, W[, C]) -> float32 (1, C, H, W) in [0, 1], as np.asarray(image) / 255."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return (x[None] if x.ndim == 2 else x.permute(2, 0, 1))[None]


def _check_image_tensor(image, pipeline: str) -> None:
    batch_of_rgb = isinstance(image, Tensor) and image.ndim == 4 and image.shape[1] == 3
    if not batch_of_rgb or not image.is_floating_point():
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a PIL image or a float tensor (B, 3, h, w) in [-1, 1] for "
                         f"{pipeline}, got {got}")  # fmt: skip
    if image.numel() and (image.min() < -1.001 or image.max() > 1.001):
        raise ValueError(f"the image tensor must be in [-1, 1] (got {image.min():.3g}..{image.max():.3g}): "
                         "map [0, 1] images with 2 * x - 1, and clamp resampling overshoot")  # fmt: skip


@torch.no_grad()
def inpaint(m, image, mask, *, num_inference_steps=None, eta=None, sampler=None, generator=None, latents=None,
            noise=None, output_type="pil", callback=None, progress=True, return_intermediates=False,
            steps_offset=None, set_alpha_to_one=None, timestep_spacing=None, sigmas=None):  # fmt: skip
    """Fill the masked part of an image (inpainting_big; the paper's Sec. 4.5, Table 7), as
    scripts/inpaint.py does. image: a PIL image or a tensor (B, 3, H, W) in [-1, 1]; mask: a PIL image
    (white = fill) or a tensor (B, 1, H, W), 1 = fill, 0 = keep (see inpaint_inputs); H, W multiples of the
    autoencoder factor (and, for the CompVis UNet, of 32).

    The condition m.inpaint_condition(image, mask) (the masked image's latent and the mask) is concatenated
    to z_t at every step, without guidance; the result is the script's composite (1 - mask) * image + mask *
    sample, so the kept pixels are the input's (its PNG: rounded, not truncated as the script's; see
    the module docstring). The script samples 50 DDIM steps, eta 0 (the defaults here). output_type
    "latent" returns the sampled latent (no composite). Others as txt2img."""
    s = settings(m, "inpaint", num_inference_steps=num_inference_steps, eta=eta, sampler=sampler,
                 steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one,
                 timestep_spacing=timestep_spacing, sigmas=sigmas, noise=noise,
                 output_type=output_type)  # fmt: skip
    image, mask = inpaint_inputs(m, image, mask)
    s["height"], s["width"] = image.shape[-2:]
    shape = _latent_shape(m, image.shape[0], s, generator, latents, noise)
    cond = m.inpaint_condition(image, mask)  # (B, c + 1, h, w); checks that the mask is binary
    keep = ((image + 1) / 2).clamp(0, 1), mask  # the script's image01 and mask01, at full resolution
    return _run(m, shape, cond, None, s, generator, latents, noise, output_type, callback, progress,
                return_intermediates, keep=keep)  # fmt: skip


def low_res_image(image, unit: int = 32) -> Tensor:
    """A PIL image or a tensor (B, 3, h, w) in [-1, 1] -> the low-res conditioning (B, 3, h, w) in [-1, 1].

    PIL images are converted to RGB and, as diffusers' preprocess does, resized (Lanczos) DOWN to a
    multiple of 32 on each side; a side under 32 pixels (the embedded shapes-superres takes 16x16) to a
    multiple of `unit`, what the UNet's levels need (superres passes 2^(levels - 1)). Tensors are used as
    they are (ldm_mini's UNet takes any size).
    """
    if isinstance(image, PIL.Image.Image):
        w, h = (s - s % 32 if s >= 32 else s - s % unit for s in image.size)
        if w == 0 or h == 0:
            raise ValueError(f"a PIL image for superres must be at least {unit}x{unit} pixels, got "
                             f"{image.size}")  # fmt: skip
        image = image.convert("RGB").resize((w, h), resample=PIL.Image.Resampling.LANCZOS)
        return 2.0 * _pil_to_tensor(image) - 1.0  # (1, 3, h, w), [0, 1] -> [-1, 1]
    _check_image_tensor(image, "superres")
    return image


@torch.no_grad()
def superres(m, image, *, num_inference_steps=None, eta=None, sampler=None, generator=None, latents=None,
             noise=None, output_type="pil", callback=None, progress=True, return_intermediates=False,
             decode_tile=None, unet_tile=None, steps_offset=None, set_alpha_to_one=None,
             timestep_spacing=None, sigmas=None):  # fmt: skip
    """4x super-resolution (LDMSuperResolutionPipeline; the model card uses eta=1). The latent has the
    low-res image's size (VQ-f4: the output is 4x larger); the image is concatenated to z_t at every step.
    image: see low_res_image. decode_tile / unet_tile: run the decoder / UNet in overlapping tiles of this
    many latent pixels (ldm_mini.tiling; e.g. decode_tile=128 for a 512x512 input). None settings:
    m.recommended, else diffusers' defaults (100 DDIM steps, eta 0). Others as txt2img."""
    s = settings(m, "superres", num_inference_steps=num_inference_steps, eta=eta, sampler=sampler,
                 steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one,
                 timestep_spacing=timestep_spacing, sigmas=sigmas, noise=noise,
                 output_type=output_type)  # fmt: skip
    if decode_tile is not None or unet_tile is not None:
        m = TiledModel(m, decode_tile=decode_tile, unet_tile=unet_tile)
    low = low_res_image(image, unit=2 ** (len(m.unet.config.channel_mult) - 1))
    s["height"], s["width"] = (side * m.downsample_factor for side in low.shape[-2:])  # latent = low's size
    shape = _latent_shape(m, low.shape[0], s, generator, latents, noise)
    low = low.to(m.device, m.dtype)
    return _run(m, shape, low, None, s, generator, latents, noise, output_type, callback, progress,
                return_intermediates)  # fmt: skip
