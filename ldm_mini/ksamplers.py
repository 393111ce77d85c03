"""Samplers in sigma: the probability-flow ODE (and SDE) of the diffusion, solved by the methods in use today.

Every sampler here integrates one ODE. Write the latent in its variance-exploding form x = z_t / sqrt(ab_t) =
z_0 + sigma * eps, with sigma = sqrt((1 - ab_t) / ab_t) (schedule.model_sigmas: 0.029 at t = 0 .. 14.6 at
t = 999); then (Karras et al. 2022, arXiv:2206.00364, Eq. 1 with Eq. 3, sigma(t) = t, s(t) = 1)

    dx/dsigma = (x - D(x; sigma)) / sigma = eps_theta(z_t, t),      D(x; sigma) = x - sigma * eps_theta,

D the denoiser (the predicted z_0), z_t = x / sqrt(sigma^2 + 1) the UNet's input at the timestep t of sigma.

Euler            Karras et al. 2022, Algorithm 1 without its correction: x += (sigma' - sigma) dx/dsigma.
Euler ancestral  Euler to sigma_down, then fresh noise of std sigma_up: DDPM's posterior (DDIM's sigma_t at
                 eta = 1, Song et al. 2021, Eq. 16) written in sigma (k-diffusion sample_euler_ancestral).
Heun             Karras et al. 2022, Algorithm 1: the trapezoid rule, a second model call at sigma_next.
DPM-2            Lu et al. 2022a (DPM-Solver, arXiv:2206.00927), its second-order step in sigma as
                 k-diffusion's sample_dpm_2: the slope at the midpoint sigma_mid = sqrt(sigma * sigma').
LMS              the linear multistep (Adams-Bashforth) method in sigma (k-diffusion sample_lms).
DPM-Solver++(2M) Lu et al. 2022b, arXiv:2211.01095, Algorithm 2: in the UNet's variables
                 z_t = alpha_t z_0 + sigma_t eps (alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t,
                 lambda = log(alpha_t / sigma_t) = -log sigma, h = lambda' - lambda), the linear part
                 integrated exactly, the predicted z_0 extrapolated linearly in lambda from two steps (D):
                 z' = (sigma_t' / sigma_t) z - alpha_t' (e^-h - 1) D.
DPM-Solver++(2M) SDE  the same step for the reverse SDE (diffusers' sde-dpmsolver++, k-diffusion
                 sample_dpmpp_2m_sde): z' = (sigma_t'/sigma_t) e^-h z + alpha_t' (1 - e^-2h) D + sigma_t'
                 sqrt(1 - e^-2h) noise.
UniPC            Zhao et al. 2023, arXiv:2302.04867: predictor UniP-2 and corrector UniC (which reuses the
                 next model call: no extra one), in the same variables, B(h) = e^h - 1 ("bh2", diffusers').

The discretisation (schedule.k_sigmas, schedule.solver_sigmas): by default the "linspace" timesteps, from
t = T - 1 down to 0 (DPM-Solver++ and UniPC: S of S + 1 such points, the last step from t ~ T/S to sigma = 0),
which is what diffusers' schedulers and k-diffusion use for these samplers; sigmas="karras" (Eq. 5, rho = 7)
or "exponential" instead; timestep_spacing overrides the spacing. Every choice follows diffusers 0.42.1
(tests/test_samplers.py: step by step to 1e-5); where diffusers departs from a paper, README says so.

The contract of samplers.py: x_T is unit noise (scaled here by diffusers' init_noise_sigma to the state a
sampler starts from), callback({"i", "t", "z", "x0"}) after each step with z and x0 in the UNet's (variance-
preserving) space, step functions that change no argument, and the checks of samplers.check_settings.
num_steps is the number of sigma intervals: Heun and DPM-2 make two model calls in each but the last (2S - 1).
"""

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import samplers
from .samplers import guided_eps
from .schedule import k_sigmas, lms_init_noise_sigma, sigma_to_t, solver_sigmas


# --- the sigma-space family: Euler, Euler ancestral, Heun, DPM-2, LMS --------------------------------------
def model_input(x: Tensor, sigma: Tensor) -> Tensor:
    """The UNet's z_t from the variance-exploding state x: x / sqrt(sigma^2 + 1)
    (diffusers' scale_model_input)."""
    return x / (sigma**2 + 1) ** 0.5


