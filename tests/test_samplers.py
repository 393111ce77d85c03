"""Sampler parity against diffusers' schedulers, each driven by a hand-written reference loop.

The model is a fake: a tiny fixed random eps predictor with the attributes of the LatentDiffusion
container that samplers use (predict_noise, alphas_cumprod, schedule). Every step's latent and the
final one are compared in float32 with assert_close(rtol=0, atol=1e-5). Then the one contract of all
samplers: the callback's z and x0 in the UNet's space, step functions that change no argument, and the
checks (check_settings, SAMPLER_OPTIONS) a pipeline can call before any work.
"""

import inspect
import math

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
from torch import Tensor, nn

from ldm_mini import ksamplers, samplers, schedule
from ldm_mini.schedule import ScheduleConfig, make_alphas_cumprod

# Without scipy, `diffusers.LMSDiscreteScheduler` is a placeholder that raises; the module's class is real
# and needs scipy.integrate.quad only in step() (see the lms_reference fixture).
LMSDiscreteScheduler = scheduling_lms_discrete.LMSDiscreteScheduler

ATOL = 1e-5  # float32 on CPU: a miss here is a real difference, not rounding
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # ldm-text2im-large-256


class FakeLDM(nn.Module):
    """A stand-in for LatentDiffusion: eps(z, t, cond) = sqrt(1 - ab_t) z + 0.2 tanh(conv(z) cos(t / 300)
    + sin(t / 70) / 10 + W mean(cond)). The first term is the exact eps of unit-Gaussian data, so latents
    stay O(1) as with a trained model; the second depends on z, t (int or fractional) and the text context.
    "superres" concatenates cond (an image) to z before the conv."""

    def __init__(self, schedule=None, kind="txt2img", channels=4, context_dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.kind = kind
        self.schedule = schedule or ScheduleConfig(**BETAS)
        self.register_buffer("alphas_cumprod", make_alphas_cumprod(self.schedule), persistent=False)
        c_in = 2 * channels if kind == "superres" else channels
        self.conv = nn.Conv2d(c_in, channels, 3, padding=1)
        self.ctx = nn.Linear(context_dim, channels)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.calls = []  # (batch, t) of every model call

    @torch.no_grad()
    def predict_noise(self, z, t, cond=None):
        t = torch.as_tensor(t).float()
        self.calls.append((z.shape[0], t.flatten()[0].item()))
        t = t.reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
        ab = self.alphas_cumprod[t.round().long().clamp(0, len(self.alphas_cumprod) - 1)]
        h = self.conv(torch.cat([z, cond], dim=1) if self.kind == "superres" else z)  # (B, c, h, w)
        h = h * torch.cos(t / 300) + torch.sin(t / 70) / 10
        if self.kind == "txt2img" and cond is not None:
            h = h + self.ctx(cond.mean(1))[:, :, None, None]  # (B, L, D) -> (B, c, 1, 1)
        return (1 - ab).sqrt() * z + 0.2 * torch.tanh(h)


def inputs(batch=2, seed=0):
    """x_T (B, 4, 8, 8), cond and uncond contexts (B, 5, 8)."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.randn(batch, 5, 8, generator=g),
        torch.randn(batch, 5, 8, generator=g),
    )


@torch.no_grad()
def reference_loop(sched, m, x_T, num_steps, cond, uncond, scale, step_kwargs=lambda i: {}):
    """What a correct diffusers pipeline does (LDMTextToImagePipeline's guidance, plus init_noise_sigma
    and scale_model_input as in LDMPipeline). Returns the latents and predicted x_0 after each step."""
    sched.set_timesteps(num_steps)
    z = x_T * sched.init_noise_sigma
    zs, x0s = [], []
    for i, t in enumerate(sched.timesteps):
        z_in = sched.scale_model_input(z, t)
        if scale == 1.0:
            eps = m.predict_noise(z_in, t, cond)
        else:
            e_uc, e_c = m.predict_noise(torch.cat([z_in] * 2), t, torch.cat([uncond, cond])).chunk(2)
            eps = e_uc + scale * (e_c - e_uc)
        out = sched.step(eps, t, z, **step_kwargs(i))
        z = out.prev_sample
        zs.append(z)
        x0s.append(getattr(out, "pred_original_sample", None))
    return zs, x0s


def run(sampler, m, x_T, **kw):
    """Our sampler with a callback that keeps every step's dict."""
    steps = []
    z0 = sampler(m, x_T, callback=steps.append, progress=False, **kw)
    return z0, steps


def assert_steps_close(z0, steps, ref_zs, ref_x0s=None):
    """Every step's latent (and predicted x_0 when given) and the final latent, in one stacked compare
    each: a mismatch reports its index as (step, batch, channel, y, x)."""
    assert [s["i"] for s in steps] == list(range(len(ref_zs)))
    torch.testing.assert_close(torch.stack([s["z"] for s in steps]), torch.stack(ref_zs), rtol=0, atol=ATOL)
    if ref_x0s is not None:
        torch.testing.assert_close(
            torch.stack([s["x0"] for s in steps]), torch.stack(ref_x0s), rtol=0, atol=ATOL
        )
    torch.testing.assert_close(z0, ref_zs[-1], rtol=0, atol=ATOL)


# --- DDIM -----------------------------------------------------------------------------------------
SETTINGS = [  # (timestep_spacing, steps_offset, set_alpha_to_one)
    ("leading", 0, True),  # diffusers' DDIMScheduler defaults
    ("leading", 1, False),  # the CompVis convention
    ("trailing", 0, True),
    ("linspace", 0, False),
]


# (eta, guidance) (0, 1) and (0.7, 5) for every setting; the other two for diffusers' defaults.
DDIM_CASES = [(*c, eta, scale) for c in SETTINGS for eta, scale in [(0.0, 1.0), (0.7, 5.0)]]
DDIM_CASES += [(*SETTINGS[0], 0.0, 5.0), (*SETTINGS[0], 0.7, 1.0)]


@pytest.mark.parametrize("spacing, offset, alpha_one, eta, scale", DDIM_CASES)
@pytest.mark.parametrize("num_steps", [1, 7, 30])
def test_ddim_matches_diffusers(spacing, offset, alpha_one, num_steps, eta, scale):
    m = FakeLDM()
    x_T, cond, uncond = inputs()
    noise = torch.randn(num_steps, *x_T.shape, generator=torch.Generator().manual_seed(1))
    sched = DDIMScheduler(
        **BETAS, clip_sample=False, set_alpha_to_one=alpha_one, steps_offset=offset, timestep_spacing=spacing
    )
    kwargs = (lambda i: {"eta": eta, "variance_noise": noise[i]}) if eta else (lambda i: {"eta": 0.0})
    ref_zs, ref_x0s = reference_loop(sched, m, x_T, num_steps, cond, uncond, scale, kwargs)
    z0, steps = run(
        samplers.ddim,
        m,
        x_T,
        num_steps=num_steps,
        cond=cond,
        uncond=uncond,
        guidance_scale=scale,
        eta=eta,
        noise=noise if eta else None,
        steps_offset=offset,
        set_alpha_to_one=alpha_one,
        timestep_spacing=spacing,
    )
    assert_steps_close(z0, steps, ref_zs, ref_x0s)
    assert [s["t"] for s in steps] == sched.timesteps.tolist()


def test_ddim_defaults_come_from_the_model_schedule():
    m = FakeLDM(ScheduleConfig(**BETAS, steps_offset=1, set_alpha_to_one=False))
    x_T, cond, _ = inputs()
    sched = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref_zs, _ = reference_loop(sched, m, x_T, 10, cond, None, 1.0)
    z0, steps = run(samplers.ddim, m, x_T, num_steps=10, cond=cond)
    assert_steps_close(z0, steps, ref_zs)
    assert steps[-1]["t"] == 1


def test_ddim_clip_sample_and_superres_cond():
    m = FakeLDM(ScheduleConfig(**BETAS, clip_sample=True), kind="superres")
    x_T, *_ = inputs()
    low_res = torch.rand(2, 4, 8, 8) * 2 - 1  # the low-res "image", concatenated, never guided
    sched = DDIMScheduler(**BETAS, clip_sample=True)
    ref_zs, ref_x0s = reference_loop(sched, m, x_T, 20, low_res, None, 1.0)
    assert_steps_close(*run(samplers.ddim, m, x_T, num_steps=20, cond=low_res), ref_zs, ref_x0s)


def test_unrolled_celebahq_loop_equals_ddim():
    # The ldm-celebahq-256 model card loop (noise -> predict noise, one step -> decode), with our parts.
    m = FakeLDM(kind="unconditional")
    z = x_T = inputs()[0]
    ts = schedule.ddim_timesteps(20)
    for t, (a_t, a_prev) in zip(ts, schedule.ddim_alphas(m.alphas_cumprod, ts), strict=True):
        eps = m.predict_noise(z, t)
        z, _ = samplers.ddim_step(z, eps, a_t, a_prev)
    torch.testing.assert_close(z, samplers.ddim(m, x_T, num_steps=20, progress=False), rtol=0, atol=0)


# --- DDPM -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "num_steps, spacing, offset, scale",
    [
        (1000, "leading", 0, 1.0),
        (50, "leading", 0, 5.0),
        (7, "leading", 1, 5.0),
        (10, "trailing", 0, 1.0),
        (10, "linspace", 0, 5.0),
    ],
)
def test_ddpm_matches_diffusers_with_injected_noise(monkeypatch, num_steps, spacing, offset, scale):
    m = FakeLDM()
    x_T, cond, uncond = inputs()
    noise = torch.randn(num_steps, *x_T.shape, generator=torch.Generator().manual_seed(1))
    step = {"i": None}
    # DDPMScheduler.step has no variance_noise argument: hand it noise[i] where it draws.
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: noise[step["i"]])
    sched = DDPMScheduler(
        **BETAS, variance_type="fixed_small", clip_sample=False, timestep_spacing=spacing, steps_offset=offset
    )
    ref_zs, ref_x0s = reference_loop(
        sched, m, x_T, num_steps, cond, uncond, scale, lambda i: step.update(i=i) or {}
    )
    z0, steps = run(
        samplers.ddpm,
        m,
        x_T,
        num_steps=num_steps,
        cond=cond,
        uncond=uncond,
        guidance_scale=scale,
        noise=noise,
        steps_offset=offset,
        timestep_spacing=spacing,
    )
    assert_steps_close(z0, steps, ref_zs, ref_x0s)


