"""The forward (noising) process: betas, alpha-bar, q(z_t | z_0).

DDPM  Ho et al. 2020, arXiv:2006.11239: q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I), Eq. 4,
      with alpha_t = 1 - beta_t and ab_t = prod_{s<=t} alpha_s ("alpha-bar", `alphas_cumprod`).
Cosine: Nichol & Dhariwal 2021, arXiv:2102.09672, Eq. 17 (alpha-bar) and the clip of beta at 0.999.
Timesteps are integers 0..T-1 (T = 1000), as in the CompVis checkpoints; index t is the noise level
after t + 1 noising steps (LMS with the "linspace" spacing also visits fractional t, interpolated).

Naming trap. CompVis' `make_beta_schedule("linear")`, used by every LDM config, is NOT linear in beta:
it is linear in sqrt(beta), beta_t = linspace(sqrt(b_0), sqrt(b_1), T)**2. diffusers calls that
schedule "scaled_linear", and its "linear" is CompVis' "sqrt_linear" (linear in beta). A config that
says `linear_start: 0.00085, linear_end: 0.012` therefore means beta_schedule="scaled_linear" here.

Everything is float32 and computed with the same torch ops as diffusers, so alphas_cumprod agrees
bit for bit (tests/test_schedule.py).

Sampling discretisations (the second half): which S of the T timesteps a sampler visits (three spacings,
Lin et al. 2024, arXiv:2305.08891, Table 2), the alpha-bar pairs of its steps, and LMS's sigmas. Each is
written as the plain math; where diffusers 0.42.1 computes something else (float64 numpy arithmetic
deciding half-way roundings, a step that lands beside the next timestep), a named keyword option
(`diffusers_rounding`, `diffusers_prev`, `diffusers_spacing`) reproduces it, and the samplers use it,
so that they match diffusers' schedulers bit for bit (tests/test_samplers.py).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

BETA_SCHEDULES = ("scaled_linear", "linear", "cosine")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule, plus the inference-timestep convention of the source of the weights."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "scaled_linear" (= CompVis "linear") | "linear" | "cosine"
    steps_offset: int = 0  # diffusers DDIM convention; CompVis DDIM = steps_offset 1
    set_alpha_to_one: bool = True  # CompVis DDIM = False (last step's alpha_prev = alphas_cumprod[0])
    timestep_spacing: str = "leading"  # see spaced_timesteps
    clip_sample: bool = False  # clamp the predicted x_0 to [-1, 1] (DDIM/DDPM); False for all LDMs

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            hint = (
                " (diffusers' name for the cosine schedule)"
                if self.beta_schedule == "squaredcos_cap_v2"
                else ""
            )
            raise ValueError(
                f"unknown beta_schedule {self.beta_schedule!r}{hint}: use one of {BETA_SCHEDULES}"
            )
        _check_spacing(self.timestep_spacing)
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")


def scaled_linear_betas(beta_start: float, beta_end: float, T: int) -> Tensor:
    """CompVis "linear" = diffusers "scaled_linear": linear in sqrt(beta). (T,) float32."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2


def linear_betas(beta_start: float, beta_end: float, T: int) -> Tensor:
    """Ho et al. 2020 Sec. 4: beta linear from beta_start to beta_end (CompVis "sqrt_linear"). (T,)"""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021 Eq. 17: ab(t) = cos^2((t/T + s) / (1 + s) * pi/2), then
    beta_t = 1 - ab(t+1)/ab(t), clipped at max_beta (diffusers "squaredcos_cap_v2"). Python floats
    (float64) first, float32 at the end, as diffusers."""

    def alpha_bar(u: float) -> float:  # u = t / T in [0, 1]
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(cfg: ScheduleConfig) -> Tensor:
    """beta_1..beta_T of the config's schedule: (T,) float32."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        return scaled_linear_betas(cfg.beta_start, cfg.beta_end, T)
    if cfg.beta_schedule == "linear":
        return linear_betas(cfg.beta_start, cfg.beta_end, T)
    return cosine_betas(T)  # "cosine" ignores beta_start / beta_end


