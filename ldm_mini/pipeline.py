"""The three pipelines of the diffusers Latent Diffusion docs: glue around samplers.py, no new math.

    txt2img        LDMTextToImagePipeline      prompt -> LDMBert context -> sampler -> decode
    unconditional  LDMPipeline                 noise -> sampler -> decode (ldm-celebahq-256)
    superres       LDMSuperResolutionPipeline  low-res image concatenated to z_t at every step -> decode

Same defaults, argument meanings and random draws as diffusers 0.42.1, so the same seed gives the same
image: x_T = torch.randn(shape, generator=generator), then (DDIM with eta > 0, DDPM) one draw of the
step noise per step from the same generator. Where diffusers is wrong, ldm_mini is right:
  - eta > 0: diffusers' pipelines never pass their generator to scheduler.step(), so the step noise
    comes from the global RNG; here it comes from `generator` (or from `noise`, given explicitly).
  - txt2img latent size: diffusers hard-codes height // 8; here height // m.downsample_factor.
  - LMS: LDMTextToImagePipeline never applies the scheduler's init_noise_sigma / scale_model_input,
    so LMS through it is wrong; samplers.lms does both. (LDMSuperResolutionPipeline does apply
    scale_model_input, but to the concatenation, scaling the low-res image too; here only z_t.)
  - VQ latents: LDMPipeline divides by vqvae.config.scaling_factor, 0.18215 when the config lacks the key
    (diffusers issue 6725); here m.decode divides by m.scale_factor, 1.0 for the VQ models of the paper.
Every sampler setting of the weights' source (m.schedule) can be overridden per call through
**sampler_overrides, e.g. steps_offset=0, set_alpha_to_one=True, timestep_spacing="trailing".
"""

from __future__ import annotations

import inspect

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from . import samplers
from .tiling import TiledModel

SAMPLERS = {"ddim": samplers.ddim, "plms": samplers.plms, "lms": samplers.lms, "ddpm": samplers.ddpm}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SET_BY_PIPELINE = {"m", "x_T", "num_steps", "cond", "uncond", "guidance_scale", "eta", "noise", "generator",
                   "callback", "progress"}  # fmt: skip


# --- checks: all before any compute ------------------------------------------------------------------
def _check_call(m, kind, num_steps, sampler, output_type, eta, noise, overrides) -> None:
    if m.kind != kind:
        hint = {"txt2img": "ldm_mini.txt2img", "unconditional": "ldm_mini.unconditional",
                "superres": "ldm_mini.superres"}[m.kind]  # fmt: skip
        raise ValueError(f"{kind} needs a {kind!r} model; this one is {m.kind!r}: use {hint}(m, ...)")
    T = m.alphas_cumprod.shape[0]
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ValueError(f"num_inference_steps must be an integer from 1 to {T}, got {num_steps!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {tuple(SAMPLERS)}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}: use one of {OUTPUT_TYPES}")
    if eta < 0 or (eta != 0 and sampler != "ddim"):
        raise ValueError(f"eta={eta} needs sampler='ddim' and eta >= 0 (0: deterministic DDIM, 1: DDPM-like)")
    if noise is not None and sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler {sampler!r} is deterministic: it takes no per-step noise=")
    allowed = set(inspect.signature(SAMPLERS[sampler]).parameters) - SET_BY_PIPELINE
    if unknown := sorted(set(overrides) - allowed):
        raise ValueError(f"sampler {sampler!r} has no option(s) {unknown}: its options are {sorted(allowed)}")


def _check_size(m, height, width) -> tuple[int, int]:
    """Image size -> latent size (h, w); the image size must be a multiple of the autoencoder's factor."""
    f = m.downsample_factor
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < f or v % f:
            raise ValueError(f"{name} must be a positive multiple of {f} (the autoencoder factor), got {v!r}")
    return height // f, width // f


def _check_tensor(name, x, shape) -> None:
    if x is not None and (not isinstance(x, Tensor) or tuple(x.shape) != tuple(shape)):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got {got}")


def _or(value, default):
    return default if value is None else value


# --- the shared body -------------------------------------------------------------------------------
def _initial_noise(m, shape, generator, latents) -> Tensor:
    """x_T ~ N(0, I): drawn on the generator's device in the model's dtype, as diffusers' randn_tensor."""
    if latents is not None:
        return latents.to(m.device, m.dtype)
    device = generator.device if generator is not None else m.device
    return torch.randn(shape, generator=generator, device=device, dtype=m.dtype).to(m.device)


