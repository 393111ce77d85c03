"""Samplers for latent diffusion: one loop per algorithm, each step also a plain function; the registry.

DDPM  Ho et al. 2020, arXiv:2006.11239: ancestral sampling (Algorithm 2) with the posterior
      q(z_{t-1} | z_t, z_0) of Eq. 6-7 at the predicted z_0 (Eq. 4 solved for z_0, as in Eq. 15).
DDIM  Song et al. 2021, arXiv:2010.02502: update Eq. 12, sigma_t(eta) Eq. 16.
PLMS  Liu et al. 2022, arXiv:2202.09778 ("pseudo linear multistep", CompVis plms.py, diffusers PNDM
      with skip_prk_steps): an Adams-Bashforth combination of past eps fed to the DDIM update (Eq. 9).
CFG   Ho & Salimans 2022, arXiv:2207.12598: eps_u + s * (eps_c - eps_u).
The sigma-space samplers, solvers of the probability-flow ODE (and SDE), are in ksamplers.py: LMS, Euler,
Euler ancestral, Heun, DPM-2, DPM-Solver++(2M) and its SDE variant, UniPC. SAMPLERS and SAMPLER_OPTIONS below
list all of them, check_settings checks the settings of any of them.
Notation: DDIM's alpha_t is DDPM's alpha-bar_t; both are `ab` / `alphas_cumprod[t]` here. Timesteps are
integers 0..T-1 (T = 1000) here; the sigma-space samplers also visit fractional ones.

Timestep conventions (ldm_mini.schedule: spaced_timesteps, ddim_alphas): CompVis DDIM/PLMS run
t = range(0, T, T//S) + 1, e.g. 801, 601, 401, 201, 1 for S = 5, and the last step goes to alpha-bar_0
(= alphas_cumprod[0]); in diffusers' words: timestep_spacing "leading", steps_offset 1, set_alpha_to_one
False. diffusers' DDIMScheduler defaults are steps_offset 0 (800, ..., 0) and set_alpha_to_one True
(alpha-bar = 1 after the last step). The `None` arguments of DDPM, DDIM and PLMS default to the model's
`m.schedule`; those of the sigma-space samplers to the "linspace" spacing (see `conventions`). The loops take
schedule.py's diffusers-reproducing options, so they match diffusers bit for bit.

Randomness is explicit: per-step noise comes from `generator` (torch.randn, drawn as diffusers draws it)
or from `noise` (num_steps, *x_T.shape): step i adds sigma_i * noise[i].

One contract for every loop: after step i, which started at timestep t, it calls
callback({"i": i, "t": t, "z": z, "x0": x0}) with z the latent after the step and x0 the step's predicted
z_0, both in the variance-preserving space the UNet sees, z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps (std ~1
at the start; after the last step z is the returned z_0), whatever a sampler keeps inside (the sigma-space
samplers: z_t / sqrt(ab_t)). So any sampler's recorded states decode alike. The step functions return new
tensors (and LMS its new history) and never change their arguments.
"""

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .schedule import SIGMA_SCHEDULES, check_timesteps, ddim_alphas, ddim_timesteps, plms_first_alphas

# Adams-Bashforth: eps' = sum(w_k * eps_{-k}) / d over the newest eps first (PLMS, CompVis plms.py).
ADAMS_BASHFORTH = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}

# The options of each loop beyond (m, x_T, num_steps, cond, uncond, guidance_scale, callback, progress).
SIGMA_OPTIONS = ("sigmas", "steps_offset", "timestep_spacing")
SAMPLER_OPTIONS = {
    "ddim": ("eta", "noise", "generator", "steps_offset", "set_alpha_to_one", "timestep_spacing"),
    "plms": ("steps_offset", "set_alpha_to_one", "timestep_spacing"),
    "ddpm": ("noise", "generator", "steps_offset", "timestep_spacing"),
    "lms": ("order", *SIGMA_OPTIONS),  # the sigma-space samplers (ksamplers.py) from here on
    "euler": SIGMA_OPTIONS,
    "euler_ancestral": ("noise", "generator", *SIGMA_OPTIONS),
    "heun": SIGMA_OPTIONS,
    "dpm_2": SIGMA_OPTIONS,
    "dpmpp_2m": SIGMA_OPTIONS,
    "dpmpp_2m_sde": ("noise", "generator", *SIGMA_OPTIONS),
    "unipc": SIGMA_OPTIONS,
}
SIGMA_SPACE = tuple(name for name, options in SAMPLER_OPTIONS.items() if "sigmas" in options)
MULTISTEP = ("dpmpp_2m", "dpmpp_2m_sde", "unipc")  # S of S + 1 spaced timesteps (schedule.solver_sigmas)