def alphas_cumprod(betas: Tensor) -> Tensor:
    """ab_t = prod_{s<=t} (1 - beta_s) (DDPM, above Eq. 4). (T,) -> (T,)"""
    return torch.cumprod(1.0 - betas, dim=0)


def make_alphas_cumprod(cfg: ScheduleConfig) -> Tensor:
    """alpha-bar of a ScheduleConfig: (T,) float32, equal to diffusers' scheduler.alphas_cumprod."""
    return alphas_cumprod(make_betas(cfg))


def snr(alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio of z_t: ab_t / (1 - ab_t) (Kingma et al. 2021, arXiv:2107.00630, Eq. 2)."""
    return alphas_cumprod / (1 - alphas_cumprod)


def log_snr(alphas_cumprod: Tensor) -> Tensor:
    """log SNR(t) = log(ab_t) - log(1 - ab_t): from +7.1 to -5.4 for ldm-text2im-large-256's schedule."""
    return torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Sample z_t ~ q(z_t | z_0) (DDPM Eq. 4): sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps.

    x0, noise: (B, ...); t: (B,) integer timesteps (or a 0-dim tensor, shared by the batch)."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    ab = alphas_cumprod.to(x0.device, x0.dtype)[t.to(x0.device)]  # (B,)
    ab = ab.reshape(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1): broadcast over (c, h, w)
    return ab**0.5 * x0 + (1 - ab) ** 0.5 * noise


# --- sampling: the timesteps, alpha-bars and sigmas that S steps visit ------------------------------------
def _check_spacing(timestep_spacing: str) -> None:
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}: use one of {TIMESTEP_SPACINGS}")