def _sample(m, x_T, num_steps, sampler, cond, uncond, guidance_scale, eta, noise, generator, callback,
            progress, return_intermediates, attention_layer, overrides):  # fmt: skip
    """Run one sampler; optionally record x_t, predicted x_0 and one layer's cross-attention per step."""
    kwargs = dict(cond=cond, uncond=uncond, guidance_scale=guidance_scale, progress=progress, **overrides)
    if sampler in ("ddim", "ddpm"):  # the per-step noise: explicit, or from the generator of x_T
        kwargs.update(noise=None if noise is None else noise.to(x_T.device, x_T.dtype),
                      generator=generator if noise is None else None)  # fmt: skip
    if sampler == "ddim":
        kwargs["eta"] = eta
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
            trace["x_t"].append(info["z"])  # lms: the sigma-space state, z_t * sqrt(1 + sigma^2)
            trace["x0"].append(info["x0"])
        if layer is not None:  # the first call of a step sees x_t at t (PLMS's step 0 makes two)
            trace["attention"].append(maps[0].cpu())
            maps.clear()
        if callback is not None:
            callback(info)

    wanted = return_intermediates or layer is not None or callback is not None
    try:
        z0 = SAMPLERS[sampler](m, x_T, num_steps, callback=on_step if wanted else None, **kwargs)
    finally:  # nothing is kept when the call is over
        if layer is not None:
            handle.remove()
            layer.keep_attention, layer.attention_probs = False, None
    return z0, trace or None


def _output(m, z0, output_type, trace):
    """Final latent -> "latent" z0, "pt" (B, 3, H, W) / "np" (B, H, W, 3) float in [0, 1], "pil" list."""
    out = z0
    if output_type != "latent":
        out = (m.decode(z0) / 2 + 0.5).clamp(0, 1)  # D(z0 / scale_factor) in [-1, 1] -> [0, 1]
        if output_type != "pt":
            out = out.permute(0, 2, 3, 1).float().cpu().numpy()  # (B, H, W, 3)
        if output_type == "pil":
            out = [PIL.Image.fromarray(a) for a in (out * 255).round().astype(np.uint8)]
    return out if trace is None else (out, trace)


# --- the three pipelines ---------------------------------------------------------------------------
@torch.no_grad()
def txt2img(m, prompt: str | list[str], num_inference_steps=50, guidance_scale=1.0, eta=0.0, height=256,
            width=256, generator=None, noise=None, sampler="ddim", output_type="pil", callback=None,
            progress=True, latents=None, return_intermediates=False, attention_layer=None,
            **sampler_overrides):  # fmt: skip
    """Text to image (LDMTextToImagePipeline). A list of prompts makes a batch. guidance_scale != 1 runs
    classifier-free guidance with "" as the unconditional prompt (the model card: 6.0, eta 0.3).

    latents: x_T (B, c, h, w) instead of a draw; noise: the per-step noise (num_steps, B, c, h, w) of
    DDIM (eta > 0) / DDPM. sampler: "ddim" | "plms" | "lms" | "ddpm". return_intermediates: also return
    {"timesteps", "x_t", "x0"} (one entry per step); attention_layer: a name from
    m.unet.cross_attention_layers(): also return its maps (B, heads, h*w, 77) per step in ["attention"].
    With either, the result is (images, intermediates).
    """
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list | tuple) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    _check_call(m, "txt2img", num_inference_steps, sampler, output_type, eta, noise, sampler_overrides)
    if m.tokenizer is None:
        raise ValueError("this model has no tokenizer: build the context with m.encode_text(ids) and call "
                         "samplers.ddim(m, x_T, cond=context) directly")  # fmt: skip
    names = [name for name, _ in m.unet.cross_attention_layers()]
    if attention_layer is not None and attention_layer not in names:
        raise ValueError(f"no cross-attention layer {attention_layer!r}: use one of {names}")
    shape = (len(prompts), m.latent_channels, *_check_size(m, height, width))  # diffusers: height // 8
    _check_tensor("latents", latents, shape)
    _check_tensor("noise", noise, (num_inference_steps, *shape))

    cond = m.encode_text(m.tokenize(list(prompts)))  # (B, 77, D)
    uncond = m.encode_text(m.tokenize([""] * len(prompts))) if guidance_scale != 1.0 else None
    x_T = _initial_noise(m, shape, generator, latents)
    z0, trace = _sample(m, x_T, num_inference_steps, sampler, cond, uncond, guidance_scale, eta, noise,
                        generator, callback, progress, return_intermediates, attention_layer,
                        sampler_overrides)  # fmt: skip
    return _output(m, z0, output_type, trace)