def test_ddpm_matches_diffusers_with_the_same_generator():
    m = FakeLDM(kind="unconditional")
    x_T, *_ = inputs()
    sched = DDPMScheduler(**BETAS, clip_sample=False)
    g = torch.Generator().manual_seed(7)
    ref_zs, _ = reference_loop(sched, m, x_T, 30, None, None, 1.0, lambda i: {"generator": g})
    z0, steps = run(samplers.ddpm, m, x_T, num_steps=30, generator=torch.Generator().manual_seed(7))
    assert_steps_close(z0, steps, ref_zs)


@pytest.mark.parametrize(
    "sampler, kw", [(samplers.ddpm, {"num_steps": 20}), (samplers.ddim, {"num_steps": 20, "eta": 1.0})]
)
def test_generator_determinism(sampler, kw):
    m = FakeLDM(kind="unconditional")
    x_T = inputs()[0]

    def sample(seed):
        return sampler(m, x_T, generator=torch.Generator().manual_seed(seed), progress=False, **kw)

    torch.testing.assert_close(sample(3), sample(3), rtol=0, atol=0)
    assert (sample(3) - sample(4)).abs().max() > 1e-2


# --- PLMS -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spacing, offset, alpha_one, scale", [(*c, s) for c, s in zip(SETTINGS, [1.0, 5.0] * 2, strict=True)]
)
@pytest.mark.parametrize("num_steps", [1, 2, 5, 30])
def test_plms_matches_diffusers_pndm(spacing, offset, alpha_one, num_steps, scale):
    m = FakeLDM()
    x_T, cond, uncond = inputs()
    sched = PNDMScheduler(
        **BETAS,
        skip_prk_steps=True,
        set_alpha_to_one=alpha_one,
        steps_offset=offset,
        timestep_spacing=spacing,
    )
    ref_zs, _ = reference_loop(sched, m, x_T, num_steps, cond, uncond, scale)
    m.calls.clear()
    z0, steps = run(
        samplers.plms,
        m,
        x_T,
        num_steps=num_steps,
        cond=cond,
        uncond=uncond,
        guidance_scale=scale,
        steps_offset=offset,
        set_alpha_to_one=alpha_one,
        timestep_spacing=spacing,
    )
    # diffusers' first step() returns the trial state of the pseudo improved-Euler step: skip it.
    assert_steps_close(z0, steps, ref_zs[1:] if num_steps > 1 else ref_zs)
    assert len(m.calls) == len(sched.timesteps) == num_steps + (num_steps > 1)