def check_timesteps(T: int, num_steps, timestep_spacing: str | None = None, steps_offset: int | None = None):
    """Raise ValueError, one line naming the problem and the fix, unless S = num_steps timesteps of this
    spacing fit in 0..T-1 (None: that setting is not checked). spaced_timesteps calls it."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be from 1 to {T} (the training timesteps), got {num_steps!r}")
    if timestep_spacing is not None:
        _check_spacing(timestep_spacing)
    if timestep_spacing == "leading" and steps_offset is not None:  # the only spacing with an offset
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int):
            raise ValueError(f"steps_offset must be an integer (0, or 1 for CompVis), got {steps_offset!r}")
        first = (num_steps - 1) * (T // num_steps) + steps_offset
        if steps_offset < 0 or first > T - 1:
            bad = steps_offset if steps_offset < 0 else first
            fits = [s for s in range(num_steps, 0, -1) if (s - 1) * (T // s) + steps_offset <= T - 1]
            fix = (
                f"use at most {fits[0]} steps, or steps_offset=0"
                if steps_offset > 0 and fits
                else "use 0 or 1"
            )
            where = f"outside 0..{T - 1} at {num_steps} steps"
            raise ValueError(f"steps_offset {steps_offset} puts timestep {bad} {where}: {fix}")


def spaced_timesteps(num_steps: int, T: int = 1000, steps_offset: int = 0, timestep_spacing: str = "leading",
                     *, diffusers_rounding: bool = True) -> list[float]:  # fmt: skip
    """The S = num_steps sampling timesteps, high to low, as floats (Lin et al. 2024, Table 2):

    leading   t = i * (T // S) + steps_offset  i = S-1 .. 0   S=5: 800 600 400 200 0 (offset 1: 801 ... 1)
    trailing  t = round(T - i * T / S) - 1     i = 0 .. S-1   S=5: 999 799 599 399 199 (starts at T-1)
    linspace  t = i * (T - 1) / (S - 1)        i = S-1 .. 0   S=5: 999 749.25 499.5 249.75 0

    round() goes to the even integer at .5, as Python's and numpy's. diffusers_rounding=True computes the
    last two as diffusers does, in float64 steps of an inexact T/S, which moves some exact half-way values
    to one side: np.arange(T, 0, -T/S) is T + i * ((T - T/S) - T) (S = 48: 936 where the plain math has
    round(937.5) - 1 = 937), np.linspace(0, T - 1, S) is i * ((T - 1) / (S - 1)) (S = 27: 499.49999999999994
    where the plain math has 499.5, which DDIM rounds to 500). (That arange sometimes has an extra last
    value, t = -1, e.g. for S = 61: diffusers then takes S + 1 steps; here always S.)"""
    check_timesteps(T, num_steps, timestep_spacing, steps_offset)
    S = num_steps
    if timestep_spacing == "leading":  # 0, r, 2r, ... (r = T // S), shifted by steps_offset
        ts = [i * (T // S) + steps_offset for i in reversed(range(S))]
    elif timestep_spacing == "trailing":  # from T - 1 down in steps of T / S
        delta = (T - T / S) - T  # numpy's float64 step of np.arange(T, 0, -T / S)
        ts = [round(T + i * delta if diffusers_rounding else T - i * T / S) - 1 for i in range(S)]
    elif S == 1:  # "linspace" of one point
        ts = [0.0]
    elif diffusers_rounding:  # np.linspace(0, T - 1, S): i * step, the last point exactly T - 1
        step = (T - 1) / (S - 1)
        ts = [T - 1, *(i * step for i in reversed(range(S - 1)))]
    else:  # "linspace": S points from T - 1 down to 0
        ts = [i * (T - 1) / (S - 1) for i in reversed(range(S))]
    return [float(t) for t in ts]


def ddim_timesteps(num_steps: int, T: int = 1000, steps_offset: int = 0, timestep_spacing: str = "leading",
                   *, diffusers_rounding: bool = True) -> list[int]:  # fmt: skip
    """spaced_timesteps rounded to integers: the timesteps of DDIM, PLMS and DDPM (linspace S=5: 999 749 500
    250 0). steps_offset is used by "leading" only, as in diffusers."""
    ts = spaced_timesteps(num_steps, T, steps_offset, timestep_spacing, diffusers_rounding=diffusers_rounding)
    return [round(t) for t in ts]


def ddim_alphas(alphas_cumprod: Tensor, timesteps: list[int], set_alpha_to_one: bool = True,
                *, diffusers_prev: bool = True) -> list[tuple[Tensor, Tensor]]:  # fmt: skip
    """(ab_t, ab_prev) of each step of a sampler that visits `timesteps` (high to low): ab_prev is alpha-bar
    at the next timestep, and after the last step 1 (set_alpha_to_one) or alphas_cumprod[0] (CompVis).

    diffusers_prev=True: as diffusers' DDIM and PNDM schedulers, ab_prev at t - T//S instead (the final
    value below 0), which is the next timestep for "leading", and for "trailing" only when S divides T
    (S = 3 visits 999, 666, 332 and steps 666 -> 333). diffusers' DDPMScheduler steps to the next
    timestep, ending at 1 (diffusers_prev=False, set_alpha_to_one=True)."""
    final = alphas_cumprod.new_tensor(1.0) if set_alpha_to_one else alphas_cumprod[0]
    if diffusers_prev:
        ratio = alphas_cumprod.shape[0] // len(timesteps)
        prev = [t - ratio if t - ratio >= 0 else None for t in timesteps]
    else:
        prev = [*timesteps[1:], None]
    return [
        (alphas_cumprod[t], final if p is None else alphas_cumprod[p])
        for t, p in zip(timesteps, prev, strict=True)
    ]


def plms_first_alphas(alphas_cumprod: Tensor, timesteps: list[int], *, diffusers_prev: bool = True):
    """(ab_from, ab_to) of PLMS's first update, the one after its trial step (S >= 2): from timesteps[0]
    to timesteps[1], as CompVis plms.py. diffusers_prev=True: as diffusers' PNDMScheduler, from
    timesteps[1] + T//S to timesteps[1] (the same for "leading"; linspace S = 5: from 949, not 999)."""
    t_from = timesteps[1] + alphas_cumprod.shape[0] // len(timesteps) if diffusers_prev else timesteps[0]
    return alphas_cumprod[t_from], alphas_cumprod[timesteps[1]]


