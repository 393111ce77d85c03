"""Noise schedule parity against diffusers' schedulers (float32, CPU): betas, alpha-bar, q_sample, and the
sampling discretisations (timesteps, alpha-bar pairs, LMS sigmas): bit for bit by default, the plain math
with the diffusers_* options off."""

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_lms_discrete

from ldm_mini import schedule
from ldm_mini.schedule import ScheduleConfig

REAL = Path(__file__).parent / "realconfigs"
PUBLISHED = ["ldm-text2im-large-256", "ldm-celebahq-256", "ldm-super-resolution-4x-openimages"]
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # ldm-text2im-large-256
LMSDiscreteScheduler = scheduling_lms_discrete.LMSDiscreteScheduler  # set_timesteps needs no scipy


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


# --- sampling discretisations ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "spacing, offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)]
)
def test_timesteps_match_diffusers_for_every_step_count(spacing, offset):
    ref = DDIMScheduler(**BETAS, steps_offset=offset, timestep_spacing=spacing)
    for S in range(1, 1001):
        if spacing == "leading" and offset and S == 1000:
            continue  # t = 1000 does not exist: ours raises (below), diffusers would index out of range
        ref.set_timesteps(S)
        ours = schedule.ddim_timesteps(S, 1000, offset, spacing)
        theirs = ref.timesteps.tolist()
        if len(theirs) == S + 1:  # a diffusers quirk: np.arange(T, 0, -T/S) sometimes ends with t = -1
            assert spacing == "trailing" and theirs[-1] == -1
            theirs = theirs[:-1]
        assert ours == theirs, (S, ours, theirs)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_plain_timesteps_are_the_exact_math(spacing):
    T, differ = 1000, []
    for S in range(1, 1001):
        if spacing == "trailing":
            exact = [round(Fraction(T) - Fraction(i * T, S)) - 1 for i in range(S)]
        else:
            exact = [Fraction(i * (T - 1), S - 1) if S > 1 else Fraction(0) for i in reversed(range(S))]
        plain = schedule.spaced_timesteps(S, T, 0, spacing, diffusers_rounding=False)
        assert plain == [float(t) for t in exact], S  # the float nearest the exact value
        rounded = schedule.ddim_timesteps(S, T, 0, spacing, diffusers_rounding=False)
        assert rounded == [round(t) for t in exact], S  # half-way to even, on the exact value
        if rounded != schedule.ddim_timesteps(S, T, 0, spacing):
            differ.append(S)
    assert differ[0] == {"trailing": 48, "linspace": 27}[spacing]  # the docstring's examples


def test_compvis_convention():
    assert schedule.ddim_timesteps(5, 1000, steps_offset=1) == [801, 601, 401, 201, 1]
    ab = schedule.make_alphas_cumprod(ScheduleConfig(**BETAS))
    (a_t, a_prev), *_ = reversed(schedule.ddim_alphas(ab, [801, 601, 401, 201, 1], set_alpha_to_one=False))
    assert a_t == ab[1] and a_prev == ab[0]  # the last step goes to alpha-bar_0, not 1


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_alphas_step_to_the_next_timestep_except_as_diffusers(spacing):
    ab = schedule.make_alphas_cumprod(ScheduleConfig(**BETAS))
    for S in [1, 2, 3, 7, 10, 48, 50]:
        ts = schedule.ddim_timesteps(S, 1000, 0, spacing)
        plain = schedule.ddim_alphas(ab, ts, diffusers_prev=False)
        assert [a_t for a_t, _ in plain] == [ab[t] for t in ts]
        assert [a for _, a in plain] == [*(ab[t] for t in ts[1:]), 1.0]
        same = [a == b for (_, a), (_, b) in zip(plain, schedule.ddim_alphas(ab, ts), strict=True)]
        # t - T//S is the next timestep for "leading", and for "trailing" when S divides T
        assert all(same) == (S == 1 or spacing == "leading" or (spacing == "trailing" and 1000 % S == 0))
        if S > 1:
            first = schedule.plms_first_alphas(ab, ts)
            assert first[1] == ab[ts[1]] and (spacing != "leading" or first[0] == ab[ts[0]])
            assert schedule.plms_first_alphas(ab, ts, diffusers_prev=False) == (ab[ts[0]], ab[ts[1]])
    if spacing == "trailing":  # the docstring's example: 999, 666, 332, and diffusers steps 666 -> 333
        ts = schedule.ddim_timesteps(3, 1000, 0, spacing)
        assert ts == [999, 666, 332] and schedule.ddim_alphas(ab, ts)[1][1] == ab[333]
    if spacing == "linspace":  # 999, 749, 500, ...: PNDM's first update starts at 749 + 200 = 949
        ts = schedule.ddim_timesteps(5, 1000, 0, spacing)
        assert ts[:2] == [999, 749] and schedule.plms_first_alphas(ab, ts)[0] == ab[949]