def test_plms_step_is_the_ddim_update():
    # PNDM's Eq. 9 is DDIM's Eq. 12 with eta = 0, rearranged: equal up to float32 rounding.
    ab = make_alphas_cumprod(ScheduleConfig(**BETAS))
    z, eps = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for t, t_prev in [(999, 979), (500, 480), (20, 0)]:
        ours, x0 = samplers.plms_step(z, eps, ab[t], ab[t_prev])
        ddim, ddim_x0 = samplers.ddim_step(z, eps, ab[t], ab[t_prev])
        torch.testing.assert_close(ours, ddim, rtol=0, atol=1e-5)
        torch.testing.assert_close(x0, ddim_x0, rtol=0, atol=0)


def test_plms_eps_is_adams_bashforth():
    e = [torch.full((1,), float(v)) for v in (1, 2, 3, 4, 5)]  # oldest first
    assert samplers.plms_eps(e[0], []).item() == 1
    assert samplers.plms_eps(e[1], e[:1]).item() == pytest.approx((3 * 2 - 1) / 2)
    assert samplers.plms_eps(e[4], e[:4]).item() == pytest.approx((55 * 5 - 59 * 4 + 37 * 3 - 9 * 2) / 24)


# --- LMS ------------------------------------------------------------------------------------------
def as_z_t(ref_zs, sigmas):
    """diffusers' LMS states (z_0 + sigma eps after step i, at sigmas[i + 1]) as the z_t the UNet sees."""
    return [z / (sigmas[i + 1] ** 2 + 1) ** 0.5 for i, z in enumerate(ref_zs)]


@pytest.mark.parametrize("spacing, offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("num_steps, order, scale", [(1, 4, 5.0), (7, 4, 1.0), (7, 2, 5.0), (30, 4, 5.0)])
def test_lms_matches_diffusers(lms_reference, spacing, offset, num_steps, order, scale):
    m = FakeLDM()
    x_T, cond, uncond = inputs()
    sched = LMSDiscreteScheduler(**BETAS, timestep_spacing=spacing, steps_offset=offset)
    ref_zs, ref_x0s = reference_loop(
        sched, m, x_T, num_steps, cond, uncond, scale, lambda i: {"order": order}
    )
    z0, steps = run(
        samplers.lms,
        m,
        x_T,
        num_steps=num_steps,
        cond=cond,
        uncond=uncond,
        guidance_scale=scale,
        order=order,
        steps_offset=offset,
        timestep_spacing=spacing,
    )
    # Latents only: x0 = z - sigma * eps cancels two terms of size |z| ~ 50 (x_T * sigma_max), whose
    # float32 ulp is 3.8e-6, so its rounding exceeds 1e-5; it is compared in float64 below.
    assert_steps_close(z0, steps, as_z_t(ref_zs, sched.sigmas))
    assert [s["t"] for s in steps] == sched.timesteps.tolist()  # fractional for linspace


def test_lms_x0_matches_diffusers_in_float64(lms_reference):
    m = FakeLDM().double()
    m.alphas_cumprod = make_alphas_cumprod(m.schedule)  # the schedule stays float32, as diffusers'
    x_T, cond, uncond = (x.double() for x in inputs())
    sched = LMSDiscreteScheduler(**BETAS)  # linspace
    ref_zs, ref_x0s = reference_loop(sched, m, x_T, 50, cond, uncond, 5.0)
    z0, steps = run(
        samplers.lms,
        m,
        x_T,
        num_steps=50,
        cond=cond,
        uncond=uncond,
        guidance_scale=5.0,
        timestep_spacing="linspace",
    )
    # 1e-6: diffusers evaluates the LMS polynomials in float32 inside scipy's quad (ours are exact).
    for s, ref_z, ref_x0 in zip(steps, as_z_t(ref_zs, sched.sigmas), ref_x0s, strict=True):
        torch.testing.assert_close(s["z"], ref_z, rtol=0, atol=1e-6)
        torch.testing.assert_close(s["x0"], ref_x0, rtol=0, atol=1e-6)


def test_lms_coefficients_integrate_the_lagrange_basis():
    sig = [14.6, 9.0, 5.5, 3.1, 1.2, 0.0]
    for i, order in [(0, 1), (1, 2), (3, 4), (4, 4)]:
        c = ksamplers.lms_coefficients(sig, i, order)
        assert sum(c) == pytest.approx(sig[i + 1] - sig[i], rel=1e-12)  # the basis sums to 1


# --- the sigma-space samplers (ksamplers.py) ---------------------------------------------------------
class KarrasEulerAncestral(EulerAncestralDiscreteScheduler):
    """diffusers' EulerAncestralDiscreteScheduler has no use_karras_sigmas / use_exponential_sigmas: it gets
    the sigmas and timesteps EulerDiscreteScheduler computes for them, and steps with its own step()."""

    def __init__(self, *args, sigma_schedule="karras", **kwargs):
        super().__init__(*args, **kwargs)
        self.sigma_schedule = sigma_schedule

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device)
        flag = {f"use_{self.sigma_schedule}_sigmas": True}
        other = EulerDiscreteScheduler.from_config(self.config, **flag)
        other.set_timesteps(num_inference_steps, device)
        self.sigmas, self.timesteps = other.sigmas, other.timesteps