def lms_sigmas(alphas_cumprod: Tensor, timesteps: list[float], *, diffusers_rounding: bool = True) -> Tensor:
    """sigma(t) = sqrt((1 - ab_t) / ab_t), the noise level of the variance-exploding form z_t / sqrt(ab_t)
    = z_0 + sigma * eps (Karras et al. 2022, arXiv:2206.00364), at each (fractional) t, linear between
    training steps, then a final 0: (S + 1,). diffusers_rounding=True: as diffusers' LMSDiscreteScheduler,
    the float32 sigmas of the T training steps interpolated in float64 (np.interp), then rounded to float32;
    else all in alphas_cumprod's dtype."""
    sigma = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # (T,) at the training steps
    if diffusers_rounding:
        sigma = sigma.double()
    t = torch.tensor(timesteps, dtype=sigma.dtype, device=sigma.device)  # (S,)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=sigma.shape[0] - 1)
    out = (sigma[hi] - sigma[lo]) * (t - lo) + sigma[lo]  # linear between lo and lo + 1
    out = torch.cat([out, out.new_zeros(1)])  # sigma = 0 after the last step
    return out.float() if diffusers_rounding else out


def lms_init_noise_sigma(sigma_max: Tensor, *, diffusers_spacing: str | None = None) -> Tensor:
    """The std of x_T in LMS's variance-exploding state: unit-variance z_T is z_T / sqrt(ab_T) =
    z_T * sqrt(sigma_max^2 + 1). diffusers_spacing: diffusers' LMSDiscreteScheduler uses that for
    "leading" only, and sigma_max (k-diffusion's prior N(0, sigma_max^2)) for "linspace" and "trailing"."""
    if diffusers_spacing in ("linspace", "trailing"):
        return sigma_max
    return (sigma_max**2 + 1) ** 0.5


# --- sigma-space samplers: sigma schedules and the sigma <-> t map ---------------------------------------
# The samplers of ksamplers.py integrate in sigma, the noise level of the variance-exploding state
# z_t / sqrt(ab_t) = z_0 + sigma_t * eps, sigma_t = sqrt((1 - ab_t) / ab_t) (Karras et al. 2022,
# arXiv:2206.00364).
# Which sigmas they visit: the model's own at spaced timesteps (None), or a schedule between two of them.
SIGMA_SCHEDULES = ("karras", "exponential")