def euler_step(x, eps, sigma, sigma_next):
    """One Euler step of dx/dsigma = (x - D) / sigma, from sigma to sigma_next. Returns (x', D)."""
    x0 = x - sigma * eps  # D(x; sigma), the predicted z_0
    d = (x - x0) / sigma  # dx/dsigma (k-diffusion to_d)
    return x + d * (sigma_next - sigma), x0


def ancestral_sigmas(sigma, sigma_next):
    """(sigma_down, sigma_up) of an ancestral step to sigma' = sigma_next: sigma_up^2 = sigma'^2 (sigma^2 -
    sigma'^2) / sigma^2, DDPM's posterior variance (DDIM Eq. 16 at eta = 1) in sigma, and sigma_down^2 =
    sigma'^2 - sigma_up^2: the deterministic part goes to sigma_down, the noise brings it back to sigma'."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def euler_ancestral_step(x, eps, sigma, sigma_next, noise):
    """Euler to sigma_down, then + sigma_up * noise (unit noise, x's shape). Returns (x at sigma_next, D)."""
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)
    x_down, x0 = euler_step(x, eps, sigma, sigma_down)
    return x_down + noise * sigma_up, x0


def heun_step(x, eps, sigma, sigma_next, eps_next):
    """Karras et al. Algorithm 1, lines 5-7: the Euler step to sigma_next, then the trapezoid rule with the
    slope there. eps_next: the model's eps at the Euler point euler_step(x, eps, sigma, sigma_next)[0] (at the
    timestep of sigma_next). Returns (x at sigma_next, D at sigma)."""
    x_euler, x0 = euler_step(x, eps, sigma, sigma_next)
    d = (x - x0) / sigma
    d_next = (x_euler - (x_euler - sigma_next * eps_next)) / sigma_next  # dx/dsigma at the Euler point
    return x + (d + d_next) / 2 * (sigma_next - sigma), x0


def dpm_2_midpoint(sigma, sigma_next):
    """The midpoint in log sigma, sqrt(sigma * sigma_next), as diffusers' KDPM2DiscreteScheduler
    computes it."""
    return sigma_next.log().lerp(sigma.log(), 0.5).exp()


def dpm_2_step(x, eps, sigma, sigma_next, eps_mid):
    """The midpoint method in sigma: an Euler step to sigma_mid, the slope there, then the whole step with it.
    eps_mid: the model's eps at euler_step(x, eps, sigma, dpm_2_midpoint(sigma, sigma_next))[0] (at the
    timestep of sigma_mid). Returns (x at sigma_next, D at sigma)."""
    sigma_mid = dpm_2_midpoint(sigma, sigma_next)
    x_mid, x0 = euler_step(x, eps, sigma, sigma_mid)
    d_mid = (x_mid - (x_mid - sigma_mid * eps_mid)) / sigma_mid
    return x + d_mid * (sigma_next - sigma), x0


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


def lms_step(z, eps, sigmas, i, derivatives=(), order=4):
    """One LMS step from sigmas[i] to sigmas[i+1] on the ODE dz/dsigma = (z - z_0) / sigma.
    z is the variance-exploding state (z_t / sqrt(ab_t)); `derivatives` holds the earlier steps'
    dz/dsigma, oldest first. Returns (z at sigmas[i+1], predicted z_0, the new history: `derivatives` with
    this step's appended, at most `order` kept, as a new tuple)."""
    sigma = sigmas[i]
    x0 = z - sigma * eps  # z_sigma = z_0 + sigma * eps
    derivatives = (*derivatives, (z - x0) / sigma)[-order:]  # dz/dsigma (k-diffusion: to_d)
    coeffs = lms_coefficients(sigmas.tolist(), i, min(i + 1, order))
    z_next = z + sum(c * d for c, d in zip(coeffs, reversed(derivatives), strict=False))
    return z_next, x0, derivatives