def diffusers_scheduler(name, sigmas, spacing, offset):
    """diffusers' scheduler for our sampler `name`, as configured by default, with the sigma schedule."""
    flag = {} if sigmas is None else {f"use_{sigmas}_sigmas": True}
    kw = dict(**BETAS, timestep_spacing=spacing, steps_offset=offset)
    if name == "euler_ancestral":
        if sigmas is not None:
            return KarrasEulerAncestral(**kw, sigma_schedule=sigmas)
        return EulerAncestralDiscreteScheduler(**kw)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", **flag)
    if name == "dpmpp_2m_sde":
        return DPMSolverMultistepScheduler(**kw, algorithm_type="sde-dpmsolver++", **flag)
    classes = {"euler": EulerDiscreteScheduler, "heun": HeunDiscreteScheduler,
               "dpm_2": KDPM2DiscreteScheduler, "unipc": UniPCMultistepScheduler,
               "lms": LMSDiscreteScheduler}  # fmt: skip
    return classes[name](**kw, **flag)


TWO_CALLS = ("heun", "dpm_2")  # diffusers: two step() calls per step but the last
VE_STATE = ("euler", "euler_ancestral", "heun", "dpm_2", "lms")  # diffusers' state is z_t / sqrt(ab_t)


def levels(sched, name, num_steps):
    """The S + 1 sigmas of the steps (Heun's and KDPM2's scheduler lists repeat them, interleaved)."""
    if name in TWO_CALLS:
        return torch.cat([sched.sigmas[:1], sched.sigmas[1::2]])[: num_steps + 1]
    return sched.sigmas


def step_ends(name, num_steps):
    """Indices of diffusers' step() outputs that end one of our steps (Heun, KDPM2: the second-order ones)."""
    if name in TWO_CALLS:
        return [2 * i + 1 for i in range(num_steps - 1)] + [2 * num_steps - 2]
    return list(range(num_steps))


SIGMA_SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]
K_CASES = [  # (num_steps, guidance, timestep_spacing, steps_offset)
    (1, 5.0, "linspace", 0),
    (2, 1.0, "linspace", 0),
    (7, 5.0, "linspace", 0),
    (25, 5.0, "linspace", 0),
    (10, 1.0, "leading", 1),
    (10, 5.0, "trailing", 0),
]