@torch.no_grad()
def unconditional(m, batch_size=1, num_inference_steps=50, eta=0.0, generator=None, noise=None,
                  sampler="ddim", output_type="pil", height=None, width=None, callback=None, progress=True,
                  latents=None, return_intermediates=False, **sampler_overrides):  # fmt: skip
    """Unconditional samples (LDMPipeline; the ldm-celebahq-256 card uses 200 steps).

    height/width default to the size the model was trained at, as diffusers (unet.config.sample_size
    times the autoencoder factor: 256 for ldm-celebahq-256). Other arguments as txt2img.
    """
    _check_call(m, "unconditional", num_inference_steps, sampler, output_type, eta, noise, sampler_overrides)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    native = m.unet.config.image_size * m.downsample_factor
    shape = (batch_size, m.latent_channels, *_check_size(m, _or(height, native), _or(width, native)))
    _check_tensor("latents", latents, shape)
    _check_tensor("noise", noise, (num_inference_steps, *shape))

    x_T = _initial_noise(m, shape, generator, latents)
    z0, trace = _sample(m, x_T, num_inference_steps, sampler, None, None, 1.0, eta, noise, generator,
                        callback, progress, return_intermediates, None, sampler_overrides)  # fmt: skip
    return _output(m, z0, output_type, trace)


def low_res_image(image) -> Tensor:
    """A PIL image or a tensor (B, 3, h, w) in [-1, 1] -> the low-res conditioning (B, 3, h, w) in [-1, 1].

    PIL images are converted to RGB and, as diffusers' preprocess does, resized (Lanczos) DOWN to a
    multiple of 32 on each side; tensors are used as they are (ldm_mini's UNet takes any size).
    """
    if isinstance(image, PIL.Image.Image):
        w, h = (s - s % 32 for s in image.size)
        if w == 0 or h == 0:
            raise ValueError(f"a PIL image for superres must be at least 32x32 pixels, got {image.size}")
        image = image.convert("RGB").resize((w, h), resample=PIL.Image.Resampling.LANCZOS)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        return 2.0 * x - 1.0  # (1, 3, h, w), [0, 1] -> [-1, 1]
    batch_of_rgb = isinstance(image, Tensor) and image.ndim == 4 and image.shape[1] == 3
    if not batch_of_rgb or not image.is_floating_point():
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a PIL image or a float tensor (B, 3, h, w) in [-1, 1], got {got}")
    if image.numel() and (image.min() < -1.001 or image.max() > 1.001):
        raise ValueError(f"the image tensor must be in [-1, 1] (got {image.min():.3g}..{image.max():.3g}): "
                         "map [0, 1] images with 2 * x - 1, and clamp resampling overshoot")  # fmt: skip
    return image


@torch.no_grad()
def superres(m, image, num_inference_steps=100, eta=0.0, generator=None, noise=None, sampler="ddim",
             output_type="pil", callback=None, progress=True, latents=None, return_intermediates=False,
             decode_tile=None, unet_tile=None, **sampler_overrides):  # fmt: skip
    """4x super-resolution (LDMSuperResolutionPipeline; the model card uses eta=1). The latent has the
    low-res image's size (VQ-f4: the output is 4x larger); the image is concatenated to z_t at every step.
    image: see low_res_image. decode_tile / unet_tile: run the decoder / UNet in overlapping tiles of this
    many latent pixels (ldm_mini.tiling; e.g. decode_tile=128 for a 512x512 input). Others as txt2img."""
    if decode_tile is not None or unet_tile is not None:
        m = TiledModel(m, decode_tile=decode_tile, unet_tile=unet_tile)
    _check_call(m, "superres", num_inference_steps, sampler, output_type, eta, noise, sampler_overrides)
    low = low_res_image(image)
    shape = (low.shape[0], m.latent_channels, *low.shape[-2:])
    _check_tensor("latents", latents, shape)
    _check_tensor("noise", noise, (num_inference_steps, *shape))

    x_T = _initial_noise(m, shape, generator, latents)
    low = low.to(m.device, m.dtype)
    z0, trace = _sample(m, x_T, num_inference_steps, sampler, low, None, 1.0, eta, noise, generator, callback,
                        progress, return_intermediates, None, sampler_overrides)  # fmt: skip
    return _output(m, z0, output_type, trace)
