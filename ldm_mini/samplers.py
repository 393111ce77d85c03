"""Samplers for latent diffusion: one loop per algorithm, each step also a plain function.

DDPM  Ho et al. 2020, arXiv:2006.11239: ancestral sampling (Algorithm 2) with the posterior
      q(z_{t-1} | z_t, z_0) of Eq. 6-7 at the predicted z_0 (Eq. 4 solved for z_0, as in Eq. 15).
DDIM  Song et al. 2021, arXiv:2010.02502: update Eq. 12, sigma_t(eta) Eq. 16.
PLMS  Liu et al. 2022, arXiv:2202.09778 ("pseudo linear multistep", CompVis plms.py, diffusers PNDM
      with skip_prk_steps): an Adams-Bashforth combination of past eps fed to the DDIM update (Eq. 9).
LMS   the linear multistep method on the ODE dz/dsigma = (z - z_0) / sigma in the variance-exploding
      form z_sigma = z_t / sqrt(ab_t), sigma = sqrt((1 - ab_t) / ab_t) (Karras et al. 2022,
      arXiv:2206.00364; k-diffusion sample_lms, diffusers LMSDiscreteScheduler).
CFG   Ho & Salimans 2022, arXiv:2207.12598: eps_u + s * (eps_c - eps_u).
Notation: DDIM's alpha_t is DDPM's alpha-bar_t; both are `ab` / `alphas_cumprod[t]` here. Timesteps
are integers 0..T-1 (T = 1000), except LMS with the "linspace" spacing (fractional t).

Timestep conventions (see ddim_timesteps): CompVis DDIM/PLMS run t = range(0, T, T//S) + 1, e.g.
801, 601, 401, 201, 1 for S = 5, and the last step goes to alpha-bar_0 (= alphas_cumprod[0]); in
diffusers' words: timestep_spacing "leading", steps_offset 1, set_alpha_to_one False. diffusers'
DDIMScheduler defaults are steps_offset 0 (800, ..., 0) and set_alpha_to_one True (alpha-bar = 1 after
the last step). The `None` arguments below default to the model's `m.schedule`.

Randomness is explicit: per-step noise comes from `generator` (torch.randn, drawn as diffusers
draws it) or from `noise` (num_steps, *x_T.shape): step i adds sigma_i * noise[i].
"""

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .schedule import TIMESTEP_SPACINGS

# Adams-Bashforth: eps' = sum(w_k * eps_{-k}) / d over the newest eps first (PLMS, CompVis plms.py).
ADAMS_BASHFORTH = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