@pytest.mark.parametrize("spacing, offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
def test_lms_sigmas_match_diffusers(spacing, offset):
    ref = LMSDiscreteScheduler(**BETAS, steps_offset=offset, timestep_spacing=spacing)
    ab = schedule.make_alphas_cumprod(ScheduleConfig(**BETAS))
    for S in [1, 2, 3, 7, 48, 50, 99, 250, 999, 1000]:
        if spacing == "leading" and S == 1000:
            continue
        ref.set_timesteps(S)
        ts = torch.tensor(schedule.spaced_timesteps(S, 1000, offset, spacing))  # float32, linspace fractional
        torch.testing.assert_close(ts, ref.timesteps, rtol=0, atol=0)
        sigmas = schedule.lms_sigmas(ab, ts.tolist())
        torch.testing.assert_close(sigmas, ref.sigmas, rtol=0, atol=0)
        want = ref.init_noise_sigma  # sigma_max, or sqrt(sigma_max^2 + 1) for "leading"
        assert schedule.lms_init_noise_sigma(sigmas.max(), diffusers_spacing=spacing) == want
        # the plain math: float32 throughout, one float32 rounding from diffusers' float64 interpolation
        plain = schedule.lms_sigmas(ab, ts.tolist(), diffusers_rounding=False)
        torch.testing.assert_close(plain, ref.sigmas, rtol=1e-6, atol=0)


def test_lms_sigmas_are_the_ve_noise_levels():
    ab = schedule.make_alphas_cumprod(ScheduleConfig(**BETAS))
    sig = schedule.lms_sigmas(ab, [999.0, 500.0, 0.0, 250.25])
    torch.testing.assert_close(sig[:3], ((1 - ab[[999, 500, 0]]) / ab[[999, 500, 0]]).sqrt(), rtol=0, atol=0)
    assert sig[-1] == 0  # after the last step
    between = ((1 - ab[[250, 251]]) / ab[[250, 251]]).sqrt()
    torch.testing.assert_close(sig[3], 0.75 * between[0] + 0.25 * between[1], rtol=1e-6, atol=0)
    s_max = sig.max()
    assert schedule.lms_init_noise_sigma(s_max) == (s_max**2 + 1) ** 0.5  # std of x_T / sqrt(ab_T)


@pytest.mark.parametrize(
    "args, match",
    [
        ((1000, 0), "num_steps must be from 1 to 1000"),
        ((1000, 1001), "num_steps"),
        ((1000, 10.0), "num_steps"),
        ((1000, True), "num_steps"),
        ((1000, 10, "uniform"), "timestep_spacing 'uniform'"),
        ((1000, 1000, "leading", 1), "steps_offset 1 puts timestep 1000 outside 0..999"),
        ((1000, 10, "leading", -1), "steps_offset -1"),
        ((1000, 10, "leading", 0.5), "steps_offset must be an integer"),
    ],
)
def test_bad_timesteps_are_a_clear_error(args, match):
    with pytest.raises(ValueError, match=match):
        schedule.check_timesteps(*args)
    if len(args) == 4:  # spaced_timesteps checks the same
        with pytest.raises(ValueError, match=match):
            schedule.spaced_timesteps(args[1], args[0], args[3], args[2])


def test_offset_is_ignored_by_trailing_and_linspace():  # as diffusers
    for spacing in ("trailing", "linspace"):
        assert schedule.ddim_timesteps(10, 1000, 5, spacing) == schedule.ddim_timesteps(10, 1000, 0, spacing)


# --- the sigma-space samplers' discretisations ------------------------------------------------------------
def _sigma_scheduler(cls, spacing, offset, sigmas):
    flag = {} if sigmas is None else {f"use_{sigmas}_sigmas": True}
    return cls(**BETAS, timestep_spacing=spacing, steps_offset=offset, **flag)


# Euler, Heun, LMS (KDPM2 too, before its midpoints) place timesteps and sigmas alike (schedule.k_sigmas);
# DPM-Solver++ and UniPC take S of S + 1 points, integer timesteps, Karras rounded and exponential truncated
# (schedule.solver_sigmas). Both: bit for bit.
GRIDS = {
    "k_sigmas": ((EulerDiscreteScheduler, LMSDiscreteScheduler), [1, 2, 3, 7, 10, 25, 48, 50, 99, 250, 500]),
    "solver_sigmas": ((DPMSolverMultistepScheduler, UniPCMultistepScheduler), [1, 2, 3, 7, 10, 20, 25, 50, 99,
                                                                              250, 500]),
}  # fmt: skip


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("sigmas", [None, "karras", "exponential"])
@pytest.mark.parametrize("spacing, offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
def test_sigma_grids_match_diffusers_exactly(grid, spacing, offset, sigmas):
    ab = schedule.make_alphas_cumprod(ScheduleConfig(**BETAS))
    classes, step_counts = GRIDS[grid]
    refs = [_sigma_scheduler(c, spacing, offset, sigmas) for c in classes]
    for S in step_counts:
        if S == 1 and sigmas is not None:
            continue  # diffusers' Karras ramp np.linspace(0, 1, 1) has no end: one sigma, sigma_max
        ts, sig = getattr(schedule, grid)(ab, S, offset, spacing, sigmas)
        for ref in refs:
            ref.set_timesteps(S)
            assert ts == ref.timesteps.tolist(), (type(ref).__name__, S)
            torch.testing.assert_close(sig, ref.sigmas, rtol=0, atol=0)
    if grid == "solver_sigmas" and spacing == "linspace" and sigmas is None:  # the docstring's example
        assert schedule.solver_sigmas(ab, 10)[0] == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    if grid == "solver_sigmas" and sigmas == "exponential":  # sigma_max at t = 998.99999975: truncated
        assert schedule.solver_sigmas(ab, 10, offset, spacing, sigmas)[0][0] == 998


def test_sigma_schedules_span_the_model_sigmas():
    ab = schedule.make_alphas_cumprod(ScheduleConfig(**BETAS))
    own = schedule.model_sigmas(ab)
    assert own[0] == pytest.approx(0.0292, abs=1e-4) and own[-1] == pytest.approx(14.61, abs=1e-2)
    for sigmas in schedule.SIGMA_SCHEDULES:
        ts, sig = schedule.k_sigmas(ab, 10, sigmas=sigmas)  # linspace: from t = 999 to t = 0
        assert (sig[0], sig[-2], sig[-1]) == (own[-1], own[0], 0) and ts[0] == 999 and ts[-1] == 0
        assert (sig.diff() < 0).all()
    karras, expo = (schedule.k_sigmas(ab, 10, sigmas=s)[1] for s in schedule.SIGMA_SCHEDULES)
    # rho = 7 lies above the exponential schedule in between: in log sigma its steps are short at high sigma
    # and long at low sigma (in sigma itself they shrink towards sigma_min, as Karras et al. say)
    assert (karras[1:-2] > expo[1:-2]).all()
    with pytest.raises(ValueError, match="unknown sigmas 'linear'"):
        schedule.k_sigmas(ab, 10, sigmas="linear")