@pytest.mark.parametrize("num_steps, scale, spacing, offset", K_CASES)
@pytest.mark.parametrize("sigmas", [None, "karras", "exponential"])
@pytest.mark.parametrize("name", SIGMA_SAMPLERS)
def test_sigma_space_samplers_match_diffusers(monkeypatch, lms_reference, name, sigmas, num_steps, scale,
                                              spacing, offset):  # fmt: skip
    m = FakeLDM()
    x_T, cond, uncond = inputs()
    noise = torch.randn(num_steps, *x_T.shape, generator=torch.Generator().manual_seed(1))
    sched = diffusers_scheduler(name, sigmas, spacing, offset)
    step_kwargs = lambda i: {}  # noqa: E731
    if name == "euler_ancestral":  # its step() has no variance_noise: hand it noise[i] where it draws
        step = {"i": -1}
        draw = lambda *a, **k: noise[step["i"]]  # noqa: E731
        monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", draw)
        step_kwargs = lambda i: step.update(i=i) or {}  # noqa: E731
    elif name == "dpmpp_2m_sde":
        step_kwargs = lambda i: {"variance_noise": noise[i]}  # noqa: E731
    ref_zs, ref_x0s = reference_loop(sched, m, x_T, num_steps, cond, uncond, scale, step_kwargs)
    ref_calls = [t for _, t in m.calls]
    m.calls.clear()
    kw = {"noise": noise} if name in ("euler_ancestral", "dpmpp_2m_sde") else {}
    z0, steps = run(samplers.SAMPLERS[name], m, x_T, num_steps=num_steps, cond=cond, uncond=uncond,
                    guidance_scale=scale, sigmas=sigmas, timestep_spacing=spacing, steps_offset=offset,
                    **kw)  # fmt: skip
    ends = step_ends(name, num_steps)
    ref_zs = [ref_zs[k] for k in ends]
    if name in VE_STATE:  # diffusers' state after step i, at sigma_{i+1}, as the UNet's z_t
        ref_zs = as_z_t(ref_zs, levels(sched, name, num_steps))
    assert_steps_close(z0, steps, ref_zs)
    diff = max((s["z"] - r).abs().max().item() for s, r in zip(steps, ref_zs, strict=True))
    if name in VE_STATE and name != "lms":  # (LMS: see test_lms_x0_matches_diffusers_in_float64)
        starts = [2 * i for i in range(num_steps)] if name in TWO_CALLS else range(num_steps)
        ours, ref = torch.stack([s["x0"] for s in steps]), torch.stack([ref_x0s[k] for k in starts])
        torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)
        diff = max(diff, (ours - ref).abs().max().item())
    print(f"max abs diff {name} {sigmas} S={num_steps} {spacing}: {diff:.1e}")  # pytest -s shows them
    # the same model calls: as many, at the same timesteps (DPM-2's midpoints: diffusers computes their t
    # in float32, we in float64, 1e-3 apart at most)
    calls = [t for _, t in m.calls]
    assert len(calls) == len(ref_calls) == len(sched.timesteps)
    atol = 1e-3 if name == "dpm_2" else 0
    torch.testing.assert_close(torch.tensor(calls), torch.tensor(ref_calls), rtol=0, atol=atol)
    starts = sched.timesteps[::2] if name in TWO_CALLS else sched.timesteps
    assert [
        s["t"] for s in steps
    ] == starts.float().tolist()  # KDPM2 keeps some in float64; the UNet: float32


@pytest.mark.parametrize("name, reference", [
    ("euler_ancestral", lambda: EulerAncestralDiscreteScheduler(**BETAS)),
    ("dpmpp_2m_sde", lambda: DPMSolverMultistepScheduler(**BETAS, algorithm_type="sde-dpmsolver++")),
])  # fmt: skip
def test_stochastic_samplers_draw_as_diffusers_with_the_same_generator(name, reference):
    m = FakeLDM(kind="unconditional")
    x_T, *_ = inputs()
    g = torch.Generator().manual_seed(7)
    ref_zs, _ = reference_loop(reference(), m, x_T, 8, None, None, 1.0, lambda i: {"generator": g})
    z0, steps = run(samplers.SAMPLERS[name], m, x_T, num_steps=8, generator=torch.Generator().manual_seed(7))
    sched = reference()
    sched.set_timesteps(8)
    assert_steps_close(z0, steps, as_z_t(ref_zs, sched.sigmas) if name == "euler_ancestral" else ref_zs)


def test_karras_and_exponential_sigmas_are_eq_5_and_its_limit():
    ab = make_alphas_cumprod(ScheduleConfig(**BETAS))
    lo, hi = schedule.model_sigmas(ab)[[0, -1]].tolist()
    k = schedule.karras_sigmas(lo, hi, 10)
    assert (k[0], k[-1]) == pytest.approx((hi, lo), rel=1e-12) and sorted(k, reverse=True) == k
    roots = [s ** (1 / 7) for s in k]  # Eq. 5: sigma^(1/rho) is linear in i
    assert max(abs(b - a - (roots[1] - roots[0])) for a, b in zip(roots, roots[1:], strict=False)) < 1e-12
    e = schedule.exponential_sigmas(lo, hi, 10)
    assert max(abs(math.log(b / a) - math.log(e[1] / e[0])) for a, b in zip(e, e[1:], strict=False)) < 1e-12
    big = schedule.karras_sigmas(lo, hi, 10, rho=1e6)  # rho -> infinity: the exponential schedule
    assert big == pytest.approx(e, rel=1e-4)


def test_sigma_to_t_inverts_the_model_sigmas():
    ab = make_alphas_cumprod(ScheduleConfig(**BETAS))
    train = schedule.model_sigmas(ab)
    ts = schedule.sigma_to_t(train[[0, 1, 500, 998, 999]].tolist(), ab, diffusers_rounding=False)
    assert ts == pytest.approx([0, 1, 500, 998, 999], abs=1e-9)
    mid = (train[500] * train[501]) ** 0.5  # the geometric mean sits half-way in log sigma
    assert schedule.sigma_to_t([mid.item()], ab, diffusers_rounding=False) == pytest.approx([500.5], abs=1e-6)
    assert schedule.sigma_to_t([1e-5, 1e3], ab) == [0.0, 999.0]  # clamped to [0, T - 1]
    # diffusers' float32 logs put sigma_max a hair below t = 999: what its int64 cast truncates to 998
    assert 998.99 < schedule.sigma_to_t([train[-1].item()], ab)[0] < 999