def conventions(schedule, sampler: str) -> dict:
    """The timestep conventions `sampler` uses where a call gives none: the weights' source's (m.schedule) for
    DDPM, DDIM and PLMS; for the sigma-space samplers the "linspace" spacing that diffusers' schedulers and
    k-diffusion use for them (a "leading" override still takes m.schedule's steps_offset)."""
    options = SAMPLER_OPTIONS[sampler]
    names = ("steps_offset", "set_alpha_to_one", "timestep_spacing")
    out = {k: getattr(schedule, k) for k in names if k in options}
    if sampler in SIGMA_SPACE:
        out["timestep_spacing"] = "linspace"
    return out


# --- checks: all before any model call ----------------------------------------------------------------
def check_settings(num_train_timesteps: int, num_steps: int, *, sampler: str = "ddim",
                   eta: float | None = 0.0, noise: Tensor | None = None, steps_offset: int | None = None,
                   set_alpha_to_one: bool | None = None, timestep_spacing: str | None = None,
                   order: int | None = None, sigmas: str | None = None) -> None:  # fmt: skip
    """Raise ValueError, one line naming the problem and the fix, for settings `sampler` cannot run. It
    needs no model or tensor, so a pipeline or CLI calls it before any work; every loop calls it first.
    None = not given, not checked (pass m.schedule's values to check what a loop will use); eta = 0 (or
    None) suits every sampler. Tensor shapes (x_T, cond, noise) are checked by the loops."""
    if sampler not in SAMPLER_OPTIONS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {tuple(SAMPLER_OPTIONS)}")
    options = SAMPLER_OPTIONS[sampler]
    if eta is not None and (
        isinstance(eta, bool) or not isinstance(eta, int | float) or not math.isfinite(eta)
    ):
        raise ValueError(f"eta must be a finite number, got {eta!r}")
    if eta is not None and eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta} (DDIM: eta >= 0; 0 is deterministic, 1 DDPM-like)")
    if eta is not None and eta != 0 and "eta" not in options:
        raise ValueError(f"eta={eta} needs sampler='ddim': the other samplers take no eta")
    if noise is not None and "noise" not in options:
        stochastic = "/".join(name for name, o in SAMPLER_OPTIONS.items() if "noise" in o)
        raise ValueError(f"sampler {sampler!r} is deterministic: it takes no per-step noise= (drop it, or "
                         f"use {stochastic})")  # fmt: skip
    given = dict(steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one,
                 timestep_spacing=timestep_spacing, order=order, sigmas=sigmas)  # fmt: skip
    if unknown := [k for k, v in given.items() if v is not None and k not in options]:
        raise ValueError(f"sampler {sampler!r} has no option(s) {unknown}: its options are {list(options)}")
    if set_alpha_to_one is not None and not isinstance(set_alpha_to_one, bool):
        raise ValueError(f"set_alpha_to_one must be True or False, got {set_alpha_to_one!r}")
    if order is not None and order not in (1, 2, 3, 4):
        raise ValueError(f"order must be 1, 2, 3 or 4, got {order!r}")
    if sigmas is not None and sigmas not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigmas {sigmas!r}: use one of {SIGMA_SCHEDULES}, or None (the model's)")
    check_timesteps(num_train_timesteps, num_steps, timestep_spacing, steps_offset)
    T = num_train_timesteps
    if sampler in MULTISTEP and timestep_spacing != "trailing" and num_steps >= T:
        raise ValueError(f"sampler {sampler!r} spaces num_steps + 1 timesteps (as diffusers), the last one "
                         f"unused: use at most {T - 1} steps, or timestep_spacing='trailing'")  # fmt: skip
    if sampler in MULTISTEP and timestep_spacing == "leading":
        check_timesteps(T, num_steps + 1, timestep_spacing, steps_offset)


def _start(m, sampler, x_T, num_steps, cond, uncond, guidance_scale, *, eta=0.0, noise=None, generator=None,
           order=None, sigmas=None, **convention):  # fmt: skip
    """Every check of a loop, before any model call; returns `convention` with None taken from
    conventions(m.schedule, sampler), and "sigmas"."""
    default = conventions(m.schedule, sampler)
    convention = {k: default[k] if v is None else v for k, v in convention.items()}
    check_settings(m.alphas_cumprod.shape[0], num_steps, sampler=sampler, eta=eta, noise=noise, order=order,
                   sigmas=sigmas, **convention)  # fmt: skip
    if cond is not None and cond.shape[0] != x_T.shape[0]:
        raise ValueError(f"cond has batch {cond.shape[0]} but x_T has batch {x_T.shape[0]}: they must match")
    if guidance_scale != 1.0 and (cond is None or uncond is None or uncond.shape != cond.shape):
        got = None if uncond is None else tuple(uncond.shape)
        raise ValueError(
            f"guidance_scale={guidance_scale} needs cond and an uncond of the same shape (e.g. the context "
            f'of the prompt ""), got uncond {got}; use guidance_scale=1.0 for no guidance'
        )
    if noise is not None and tuple(noise.shape) != (num_steps, *x_T.shape):
        want = (num_steps, *x_T.shape)
        raise ValueError(f"noise must have shape (num_steps, *x_T.shape) = {want}, got {tuple(noise.shape)}")
    if noise is not None and generator is not None:
        raise ValueError("pass either noise= (the per-step noise) or generator=, not both")
    return {**convention, "sigmas": sigmas}


# --- shared pieces --------------------------------------------------------------------------------
def guided_eps(m, x: Tensor, t, cond: Tensor | None = None, uncond: Tensor | None = None, scale=1.0):
    """eps_theta(x, t, cond); with classifier-free guidance when scale != 1: ONE model call on the batch
    cat([uncond, cond]) (unconditional half first, as diffusers' LDMTextToImagePipeline), then
    e_uc + scale * (e_c - e_uc). t: a python int/float (broadcast to a (B,) tensor)."""
    if scale == 1.0:
        return m.predict_noise(x, torch.as_tensor(t, device=x.device).expand(x.shape[0]), cond)
    if cond is None or uncond is None:
        raise ValueError('guidance_scale != 1 needs cond and uncond (e.g. the context of the prompt "")')
    x2 = torch.cat([x, x])  # (2B, c, h, w)
    e_uc, e_c = m.predict_noise(
        x2, torch.as_tensor(t, device=x.device).expand(x2.shape[0]), torch.cat([uncond, cond])
    ).chunk(2)
    return e_uc + scale * (e_c - e_uc)


def randn(shape, generator, device, dtype) -> Tensor:
    """Standard normal noise (B, ...) on `device`, drawn on the generator's device as diffusers' randn_tensor.
    generator: None (the global RNG), one torch.Generator for the batch, or a list of B generators: row i
    drawn from generator[i] alone, so each image is the one its generator gives in a batch of one."""
    if isinstance(generator, list | tuple):
        rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat([r.to(device) for r in rows])
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def _randn(like: Tensor, generator) -> Tensor:
    """Step noise shaped like `like` (see randn)."""
    return randn(like.shape, generator, like.device, like.dtype)


# --- single steps ---------------------------------------------------------------------------------
def ddim_sigma(a_t: Tensor, a_prev: Tensor, eta: float) -> Tensor:
    """DDIM Eq. 16: sigma_t = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)."""
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5


def ddim_step(z, eps, a_t, a_prev, sigma=0.0, noise=None, clip=False):
    """One DDIM update (Song et al. 2021, Eq. 12). Returns (z at the next step, predicted z_0)."""
    x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5  # "predicted x_0"
    if clip:
        x0 = x0.clamp(-1, 1)
    z_next = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps  # + "direction pointing to x_t"
    return (z_next if noise is None else z_next + sigma * noise), x0  # + sigma_t * eps_t


def ddpm_step(z, eps, a_t, a_prev, noise=None, clip=False):
    """One ancestral DDPM step: a draw from q(z_prev | z_t, z_0 = predicted z_0) (Ho et al. Eq. 6-7).
    a_prev is alpha-bar of the next timestep (1 after the last). Returns (z_prev, predicted z_0)."""
    alpha = a_t / a_prev  # alpha_t of the (possibly multi-step) jump
    beta = 1 - alpha
    x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5  # Eq. 4 solved for z_0
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = (a_prev**0.5 * beta) / (1 - a_t) * x0 + alpha**0.5 * (1 - a_prev) / (1 - a_t) * z  # Eq. 7 mu~
    if noise is None:
        return mean, x0
    var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)  # Eq. 7 beta~ ("fixed_small" variance)
    return mean + var**0.5 * noise, x0


