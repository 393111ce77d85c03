"""The three pipelines end to end against diffusers' LDMTextToImagePipeline, LDMPipeline and
LDMSuperResolutionPipeline: tiny random weights saved as a diffusers folder, converted, loaded; same seed,
same steps; the images compared.

Tolerance: images are float32 in [0, 1] ("np" output), so atol=1e-5 is relative to the image's scale;
float32 round-off of these tiny models is ~1e-7..1e-6, any real mistake (an offset timestep, a wrong
alpha) is ~1e-2. The step noise of eta > 0 / DDPM is injected into both sides: diffusers' pipelines draw
it from the global RNG, ldm_mini from the generator (or the given `noise`).
"""

from __future__ import annotations

import functools

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete, scheduling_lms_discrete
from helpers import save_pipeline, tiny_superres, tiny_txt2img, tiny_unconditional

import ldm_mini
from ldm_mini import load
from ldm_mini.pipeline import settings as pipeline_settings
from ldm_mini.pipeline import superres, txt2img, unconditional
from weights_tools.convert import convert

ATOL = 1e-5
STEPS = 6
PROMPTS = ["a red circle above a blue square", "a painting of a squirrel eating a burger"]
# Without scipy, diffusers.LMSDiscreteScheduler is a placeholder; the module's class is real (conftest).
LMSDiscreteScheduler = scheduling_lms_discrete.LMSDiscreteScheduler