def test_sigma_space_samplers_default_to_linspace_and_the_weights_offset():
    m = FakeLDM(ScheduleConfig(**BETAS, timestep_spacing="trailing", steps_offset=1))
    x_T, *_ = inputs()
    for name in samplers.SIGMA_SPACE:
        assert samplers.conventions(m.schedule, name)["timestep_spacing"] == "linspace"
        m.calls.clear()
        samplers.SAMPLERS[name](m, x_T, 5, progress=False, **({"noise": torch.zeros(5, *x_T.shape)}
                                if "noise" in samplers.SAMPLER_OPTIONS[name] else {}))  # fmt: skip
        assert m.calls[0][1] == 999.0  # linspace starts at T - 1 (trailing too, but then the DDIM family ...)
    assert samplers.conventions(m.schedule, "ddim") == dict(steps_offset=1, set_alpha_to_one=True,
                                                            timestep_spacing="trailing")  # fmt: skip
    assert samplers.conventions(m.schedule, "lms") == dict(steps_offset=1, timestep_spacing="linspace")


def test_heun_and_dpm_2_make_two_calls_per_step_but_the_last():
    m = FakeLDM()
    x_T, cond, _ = inputs()
    for name, calls in [("heun", 9), ("dpm_2", 9), ("euler", 5), ("dpmpp_2m", 5), ("unipc", 5)]:
        m.calls.clear()
        samplers.SAMPLERS[name](m, x_T, 5, cond=cond, progress=False)
        assert len(m.calls) == calls, name


def test_dpmpp_2m_first_order_is_ddim():
    # One DPM-Solver++ step without history is DDIM's Eq. 12 (eta = 0): the same numbers in float32.
    ab = make_alphas_cumprod(ScheduleConfig(**BETAS))
    z, eps = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sig = schedule.model_sigmas(ab)[[700, 500]]
    ours, x0 = ksamplers.dpmpp_2m_step(z, eps, torch.cat([sig, sig.new_zeros(1)]), 0)
    ddim, ddim_x0 = samplers.ddim_step(z, eps, ab[700], ab[500])
    torch.testing.assert_close(ours, ddim, rtol=0, atol=1e-5)
    torch.testing.assert_close(x0, ddim_x0, rtol=0, atol=1e-5)


# --- one contract for every sampler ---------------------------------------------------------------
def run_each(name, m, x_T, **kw):
    """samplers.SAMPLERS[name] with a callback; the stochastic ones (DDIM: eta 1) with a seeded generator."""
    if "generator" in samplers.SAMPLER_OPTIONS[name]:
        kw = {**kw, "generator": torch.Generator().manual_seed(0), **({"eta": 1.0} if name == "ddim" else {})}
    return run(samplers.SAMPLERS[name], m, x_T, **kw)


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_callback_reports_z_t_from_unit_noise_to_the_returned_z_0(name, spacing):
    m = FakeLDM()
    x_T, cond, _ = inputs()
    z0, steps = run_each(name, m, x_T, num_steps=10, cond=cond, timestep_spacing=spacing)
    assert [sorted(s) for s in steps] == [["i", "t", "x0", "z"]] * 10
    # z_t after 1 of 10 steps: std ~1 as x_T (1.4 with DDPM noise on this fake; 5-10 in a sigma-space state)
    assert 0.5 < steps[0]["z"].std() / x_T.std() < 2
    assert torch.equal(steps[-1]["z"], z0)  # after the last step: the returned z_0
    assert all(0.5 < s["x0"].std() < 4 for s in steps)  # the predicted z_0: O(1), as the data


