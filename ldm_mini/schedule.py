"""The forward (noising) process: betas, alpha-bar, q(z_t | z_0).

DDPM  Ho et al. 2020, arXiv:2006.11239: q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I), Eq. 4,
      with alpha_t = 1 - beta_t and ab_t = prod_{s<=t} alpha_s ("alpha-bar", `alphas_cumprod`).
Cosine: Nichol & Dhariwal 2021, arXiv:2102.09672, Eq. 17 (alpha-bar) and the clip of beta at 0.999.
Timesteps are integers 0..T-1 (T = 1000), as in the CompVis checkpoints; index t is the noise level
after t + 1 noising steps.

Naming trap. CompVis' `make_beta_schedule("linear")`, used by every LDM config, is NOT linear in beta:
it is linear in sqrt(beta), beta_t = linspace(sqrt(b_0), sqrt(b_1), T)**2. diffusers calls that
schedule "scaled_linear", and its "linear" is CompVis' "sqrt_linear" (linear in beta). A config that
says `linear_start: 0.00085, linear_end: 0.012` therefore means beta_schedule="scaled_linear" here.

Everything is float32 and computed with the same torch ops as diffusers, so alphas_cumprod agrees
bit for bit (tests/test_schedule.py).
"""

import math
from dataclasses import dataclass

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
    timestep_spacing: str = "leading"  # see samplers.ddim_timesteps
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
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"unknown timestep_spacing {self.timestep_spacing!r}: use one of {TIMESTEP_SPACINGS}"
            )
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