def model_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - ab_t) / ab_t) at the T training steps: (T,), increasing (0.029 .. 14.6, LDMs)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022, Eq. 5, for i = 0 .. n-1 (the samplers append sigma_n = 0):

        sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

    rho = 7 (the paper's choice) makes the steps shrink towards sigma_min, where the details form (in log
    sigma they grow: the exponential schedule, rho -> infinity, is uniform there). Python floats (float64),
    as diffusers' numpy."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    ramp = [i / (n - 1) for i in range(n)] if n > 1 else [0.0]
    return [(hi + r * (lo - hi)) ** rho for r in ramp]


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> list[float]:
    """n sigmas from sigma_max to sigma_min, evenly spaced in log sigma (k-diffusion get_sigmas_exponential,
    diffusers use_exponential_sigmas): Eq. 5 in the limit rho -> infinity. Python floats (float64)."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return [math.exp(hi + (i / (n - 1) if n > 1 else 0.0) * (lo - hi)) for i in range(n)]


def sigma_to_t(sigmas, alphas_cumprod: Tensor, *, diffusers_rounding: bool = True,
               float32: bool = False) -> list[float]:  # fmt: skip
    """The (fractional) timestep of each sigma: log sigma interpolated linearly between the training steps,
    t = k + (log sigma_k - log sigma) / (log sigma_k - log sigma_{k+1}) where sigma_k <= sigma < sigma_{k+1},
    clamped to [0, T - 1] (k-diffusion DiscreteSchedule.sigma_to_t, diffusers' _sigma_to_t); in float64, or
    all in float32 (float32=True: diffusers' KDPM2DiscreteScheduler for its midpoints, which meet this
    function as float32 tensors). diffusers_rounding=True: the logs by numpy, those of the training sigmas
    in float32, as diffusers computes them. numpy's float32 log is 1 ulp from the exact one for a fifth of
    them, which moves t by < 1e-4, but also puts sigma_max at t = 998.99999975, not 999: what diffusers' int64
    cast (DPM-Solver++ and UniPC with the exponential schedule) truncates to 998."""

    def log(x: Tensor) -> Tensor:
        return torch.from_numpy(np.log(x.numpy())) if diffusers_rounding else x.log()

    dtype = torch.float32 if float32 else torch.float64
    train = model_sigmas(alphas_cumprod).float().cpu()  # (T,), increasing
    log_train = log(train if diffusers_rounding or float32 else train.double())
    log_sigma = log(torch.as_tensor(sigmas, dtype=dtype).cpu().clamp(min=1e-10))  # (n,)
    low = torch.searchsorted(log_train.to(dtype), log_sigma, right=True) - 1
    low = low.clamp(0, len(train) - 2)  # the training step at or below each sigma
    step = log_train[low] - log_train[low + 1]  # < 0, in log_train's dtype
    w = ((log_train[low].to(dtype) - log_sigma) / step.to(dtype)).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).tolist()


def _schedule(name: str | None, sigma_min: float, sigma_max: float, n: int) -> list[float]:
    if name not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigmas {name!r}: use one of {SIGMA_SCHEDULES}, or None (the model's)")
    return (karras_sigmas if name == "karras" else exponential_sigmas)(sigma_min, sigma_max, n)


def k_sigmas(alphas_cumprod: Tensor, num_steps: int, steps_offset: int = 0,
             timestep_spacing: str = "linspace",
             sigmas: str | None = None) -> tuple[list[float], Tensor]:  # fmt: skip
    """The timesteps (S floats, float32 values) and sigmas (S + 1,, float32, the last 0) that Euler, Euler
    ancestral, Heun, DPM-2 and LMS visit, as diffusers' Euler/EulerAncestral/Heun/KDPM2/LMSDiscreteScheduler:
    sigmas=None: the model's sigma at each spaced_timesteps t (lms_sigmas, linear between training steps);
    "karras" / "exponential": S new sigmas between the first and last of those (for "linspace", the model's
    sigma_max and sigma_min), each at the timestep sigma_to_t gives (fractional)."""
    T = alphas_cumprod.shape[0]
    ts = torch.tensor(spaced_timesteps(num_steps, T, steps_offset, timestep_spacing)).tolist()  # float32
    own = lms_sigmas(alphas_cumprod, ts)  # (S + 1,)
    if sigmas is None:
        return ts, own
    new = _schedule(sigmas, own[-2].item(), own[0].item(), num_steps)
    ts = torch.tensor(sigma_to_t(new, alphas_cumprod), dtype=torch.float32).tolist()
    return ts, torch.tensor([*new, 0.0], dtype=torch.float32)


def solver_sigmas(alphas_cumprod: Tensor, num_steps: int, steps_offset: int = 0,
                  timestep_spacing: str = "linspace",
                  sigmas: str | None = None) -> tuple[list[int], Tensor]:  # fmt: skip
    """The integer timesteps (S,) and sigmas (S + 1,, float32, the last 0) of DPM-Solver++ and UniPC, placed
    as diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler place them: for "linspace" and
    "leading" the first S of S + 1 spaced points, rounded (linspace, S = 10: 999, 899, ..., 100; not 0: the
    last step goes from t = 100 to sigma = 0), for "trailing" spaced_timesteps; the model's sigmas there, or
    Karras / exponential sigmas between the model's sigma_min and sigma_max (whatever the spacing), each at
    the timestep sigma_to_t gives, rounded (Karras) or truncated (exponential: diffusers' int64 cast) to an
    integer. (diffusers' DPM-Solver++ skips that rounding for the cosine schedule; here it is always done.)"""
    T = alphas_cumprod.shape[0]
    if timestep_spacing == "trailing":
        ts = spaced_timesteps(num_steps, T, steps_offset, timestep_spacing)
    else:  # S + 1 points, the last one (t = 0, or steps_offset) dropped
        ts = spaced_timesteps(num_steps + 1, T, steps_offset, timestep_spacing)[:-1]
    ts = [round(t) for t in ts]
    if sigmas is None:
        return ts, lms_sigmas(alphas_cumprod, [float(t) for t in ts])
    own = model_sigmas(alphas_cumprod)
    new = _schedule(sigmas, own[0].item(), own[-1].item(), num_steps)
    ts = [round(t) if sigmas == "karras" else int(t) for t in sigma_to_t(new, alphas_cumprod)]
    return ts, torch.tensor([*new, 0.0], dtype=torch.float32)