def plms_step(z, eps, a_t, a_prev):
    """The PLMS update: Liu et al. 2022, Eq. 9, which is DDIM's Eq. 12 with eta = 0 rearranged. diffusers'
    PNDMScheduler computes this form (CompVis plms.py the DDIM form: equal up to float32 rounding, a few
    1e-6 after 30 steps), so we do too. Returns (z at the next step, predicted z_0)."""
    x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5  # for the callback only
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * z - (a_prev - a_t) * eps / denom, x0


def plms_eps(eps: Tensor, old_eps: list[Tensor]) -> Tensor:
    """Adams-Bashforth combination of the newest eps and up to 3 earlier ones (old_eps, oldest first)."""
    history = [eps, *reversed(old_eps[-3:])]  # newest first
    weights, denom = ADAMS_BASHFORTH[len(history)]
    return sum(w * e for w, e in zip(weights, history, strict=True)) / denom


# --- sampling loops -------------------------------------------------------------------------------
# Each takes the model container m (m.predict_noise, m.alphas_cumprod, m.schedule) and x_T (B, c, h, w)
# unit-variance noise, calls callback({"i", "t", "z", "x0"}) after each step (the contract above) and returns
# z_0 (not yet divided by the latent scale factor). steps_offset / set_alpha_to_one / timestep_spacing:
# None = m.schedule. SAMPLER_OPTIONS lists each loop's options; check_settings checks them.
@torch.no_grad()
def ddim(m, x_T, num_steps=50, cond=None, uncond=None, guidance_scale=1.0, eta=0.0, noise=None,
         generator=None, steps_offset=None, set_alpha_to_one=None, timestep_spacing=None, callback=None,
         progress=True):  # fmt: skip
    """DDIM sampling: eta = 0 deterministic, eta = 1 DDPM-like. Also honours m.schedule.clip_sample."""
    s = _start(m, "ddim", x_T, num_steps, cond, uncond, guidance_scale, eta=eta, noise=noise,
               generator=generator, steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one,
               timestep_spacing=timestep_spacing)  # fmt: skip
    ts = ddim_timesteps(num_steps, m.alphas_cumprod.shape[0], s["steps_offset"], s["timestep_spacing"])
    alphas = ddim_alphas(m.alphas_cumprod, ts, s["set_alpha_to_one"])  # (ab_t, ab_prev) per step
    noise = None if noise is None else noise.to(x_T.device, x_T.dtype)
    z = x_T
    for i, (t, (a_t, a_prev)) in enumerate(
        tqdm(list(zip(ts, alphas, strict=True)), desc="DDIM", disable=not progress)
    ):
        eps = guided_eps(m, z, t, cond, uncond, guidance_scale)  # (B, c, h, w)
        sigma = ddim_sigma(a_t, a_prev, eta)  # Eq. 16
        step_noise = None
        if eta > 0:  # diffusers draws at every step when eta > 0
            step_noise = noise[i] if noise is not None else _randn(z, generator)
        z, x0 = ddim_step(z, eps, a_t, a_prev, sigma, step_noise, clip=m.schedule.clip_sample)
        if callback is not None:
            callback({"i": i, "t": t, "z": z, "x0": x0})
    return z