class PointMass(FakeLDM):
    """The exact eps when all data is one latent c: eps = (z_t - sqrt(ab_t) c) / sqrt(1 - ab_t). On it each
    deterministic sampler is exact: x0 = c at every step, z_t = sqrt(ab_t) c + sqrt(1 - ab_t) e (e fixed by
    x_T), whatever its update rule, so all of them report the same numbers where they visit the same t.
    Fractional t (DPM-2's midpoints): ab from sigma interpolated in log sigma, the inverse of sigma_to_t."""

    def __init__(self):
        super().__init__(kind="unconditional")
        self.c = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.7

    @torch.no_grad()
    def predict_noise(self, z, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        log_sigma = schedule.model_sigmas(self.alphas_cumprod).double().log()  # (T,)
        k = t.floor().long().clamp(0, len(log_sigma) - 2)
        sigma = torch.lerp(log_sigma[k], log_sigma[k + 1], t - k).exp()
        ab = (1 / (1 + sigma**2)).float().reshape(-1, 1, 1, 1)
        return (z - ab.sqrt() * self.c) / (1 - ab).sqrt()


@pytest.mark.parametrize("spacing, names", [
    # "leading", S = 10, alpha-bar 1 after the last step: DDIM and the others visit the same states 900, 800,
    # ..., 0, then z_0 (the sigma-space samplers from sqrt(sigma_max^2 + 1) x_T: the same start)
    ("leading", ["plms", "ddpm", "lms", "euler", "euler_ancestral", "heun", "dpm_2"]),
    # "trailing": DDIM visits 999, 899, ..., 99 as DPM-Solver++ and UniPC, which start from x_T itself
    ("trailing", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"]),
])  # fmt: skip
def test_every_sampler_reports_in_the_same_space(spacing, names):
    # A sampler reporting another space (the sigma-space samplers' own state z_t / sqrt(ab_t): std ~5 at
    # t = 800) fails by far more than that.
    m = PointMass()
    x_T = inputs()[0]
    kw = dict(num_steps=10, timestep_spacing=spacing, steps_offset=0)
    ddim_z0, ddim_steps = run(samplers.ddim, m, x_T, set_alpha_to_one=True, **kw)
    for name in names:
        extra = dict(set_alpha_to_one=True) if name == "plms" else {}
        z0, steps = run_each(name, m, x_T, **kw, **extra)
        for ours, ddim in zip(steps, ddim_steps, strict=True):
            # 2e-5: float32 rounding of different but equivalent updates (measured: at most 5.4e-6)
            torch.testing.assert_close(ours["x0"], m.c, rtol=0, atol=2e-5)
            if "noise" not in samplers.SAMPLER_OPTIONS[name]:  # random states; their x0 still is c
                torch.testing.assert_close(ours["z"], ddim["z"], rtol=0, atol=2e-5)
    torch.testing.assert_close(ddim_z0, m.c, rtol=0, atol=2e-5)


def step_call(name):
    """A step function and its arguments (tensors, lists of tensors or floats), as the loops call it."""
    ab = make_alphas_cumprod(ScheduleConfig(**BETAS))
    g = torch.Generator().manual_seed(3)
    z, eps, noise, e1, e2, e3 = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(6))
    cond, uncond = torch.randn(2, 2, 5, 8, generator=g)
    sigmas = torch.tensor([9.0, 5.0, 2.0, 1.0, 0.0])
    return {
        "ddim_step": (samplers.ddim_step, [z, eps, ab[500], ab[480], ab[7], noise, True]),
        "ddim_sigma": (samplers.ddim_sigma, [ab[500], ab[480], 0.5]),
        "ddpm_step": (samplers.ddpm_step, [z, eps, ab[500], ab[480], noise, True]),
        "plms_step": (samplers.plms_step, [z, eps, ab[500], ab[480]]),
        "plms_eps": (samplers.plms_eps, [eps, [e1, e2, e3, z]]),
        "lms_coefficients": (ksamplers.lms_coefficients, [sigmas.tolist(), 3, 4]),
        "lms_step": (ksamplers.lms_step, [z, eps, sigmas, 3, [e1, e2, e3], 4]),
        "guided_eps": (samplers.guided_eps, [FakeLDM(), z, 500, cond, uncond, 3.0]),
        "model_input": (ksamplers.model_input, [z, sigmas[1]]),
        "euler_step": (ksamplers.euler_step, [z, eps, sigmas[1], sigmas[2]]),
        "ancestral_sigmas": (ksamplers.ancestral_sigmas, [sigmas[1], sigmas[2]]),
        "euler_ancestral_step": (ksamplers.euler_ancestral_step, [z, eps, sigmas[1], sigmas[2], noise]),
        "heun_step": (ksamplers.heun_step, [z, eps, sigmas[1], sigmas[2], e1]),
        "dpm_2_midpoint": (ksamplers.dpm_2_midpoint, [sigmas[1], sigmas[2]]),
        "dpm_2_step": (ksamplers.dpm_2_step, [z, eps, sigmas[1], sigmas[2], e1]),
        "vp": (ksamplers.vp, [sigmas[1]]),
        "dpmpp_2m_step": (ksamplers.dpmpp_2m_step, [z, eps, sigmas, 2, e1, noise]),
        "unipc_predict": (ksamplers.unipc_predict, [z, [e1, e2], sigmas, 2, 2]),
        "unipc_correct": (ksamplers.unipc_correct, [z, [e1, e2], e3, sigmas, 3, 2]),
    }[name]


@pytest.mark.parametrize(
    "name",
    [
        "ddim_step",
        "ddim_sigma",
        "ddpm_step",
        "plms_step",
        "plms_eps",
        "lms_coefficients",
        "lms_step",
        "guided_eps",
        "model_input",
        "euler_step",
        "ancestral_sigmas",
        "euler_ancestral_step",
        "heun_step",
        "dpm_2_midpoint",
        "dpm_2_step",
        "vp",
        "dpmpp_2m_step",
        "unipc_predict",
        "unipc_correct",
    ],
)
def test_step_functions_do_not_change_their_arguments(name):
    fn, args = step_call(name)

    def copy(x):
        if isinstance(x, Tensor):
            return x.clone()
        return [copy(y) for y in x] if isinstance(x, list) else x

    def same(x, y):
        if isinstance(x, Tensor):
            return torch.equal(x, y)
        if isinstance(x, list):
            return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y, strict=True))
        return True  # a model or a python number

    before = [copy(x) for x in args]
    fn(*args)
    assert all(same(x, y) for x, y in zip(args, before, strict=True))