# --- timesteps ------------------------------------------------------------------------------------
def _spaced(num_steps: int, T: int, steps_offset: int, spacing: str) -> list[float]:
    """The S = num_steps sampling timesteps, high to low, as floats ("linspace" is not rounded)."""
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}: use one of {TIMESTEP_SPACINGS}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ValueError(
            f"num_steps must be an integer from 1 to T = {T} (training timesteps), got {num_steps!r}"
        )
    S = num_steps
    if spacing == "leading":  # 0, r, 2r, ... (r = T // S), plus steps_offset: CompVis = offset 1
        ts = [float(i * (T // S) + steps_offset) for i in reversed(range(S))]
    elif spacing == "trailing":  # T-1 downwards in steps of T/S (Lin et al. 2024, arXiv:2305.08891, Table 2)
        # diffusers computes np.arange(T, 0, -T/S); its i-th value is T + i*delta with this float64 delta,
        # which decides the half-way roundings (e.g. S = 48). (That arange sometimes has an extra last
        # value, t = -1, e.g. for S = 61: diffusers then takes S + 1 steps; here always S.)
        delta = (T - T / S) - T
        ts = [float(round(T + i * delta) - 1) for i in range(S)]
    else:  # "linspace": S points from 0 to T-1
        ts = [i * ((T - 1) / (S - 1)) if S > 1 else 0.0 for i in reversed(range(S))]
    if ts[0] >= T or ts[-1] < 0:
        bad = ts[0] if ts[0] >= T else ts[-1]
        raise ValueError(
            f"steps_offset {steps_offset} puts timestep {bad:.0f} outside 0..{T - 1}: use 0 or 1"
        )
    return ts


def ddim_timesteps(num_steps: int, T: int = 1000, steps_offset: int = 0, timestep_spacing: str = "leading"):
    """Integer timesteps, high to low, of diffusers' three spacings (steps_offset is used by "leading" only).

    leading  (S=5): 800 600 400 200 0, or 801 ... 1 with steps_offset=1 (the CompVis convention)
    trailing (S=5): 999 799 599 399 199   (always reaches t = T-1)
    linspace (S=5): 999 749 500 250 0     (round(linspace(0, T-1, S)))
    """
    return [round(t) for t in _spaced(num_steps, T, steps_offset, timestep_spacing)]


def _timesteps(m, num_steps, steps_offset, timestep_spacing, integer=True):
    """ddim_timesteps (or the unrounded floats) with None arguments taken from the model's schedule."""
    offset = m.schedule.steps_offset if steps_offset is None else steps_offset
    spacing = m.schedule.timestep_spacing if timestep_spacing is None else timestep_spacing
    ts = _spaced(num_steps, m.alphas_cumprod.shape[0], offset, spacing)
    return [round(t) for t in ts] if integer else ts


def ddim_alphas(alphas_cumprod: Tensor, timesteps: list[int], set_alpha_to_one: bool = True):
    """(ab_t, ab_prev) for each DDIM/PLMS step, as diffusers' DDIM/PNDM schedulers step: from t to
    t - T//S (= the next timestep for the "leading" spacing, not always for the other two); below 0
    the final alpha-bar: 1 (set_alpha_to_one) or alphas_cumprod[0] (CompVis)."""
    final = alphas_cumprod.new_tensor(1.0) if set_alpha_to_one else alphas_cumprod[0]
    step = alphas_cumprod.shape[0] // len(timesteps)
    return [(alphas_cumprod[t], alphas_cumprod[t - step] if t - step >= 0 else final) for t in timesteps]


def lms_sigmas(alphas_cumprod: Tensor, timesteps: list[float]) -> Tensor:
    """sigma(t) = sqrt((1 - ab_t) / ab_t), interpolated linearly at fractional t, then 0: (S + 1,) float32.
    As diffusers: float32 sigmas of all T steps, interpolated in float64, rounded to float32."""
    s = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).double().tolist()  # (T,) sigma per train step
    out = []
    for t in timesteps:
        lo = int(t)
        hi = min(lo + 1, len(s) - 1)
        out.append((s[hi] - s[lo]) * (t - lo) + s[lo])  # linear interpolation between lo and lo + 1
    return torch.tensor(out + [0.0], dtype=torch.float64).float().to(alphas_cumprod.device)


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


def _or(value, default):
    return default if value is None else value


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


def _check(m, x_T, num_steps, cond, uncond, guidance_scale, noise=None, generator=None):
    """Reject bad arguments before any model call (num_steps is checked by _spaced)."""
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


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """Integrals over [sigma_i, sigma_{i+1}] of the Lagrange polynomials l_j through sigma_i, sigma_{i-1},
    ..., sigma_{i-order+1} (newest first). l_j has degree order - 1 <= 3, so Simpson's rule is exact
    (diffusers and k-diffusion integrate numerically with scipy.integrate.quad)."""
    nodes = [sigmas[i - k] for k in range(order)]

    def basis(j, s):  # Lagrange polynomial j at s: 1 at nodes[j], 0 at the other nodes
        out = 1.0
        for k in range(order):
            if k != j:
                out *= (s - nodes[k]) / (nodes[j] - nodes[k])
        return out

    a, b = sigmas[i], sigmas[i + 1]
    return [(b - a) / 6 * (basis(j, a) + 4 * basis(j, (a + b) / 2) + basis(j, b)) for j in range(order)]


def lms_step(z, eps, sigmas, i, derivatives, order=4):
    """One LMS step from sigmas[i] to sigmas[i+1] on the ODE dz/dsigma = (z - z_0) / sigma.
    z is the variance-exploding state (z_t / sqrt(ab_t)); `derivatives` holds the earlier steps'
    dz/dsigma, oldest first, and gets this step's appended (at most `order` kept).
    Returns (z at sigmas[i+1], predicted z_0)."""
    sigma = sigmas[i]
    x0 = z - sigma * eps  # z_sigma = z_0 + sigma * eps
    derivatives.append((z - x0) / sigma)  # dz/dsigma (k-diffusion: to_d)
    del derivatives[:-order]
    coeffs = lms_coefficients(sigmas.tolist(), i, min(i + 1, order))
    return z + sum(c * d for c, d in zip(coeffs, reversed(derivatives), strict=False)), x0


# --- sampling loops -------------------------------------------------------------------------------
# Each takes the model container m (m.predict_noise, m.alphas_cumprod, m.schedule) and x_T (B, c, h, w)
# unit-variance noise, calls callback(dict(i=, t=, z=, x0=)) after each step and returns z_0 (not yet
# divided by the latent scale factor). steps_offset / set_alpha_to_one / timestep_spacing: None = m.schedule.
@torch.no_grad()
def ddim(m, x_T, num_steps=50, cond=None, uncond=None, guidance_scale=1.0, eta=0.0, noise=None,
         generator=None, steps_offset=None, set_alpha_to_one=None, timestep_spacing=None, callback=None,
         progress=True):  # fmt: skip
    """DDIM sampling: eta = 0 deterministic, eta = 1 DDPM-like. Also honours m.schedule.clip_sample."""
    ts = _timesteps(m, num_steps, steps_offset, timestep_spacing)
    _check(m, x_T, num_steps, cond, uncond, guidance_scale, noise, generator)
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: DDIM, 1: DDPM-like), got {eta}")
    alphas = ddim_alphas(m.alphas_cumprod, ts, _or(set_alpha_to_one, m.schedule.set_alpha_to_one))
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
    ts = _timesteps(m, num_steps, steps_offset, timestep_spacing)
    _check(m, x_T, num_steps, cond, uncond, guidance_scale, noise, generator)
    ab = m.alphas_cumprod
    noise = None if noise is None else noise.to(x_T.device, x_T.dtype)
    z = x_T
    for i, t in enumerate(tqdm(ts, desc="DDPM", disable=not progress)):
        a_prev = ab[ts[i + 1]] if i + 1 < len(ts) else ab.new_tensor(1.0)  # alpha-bar after this step
        eps = guided_eps(m, z, t, cond, uncond, guidance_scale)
        step_noise = None
        if t > 0:
            step_noise = noise[i] if noise is not None else _randn(z, generator)
        z, x0 = ddpm_step(z, eps, ab[t], a_prev, step_noise, clip=m.schedule.clip_sample)
        if callback is not None:
            callback({"i": i, "t": t, "z": z, "x0": x0})
    return z


@torch.no_grad()
def plms(m, x_T, num_steps=50, cond=None, uncond=None, guidance_scale=1.0, steps_offset=None,
         set_alpha_to_one=None, timestep_spacing=None, callback=None, progress=True):  # fmt: skip
    """PLMS as CompVis plms.py / diffusers PNDMScheduler(skip_prk_steps=True): the DDIM update (eta = 0,
    in PNDM's form) with an Adams-Bashforth eps. Step 0 has no history: a trial step, a second model call
    at the next timestep, the mean of both eps (pseudo improved Euler): num_steps + 1 model calls in all."""
    ts = _timesteps(m, num_steps, steps_offset, timestep_spacing)
    _check(m, x_T, num_steps, cond, uncond, guidance_scale)
    ab, S = m.alphas_cumprod, num_steps
    alphas = ddim_alphas(ab, ts, _or(set_alpha_to_one, m.schedule.set_alpha_to_one))
    z, old_eps = x_T, []
    for i, (t, (a_t, a_prev)) in enumerate(
        tqdm(list(zip(ts, alphas, strict=True)), desc="PLMS", disable=not progress)
    ):
        eps = guided_eps(m, z, t, cond, uncond, guidance_scale)
        if i == 0 and S > 1:
            z_trial, _ = plms_step(z, eps, a_t, a_prev)
            eps_next = guided_eps(m, z_trial, ts[1], cond, uncond, guidance_scale)
            # diffusers takes this step from ts[1] + T//S to ts[1] (= t -> t - T//S for "leading")
            a_from = ab[ts[1] + ab.shape[0] // S]
            z, x0 = plms_step(z, (eps + eps_next) / 2, a_from, ab[ts[1]])
        else:
            z, x0 = plms_step(z, plms_eps(eps, old_eps), a_t, a_prev)
        old_eps = [*old_eps[-2:], eps]  # the 3 newest are enough for 4th order
        if callback is not None:
            callback({"i": i, "t": t, "z": z, "x0": x0})
    return z


@torch.no_grad()
def lms(m, x_T, num_steps=50, cond=None, uncond=None, guidance_scale=1.0, order=4, steps_offset=None,
        timestep_spacing=None, callback=None, progress=True):  # fmt: skip
    """LMS in sigma (diffusers' LMSDiscreteScheduler, used as a correct pipeline uses it). x_T is unit
    noise here too: lms multiplies it by diffusers' init_noise_sigma (sigma_max for "linspace" and
    "trailing", sqrt(sigma_max^2 + 1) for "leading"). The callback's z is the sigma-space state."""
    spacing = _or(timestep_spacing, m.schedule.timestep_spacing)
    ts = torch.tensor(_timesteps(m, num_steps, steps_offset, spacing, integer=False)).tolist()  # float32
    _check(m, x_T, num_steps, cond, uncond, guidance_scale)
    if order not in (1, 2, 3, 4):
        raise ValueError(f"order must be 1, 2, 3 or 4, got {order!r}")
    sigmas = lms_sigmas(m.alphas_cumprod, ts)  # (S + 1,) float32, last 0
    s_max = sigmas.max()
    z = x_T * (s_max if spacing in ("linspace", "trailing") else (s_max**2 + 1) ** 0.5)  # init_noise_sigma
    derivatives = []
    for i, t in enumerate(tqdm(ts, desc="LMS", disable=not progress)):
        z_t = z / (sigmas[i] ** 2 + 1) ** 0.5  # the variance-preserving z_t the UNet was trained on
        eps = guided_eps(m, z_t, t, cond, uncond, guidance_scale)
        z, x0 = lms_step(z, eps, sigmas, i, derivatives, order)
        if callback is not None:
            callback({"i": i, "t": t, "z": z, "x0": x0})
    return z