@torch.no_grad()
def ddpm(m, x_T, num_steps=1000, cond=None, uncond=None, guidance_scale=1.0, noise=None, generator=None,
         steps_offset=None, timestep_spacing=None, callback=None, progress=True):  # fmt: skip
    """Ancestral DDPM sampling (Algorithm 2) over all T timesteps, or fewer: then each step jumps to the
    next listed timestep, as diffusers' DDPMScheduler. No noise at t = 0. Honours m.schedule.clip_sample."""
    s = _start(m, "ddpm", x_T, num_steps, cond, uncond, guidance_scale, noise=noise, generator=generator,
               steps_offset=steps_offset, timestep_spacing=timestep_spacing)  # fmt: skip
    ts = ddim_timesteps(num_steps, m.alphas_cumprod.shape[0], s["steps_offset"], s["timestep_spacing"])
    # to the next listed timestep, and to alpha-bar = 1 after the last
    alphas = ddim_alphas(m.alphas_cumprod, ts, set_alpha_to_one=True, diffusers_prev=False)
    noise = None if noise is None else noise.to(x_T.device, x_T.dtype)
    z = x_T
    for i, (t, (a_t, a_prev)) in enumerate(
        tqdm(list(zip(ts, alphas, strict=True)), desc="DDPM", disable=not progress)
    ):
        eps = guided_eps(m, z, t, cond, uncond, guidance_scale)
        step_noise = None
        if t > 0:
            step_noise = noise[i] if noise is not None else _randn(z, generator)
        z, x0 = ddpm_step(z, eps, a_t, a_prev, step_noise, clip=m.schedule.clip_sample)
        if callback is not None:
            callback({"i": i, "t": t, "z": z, "x0": x0})
    return z