def test_lms_step_returns_its_new_history():
    sigmas = torch.tensor([9.0, 5.0, 2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    z, history = torch.randn(2, 4, 8, 8, generator=g), []
    for i in range(4):
        eps = torch.randn(2, 4, 8, 8, generator=g)
        z, x0, new = ksamplers.lms_step(z, eps, sigmas, i, history, order=2)
        assert len(new) == min(i + 1, 2) and new[:-1] == tuple(history[-1:])  # oldest first, at most 2
        torch.testing.assert_close(new[-1], eps, rtol=0, atol=1e-5)  # dz/dsigma = (z - x0) / sigma = eps
        history = new


def test_sampler_options_are_the_loops_parameters():
    common = {"m", "x_T", "num_steps", "cond", "uncond", "guidance_scale", "callback", "progress"}
    names = {"ddim", "plms", "ddpm", "lms", "euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m",
             "dpmpp_2m_sde", "unipc"}  # fmt: skip
    assert set(samplers.SAMPLERS) == set(samplers.SAMPLER_OPTIONS) == names
    for name, fn in samplers.SAMPLERS.items():
        assert fn.__name__ == name
        params = list(inspect.signature(fn).parameters)
        assert set(params) == common | set(samplers.SAMPLER_OPTIONS[name]), name


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(sampler="euler_a"), "unknown sampler 'euler_a'"),
        (dict(sampler="heun", eta=0.5), "eta=0.5 needs sampler='ddim'"),
        (dict(sampler="euler", noise=torch.zeros(1)), "'euler' is deterministic.*euler_ancestral"),
        (dict(sampler="ddim", sigmas="karras"), r"'ddim' has no option\(s\) \['sigmas'\]"),
        (dict(sampler="euler", sigmas="linear"), "unknown sigmas 'linear'.*'karras', 'exponential'"),
        (dict(sampler="dpmpp_2m", timestep_spacing="linspace"), "use at most 999 steps"),
        (dict(sampler="unipc", timestep_spacing="leading", num_steps=999, steps_offset=1), "steps_offset 1"),
        (dict(sampler="plms", eta=0.5), "eta=0.5 needs sampler='ddim'"),
        (dict(sampler="ddim", eta=-0.1), "eta >= 0"),
        (dict(sampler="lms", noise=torch.zeros(1)), "'lms' is deterministic"),
        (dict(sampler="lms", set_alpha_to_one=True), r"'lms' has no option\(s\) \['set_alpha_to_one'\]"),
        (dict(sampler="ddpm", set_alpha_to_one=False), "'ddpm' has no option"),
        (dict(sampler="ddim", order=2), "'ddim' has no option.*order"),
        (dict(sampler="lms", order=5), "order must be 1, 2, 3 or 4"),
        (dict(sampler="plms", set_alpha_to_one=1), "set_alpha_to_one must be True or False"),
        (dict(sampler="ddim", timestep_spacing="uniform"), "timestep_spacing"),
        (
            dict(sampler="ddim", timestep_spacing="leading", steps_offset=1),
            "steps_offset 1 puts timestep 1000",
        ),
        (dict(num_steps=0), "num_steps"),
    ],
)
def test_check_settings_names_the_problem_and_the_fix(kw, match):
    kw = {"num_steps": 1000, **kw}
    with pytest.raises(ValueError, match=match):
        samplers.check_settings(1000, **kw)


def test_check_settings_accepts_what_the_loops_take():
    for name, options in samplers.SAMPLER_OPTIONS.items():
        samplers.check_settings(1000, 50, sampler=name, eta=0.0, timestep_spacing="trailing", steps_offset=1)
        if "noise" in options:
            samplers.check_settings(1000, 50, sampler=name, noise=torch.zeros(50, 1))
    samplers.check_settings(1000, 50, sampler="ddim", eta=1.0, set_alpha_to_one=False)
    samplers.check_settings(1000, 50, sampler="lms", order=1)
    for name in samplers.SIGMA_SPACE:
        for sigmas in schedule.SIGMA_SCHEDULES:
            samplers.check_settings(1000, 50, sampler=name, sigmas=sigmas, timestep_spacing="linspace")
    samplers.check_settings(1000, 1000, sampler="dpmpp_2m", timestep_spacing="trailing")  # S, not S + 1


# --- guidance and bad input -----------------------------------------------------------------------
def test_guidance_is_one_batched_call_uncond_first():
    m = FakeLDM()
    x, cond, uncond = inputs()
    eps = samplers.guided_eps(m, x, 500, cond, uncond, 3.0)
    assert m.calls == [(4, 500.0)]
    e_uc, e_c = m.predict_noise(x, 500, uncond), m.predict_noise(x, 500, cond)
    torch.testing.assert_close(eps, e_uc + 3.0 * (e_c - e_uc), rtol=0, atol=1e-6)
    m.calls.clear()
    samplers.guided_eps(m, x, 500, cond, uncond, 1.0)  # s == 1: no guidance, one unbatched call
    assert m.calls == [(2, 500.0)]


@pytest.mark.parametrize(
    "sampler, kw, match",
    [
        (samplers.ddim, {"num_steps": 0}, "num_steps"),
        (samplers.ddim, {"num_steps": 1001}, "num_steps"),
        (samplers.ddpm, {"num_steps": 2.5}, "num_steps"),
        (samplers.ddpm, {"num_steps": 1000, "steps_offset": 1}, "steps_offset"),
        (
            samplers.ddim,
            {"num_steps": 4, "noise": torch.zeros(3, 2, 4, 8, 8), "eta": 1.0},
            "noise must have shape",
        ),
        (
            samplers.ddpm,
            {"num_steps": 4, "noise": torch.zeros(4, 2, 4, 8, 8), "generator": torch.Generator()},
            "either",
        ),
        (samplers.plms, {"timestep_spacing": "uniform"}, "timestep_spacing"),
        (samplers.lms, {"guidance_scale": 5.0, "cond": torch.zeros(2, 5, 8)}, "uncond"),
        (samplers.lms, {"cond": torch.zeros(3, 5, 8)}, "batch"),
        (samplers.lms, {"order": 5}, "order"),
        (samplers.ddim, {"eta": -1.0}, "eta"),
        (samplers.euler, {"sigmas": "Karras"}, "unknown sigmas"),
        (samplers.heun, {"guidance_scale": 3.0, "cond": torch.zeros(2, 5, 8)}, "uncond"),
        (samplers.dpmpp_2m, {"num_steps": 1000}, "at most 999"),
        (
            samplers.euler_ancestral,
            {"num_steps": 4, "noise": torch.zeros(3, 2, 4, 8, 8)},
            "noise must have shape",
        ),
        (samplers.unipc, {"timestep_spacing": "uniform"}, "timestep_spacing"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_compute(sampler, kw, match):
    m = FakeLDM()
    with pytest.raises(ValueError, match=match):
        sampler(m, inputs()[0], progress=False, **kw)
    assert m.calls == []