# --- DPM-Solver++ and UniPC: exponential integrators in the UNet's own variables ---------------------------
def vp(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha_t, sigma_t) of z_t = alpha_t z_0 + sigma_t eps at the VE noise level sigma: 1/sqrt(sigma^2 + 1)
    and sigma alpha_t (diffusers' _sigma_to_alpha_sigma_t); lambda_t = log(alpha_t / sigma_t) = -log sigma."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def _lambda(sigma: Tensor) -> Tensor:
    alpha, s = vp(sigma)
    return torch.log(alpha) - torch.log(s)  # +inf at sigma = 0


def dpmpp_2m_step(z, eps, sigmas, i, x0_prev=None, noise=None):
    """One DPM-Solver++(2M) step from sigmas[i] to sigmas[i+1]; z is the UNet's z_t. x0_prev: the previous
    step's predicted z_0, None at the first step (first order: DDIM). The step to sigma = 0 is first order too
    (diffusers' lower_order_final, k-diffusion's too): it returns the predicted z_0. noise (unit, z's shape):
    the SDE variant (dpmpp_2m_sde). Returns (z at sigmas[i+1], predicted z_0)."""
    alpha, s = vp(sigmas[i])
    alpha_next, s_next = vp(sigmas[i + 1])
    x0 = (z - s * eps) / alpha  # data prediction x_theta
    h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
    if x0_prev is None or sigmas[i + 1] == 0:
        D = x0
    else:  # Algorithm 2: D = (1 + 1/(2r)) x_theta(t_i) - 1/(2r) x_theta(t_{i-1}), r = h_{i-1} / h_i
        r = (_lambda(sigmas[i]) - _lambda(sigmas[i - 1])) / h
        D = x0 + 0.5 * (1.0 / r) * (x0 - x0_prev)
    if noise is None:
        return (s_next / s) * z - (alpha_next * (torch.exp(-h) - 1.0)) * D, x0
    return (
        (s_next / s * torch.exp(-h)) * z
        + (alpha_next * (1 - torch.exp(-2.0 * h))) * D
        + s_next * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
    ), x0


def _unipc_base(z, x0, sigma, sigma_next):
    """The first-order (DDIM) part shared by UniP and UniC: (x_t_, alpha_t', B(h), h, hh = -h)."""
    alpha_next, s_next = vp(sigma_next)
    _, s = vp(sigma)
    h = _lambda(sigma_next) - _lambda(sigma)
    hh = -h  # data prediction: the integrator in -h
    h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^-h - 1
    return s_next / s * z - alpha_next * h_phi_1 * x0, alpha_next, torch.expm1(hh), h, hh


def unipc_predict(z, x0s, sigmas, i, order):
    """UniP from sigmas[i] to sigmas[i+1], of order 1 (DDIM) or 2; z the (corrected) UNet z_t, x0s the
    predicted z_0 so far, newest last (at sigmas[i], sigmas[i-1]). Returns z at sigmas[i+1]."""
    z_next, alpha_next, B_h, h, _ = _unipc_base(z, x0s[-1], sigmas[i], sigmas[i + 1])
    if order == 1:
        return z_next
    r = (_lambda(sigmas[i - 1]) - _lambda(sigmas[i])) / h  # r_1 < 0: the earlier point, in units of h
    D1 = (x0s[-2] - x0s[-1]) / r
    return z_next - alpha_next * B_h * (0.5 * D1)  # rho = 1/2 (diffusers' UniP-2)


def unipc_correct(z_prev, x0s, x0, sigmas, i, order):
    """UniC: the step sigmas[i-1] -> sigmas[i] again, from z_prev (the z_t it started from) with the history
    x0s (newest last, the newest at sigmas[i-1]) and x0, the model's prediction at the new point (the call the
    next step makes anyway: no extra one). order: that of the step corrected. Returns the corrected z_t."""
    z_new, alpha_t, B_h, h, hh = _unipc_base(z_prev, x0s[-1], sigmas[i - 1], sigmas[i])
    D1_t = x0 - x0s[-1]
    if order == 1:
        return z_new - alpha_t * B_h * (0.5 * D1_t)  # rho_c = 1/2
    # order 2: solve R rho = b, R = [[1, 1], [r, 1]], b_k = k! h phi_{k+1}(hh) / B(h) (the bh2 rule)
    r = (_lambda(sigmas[i - 2]) - _lambda(sigmas[i - 1])) / h
    phi = torch.expm1(hh) / hh - 1  # h phi_2 over h, as diffusers' recursion
    b1 = phi / B_h
    b2 = 2 * (phi / hh - 0.5) / B_h
    rho_0 = (b1 - b2) / (1 - r)
    rho_1 = b1 - rho_0
    D1 = (x0s[-2] - x0s[-1]) / r
    return z_new - alpha_t * B_h * (rho_0 * D1 + rho_1 * D1_t)


# --- sampling loops -------------------------------------------------------------------------------
# Each takes m (m.predict_noise, m.alphas_cumprod, m.schedule) and x_T (B, c, h, w) unit noise, returns z_0.
# sigmas: None (the model's own), "karras", "exponential"; timestep_spacing: None = "linspace"; steps_offset
# (for "leading" only): None = m.schedule's. samplers.SAMPLER_OPTIONS lists each loop's options.
def _setup(m, name, x_T, num_steps, cond, uncond, guidance_scale, *, solver=False, noise=None, **options):
    """Every check (samplers._start), then the discretisation: (settings, timesteps, sigmas (S + 1,))."""
    s = samplers._start(m, name, x_T, num_steps, cond, uncond, guidance_scale, noise=noise, **options)
    discretise = solver_sigmas if solver else k_sigmas
    ts, sig = discretise(m.alphas_cumprod, num_steps, s["steps_offset"], s["timestep_spacing"], s["sigmas"])
    return s, ts, sig.to(x_T.device)


def _init_noise(x_T, sig, spacing):
    """The state a sigma-space sampler starts from: x_T * diffusers' init_noise_sigma (sigma_max; for the
    "leading" spacing sqrt(sigma_max^2 + 1), the exact z_T / sqrt(ab_T))."""
    return x_T * lms_init_noise_sigma(sig.max(), diffusers_spacing=spacing)


def _noise(noise, i, like, generator):
    """Step i's unit noise: noise[i] when given, else a fresh draw (drawn at every step, as diffusers)."""
    return noise[i].to(like.device, like.dtype) if noise is not None else samplers._randn(like, generator)


def _report(callback, i, t, x, x0, sigma_next):
    """The contract: z in the UNet's space (x / sqrt(sigma_next^2 + 1); after the last step, sigma = 0: x)."""
    if callback is not None:
        callback({"i": i, "t": t, "z": model_input(x, sigma_next), "x0": x0})


@torch.no_grad()
def euler(m, x_T, num_steps=50, cond=None, uncond=None, guidance_scale=1.0, sigmas=None, steps_offset=None,
          timestep_spacing=None, callback=None, progress=True):  # fmt: skip
    """Euler in sigma, deterministic (diffusers' EulerDiscreteScheduler, k-diffusion's sample_euler).
    S calls."""
    s, ts, sig = _setup(m, "euler", x_T, num_steps, cond, uncond, guidance_scale, sigmas=sigmas,
                        steps_offset=steps_offset, timestep_spacing=timestep_spacing)  # fmt: skip
    x = _init_noise(x_T, sig, s["timestep_spacing"])
    for i, t in enumerate(tqdm(ts, desc="Euler", disable=not progress)):
        eps = guided_eps(m, model_input(x, sig[i]), t, cond, uncond, guidance_scale)
        x, x0 = euler_step(x, eps, sig[i], sig[i + 1])
        _report(callback, i, t, x, x0, sig[i + 1])
    return x


@torch.no_grad()
def euler_ancestral(m, x_T, num_steps=50, cond=None, uncond=None, guidance_scale=1.0, noise=None,
                    generator=None, sigmas=None, steps_offset=None, timestep_spacing=None, callback=None,
                    progress=True):  # fmt: skip
    """Euler ancestral (diffusers' EulerAncestralDiscreteScheduler): each step adds fresh noise, noise[i] or
    drawn from generator at every step. S calls."""
    s, ts, sig = _setup(m, "euler_ancestral", x_T, num_steps, cond, uncond, guidance_scale, noise=noise,
                        generator=generator, sigmas=sigmas, steps_offset=steps_offset,
                        timestep_spacing=timestep_spacing)  # fmt: skip
    x = _init_noise(x_T, sig, s["timestep_spacing"])
    for i, t in enumerate(tqdm(ts, desc="Euler ancestral", disable=not progress)):
        eps = guided_eps(m, model_input(x, sig[i]), t, cond, uncond, guidance_scale)
        x, x0 = euler_ancestral_step(x, eps, sig[i], sig[i + 1], _noise(noise, i, x, generator))
        _report(callback, i, t, x, x0, sig[i + 1])
    return x


@torch.no_grad()
def heun(m, x_T, num_steps=50, cond=None, uncond=None, guidance_scale=1.0, sigmas=None, steps_offset=None,
         timestep_spacing=None, callback=None, progress=True):  # fmt: skip
    """Heun's method (Karras et al. Algorithm 1; diffusers' HeunDiscreteScheduler): a second call at the next
    timestep, except in the last step into sigma = 0 (Euler). 2S - 1 model calls."""
    s, ts, sig = _setup(m, "heun", x_T, num_steps, cond, uncond, guidance_scale, sigmas=sigmas,
                        steps_offset=steps_offset, timestep_spacing=timestep_spacing)  # fmt: skip
    x = _init_noise(x_T, sig, s["timestep_spacing"])
    for i, t in enumerate(tqdm(ts, desc="Heun", disable=not progress)):
        eps = guided_eps(m, model_input(x, sig[i]), t, cond, uncond, guidance_scale)
        if sig[i + 1] == 0:  # Algorithm 1, line 8: no correction at sigma = 0
            x, x0 = euler_step(x, eps, sig[i], sig[i + 1])
        else:
            x_euler, _ = euler_step(x, eps, sig[i], sig[i + 1])
            z_euler = model_input(x_euler, sig[i + 1])  # the UNet's input at the next timestep
            eps_next = guided_eps(m, z_euler, ts[i + 1], cond, uncond, guidance_scale)
            x, x0 = heun_step(x, eps, sig[i], sig[i + 1], eps_next)
        _report(callback, i, t, x, x0, sig[i + 1])
    return x


@torch.no_grad()
def dpm_2(m, x_T, num_steps=50, cond=None, uncond=None, guidance_scale=1.0, sigmas=None, steps_offset=None,
          timestep_spacing=None, callback=None, progress=True):  # fmt: skip
    """DPM-2 (diffusers' KDPM2DiscreteScheduler): a second call at the log-sigma midpoint, except in the last
    step into sigma = 0 (Euler). 2S - 1 model calls. As diffusers, Karras timesteps are rounded to integers
    (not the midpoints', nor the exponential schedule's)."""
    s, ts, sig = _setup(m, "dpm_2", x_T, num_steps, cond, uncond, guidance_scale, sigmas=sigmas,
                        steps_offset=steps_offset, timestep_spacing=timestep_spacing)  # fmt: skip
    if s["sigmas"] == "karras":
        ts = [float(round(t)) for t in ts]
    mids = dpm_2_midpoint(sig[:-1], sig[1:])  # (S,), the last one 0
    t_mid = sigma_to_t(mids[:-1].cpu(), m.alphas_cumprod, float32=True)  # in float32, as diffusers
    x = _init_noise(x_T, sig, s["timestep_spacing"])
    for i, t in enumerate(tqdm(ts, desc="DPM-2", disable=not progress)):
        eps = guided_eps(m, model_input(x, sig[i]), t, cond, uncond, guidance_scale)
        if sig[i + 1] == 0:
            x, x0 = euler_step(x, eps, sig[i], sig[i + 1])
        else:
            x_mid, _ = euler_step(x, eps, sig[i], mids[i])
            eps_mid = guided_eps(m, model_input(x_mid, mids[i]), t_mid[i], cond, uncond, guidance_scale)
            x, x0 = dpm_2_step(x, eps, sig[i], sig[i + 1], eps_mid)
        _report(callback, i, t, x, x0, sig[i + 1])
    return x


@torch.no_grad()
def lms(m, x_T, num_steps=50, cond=None, uncond=None, guidance_scale=1.0, order=4, sigmas=None,
        steps_offset=None, timestep_spacing=None, callback=None, progress=True):  # fmt: skip
    """LMS in sigma (diffusers' LMSDiscreteScheduler, used as a correct pipeline uses it: x_T times its
    init_noise_sigma, the model input scaled). order: how many past slopes (1-4). S calls."""
    s, ts, sig = _setup(m, "lms", x_T, num_steps, cond, uncond, guidance_scale, order=order, sigmas=sigmas,
                        steps_offset=steps_offset, timestep_spacing=timestep_spacing)  # fmt: skip
    x = _init_noise(x_T, sig, s["timestep_spacing"])
    derivatives = ()  # dx/dsigma of the earlier steps, oldest first
    for i, t in enumerate(tqdm(ts, desc="LMS", disable=not progress)):
        eps = guided_eps(m, model_input(x, sig[i]), t, cond, uncond, guidance_scale)
        x, x0, derivatives = lms_step(x, eps, sig, i, derivatives, order)
        _report(callback, i, t, x, x0, sig[i + 1])
    return x


@torch.no_grad()
def dpmpp_2m(m, x_T, num_steps=25, cond=None, uncond=None, guidance_scale=1.0, sigmas=None, steps_offset=None,
             timestep_spacing=None, callback=None, progress=True):  # fmt: skip
    """DPM-Solver++(2M) (diffusers' DPMSolverMultistepScheduler: algorithm_type "dpmsolver++", solver_order
    2): first order at the first and the last step, second order between. S calls, integer timesteps."""
    _, ts, sig = _setup(m, "dpmpp_2m", x_T, num_steps, cond, uncond, guidance_scale, solver=True,
                        sigmas=sigmas, steps_offset=steps_offset,
                        timestep_spacing=timestep_spacing)  # fmt: skip
    z, x0 = x_T, None  # the UNet's own variables throughout: x_T is z_T
    for i, t in enumerate(tqdm(ts, desc="DPM++ 2M", disable=not progress)):
        eps = guided_eps(m, z, t, cond, uncond, guidance_scale)
        z, x0 = dpmpp_2m_step(z, eps, sig, i, x0_prev=x0)
        if callback is not None:
            callback({"i": i, "t": t, "z": z, "x0": x0})
    return z


@torch.no_grad()
def dpmpp_2m_sde(m, x_T, num_steps=25, cond=None, uncond=None, guidance_scale=1.0, noise=None,
                 generator=None, sigmas=None, steps_offset=None, timestep_spacing=None, callback=None,
                 progress=True):  # fmt: skip
    """DPM-Solver++(2M) SDE (diffusers' algorithm_type "sde-dpmsolver++"): fresh noise every step, noise[i]
    or drawn from generator (also in the last step, where it is multiplied by sigma = 0). S calls."""
    _, ts, sig = _setup(m, "dpmpp_2m_sde", x_T, num_steps, cond, uncond, guidance_scale, solver=True,
                        noise=noise, generator=generator, sigmas=sigmas, steps_offset=steps_offset,
                        timestep_spacing=timestep_spacing)  # fmt: skip
    z, x0 = x_T, None
    for i, t in enumerate(tqdm(ts, desc="DPM++ 2M SDE", disable=not progress)):
        eps = guided_eps(m, z, t, cond, uncond, guidance_scale)
        z, x0 = dpmpp_2m_step(z, eps, sig, i, x0_prev=x0, noise=_noise(noise, i, z, generator))
        if callback is not None:
            callback({"i": i, "t": t, "z": z, "x0": x0})
    return z


@torch.no_grad()
def unipc(m, x_T, num_steps=25, cond=None, uncond=None, guidance_scale=1.0, sigmas=None, steps_offset=None,
          timestep_spacing=None, callback=None, progress=True):  # fmt: skip
    """UniPC, bh2, order 2 (diffusers' UniPCMultistepScheduler defaults): each model call first corrects the
    point it was made at (UniC), then predicts the next (UniP); order 1 at the first and the last step. The
    last prediction, into sigma = 0, is not corrected (no call is left to do it). S calls."""
    _, ts, sig = _setup(m, "unipc", x_T, num_steps, cond, uncond, guidance_scale, solver=True, sigmas=sigmas,
                        steps_offset=steps_offset, timestep_spacing=timestep_spacing)  # fmt: skip
    z, z_prev, x0s, order = x_T, None, [], 0
    for i, t in enumerate(tqdm(ts, desc="UniPC", disable=not progress)):
        eps = guided_eps(m, z, t, cond, uncond, guidance_scale)
        alpha, s_t = vp(sig[i])
        x0 = (z - s_t * eps) / alpha  # at the uncorrected point, where the model was called
        if i > 0:
            z = unipc_correct(z_prev, x0s, x0, sig, i, order)
        x0s = [*x0s[-1:], x0]
        order = min(2, num_steps - i, i + 1)  # warm-up, and lower order in the final step
        z_prev, z = z, unipc_predict(z, x0s, sig, i, order)
        if callback is not None:
            callback({"i": i, "t": t, "z": z, "x0": x0})
    return z
