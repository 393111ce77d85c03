"""Noise schedule parity against diffusers' schedulers (float32, CPU): betas, alpha-bar, q_sample."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ldm_mini import schedule
from ldm_mini.schedule import ScheduleConfig

REAL = Path(__file__).parent / "realconfigs"
PUBLISHED = ["ldm-text2im-large-256", "ldm-celebahq-256", "ldm-super-resolution-4x-openimages"]


def published(name: str) -> tuple[ScheduleConfig, DDIMScheduler]:
    """Our config and diffusers' scheduler, both from the model's scheduler_config.json."""
    raw = json.loads((REAL / name / "scheduler" / "scheduler_config.json").read_text())
    cfg = ScheduleConfig(
        beta_start=raw["beta_start"], beta_end=raw["beta_end"], beta_schedule=raw["beta_schedule"]
    )
    return cfg, DDIMScheduler.from_config(raw)


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_schedules_match_diffusers_exactly(name):
    cfg, ref = published(name)
    betas = schedule.make_betas(cfg)
    assert betas.dtype == torch.float32 and betas.shape == (1000,)
    # Same float32 ops as diffusers: bit-identical, so the tolerance is 0.
    torch.testing.assert_close(betas, ref.betas, rtol=0, atol=0)
    torch.testing.assert_close(schedule.make_alphas_cumprod(cfg), ref.alphas_cumprod, rtol=0, atol=0)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ("linear", "linear"),  # Ho et al. linear-in-beta: CompVis "sqrt_linear"
        ("scaled_linear", "scaled_linear"),  # linear in sqrt(beta): CompVis "linear"
        ("cosine", "squaredcos_cap_v2"),
    ],
)
def test_each_beta_schedule_matches_diffusers_exactly(ours, theirs):
    cfg = ScheduleConfig(beta_start=0.0001, beta_end=0.02, beta_schedule=ours)
    ref = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule=theirs)
    torch.testing.assert_close(schedule.make_betas(cfg), ref.betas, rtol=0, atol=0)
    torch.testing.assert_close(schedule.make_alphas_cumprod(cfg), ref.alphas_cumprod, rtol=0, atol=0)


def test_naming_trap_compvis_linear_is_scaled_linear():
    # CompVis make_beta_schedule("linear"): linspace of square roots, squared (computed there in float64).
    compvis = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ours = schedule.scaled_linear_betas(0.00085, 0.012, 1000)
    torch.testing.assert_close(ours.double(), compvis, rtol=1e-6, atol=0)  # float32 vs float64 rounding only
    assert (schedule.linear_betas(0.00085, 0.012, 1000).double() - compvis).abs().max() > 1e-3  # not this one


def test_q_sample_matches_add_noise():
    cfg = ScheduleConfig()
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 250, 500, 999])
    ours = schedule.q_sample(x0, t, noise, schedule.make_alphas_cumprod(cfg))
    torch.testing.assert_close(ours, ref.add_noise(x0, noise, t), rtol=0, atol=1e-7)


def test_snr():
    ab = schedule.make_alphas_cumprod(ScheduleConfig())
    torch.testing.assert_close(schedule.log_snr(ab), schedule.snr(ab).log(), rtol=0, atol=1e-5)
    assert (schedule.snr(ab).diff() < 0).all()  # noise only grows with t


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="squaredcos_cap_v2.*cosine"):
        ScheduleConfig(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="timestep_spacing"):
        ScheduleConfig(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="x0's shape"):
        schedule.q_sample(torch.zeros(2, 3), torch.tensor([1, 2]), torch.zeros(2, 4), torch.ones(10))