def close(name, ours, ref, atol=ATOL):
    ours, ref = torch.as_tensor(np.asarray(ours)), torch.as_tensor(np.asarray(ref))
    torch.testing.assert_close(ours, ref, rtol=0, atol=atol)
    diff = (ours - ref).abs().max().item()
    print(f"max abs diff {name}: {diff:.2e}")  # pytest -s shows the measured differences
    return diff


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def with_scheduler(pipe, scheduler):
    """The same diffusers pipeline (shared modules) with another scheduler."""
    pipe = type(pipe)(**{**pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inject_step_noise(monkeypatch, scheduler, noise):
    """Make scheduler.step use noise[i] at step i: DDIM and DPM-Solver++ SDE through their variance_noise
    argument, DDPM (which has none) by replacing the randn_tensor it draws with. functools.wraps keeps step's
    signature, which the pipelines inspect for `eta`."""
    original, step = scheduler.step, {"i": -1}

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        step["i"] += 1
        if isinstance(scheduler, DDIMScheduler | DPMSolverMultistepScheduler):
            kwargs["variance_noise"] = noise[step["i"]]
        return original(*args, **kwargs)

    monkeypatch.setattr(scheduler, "step", wrapped)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: noise[step["i"]])


def build(tmp_path_factory, name, make):
    tmp = tmp_path_factory.mktemp(name)
    pipe = make(tmp) if name == "txt2img" else make()
    pipe.set_progress_bar_config(disable=True)
    return pipe, load(convert(save_pipeline(pipe, tmp / "pipe"), tmp / "model.safetensors"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~50x faster than two contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    return build(tmp_path_factory, "txt2img", tiny_txt2img)


@pytest.fixture(scope="module")
def uncond(tmp_path_factory):
    return build(tmp_path_factory, "uncond", tiny_unconditional)


@pytest.fixture(scope="module")
def sr(tmp_path_factory):
    return build(tmp_path_factory, "superres", tiny_superres)


# --- txt2img ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch, size, scale, eta, overrides", [
    (1, (32, 32), 1.0, 0.0, {}),
    (2, (32, 48), 3.0, 0.0, {}),
    (2, (32, 32), 1.0, 0.7, {}),
    (2, (48, 32), 4.0, 1.0, {"steps_offset": 0, "set_alpha_to_one": True}),
])  # fmt: skip
def test_txt2img_ddim_matches_diffusers(t2i, monkeypatch, batch, size, scale, eta, overrides):
    pipe, m = t2i
    assert m.downsample_factor == 4  # diffusers hard-codes height // 8: ask it for twice the size
    h, w = size
    noise = torch.randn(STEPS, batch, 4, h // 4, w // 4, generator=seeded(1)) if eta else None
    ours = txt2img(m, PROMPTS[:batch], num_inference_steps=STEPS, guidance_scale=scale, eta=eta, height=h,
                   width=w, generator=seeded(0), noise=noise, output_type="np", progress=False,
                   **overrides)  # fmt: skip
    ref_pipe = with_scheduler(pipe, DDIMScheduler.from_config(pipe.scheduler.config, **overrides))
    if eta:
        inject_step_noise(monkeypatch, ref_pipe.scheduler, noise)
    ref = ref_pipe(PROMPTS[:batch], 2 * h, 2 * w, STEPS, scale, eta, seeded(0), output_type="np").images
    assert ours.shape == (batch, h, w, 3)
    close(f"txt2img ddim batch {batch} scale {scale} eta {eta} {overrides}", ours, ref)


@pytest.mark.parametrize("sampler, scale", [("plms", 1.0), ("plms", 5.0), ("ddpm", 2.0)])
def test_txt2img_plms_and_ddpm_match_diffusers(t2i, monkeypatch, sampler, scale):
    """PLMS = PNDMScheduler(skip_prk_steps=True); DDPM = DDPMScheduler, both in LDMTextToImagePipeline."""
    pipe, m = t2i
    noise = torch.randn(STEPS, 2, 4, 8, 8, generator=seeded(1)) if sampler == "ddpm" else None
    ours = txt2img(m, PROMPTS, num_inference_steps=STEPS, guidance_scale=scale, height=32, width=32,
                   generator=seeded(0), noise=noise, sampler=sampler, output_type="np",
                   progress=False)  # fmt: skip
    if sampler == "plms":
        scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    else:
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        inject_step_noise(monkeypatch, scheduler, noise)
    ref_pipe = with_scheduler(pipe, scheduler)
    ref = ref_pipe(PROMPTS, 64, 64, STEPS, scale, 0.0, seeded(0), output_type="np").images
    close(f"txt2img {sampler} scale {scale}", ours, ref)


# --- the sigma-space samplers: against diffusers' schedulers, used as a correct pipeline uses them ----------
STOCHASTIC = ("euler_ancestral", "dpmpp_2m_sde")


def sigma_scheduler(config, sampler, sigmas=None, spacing=None):
    """diffusers' scheduler for `sampler`, from the pipeline's (DDIM) config as a user would make it; the
    config's default timestep_spacing is not carried over: each scheduler's own default ("linspace") holds."""
    kw = {} if sigmas is None else {f"use_{sigmas}_sigmas": True}
    if spacing is not None:
        kw["timestep_spacing"] = spacing
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        kw["algorithm_type"] = "dpmsolver++" if sampler == "dpmpp_2m" else "sde-dpmsolver++"
    classes = {"lms": LMSDiscreteScheduler, "euler": EulerDiscreteScheduler,
               "euler_ancestral": EulerAncestralDiscreteScheduler, "heun": HeunDiscreteScheduler,
               "dpm_2": KDPM2DiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
               "dpmpp_2m_sde": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}  # fmt: skip
    return classes[sampler].from_config(config, **kw)


@torch.no_grad()
def correct_loop(pipe, scheduler, prompts, scale, monkeypatch, noise=None):
    """LDMTextToImagePipeline's loop with the scheduler's init_noise_sigma and scale_model_input, which that
    pipeline never applies, and noise[i] as the step noise of the stochastic schedulers."""
    tokens = functools.partial(pipe.tokenizer, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt")  # fmt: skip
    cond, uncond = (pipe.bert(tokens(p).input_ids)[0] for p in (prompts, [""] * len(prompts)))
    scheduler.set_timesteps(STEPS)
    z = torch.randn(len(prompts), 4, 8, 8, generator=seeded(0)) * scheduler.init_noise_sigma
    step = {"i": -1}
    if isinstance(scheduler, EulerAncestralDiscreteScheduler):  # its step() draws: hand it noise[i]
        draw = lambda *a, **k: noise[step["i"]]  # noqa: E731
        monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", draw)
    sde = getattr(scheduler.config, "algorithm_type", None) == "sde-dpmsolver++"
    for t in scheduler.timesteps:
        step["i"] += 1
        z_in = scheduler.scale_model_input(torch.cat([z, z]), t)
        e_uc, e_c = pipe.unet(z_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        kw = {"variance_noise": noise[step["i"]]} if sde else {}
        z = scheduler.step(e_uc + scale * (e_c - e_uc), t, z, **kw).prev_sample
    image = pipe.vqvae.decode(z / pipe.vqvae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


SIGMA_CASES = [  # (sampler, sigmas, timestep_spacing); None: the default (the model's sigmas, "linspace")
    ("lms", None, None), ("lms", None, "leading"), ("lms", "karras", None), ("euler", None, None),
    ("euler", "karras", None), ("euler_ancestral", None, "trailing"), ("heun", None, None),
    ("heun", "exponential", None), ("dpm_2", None, None), ("dpm_2", "karras", None), ("dpmpp_2m", None, None),
    ("dpmpp_2m", "karras", None), ("dpmpp_2m_sde", "karras", None), ("unipc", None, None),
    ("unipc", "exponential", "leading"),
]  # fmt: skip


@pytest.mark.parametrize("sampler, sigmas, spacing", SIGMA_CASES)
def test_txt2img_sigma_space_samplers_match_a_correct_diffusers_loop(t2i, lms_reference, monkeypatch, sampler,
                                                                     sigmas, spacing):  # fmt: skip
    """Their default is diffusers' (and k-diffusion's) for them, "linspace", whatever the file's DDIM spacing
    (here "leading", recorded from the DDIM config): the scheduler a user builds with from_config."""
    pipe, m = t2i
    scale = 3.0
    noise = torch.randn(STEPS, 2, 4, 8, 8, generator=seeded(1)) if sampler in STOCHASTIC else None
    ours = txt2img(m, PROMPTS, num_inference_steps=STEPS, guidance_scale=scale, height=32, width=32,
                   generator=seeded(0), sampler=sampler, sigmas=sigmas, timestep_spacing=spacing, noise=noise,
                   output_type="np", progress=False)  # fmt: skip
    scheduler = sigma_scheduler(pipe.scheduler.config, sampler, sigmas, spacing)
    assert scheduler.config.timestep_spacing == (spacing or "linspace")
    ref = correct_loop(pipe, scheduler, PROMPTS, scale, monkeypatch, noise)
    close(f"txt2img {sampler} {sigmas} {spacing} vs correct loop", ours, ref)
    if sampler == "lms" and spacing is None:  # LMSDiscreteScheduler in LDMTextToImagePipeline: another image
        wrong = with_scheduler(pipe, LMSDiscreteScheduler.from_config(pipe.scheduler.config))
        with pytest.warns(UserWarning, match="scale_model_input"):  # diffusers' own warning
            wrong = wrong(PROMPTS, 64, 64, STEPS, scale, 0.0, seeded(0), output_type="np").images
        assert np.abs(wrong - ours).max() > 1e-2


@pytest.mark.parametrize(
    "sampler, sigmas", [("dpmpp_2m", None), ("dpmpp_2m_sde", "karras"), ("unipc", "karras")]
)
def test_txt2img_dpmpp_and_unipc_match_the_diffusers_pipeline(t2i, monkeypatch, sampler, sigmas):
    """DPM-Solver++ and UniPC need no init_noise_sigma nor scale_model_input (both are 1): the diffusers
    pipeline LDMTextToImagePipeline itself runs them right."""
    pipe, m = t2i
    noise = torch.randn(STEPS, 2, 4, 8, 8, generator=seeded(1)) if sampler in STOCHASTIC else None
    ours = txt2img(m, PROMPTS, num_inference_steps=STEPS, guidance_scale=4.0, height=32, width=32,
                   generator=seeded(0), sampler=sampler, sigmas=sigmas, noise=noise, output_type="np",
                   progress=False)  # fmt: skip
    ref_pipe = with_scheduler(pipe, sigma_scheduler(pipe.scheduler.config, sampler, sigmas))
    if noise is not None:
        inject_step_noise(monkeypatch, ref_pipe.scheduler, noise)
    ref = ref_pipe(PROMPTS, 64, 64, STEPS, 4.0, 0.0, seeded(0), output_type="np").images
    close(f"txt2img {sampler} {sigmas} vs LDMTextToImagePipeline", ours, ref)


def test_txt2img_step_noise_comes_from_the_generator(t2i):
    """eta > 0 without `noise`: x_T, then one draw per step, all from the generator (diffusers: global
    RNG)."""
    _, m = t2i
    g = seeded(5)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.stack([torch.randn(2, 4, 8, 8, generator=g) for _ in range(STEPS)])
    kwargs = dict(num_inference_steps=STEPS, eta=0.5, height=32, width=32, output_type="latent")
    drawn = txt2img(m, PROMPTS, generator=seeded(5), progress=False, **kwargs)
    assert torch.equal(drawn, txt2img(m, PROMPTS, latents=x_T, noise=noise, progress=False, **kwargs))


def test_txt2img_same_seed_same_image_and_output_types(t2i):
    _, m = t2i
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=2.0, eta=0.3, height=32, width=32, progress=False)
    a = txt2img(m, PROMPTS, generator=seeded(7), output_type="np", **kwargs)
    assert np.array_equal(a, txt2img(m, PROMPTS, generator=seeded(7), output_type="np", **kwargs))
    assert np.abs(a - txt2img(m, PROMPTS, generator=seeded(8), output_type="np", **kwargs)).max() > 1e-2
    pil = txt2img(m, PROMPTS, generator=seeded(7), **kwargs)
    assert [p.size for p in pil] == [(32, 32)] * 2 and all(isinstance(p, PIL.Image.Image) for p in pil)
    assert np.array_equal(np.stack([np.asarray(p) for p in pil]), (a * 255).round().astype(np.uint8))
    z = txt2img(m, PROMPTS, generator=seeded(7), output_type="latent", **kwargs)
    pt = txt2img(m, PROMPTS, generator=seeded(7), output_type="pt", **kwargs)
    assert z.shape == (2, 4, 8, 8) and pt.shape == (2, 3, 32, 32)
    assert torch.equal(pt, (m.decode(z) / 2 + 0.5).clamp(0, 1))


def test_txt2img_intermediates_and_attention(t2i):
    _, m = t2i
    name = m.unet.cross_attention_layers()[-1][0]
    calls = []
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=3.0, height=32, width=48, sampler="plms",
                  output_type="latent", progress=False)  # fmt: skip
    z, trace = txt2img(m, PROMPTS, generator=seeded(0), return_intermediates=True, attention_layer=name,
                       callback=calls.append, **kwargs)  # fmt: skip
    assert len(calls) == len(trace["x_t"]) == len(trace["x0"]) == len(trace["attention"]) == STEPS
    assert trace["timesteps"] == [831, 665, 499, 333, 167, 1]  # the CompVis convention recorded in the file
    assert torch.equal(trace["x_t"][-1], z)
    assert torch.equal(z, txt2img(m, PROMPTS, generator=seeded(0), **kwargs))  # recording changes nothing
    heads = trace["attention"][0].shape[1]
    assert trace["attention"][0].shape == (2, heads, 8 * 12, 77)  # conditional half, (B, heads, h*w, L)
    torch.testing.assert_close(trace["attention"][2].sum(-1), torch.ones(2, heads, 96), rtol=0, atol=1e-5)
    layers = [mod for _, mod in m.unet.cross_attention_layers()]
    assert all(not mod.keep_attention and mod.attention_probs is None for mod in layers)  # nothing kept


# --- unconditional and superres ---------------------------------------------------------------------
@pytest.mark.parametrize("batch, eta", [(1, 0.0), (2, 0.0), (2, 1.0)])
def test_unconditional_matches_diffusers(uncond, monkeypatch, batch, eta):
    pipe, m = uncond
    assert (m.downsample_factor, m.scale_factor, pipe.vqvae.config.scaling_factor) == (2, 1.0, 1.0)
    noise = torch.randn(STEPS, batch, 3, 8, 8, generator=seeded(1)) if eta else None
    ours = unconditional(m, batch, num_inference_steps=STEPS, eta=eta, generator=seeded(0), noise=noise,
                         height=16, width=16, output_type="np", progress=False)  # fmt: skip
    ref_pipe = with_scheduler(pipe, DDIMScheduler.from_config(pipe.scheduler.config))
    if eta:
        inject_step_noise(monkeypatch, ref_pipe.scheduler, noise)
    ref = ref_pipe(batch, seeded(0), eta, STEPS, output_type="np").images
    close(f"unconditional batch {batch} eta {eta}", ours, ref)


@pytest.mark.parametrize("source, eta", [("tensor", 0.0), ("tensor", 1.0), ("pil", 1.0)])
def test_superres_matches_diffusers(sr, monkeypatch, source, eta):
    pipe, m = sr
    if source == "pil":  # resized down to 32 x 32 (a multiple of 32) by both
        rgb = torch.randint(0, 256, (37, 45, 3), generator=seeded(2), dtype=torch.uint8).numpy()
        image, batch, size = PIL.Image.fromarray(rgb), 1, 32
    else:
        image, batch, size = torch.rand(2, 3, 8, 12, generator=seeded(2)) * 2 - 1, 2, (8, 12)
    shape = (batch, 3, *((size, size) if source == "pil" else size))
    noise = torch.randn(STEPS, *shape, generator=seeded(1)) if eta else None
    ours = superres(m, image, num_inference_steps=STEPS, eta=eta, generator=seeded(0), noise=noise,
                    output_type="np", progress=False)  # fmt: skip
    ref_pipe = with_scheduler(pipe, DDIMScheduler.from_config(pipe.scheduler.config))
    if eta:
        inject_step_noise(monkeypatch, ref_pipe.scheduler, noise)
    ref = ref_pipe(image, num_inference_steps=STEPS, eta=eta, generator=seeded(0), output_type="np").images
    assert ours.shape == (batch, 2 * shape[2], 2 * shape[3], 3)  # VQ-f2 here: 2x the low-res size
    close(f"superres {source} eta {eta}", ours, ref)


@pytest.mark.parametrize("sampler, sigmas", [("heun", "karras"), ("unipc", None), ("euler", "exponential")])
def test_unconditional_sigma_space_samplers_match_diffusers(uncond, sampler, sigmas):
    """LDMPipeline applies init_noise_sigma (before set_timesteps: sigma_max either way for "linspace") and
    scale_model_input, so it runs every scheduler right."""
    pipe, m = uncond
    ours = unconditional(m, 2, num_inference_steps=STEPS, generator=seeded(0), sampler=sampler, sigmas=sigmas,
                         height=16, width=16, output_type="np", progress=False)  # fmt: skip
    ref_pipe = with_scheduler(pipe, sigma_scheduler(pipe.scheduler.config, sampler, sigmas))
    ref = ref_pipe(2, seeded(0), 0.0, STEPS, output_type="np").images
    close(f"unconditional {sampler} {sigmas}", ours, ref)


@pytest.mark.parametrize("sampler, sigmas", [("dpmpp_2m", "karras"), ("unipc", None)])
def test_superres_dpmpp_and_unipc_match_diffusers(sr, sampler, sigmas):
    """LDMSuperResolutionPipeline scales the concatenation [z_t, image] by scale_model_input (wrong for the
    sigma-space schedulers that scale, see the module docstring); DPM-Solver++'s and UniPC's is 1: right."""
    pipe, m = sr
    image = torch.rand(2, 3, 8, 12, generator=seeded(2)) * 2 - 1
    ours = superres(m, image, num_inference_steps=STEPS, generator=seeded(0), sampler=sampler, sigmas=sigmas,
                    output_type="np", progress=False)  # fmt: skip
    ref_pipe = with_scheduler(pipe, sigma_scheduler(pipe.scheduler.config, sampler, sigmas))
    ref = ref_pipe(image, num_inference_steps=STEPS, generator=seeded(0), output_type="np").images
    close(f"superres {sampler} {sigmas}", ours, ref)


# --- bad input: a clear ValueError before any compute ------------------------------------------------
BAD = [
    ("t2i", txt2img, dict(prompt=[]), "non-empty list of strings"),
    ("t2i", txt2img, dict(prompt=["a", 3]), "non-empty list of strings"),
    ("t2i", txt2img, dict(prompt="a", num_inference_steps=0), "from 1 to 1000"),
    ("t2i", txt2img, dict(prompt="a", num_inference_steps=2.5), "from 1 to 1000"),
    ("t2i", txt2img, dict(prompt="a", height=30), "height must be a positive multiple of 4"),
    ("t2i", txt2img, dict(prompt="a", sampler="euler_a"), "unknown sampler 'euler_a'"),
    ("t2i", txt2img, dict(prompt="a", sigmas="karras"), r"'ddim' has no option\(s\) \['sigmas'\]"),
    ("t2i", txt2img, dict(prompt="a", sampler="heun", sigmas="rho7"), "unknown sigmas 'rho7'"),
    (
        "t2i",
        txt2img,
        dict(prompt="a", sampler="euler", noise=torch.zeros(6, 1, 4, 8, 8)),
        "'euler' is determin",
    ),
    ("t2i", txt2img, dict(prompt="a", sampler="dpmpp_2m", num_inference_steps=1000), "at most 999 steps"),
    ("t2i", txt2img, dict(prompt="a", output_type="jpg"), "unknown output_type 'jpg'"),
    ("t2i", txt2img, dict(prompt="a", sampler="plms", eta=0.5), "needs sampler='ddim'"),
    ("t2i", txt2img, dict(prompt="a", eta=-1.0), "eta >= 0"),
    ("t2i", txt2img, dict(prompt="a", eta=1, noise=torch.zeros(3, 1, 4, 8, 8)), rf"\({STEPS}, 1, 4, 8, 8"),
    ("t2i", txt2img, dict(prompt="a", latents=torch.zeros(1, 4, 4, 4)), r"shape \(1, 4, 8, 8\)"),
    ("t2i", txt2img, dict(prompt="a", sampler="lms", set_alpha_to_one=True), "no option.*set_alpha_to_one"),
    ("t2i", txt2img, dict(prompt="a", attention_layer="nope"), "no cross-attention layer 'nope'"),
    ("t2i", unconditional, dict(), "use ldm_mini.txt2img"),
    ("uncond", txt2img, dict(prompt="a"), "use ldm_mini.unconditional"),
    ("uncond", unconditional, dict(batch_size=0), "batch_size must be a positive integer"),
    ("sr", superres, dict(image=torch.rand(1, 3, 8, 8) * 255), r"in \[-1, 1\]"),
    ("sr", superres, dict(image=torch.rand(3, 8, 8)), r"\(B, 3, h, w\)"),
    ("sr", superres, dict(image=PIL.Image.new("RGB", (40, 1))), "must be at least"),
]


@pytest.mark.parametrize("fixture, fn, kwargs, message", BAD, ids=[b[3][:30] for b in BAD])
def test_bad_input_fails_before_compute(request, monkeypatch, fixture, fn, kwargs, message):
    _, m = request.getfixturevalue(fixture)

    def boom(*args, **kw):
        raise AssertionError("computed before rejecting bad input")

    for method in ("encode_text", "predict_noise", "decode"):
        monkeypatch.setattr(m, method, boom)
    defaults = dict(num_inference_steps=STEPS, progress=False)
    if fn is txt2img:
        defaults.update(height=32, width=32)
    with pytest.raises(ValueError, match=message):
        fn(m, **{**defaults, **kwargs})


# --- defaults and the calling convention ----------------------------------------------------------------
def test_every_pipeline_defaults_to_the_trained_size_and_diffusers_settings(t2i, uncond, sr):
    (_, t), (_, u), (_, s) = t2i, uncond, sr
    assert (
        t.recommended == u.recommended == s.recommended == {}
    )  # converted diffusers folders recommend nothing
    assert (t.default_size, u.default_size) == (8 * 4, 8 * 2)  # sample_size 8 times the autoencoder factor
    assert txt2img(t, "a", num_inference_steps=1, progress=False)[0].size == (32, 32)
    assert unconditional(u, num_inference_steps=1, progress=False)[0].size == (16, 16)
    low = torch.rand(1, 3, 8, 8) * 2 - 1
    assert superres(s, low, num_inference_steps=1, progress=False)[0].size == (16, 16)  # 2x the input here
    calls = []
    txt2img(t, "a", progress=False, callback=calls.append, output_type="latent")
    assert len(calls) == 50  # diffusers' 50 steps; guidance 1.0: one UNet call per step
    assert pipeline_settings(t, "txt2img") == dict(
        num_inference_steps=50,
        guidance_scale=1.0,
        eta=0.0,
        sampler="ddim",
        height=32,
        width=32,
        options={"eta": 0.0},
    )


def test_the_files_recommended_settings_are_the_defaults_and_a_call_overrides_them(t2i, tmp_path):
    _, m = t2i
    rec = ldm_mini.save(
        m, tmp_path / "rec.safetensors", recommended={"steps": 3, "guidance": 2.5, "eta": 0.5}
    )
    r = load(rec)
    assert r.recommended == {"steps": 3, "guidance": 2.5, "eta": 0.5}
    s = pipeline_settings(r, "txt2img", num_inference_steps=4, sampler="ddim")
    assert (s["num_inference_steps"], s["guidance_scale"], s["eta"], s["sampler"]) == (4, 2.5, 0.5, "ddim")
    kw = dict(progress=False, output_type="latent")
    given = txt2img(m, PROMPTS, num_inference_steps=3, guidance_scale=2.5, eta=0.5, generator=seeded(3), **kw)
    assert torch.equal(txt2img(r, PROMPTS, generator=seeded(3), **kw), given)
    with pytest.raises(ValueError, match="unknown recommended setting 'stpes'"):
        ldm_mini.save(m, tmp_path / "bad.safetensors", recommended={"stpes": 3})


def test_settings_after_the_first_arguments_are_keyword_only(t2i, uncond, sr):
    """Written as for diffusers, txt2img(m, p, 256, 256) must not mean 256 steps at guidance 256."""
    for fn, first, model in ((txt2img, "a", t2i[1]), (superres, torch.zeros(1, 3, 8, 8), sr[1])):
        with pytest.raises(TypeError, match="positional"):
            fn(model, first, 32, 32)
    with pytest.raises(TypeError, match="positional"):
        unconditional(uncond[1], 1, 32)


def test_a_list_of_generators_makes_each_image_its_own(t2i):
    """As in diffusers: generator[i] draws image i alone (x_T and, with eta > 0, every step's noise), so a
    batch holds the images that its generators give one by one."""
    _, m = t2i
    kw = dict(num_inference_steps=STEPS, guidance_scale=2.0, eta=0.7, output_type="latent", progress=False)
    batch = txt2img(m, PROMPTS, generator=[seeded(1), seeded(2)], **kw)
    draws = []  # what each generator gives a batch of one: x_T, then one noise per step
    for seed in (1, 2):
        g = seeded(seed)
        draws.append([torch.randn(1, 4, 8, 8, generator=g) for _ in range(STEPS + 1)])
    x_T = torch.cat([d[0] for d in draws])
    noise = torch.stack([torch.cat([d[i + 1] for d in draws]) for i in range(STEPS)])
    assert torch.equal(batch, txt2img(m, PROMPTS, latents=x_T, noise=noise, **kw))  # exactly those draws
    one = [txt2img(m, [p], generator=seeded(s), **kw) for p, s in zip(PROMPTS, (1, 2), strict=True)]
    # the same images: a batch of two runs other float32 kernels (round-off ~1e-6 of latents of order 5)
    torch.testing.assert_close(batch, torch.cat(one), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="list of 1 generators for a batch of 2"):
        txt2img(m, PROMPTS, generator=[seeded(1)], **kw)


def test_an_unknown_word_is_named_once_with_where_the_vocabulary_is(t2i):
    _, m = t2i
    with pytest.warns(UserWarning, match=r"has no 'zebra', 'xyz'.*ldm-mini info WEIGHTS --vocab") as caught:
        m.tokenize(["a zebra and a xyz", "a zebra"])
    assert len(caught) == 1
    assert m.tokenizer.unknown_words("a red circle above a blue square") == []
    assert m.tokenizer.unknown_words("the cats, painting!") == []  # cat ##s: pieces longer than a letter
    with pytest.warns(UserWarning, match="is 90 tokens long: only its first 75 are read"):
        m.tokenize("red " * 90)