@torch.no_grad()
def plms(m, x_T, num_steps=50, cond=None, uncond=None, guidance_scale=1.0, steps_offset=None,
         set_alpha_to_one=None, timestep_spacing=None, callback=None, progress=True):  # fmt: skip
    """PLMS as CompVis plms.py / diffusers PNDMScheduler(skip_prk_steps=True): the DDIM update (eta = 0,
    in PNDM's form) with an Adams-Bashforth eps. Step 0 has no history: a trial step, a second model call
    at the next timestep, the mean of both eps (pseudo improved Euler): num_steps + 1 model calls in all."""
    s = _start(m, "plms", x_T, num_steps, cond, uncond, guidance_scale, steps_offset=steps_offset,
               set_alpha_to_one=set_alpha_to_one, timestep_spacing=timestep_spacing)  # fmt: skip
    ab = m.alphas_cumprod
    ts = ddim_timesteps(num_steps, ab.shape[0], s["steps_offset"], s["timestep_spacing"])
    alphas = ddim_alphas(ab, ts, s["set_alpha_to_one"])  # (ab_t, ab_prev) per step, also step 0's trial
    z, old_eps = x_T, []
    for i, (t, (a_t, a_prev)) in enumerate(
        tqdm(list(zip(ts, alphas, strict=True)), desc="PLMS", disable=not progress)
    ):
        eps = guided_eps(m, z, t, cond, uncond, guidance_scale)
        if i == 0 and num_steps > 1:
            z_trial, _ = plms_step(z, eps, a_t, a_prev)
            eps_next = guided_eps(m, z_trial, ts[1], cond, uncond, guidance_scale)
            z, x0 = plms_step(z, (eps + eps_next) / 2, *plms_first_alphas(ab, ts))  # to ts[1]
        else:
            z, x0 = plms_step(z, plms_eps(eps, old_eps), a_t, a_prev)
        old_eps = [*old_eps[-2:], eps]  # the 3 newest are enough for 4th order
        if callback is not None:
            callback({"i": i, "t": t, "z": z, "x0": x0})
    return z


# --- the registry: every loop by name (the pipelines' and the command line's `sampler`) ----------------
from .ksamplers import dpm_2, dpmpp_2m, dpmpp_2m_sde, euler, euler_ancestral, heun, lms, unipc  # noqa: E402

SAMPLERS = {"ddim": ddim, "plms": plms, "ddpm": ddpm, "lms": lms, "euler": euler,
            "euler_ancestral": euler_ancestral, "heun": heun, "dpm_2": dpm_2, "dpmpp_2m": dpmpp_2m,
            "dpmpp_2m_sde": dpmpp_2m_sde, "unipc": unipc}  # fmt: skip
assert set(SAMPLERS) == set(SAMPLER_OPTIONS)
