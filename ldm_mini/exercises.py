"""Exercises with graders that give hints: re-implement a piece of ldm_mini, check it against the library.

    from ldm_mini import exercises
    exercises.check("ddim_step", ddim_step)     # prints a one- or two-sentence verdict; True when right

    python -m ldm_mini.exercises list           # the exercises, lesson by lesson, with their signatures
    python -m ldm_mini.exercises check mine.py  # grades each function of mine.py named like an exercise

Each exercise names the library function it re-implements, and the student's function takes the same
arguments. A grader calls both on the same cases (random inputs of several shapes, float32 and float64, and
the edge cases: t = 0 and T-1, batch 1, eta 0 and 1, the last step, ...), every call on fresh copies. Equal
to the dtype's tolerance on every case: right. Otherwise the grader runs the exercise's recorded wrong
versions (its `mistakes` table: alpha instead of alpha-bar, a missing square root, sin and cos swapped, ...)
on the same cases, and when the student's function agrees with one of them on all of them, its hint names
that mistake; else the verdict names the first case that differs. A student's function that raises gets its
own message and the line of its code, never a stack trace. notebooks/exercises/ holds one notebook per lesson
(a blank per exercise, then its check); notebooks/COURSE.md is the teacher's guide.
"""

from __future__ import annotations

import argparse
import copy
import dis
import importlib
import inspect
import math
import runpy
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import samplers, schedule, train, unet
from .autoencoder import DiagonalGaussian

NOT_IMPLEMENTED = "not implemented yet"


@dataclass(frozen=True)
class Case:
    """One input of a grader: a label for the verdict, and `make()` -> fresh (args, kwargs) for one call."""

    label: str
    make: Callable[[], tuple[tuple, dict]]


def case(label: str, *args, **kwargs) -> Case:
    """A case of fixed values, deep-copied for every call, so that no call sees what another changed."""
    return Case(label, lambda: copy.deepcopy((args, kwargs)))


@dataclass(frozen=True)
class Exercise:
    """One exercise: what the student writes, what it is compared with, on which cases, and its mistakes."""

    name: str  # the student's function is named so; check()'s first argument
    lesson: str  # the teaching notebook it goes with (notebooks/<lesson>.ipynb, notebooks/exercises/...)
    reimplements: str  # the library function the verdicts compare with
    signature: str
    equation: str  # where the formula comes from, for the verdicts
    reference: Callable
    cases: Callable[[], list[Case]]  # built at grading time, under a fixed seed
    mistakes: tuple[tuple[Callable, str], ...] = ()  # (a wrong version, the hint naming its mistake)
    returns: tuple[str, ...] = ()  # the names of the items of a tuple result
    observe: Callable | None = None  # (result, args) -> what is compared; default: the result
    changes_arguments: bool = False  # True for train_step, which updates its model
    tolerance: tuple[float, float] | None = None  # (rtol, atol) instead of _tolerance's for float32


EXERCISES: dict[str, Exercise] = {}


def _register(ex: Exercise, bugs: Callable | None = None, hints: dict[str, str] | None = None) -> None:
    """Add an exercise; `bugs(..., bug=key)` computes the wrong version that `hints[key]` describes."""
    mistakes = tuple((partial(bugs, bug=key), hint) for key, hint in (hints or {}).items())
    EXERCISES[ex.name] = Exercise(**{**ex.__dict__, "mistakes": mistakes})


# --- grading ---------------------------------------------------------------------------------------------
def check(name: str, fn) -> bool:
    """Grade `fn` as the exercise `name`: print the verdict (one or two sentences), return True if right."""
    ok, verdict = grade(name, fn)
    print(verdict)
    return ok


def grade(name: str, fn) -> tuple[bool, str]:
    """(right?, the verdict) of `fn` as the exercise `name`, without printing."""
    ex = EXERCISES.get(name)
    if ex is None:
        return False, f"There is no exercise {name!r}; the exercises are: {', '.join(EXERCISES)}."
    if fn is None or fn is Ellipsis or _is_blank(fn):
        return False, f"{name}: {NOT_IMPLEMENTED}: fill in the blank, then run this check again."
    if not callable(fn):
        return False, f"{name}: expected a function with the signature {ex.signature}, got {_kind(fn)}."
    with torch.random.fork_rng(devices=[]):  # the student's global RNG state is left as it was
        torch.manual_seed(0)
        cases = ex.cases()
        wants = [_observe(ex, *_call(ex.reference, c)) for c in cases]
        gots = []
        for c in cases:
            args, kwargs = c.make()
            before = None if ex.changes_arguments else _tensors(ex, args, kwargs, clone=True)
            try:
                result = fn(*args, **kwargs)
            except NotImplementedError:
                return False, f"{name}: {NOT_IMPLEMENTED}: fill in the blank, then run this check again."
            except Exception as e:  # the student's bug: its message and line, not a traceback
                return False, _crash(ex, fn, e, c)
            if _has_ellipsis(result):
                return False, f"{name}: {NOT_IMPLEMENTED}: what it returns still holds a `...` blank."
            if result is None:
                return False, f"{name}: your function returned None ({c.label}): did you forget `return`?"
            if before is not None and (changed := _changed(before, _tensors(ex, args, kwargs))):
                return False, (
                    f"{name}: your function changed its argument `{changed}` in place ({c.label}): compute "
                    f"a new tensor (z = z - ..., not z -= ...), as {ex.reimplements} does."
                )
            gots.append(_observe(ex, result, args))
        diffs = [_difference(g, w, ex.returns, ex.tolerance) for g, w in zip(gots, wants, strict=True)]
        if not any(diffs):
            labels = "; ".join(c.label for c in cases)
            return True, f"{name}: right. It equals {ex.reimplements} on all {len(cases)} cases ({labels})."
        i = next(i for i, d in enumerate(diffs) if d)
        for wrong, hint in ex.mistakes:
            if _agrees(ex, wrong, cases, gots):
                return False, f"{name}: not right yet: {diffs[i]} ({cases[i].label}). Hint: {hint}"
        right = sum(d is None for d in diffs)
        return False, (
            f"{name}: not right yet: {diffs[i]} ({cases[i].label}); it is right on {right} of {len(cases)} "
            f"cases. Compare each term with {ex.equation}."
        )


def _call(fn: Callable, c: Case):
    args, kwargs = c.make()
    return fn(*args, **kwargs), args


def _observe(ex: Exercise, result, args):
    return result if ex.observe is None else ex.observe(result, args)


def _agrees(ex: Exercise, wrong: Callable, cases: list[Case], gots: list) -> bool:
    """Does the student's output equal this wrong version's on every case?"""
    for c, got in zip(cases, gots, strict=True):
        try:
            out = _observe(ex, *_call(wrong, c))
        except Exception:
            return False
        if _difference(got, out, ex.returns, ex.tolerance) is not None:
            return False
    return True


def _tolerance(dtype: torch.dtype, tolerance: tuple[float, float] | None = None) -> tuple[float, float]:
    """(rtol, atol): loose enough for the same formula computed in another order, or with a float32 constant
    in a float64 computation; every recorded mistake is off by far more."""
    if dtype == torch.float64:
        return (1e-5, 1e-6)
    return tolerance or (1e-4, 1e-5)


def _difference(
    got, want, names: tuple[str, ...] = (), tolerance=None, what: str = "the result"
) -> str | None:
    """None when `got` equals `want` (to the tolerance of want's dtype), else what differs, in a few words."""
    if isinstance(want, tuple | list):
        if not isinstance(got, tuple | list):
            return f"{what} is {_kind(got)}, where the library returns a tuple of {len(want)}"
        if len(got) != len(want):
            return f"{what} has {len(got)} items, the library's {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            item = f"{what}'s item {i}" + (f" ({names[i]})" if i < len(names) else "")
            if d := _difference(g, w, (), tolerance, item):
                return d
        return None
    if isinstance(want, Tensor):
        if isinstance(got, int | float) and want.ndim == 0:
            got = torch.tensor(got, dtype=want.dtype)
        if not isinstance(got, Tensor):
            return f"{what} is {_kind(got)}, the library's a tensor"
        if got.shape != want.shape:
            return f"{what} has shape {tuple(got.shape)}, the library's {tuple(want.shape)}"
        if got.dtype != want.dtype:
            return f"{what} is {got.dtype}, the library's {want.dtype}"
        got, want = got.detach(), want.detach()
        rtol, atol = _tolerance(want.dtype, tolerance)
        if torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
            return None
        if (got.isnan() & ~want.isnan()).any():
            return f"{what} has NaN where the library's has numbers"
        err = (got - want).abs().nan_to_num(nan=math.inf).max().item()
        return f"{what} differs from the library's by up to {err:.2g}"
    if isinstance(want, int | float):
        if isinstance(got, Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, int | float):
            return f"{what} is {_kind(got)}, the library's a number"
        if math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-6) or (math.isnan(got) and math.isnan(want)):
            return None
        return f"{what} is {got:.6g}, the library's {want:.6g}"
    return None if got == want else f"{what} is {got!r}, the library's {want!r}"


def _kind(x) -> str:
    return "None" if x is None else f"a {type(x).__name__}"


def _is_blank(fn) -> bool:
    """True for a function whose body is only `...`, `pass` or a docstring."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_CONST", "RETURN_CONST") and ins.argval is None:
            continue
        if ins.opname not in ("RESUME", "NOP", "CACHE", "RETURN_VALUE"):
            return False
    return True


def _has_ellipsis(x) -> bool:
    return x is Ellipsis or (isinstance(x, tuple | list) and any(_has_ellipsis(y) for y in x))


def _tensors(ex: Exercise, args: tuple, kwargs: dict, clone: bool = False) -> dict[str, Tensor]:
    """The tensor arguments by name (lists of tensors as name[i]), for the check that none is changed."""
    try:
        params = list(inspect.signature(ex.reference).parameters)
    except (TypeError, ValueError):
        params = []
    named = {(params[i] if i < len(params) else f"argument {i}"): a for i, a in enumerate(args)} | kwargs
    out = {}
    for key, value in named.items():
        items = enumerate(value) if isinstance(value, list | tuple) else [(None, value)]
        for i, v in items:
            if isinstance(v, Tensor):
                out[key if i is None else f"{key}[{i}]"] = v.detach().clone() if clone else v
    return out


def _changed(before: dict[str, Tensor], after: dict[str, Tensor]) -> str | None:
    for key, old in before.items():
        new = after.get(key)
        if new is not None and (new.shape != old.shape or not torch.equal(new.detach(), old)):
            return key
    return None


def _crash(ex: Exercise, fn, e: Exception, c: Case) -> str:
    """The student's exception, one line: its type and message, and the line of their code it came from."""
    message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else '(no message)'}"
    frames = traceback.extract_tb(e.__traceback__)[1:]  # [0] is the call in grade()
    if not frames:  # raised by the call itself: the arguments do not fit the student's signature
        return f"{ex.name}: calling your function raised {message}: give it the signature {ex.signature}."
    mine = getattr(getattr(fn, "__code__", None), "co_filename", None)
    library = (str(Path(torch.__file__).parent), str(Path(__file__).parent))
    own = [f for f in frames if f.filename == mine]
    f = (own or [f for f in frames if not f.filename.startswith(library)] or frames)[-1]
    place = "your cell" if "ipykernel" in f.filename or f.filename.startswith("<") else Path(f.filename).name
    code = f": `{f.line.strip()}`" if f.line else ""
    return f"{ex.name}: your function raised {message} ({c.label}), at line {f.lineno} of {place}{code}."


# --- shared test inputs ----------------------------------------------------------------------------------
def _ab() -> Tensor:
    """alpha-bar of every LDM: the CompVis "linear" (= scaled_linear) schedule, T = 1000. (1000,) float32."""
    return schedule.make_alphas_cumprod(schedule.ScheduleConfig())


def _randn(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(shape, dtype=dtype)  # the grader has seeded the global RNG (in a forked state)


def _sqrt(x):
    return x**0.5


class ToyModel:
    """A stand-in for LatentDiffusion in the guidance and loss exercises: `alphas_cumprod` and a cheap,
    deterministic predict_noise(x, t, context) that depends on x, t and context, row by row."""

    def __init__(self, channels: int = 4, context_dim: int = 6, dtype: torch.dtype = torch.float32):
        g = torch.Generator().manual_seed(0)
        self.alphas_cumprod = _ab()
        self.mix = torch.randn(channels, channels, generator=g).to(dtype) / channels**0.5
        self.proj = torch.randn(context_dim, channels, generator=g).to(dtype)

    def predict_noise(self, x: Tensor, t, context: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1).expand(x.shape[0])  # (B,)
        h = torch.einsum("bchw,cd->bdhw", x, self.mix) * (1 + t / 1000)[:, None, None, None]
        if context is not None:
            h = h + (context.mean(1) @ self.proj)[:, :, None, None]  # (B, L, D) -> (B, C, 1, 1)
        return torch.tanh(h)


# === lesson 01: the noise schedule ========================================================================
def _scaled_linear_cases():
    return [case("LDM's schedule: 0.00085 to 0.012, T = 1000", 0.00085, 0.012, 1000),
            case("DDPM's range: 1e-4 to 0.02, T = 1000", 1e-4, 0.02, 1000),
            case("T = 10", 0.00085, 0.012, 10), case("T = 1", 0.00085, 0.012, 1)]  # fmt: skip


def _scaled_linear_bugs(beta_start, beta_end, T, *, bug):
    if bug == "linear":
        return torch.linspace(beta_start, beta_end, T)
    if bug == "not squared":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T)
    if bug == "float64":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if bug == "T + 1":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T + 1) ** 2


_register(Exercise(
    "scaled_linear_betas", "01_noise_schedule", "schedule.scaled_linear_betas",
    "scaled_linear_betas(beta_start, beta_end, T)", "the CompVis 'linear' schedule (schedule.py's header)",
    schedule.scaled_linear_betas, _scaled_linear_cases), _scaled_linear_bugs, {
    "linear": "this is linear in beta (diffusers' 'linear'); every LDM uses CompVis' 'linear', which is "
              "linear in sqrt(beta): linspace(sqrt(beta_start), sqrt(beta_end), T), then squared.",
    "not squared": "you return sqrt(beta): square the linspace of the square roots.",
    "float64": "compute in float32 (torch.linspace's default), as diffusers does, so that alpha-bar agrees "
               "bit for bit.",
    "T + 1": "T betas, beta_1 .. beta_T: linspace(..., T) points, not T + 1.",
})  # fmt: skip


def _cosine_cases():
    return [case("T = 1000", 1000), case("T = 50", 50), case("s = 0.02, T = 100", 100, s=0.02),
            case("max_beta = 0.5, T = 20", 20, max_beta=0.5), case("T = 1", 1)]  # fmt: skip


def _cosine_bugs(T, s=0.008, max_beta=0.999, *, bug):
    trig = math.sin if bug == "sin" else math.cos
    power = 1 if bug == "not squared" else 2
    offset = 0.0 if bug == "no offset" else s

    def ab(u):
        return trig((u + offset) / (1 + s) * math.pi / 2) ** power

    if bug == "alpha-bar":
        return torch.tensor([ab((i + 1) / T) for i in range(T)])
    ratio = [ab((i + 1) / T) / ab(i / T) for i in range(T)]  # alpha-bar(t + 1) / alpha-bar(t)
    if bug == "reversed":
        ratio = [ab(i / T) / ab((i + 1) / T) for i in range(T)]
    return torch.tensor([1 - r if bug == "no clip" else min(1 - r, max_beta) for r in ratio])


_register(Exercise(
    "cosine_betas", "01_noise_schedule", "schedule.cosine_betas", "cosine_betas(T, s=0.008, max_beta=0.999)",
    "Nichol & Dhariwal 2021, Eq. 17 and the clip of beta", schedule.cosine_betas, _cosine_cases),
    _cosine_bugs, {
    "no clip": "clip each beta at max_beta: alpha-bar(T) is 0, so the last beta would be 1 (the paper clips "
               "at 0.999).",
    "alpha-bar": "that is alpha-bar itself; beta_t = 1 - alpha-bar((t+1)/T) / alpha-bar(t/T).",
    "reversed": "the ratio is upside down: beta_t = 1 - alpha-bar((t+1)/T) / alpha-bar(t/T), the later one "
                "on top.",
    "sin": "alpha-bar is a cos^2, not a sin^2: it falls from 1 at t = 0 to 0 at t = T.",
    "not squared": "alpha-bar(t) is cos SQUARED ((t/T + s) / (1 + s) * pi/2).",
    "no offset": "the offset s goes inside the cosine: cos((t/T + s) / (1 + s) * pi/2).",
})  # fmt: skip


def _cumprod_cases():
    return [case("the LDM schedule, T = 1000", schedule.scaled_linear_betas(0.00085, 0.012, 1000)),
            case("the cosine schedule", schedule.cosine_betas(1000)),
            case("7 random betas", torch.rand(7) * 0.05), case("one beta", torch.tensor([0.02])),
            case("float64", torch.rand(5, dtype=torch.float64) * 0.1)]  # fmt: skip


def _cumprod_bugs(betas, *, bug):
    if bug == "alpha":
        return 1 - betas
    if bug == "betas":
        return torch.cumprod(betas, dim=0)
    if bug == "cumsum":
        return 1 - torch.cumsum(betas, dim=0)
    if bug == "exclusive":
        return torch.cat([betas.new_ones(1), torch.cumprod(1 - betas, dim=0)[:-1]])


_register(Exercise(
    "alphas_cumprod", "01_noise_schedule", "schedule.alphas_cumprod", "alphas_cumprod(betas)",
    "DDPM (Ho et al. 2020), the definitions above Eq. 4", schedule.alphas_cumprod, _cumprod_cases),
    _cumprod_bugs, {
    "alpha": "that is alpha_t = 1 - beta_t; alpha-bar_t is their running product, prod_{s<=t} alpha_s "
             "(torch.cumprod).",
    "betas": "that multiplies the betas; alpha-bar multiplies the alphas, alpha_s = 1 - beta_s.",
    "cumsum": "1 - (sum of the betas) is only the first-order approximation: multiply the (1 - beta_s).",
    "exclusive": "off by one step: alpha-bar_t includes step t itself (alpha-bar_0 = 1 - beta_0, not 1).",
})  # fmt: skip


def _q_sample_cases():
    ab, cases = _ab(), []
    f32, f64 = torch.float32, torch.float64
    for label, shape, t, dtype in [("t = 0, 250, 500, 999, batch 4", (4, 3, 8, 8), [0, 250, 500, 999], f32),
                                   ("batch 1, t = 999", (1, 4, 8, 8), [999], f32),
                                   ("batch 1, t = 0", (1, 4, 8, 8), [0], f32),
                                   ("float64, batch 3", (3, 4, 4, 4), [1, 600, 998], f64),
                                   ("x0 of shape (2, 16), t = 10, 990", (2, 16), [10, 990], f32),
                                   ("one 0-dim t for a batch of 3", (3, 4, 4, 4), 500, f32)]:  # fmt: skip
        x0, noise = _randn(*shape, dtype=dtype), _randn(*shape, dtype=dtype)
        cases.append(case(label, x0, torch.tensor(t), noise, ab))
    return cases


def _q_sample_bugs(x0, t, noise, alphas_cumprod, *, bug):
    ab = alphas_cumprod.to(x0.dtype)
    if bug == "alpha":  # alpha_t = ab_t / ab_{t-1}
        ab = ab / torch.cat([ab.new_ones(1), ab[:-1]])
    index = {"off by one": t - 1, "one t": t.reshape(-1)[0]}.get(bug, t)
    a = ab[index].reshape(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
    if bug == "no sqrt":
        return a * x0 + (1 - a) * noise
    if bug == "variance":
        return a**0.5 * x0 + (1 - a) * noise
    if bug == "swapped":
        return (1 - a) ** 0.5 * x0 + a**0.5 * noise
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


_register(Exercise(
    "q_sample", "01_noise_schedule", "schedule.q_sample", "q_sample(x0, t, noise, alphas_cumprod)",
    "DDPM Eq. 4", schedule.q_sample, _q_sample_cases), _q_sample_bugs, {
    "no sqrt": "square roots missing: the mean is sqrt(alpha-bar_t) x0 and the std is sqrt(1 - alpha-bar_t).",
    "variance": "(1 - alpha-bar_t) is the variance of the noise: multiply the noise by its square root.",
    "swapped": "signal and noise swapped: sqrt(alpha-bar_t) multiplies x0, sqrt(1 - alpha-bar_t) the noise.",
    "alpha": "that is alpha_t, one step's, instead of alpha-bar_t: take alphas_cumprod[t] as it is.",
    "off by one": "off by one: timestep t is alphas_cumprod[t] (timesteps run 0..T-1), not [t - 1].",
    "one t": "each batch element has its own t: index alphas_cumprod[t] with the (B,) tensor and reshape it "
             "to (B, 1, 1, 1) to broadcast.",
})  # fmt: skip


# === lesson 02: the autoencoder ===========================================================================
def _moments_cases(with_noise: bool):
    cases = []
    for label, (b, c, h, w), dtype in [("batch 2, 4 latent channels", (2, 4, 4, 4), torch.float32),
                                       ("batch 1, 3 channels, 5 x 7", (1, 3, 5, 7), torch.float32),
                                       ("float64", (2, 4, 3, 3), torch.float64)]:  # fmt: skip
        moments = torch.cat([_randn(b, c, h, w, dtype=dtype), torch.rand(b, c, h, w, dtype=dtype) * 4 - 3], 1)
        extra = (_randn(b, c, h, w, dtype=dtype),) if with_noise else ()
        cases.append(case(label, moments, *extra))
    logvar = torch.tensor([-40.0, 25.0, 0.0, 1.0]).repeat(2).reshape(1, 2, 2, 2)
    extreme = torch.cat([_randn(1, 2, 2, 2), logvar], 1)
    cases.append(case("log-variances of -40 and 25", extreme, *((_randn(1, 2, 2, 2),) if with_noise else ())))
    return cases


def _moments(moments, bug):
    mean, logvar = moments.chunk(2, dim=1)  # (B, 2C, h, w) -> 2 x (B, C, h, w)
    if bug == "mean/logvar swapped":
        mean, logvar = logvar, mean
    return mean, (logvar if bug == "no clamp" else logvar.clamp(-30.0, 20.0))


def _posterior_sample(moments: Tensor, noise: Tensor) -> Tensor:
    """DiagonalGaussian(moments).sample() with its noise eps given: mean + std * eps."""
    posterior = DiagonalGaussian(moments)
    return posterior.mean + posterior.std * noise


def _sample_bugs(moments, noise, *, bug):
    mean, logvar = _moments(moments, bug)
    std = {"variance": torch.exp(logvar), "logvar": logvar}.get(bug, torch.exp(0.5 * logvar))
    return mean + std * noise


_register(Exercise(
    "posterior_sample", "02_autoencoder", "autoencoder.DiagonalGaussian.sample (with its noise given)",
    "posterior_sample(moments, noise)", "the reparameterisation trick (Kingma & Welling 2014, Sec. 2.4)",
    _posterior_sample, partial(_moments_cases, True)), _sample_bugs, {
    "variance": "exp(logvar) is the variance: the std is its square root, exp(logvar / 2).",
    "logvar": "logvar is log sigma^2, not sigma: the std is exp(0.5 * logvar).",
    "mean/logvar swapped": "the first half of the channels is the mean, the second the log-variance: "
                           "mean, logvar = moments.chunk(2, dim=1).",
    "no clamp": "clamp logvar to [-30, 20] first, as the original does: it keeps exp() finite.",
})  # fmt: skip


def _posterior_kl(moments: Tensor) -> Tensor:
    """DiagonalGaussian(moments).kl(): KL(N(mean, var) || N(0, I)) per batch element, (B,)."""
    return DiagonalGaussian(moments).kl()


def _kl_bugs(moments, *, bug):
    mean, logvar = _moments(moments, bug)
    var = torch.exp(0.5 * logvar) if bug == "std" else torch.exp(logvar)
    terms = mean**2 + var - (0 if bug == "no -1" else 1) + (logvar if bug == "+logvar" else -logvar)
    if bug == "batch sum":
        return 0.5 * terms.sum()
    total = terms.mean(dim=[1, 2, 3]) if bug == "mean" else terms.sum(dim=[1, 2, 3])
    return total if bug == "no half" else 0.5 * total


_register(Exercise(
    "posterior_kl", "02_autoencoder", "autoencoder.DiagonalGaussian.kl", "posterior_kl(moments)",
    "the Gaussian KL in closed form (Kingma & Welling 2014, Appendix B)", _posterior_kl,
    partial(_moments_cases, False)), _kl_bugs, {
    "no half": "the factor 1/2 is missing: KL = 0.5 * sum(mean^2 + var - 1 - logvar).",
    "+logvar": "the log-variance enters with a minus sign: ... - 1 - logvar.",
    "std": "var is exp(logvar), the variance, not exp(logvar / 2), the std.",
    "no -1": "the -1 per element is missing: mean^2 + var - 1 - logvar is 0 when q is N(0, I).",
    "mean": "sum over the latent's (c, h, w), not a mean: one KL per image.",
    "batch sum": "one KL per batch element: sum over dims 1, 2, 3 only, to shape (B,).",
    "no clamp": "clamp logvar to [-30, 20] first, as the original does: it keeps exp() finite.",
})  # fmt: skip


def _scale_cases():
    per_channel = _randn(2, 4, 8, 8) * torch.tensor([0.5, 1.0, 3.0, 8.0])[None, :, None, None]
    return [case("std 5, batch 2", _randn(2, 4, 8, 8) * 5), case("batch 1, 64 values", _randn(1, 4, 4, 4)),
            case("a mean of 3", _randn(2, 4, 8, 8) * 2 + 3), case("channels of other scales", per_channel),
            case("float64", _randn(2, 3, 4, 4, dtype=torch.float64) * 0.2)]  # fmt: skip


def _scale_bugs(z, *, bug):
    if bug == "std":
        return z.std().item()
    if bug == "variance":
        return 1 / z.var().item()
    if bug == "rms":
        return 1 / z.pow(2).mean().sqrt().item()
    if bug == "biased":
        return 1 / z.std(correction=0).item()
    if bug == "per channel":
        return 1 / z.transpose(0, 1).flatten(1).std(dim=1).mean().item()


_register(Exercise(
    "scale_factor", "02_autoencoder", "train.scale_factor", "scale_factor(z)",
    "LDM's rescaling of the latent (CompVis scale_by_std: 1 / z.flatten().std())", train.scale_factor,
    _scale_cases), _scale_bugs, {
    "std": "that is the std of z; the scale factor is 1 / std, so that scale_factor * z has unit variance.",
    "variance": "1 / variance: take the square root, 1 / std.",
    "rms": "that is 1 / root-mean-square: the std subtracts the mean first (z.std()).",
    "biased": "the std divides by n - 1 (Bessel's correction, torch.std's default); yours divides by n.",
    "per channel": "one number for the whole latent: the std of all its values, z.flatten().std(), not a "
                   "mean of per-channel stds.",
})  # fmt: skip


# === lesson 03: attention =================================================================================
def _attention_cases():
    return [case("self-attention, 3 heads, 16 tokens of 8", _randn(2, 3, 16, 8), _randn(2, 3, 16, 8),
                 _randn(2, 3, 16, 8)),
            case("cross-attention: 10 queries, 7 keys", _randn(2, 4, 10, 8), _randn(2, 4, 7, 8),
                 _randn(2, 4, 7, 8)),
            case("batch 1, 3-D, 5 queries, 6 keys of 4", _randn(1, 5, 4), _randn(1, 6, 4), _randn(1, 6, 4)),
            case("float64", *(_randn(2, 2, 6, 3, dtype=torch.float64) * 2 for _ in range(3)))]  # fmt: skip


def _attention_bugs(q, k, v, *, bug):
    d = {"no scale": 1.0, "scale d": q.shape[-1], "scale tokens": k.shape[-2] ** 0.5}.get(bug)
    d = q.shape[-1] ** 0.5 if d is None else d
    scores = q @ k.transpose(-1, -2) / d  # (..., N, L)
    weights = scores.softmax(dim=-2 if bug == "softmax axis" else -1)
    return weights if bug == "no v" else weights @ v


_register(Exercise(
    "attention", "03_text_encoder", "F.scaled_dot_product_attention (unet.Attention's kernel)",
    "attention(q, k, v)", "the attention of LDM Sec. 3.3 (Vaswani et al. 2017, Eq. 1)",
    F.scaled_dot_product_attention, _attention_cases), _attention_bugs, {
    "softmax axis": "softmax over the wrong axis: each query's weights over the keys sum to 1 (dim=-1).",
    "no scale": "divide the scores Q K^T by sqrt(d), d the size of a query (q.shape[-1]).",
    "scale d": "divide by sqrt(d), not by d.",
    "scale tokens": "sqrt(d) with d the size of a query (q.shape[-1]), not the number of keys.",
    "no v": "that is the attention weights: multiply them by V.",
})  # fmt: skip


def _attention_layer(attn: unet.Attention, x: Tensor, context: Tensor | None = None) -> Tensor:
    """unet.Attention.forward: multi-head attention of the queries x over context (x itself when None)."""
    return attn(x, context)


def _layer_cases():
    cross = unet.Attention(16, 12, heads=2, head_dim=8, qkv_bias=False)
    four = unet.Attention(16, 12, heads=4, head_dim=4, qkv_bias=False)
    self_attn = unet.Attention(16, 16, heads=2, head_dim=8, qkv_bias=True)
    return [case("cross-attention, 2 heads, batch 2", cross, _randn(2, 10, 16), _randn(2, 7, 12)),
            case("4 heads of 4, batch 1", four, _randn(1, 9, 16), _randn(1, 5, 12)),
            case("self-attention (context None)", self_attn, _randn(2, 6, 16)),
            case("float64", copy.deepcopy(cross).double(), _randn(2, 5, 16, dtype=torch.float64),
                 _randn(2, 3, 12, dtype=torch.float64))]  # fmt: skip


def _layer_bugs(attn, x, context=None, *, bug):
    context = x if context is None else context
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)  # (B, N | L, heads * d)
    heads = 1 if bug == "no heads" else attn.heads
    if bug == "head order":  # channels split as (d, heads)
        q, k, v = (y.unflatten(-1, (-1, heads)).transpose(-1, -2).transpose(1, 2) for y in (q, k, v))
    else:
        q, k, v = (y.unflatten(-1, (heads, -1)).transpose(1, 2) for y in (q, k, v))  # (B, heads, N | L, d)
    d = q.shape[-1] * (attn.heads if bug == "width scale" else 1)
    weights = (q @ k.transpose(-1, -2) / d**0.5).softmax(dim=-2 if bug == "softmax axis" else -1)
    out = (weights @ v).transpose(1, 2).flatten(2)  # (B, N, heads * d)
    return out if bug == "no to_out" else attn.to_out(out)


_register(Exercise(
    "cross_attention", "03_text_encoder", "unet.Attention.forward", "cross_attention(attn, x, context=None)",
    "LDM Sec. 3.3: softmax(Q K^T / sqrt(d)) V with Q = W_Q x, K = W_K context, V = W_V context",
    _attention_layer, _layer_cases), _layer_bugs, {
    "no heads": "split the width into attn.heads heads, (B, N, heads * d) -> (B, heads, N, d), attend in "
                "each, then merge them back.",
    "head order": "split the width as (heads, d): head h owns channels h*d .. (h+1)*d - 1 "
                  "(y.unflatten(-1, (attn.heads, -1))).",
    "width scale": "scale by sqrt(d) of ONE head (d = width / heads), not of the whole width.",
    "softmax axis": "softmax over the keys (the last axis): each query's weights sum to 1.",
    "no to_out": "project the merged heads with the output layer, attn.to_out.",
})  # fmt: skip


# === lesson 04: the UNet's parts ==========================================================================
def _embedding_cases():
    return [case("t = 0, 1, 250, 999, dim 32", torch.tensor([0, 1, 250, 999]), 32),
            case("batch 1, t = 0, dim 8", torch.tensor([0]), 8),
            case("batch 1, t = 999, dim 320 (the text2im UNet)", torch.tensor([999]), 320),
            case("fractional t (LMS), dim 16", torch.tensor([0.5, 749.25]), 16),
            case("max_period = 100, dim 16", torch.tensor([3, 70]), 16, max_period=100.0)]  # fmt: skip


def _embedding_bugs(t, dim, max_period=10000.0, *, bug):
    half = dim // 2
    i = torch.arange(1, half + 1) if bug == "from 1" else torch.arange(half)
    div = {"freq shift": half - 1, "over dim": dim}.get(bug, half)
    sign = 1 if bug == "positive" else -1
    freqs = torch.exp(sign * math.log(max_period) * i.float() / div)  # (dim/2,)
    angles = t[:, None].float() * freqs[None, :]  # (B, dim/2)
    if bug == "interleaved":
        return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).flatten(1)
    first, second = (torch.sin, torch.cos) if bug == "sin first" else (torch.cos, torch.sin)
    return torch.cat([first(angles), second(angles)], dim=-1)


_register(Exercise(
    "timestep_embedding", "04_unet", "unet.timestep_embedding",
    "timestep_embedding(t, dim, max_period=10000.0)",
    "the sinusoidal embedding (Vaswani et al. 2017, Sec. 3.5; cos first as CompVis)", unet.timestep_embedding,
    _embedding_cases, tolerance=(1e-4, 5e-4)), _embedding_bugs, {  # float32 angles t * w up to 999 rad
    "sin first": "sin and cos swapped: CompVis (diffusers' flip_sin_to_cos=True) puts the cos half first.",
    "interleaved": "the two halves are concatenated, [cos(t w) | sin(t w)], not interleaved.",
    "freq shift": "w_i = max_period^(-i / (dim/2)): divide by dim/2, not dim/2 - 1 (diffusers' "
                  "freq_shift=1).",
    "over dim": "the exponent is -i / (dim/2), i = 0 .. dim/2 - 1: you divided by dim.",
    "positive": "the frequencies fall: w_i = max_period^(-i / (dim/2)), with a minus sign.",
    "from 1": "i starts at 0, so the first frequency is 1 (cos(t) and sin(t)).",
})  # fmt: skip


def _resblock(block: unet.ResBlock, x: Tensor, emb: Tensor) -> Tensor:
    """unet.ResBlock.forward: x (B, C_in, H, W) and emb (B, time_dim), SiLU already applied."""
    return block(x, emb)


def _resblock_cases():
    wide, same = unet.ResBlock(8, 16, time_dim=12, groups=4), unet.ResBlock(16, 16, time_dim=12, groups=4)
    return [case("8 -> 16 channels (a 1x1 shortcut), batch 2", wide, _randn(2, 8, 6, 6), _randn(2, 12)),
            case("16 -> 16 channels, batch 1, 5 x 7", same, _randn(1, 16, 5, 7), _randn(1, 12)),
            case("float64", copy.deepcopy(wide).double(), _randn(2, 8, 4, 4, dtype=torch.float64),
                 _randn(2, 12, dtype=torch.float64))]  # fmt: skip


def _resblock_bugs(block, x, emb, *, bug):
    def norm_act(norm, h):
        return norm(F.silu(h)) if bug == "act first" else F.silu(norm(h))

    h = block.conv1(norm_act(block.norm1, x))  # (B, C_out, H, W)
    time = block.time_emb_proj(F.silu(emb) if bug == "silu twice" else emb)[:, :, None, None]
    h = h if bug == "time at the end" else h + time
    h = block.conv2(h if bug == "no second norm" else norm_act(block.norm2, h))
    h = h + time if bug == "time at the end" else h
    skip = x if block.conv_shortcut is None else block.conv_shortcut(x)
    return h if bug == "no skip" else skip + h


_register(Exercise(
    "resblock", "04_unet", "unet.ResBlock.forward", "resblock(block, x, emb)",
    "the ADM/CompVis ResBlock (unet.py: GroupNorm-SiLU-conv, + time, GroupNorm-SiLU-conv, + skip)", _resblock,
    _resblock_cases), _resblock_bugs, {
    "time at the end": "add the projected time embedding between the two convolutions (after conv1), not "
                       "after conv2.",
    "silu twice": "emb arrives with its SiLU applied (once, in UNet.forward): project it with "
                  "block.time_emb_proj directly.",
    "no skip": "the block is residual: return skip + h, skip = x, or block.conv_shortcut(x) when the channel "
               "count changes.",
    "act first": "GroupNorm first, then SiLU, then the conv: silu(norm(x)).",
    "no second norm": "the second half is GroupNorm (norm2), SiLU, conv2, like the first.",
})  # fmt: skip


# === lesson 05: sampling ==================================================================================
def _guidance_cases():
    m, m64 = ToyModel(), ToyModel(dtype=torch.float64)
    cond, uncond = _randn(2, 7, 6), _randn(2, 7, 6)
    return [case("scale 4, batch 2", m, _randn(2, 4, 8, 8), 500, cond, uncond, 4.0),
            case("scale 1 (no guidance), uncond None", m, _randn(2, 4, 8, 8), 500, cond, None, 1.0),
            case("scale 0", m, _randn(2, 4, 8, 8), 10, cond, uncond, 0.0),
            case("scale 7.5, batch 1, t a 0-dim tensor", m, _randn(1, 4, 8, 8), torch.tensor(999), cond[:1],
                 uncond[:1], 7.5),
            case("float64, scale 2, t = 0", m64, _randn(2, 4, 4, 4, dtype=torch.float64), 0, cond.double(),
                 uncond.double(), 2.0)]  # fmt: skip


def _guidance_bugs(m, x, t, cond=None, uncond=None, scale=1.0, *, bug):
    e_c = m.predict_noise(x, t, cond)
    if scale == 1.0:
        return e_c
    e_u = m.predict_noise(x, t, uncond)
    return {"swapped": e_c + scale * (e_u - e_c), "scaled cond": e_u + scale * e_c, "no uncond": scale * e_c,
            "1 + w": e_c + scale * (e_c - e_u)}[bug]  # fmt: skip


_register(Exercise(
    "guided_eps", "05_sampling", "samplers.guided_eps",
    "guided_eps(m, x, t, cond=None, uncond=None, scale=1.0)",
    "classifier-free guidance (Ho & Salimans 2022, Eq. 6, with scale = 1 + w)", samplers.guided_eps,
    _guidance_cases), _guidance_bugs, {
    "swapped": "uncond and cond swapped: guidance is eps_uncond + scale * (eps_cond - eps_uncond).",
    "scaled cond": "scale multiplies the difference (eps_cond - eps_uncond), not eps_cond alone.",
    "no uncond": "keep the unconditional eps: eps_uncond + scale * (eps_cond - eps_uncond).",
    "1 + w": "that is (1 + w) eps_c - w eps_u with w = scale (Ho & Salimans Eq. 6); ldm_mini's and "
             "diffusers' scale is 1 + w: eps_uncond + scale * (eps_cond - eps_uncond).",
})  # fmt: skip


def _steps(*pairs):
    """(a_t, a_prev) 0-dim tensors of (t, t_prev) pairs; t_prev None = alpha-bar 1 after the last step."""
    ab = _ab()
    return [(ab[t], ab.new_tensor(1.0) if p is None else ab[p]) for t, p in pairs]


def _sigma_cases():
    (a, p), (b, q), (c, r), (d, s) = _steps((999, 949), (500, 450), (49, None), (250, 200))
    ab = _ab()
    return [case("eta = 0, t = 999 -> 949", a, p, 0.0), case("eta = 1, t = 500 -> 450", b, q, 1.0),
            case("eta = 0.5, t = 999 -> 949", a, p, 0.5),
            case("the last step, to alpha-bar 1, eta = 1", c, r, 1.0),
            case("float64, eta = 1", d.double(), s.double(), 1.0),
            case("a_t, a_prev of shape (4,), eta = 1", ab[[999, 700, 300, 50]], ab[[949, 650, 250, 0]],
                 1.0)]  # fmt: skip


def _sigma_bugs(a_t, a_prev, eta, *, bug):
    first = (1 - a_t) / (1 - a_prev) if bug == "ratio" else (1 - a_prev) / (1 - a_t)
    second = 1 - a_prev / a_t if bug == "second" else 1 - a_t / a_prev
    if bug == "no sqrt":
        return eta * first * second
    if bug == "eta inside":
        return (eta * first * second) ** 0.5
    return (1 if bug == "no eta" else eta) * (first * second) ** 0.5


_register(Exercise(
    "ddim_sigma", "05_sampling", "samplers.ddim_sigma", "ddim_sigma(a_t, a_prev, eta)", "DDIM Eq. 16",
    samplers.ddim_sigma, _sigma_cases), _sigma_bugs, {
    "ratio": "the first factor is (1 - alpha-bar_prev) / (1 - alpha-bar_t): the next step's over this one's.",
    "second": "the second factor is 1 - alpha-bar_t / alpha-bar_prev (alpha-bar_t < alpha-bar_prev, so it is "
              "positive).",
    "no sqrt": "sigma is a standard deviation: both factors go under a square root.",
    "eta inside": "eta multiplies the square root, it is not inside it.",
    "no eta": "multiply by eta: eta = 0 makes DDIM deterministic, eta = 1 DDPM-like.",
})  # fmt: skip


def _ddim_cases():
    pairs = (999, 949), (500, 450), (49, None), (250, 200), (999, 899)
    (a, p), (b, q), (c, r), (d, s), (e, f) = _steps(*pairs)
    sigma_b, sigma_d = samplers.ddim_sigma(b, q, 1.0), samplers.ddim_sigma(d, s, 1.0)
    z, eps = _randn(2, 4, 8, 8), _randn(2, 4, 8, 8)
    return [case("eta = 0, t = 999 -> 949, batch 2", z, eps, a, p),
            case("eta = 1 with noise, t = 500 -> 450", z, eps, b, q, sigma_b, _randn(2, 4, 8, 8)),
            case("sigma 0.05 (a Python float) with noise", z, eps, b, q, 0.05, _randn(2, 4, 8, 8)),
            case("the last step, to alpha-bar 1, batch 1", z[:1], eps[:1], c, r),
            case("float64, eta = 1 with noise", z.double(), eps.double(), d.double(), s.double(),
                 sigma_d.double(), _randn(2, 4, 8, 8, dtype=torch.float64)),
            case("clip=True, t = 999 -> 899", 3 * z, eps, e, f, clip=True)]  # fmt: skip


def _ddim_bugs(z, eps, a_t, a_prev, sigma=0.0, noise=None, clip=False, *, bug):
    if bug == "swapped":
        a_t, a_prev = a_prev, a_t
    x0 = (z - (1 - a_t) * eps) / a_t if bug == "x0 sqrt" else (z - _sqrt(1 - a_t) * eps) / _sqrt(a_t)
    if clip and bug != "no clip":
        x0 = x0.clamp(-1, 1)
    var = {"no sigma": 1 - a_prev, "sigma not squared": 1 - a_prev - sigma}.get(bug, 1 - a_prev - sigma**2)
    z_next = (a_prev if bug == "a_prev sqrt" else _sqrt(a_prev)) * x0 + _sqrt(var) * eps
    if noise is not None and bug != "no noise":
        z_next = z_next + sigma * noise
    return z_next, x0


_register(Exercise(
    "ddim_step", "05_sampling", "samplers.ddim_step", "ddim_step(z, eps, a_t, a_prev, sigma=0.0, noise=None, "
    "clip=False)", "DDIM Eq. 12", samplers.ddim_step, _ddim_cases, returns=("z_next", "x0")), _ddim_bugs, {
    "no sigma": "the direction term is sqrt(1 - alpha-bar_prev - sigma^2) * eps (Eq. 12): subtract sigma^2.",
    "sigma not squared": "subtract sigma SQUARED under the square root: sqrt(1 - alpha-bar_prev - sigma^2).",
    "no noise": "when noise is given, add sigma * noise (the random term of Eq. 12).",
    "x0 sqrt": "the predicted z_0 is (z - sqrt(1 - alpha-bar_t) * eps) / sqrt(alpha-bar_t): square roots "
               "missing.",
    "a_prev sqrt": "sqrt(alpha-bar_prev) multiplies the predicted z_0, not alpha-bar_prev.",
    "swapped": "a_t and a_prev swapped: alpha-bar_t belongs to the current z (the predicted z_0), "
               "alpha-bar_prev to the step's target.",
    "no clip": "with clip=True, clamp the predicted z_0 to [-1, 1] before using it.",
})  # fmt: skip


def _ddpm_cases():
    (a, p), (b, q), (c, r), (d, s), (e, f), (g, h) = _steps((999, 949), (500, 499), (0, None), (250, 200),
                                                            (999, 899), (600, 550))  # fmt: skip
    z, eps, noise = _randn(2, 4, 8, 8), _randn(2, 4, 8, 8), _randn(2, 4, 8, 8)
    return [case("t = 999 -> 949 (a jump) with noise, batch 2", z, eps, a, p, noise),
            case("t = 500 -> 499 (one step) with noise", z, eps, b, q, noise),
            case("the last step, t = 0 -> alpha-bar 1, no noise, batch 1", z[:1], eps[:1], c, r),
            case("float64, t = 250 -> 200, with noise", z.double(), eps.double(), d.double(), s.double(),
                 noise.double()),
            case("clip=True, t = 999 -> 899, no noise", 3 * z, eps, e, f, clip=True),
            case("no noise (the mean), t = 600 -> 550", z, eps, g, h)]  # fmt: skip


def _ddpm_bugs(z, eps, a_t, a_prev, noise=None, clip=False, *, bug):
    alpha = a_t if bug == "alpha-bar" else a_t / a_prev  # alpha of the (possibly multi-step) jump
    beta = 1 - alpha
    x0 = (z - (1 - a_t) * eps) / a_t if bug == "x0 sqrt" else (z - _sqrt(1 - a_t) * eps) / _sqrt(a_t)
    if clip and bug != "no clip":
        x0 = x0.clamp(-1, 1)
    c0, ct = _sqrt(a_prev) * beta / (1 - a_t), _sqrt(alpha) * (1 - a_prev) / (1 - a_t)
    mean = ct * x0 + c0 * z if bug == "coefficients" else c0 * x0 + ct * z
    if noise is None:
        return mean, x0
    ratio = (1 - a_t) / (1 - a_prev) if bug == "ratio" else (1 - a_prev) / (1 - a_t)
    var = (beta if bug == "fixed_large" else ratio * beta).clamp(min=1e-20)
    return mean + (var if bug == "var sqrt" else _sqrt(var)) * noise, x0


_register(Exercise(
    "ddpm_step", "05_sampling", "samplers.ddpm_step",
    "ddpm_step(z, eps, a_t, a_prev, noise=None, clip=False)",
    "DDPM Eq. 6-7", samplers.ddpm_step, _ddpm_cases, returns=("z_prev", "x0")), _ddpm_bugs, {
    "fixed_large": "the variance of the wrong distribution: beta_t is the forward step's ('fixed_large'); "
                   "the posterior's is beta~ = (1 - alpha-bar_prev) / (1 - alpha-bar_t) * beta_t (Eq. 7).",
    "ratio": "the variance's ratio is upside down: beta~ = (1 - alpha-bar_prev) / (1 - alpha-bar_t) * "
             "beta_t.",
    "var sqrt": "beta~ is a variance: add sqrt(beta~) * noise.",
    "alpha-bar": "alpha-bar instead of alpha: the step's alpha_t is alpha-bar_t / alpha-bar_prev (beta_t = "
                 "1 - alpha_t).",
    "coefficients": "the mean's coefficients are swapped: sqrt(alpha-bar_prev) beta_t / (1 - alpha-bar_t) "
                    "multiplies the predicted z_0, sqrt(alpha_t) (1 - alpha-bar_prev) / (1 - alpha-bar_t) "
                    "multiplies z_t.",
    "x0 sqrt": "the predicted z_0 is (z - sqrt(1 - alpha-bar_t) * eps) / sqrt(alpha-bar_t): square roots "
               "missing.",
    "no clip": "with clip=True, clamp the predicted z_0 to [-1, 1] before the mean.",
})  # fmt: skip


def _plms_cases():
    eps, old = _randn(2, 4, 8, 8), [_randn(2, 4, 8, 8) for _ in range(5)]  # old: oldest first
    return [case("no history (the first step)", eps, []), case("1 earlier eps", eps, old[-1:]),
            case("2 earlier eps", eps, old[-2:]), case("3 earlier eps (4th order)", eps, old[-3:]),
            case("5 earlier eps: the 3 newest count", eps, old),
            case("float64, batch 1, 3 earlier", eps[:1].double(),
                 [e[:1].double() for e in old[:3]])]  # fmt: skip


def _plms_bugs(eps, old_eps, *, bug):
    older = old_eps[:3] if bug == "oldest three" else old_eps[-3:]
    history = [eps, *older] if bug == "oldest first" else [eps, *reversed(older)]  # newest first
    weights, denom = samplers.ADAMS_BASHFORTH[len(history)]
    if bug == "eps only":
        return eps
    total = sum(w * e for w, e in zip(weights, history, strict=True))
    return total if bug == "no denominator" else total / denom


_register(Exercise(
    "plms_eps", "05_sampling", "samplers.plms_eps", "plms_eps(eps, old_eps)",
    "the Adams-Bashforth combination of PLMS (Liu et al. 2022; CompVis plms.py)", samplers.plms_eps,
    _plms_cases), _plms_bugs, {
    "oldest first": "the weights go newest first: 55/24 multiplies eps, -59/24 the newest earlier one, "
                    "old_eps[-1] (old_eps is oldest first).",
    "no denominator": "divide the weighted sum by the denominator (2, 12 or 24).",
    "eps only": "combine eps with the earlier ones (Adams-Bashforth) when old_eps is not empty.",
    "oldest three": "use the 3 newest earlier eps, old_eps[-3:], not the oldest.",
})  # fmt: skip


# Euler: ldm_mini has no Euler step on this branch yet (Euler and DPM-Solver++ are being added on another one,
# as ksamplers.euler_step). Until the library has one with this signature, the grader's reference is this one.
def _euler_step(x: Tensor, eps: Tensor, sigma, sigma_next) -> tuple[Tensor, Tensor]:
    """One Euler step of the ODE dx/dsigma = (x - x0) / sigma = eps, in the variance-exploding state
    x = z_t / sqrt(alpha-bar_t) = z_0 + sigma * eps (Karras et al. 2022, Algorithm 1 without its second-order
    correction; k-diffusion sample_euler). Returns (x at sigma_next, the predicted z_0)."""
    x0 = x - sigma * eps
    return x + (sigma_next - sigma) * eps, x0  # = x0 + sigma_next * eps: DDIM with eta = 0 (DDIM Eq. 13)


def _library_euler() -> tuple[Callable, str]:
    """(the library's Euler step, its name), or this module's reference while the library has none."""
    for module in ("ksamplers", "samplers"):
        if not Path(__file__).with_name(f"{module}.py").exists():  # not in this copy of the package
            continue
        fn = getattr(importlib.import_module(f"{__package__}.{module}"), "euler_step", None)
        if fn is not None and list(inspect.signature(fn).parameters) == ["x", "eps", "sigma", "sigma_next"]:
            return fn, f"{module}.euler_step"
    return _euler_step, "the Euler step (ldm_mini.exercises' reference)"


_euler_reference, _euler_name = _library_euler()


def _euler_cases():
    ab = _ab()
    sigmas = schedule.lms_sigmas(ab, schedule.spaced_timesteps(10, 1000, 0, "trailing"))  # (11,), last 0
    z, eps = _randn(2, 4, 8, 8), _randn(2, 4, 8, 8)
    return [case("the first step, sigma 157 -> 19, batch 2", sigmas[0] * z, eps, sigmas[0], sigmas[1]),
            case("a middle step", sigmas[5] * z, eps, sigmas[5], sigmas[6]),
            case("the last step (sigma_next = 0), batch 1", sigmas[9] * z[:1], eps[:1], sigmas[9],
                 sigmas[10]),
            case("float64", z.double(), eps.double(), sigmas[7].double(), sigmas[8].double()),
            case("sigmas as Python floats", z, eps, 2.0, 1.25)]  # fmt: skip


def _euler_bugs(x, eps, sigma, sigma_next, *, bug):
    x0 = x - eps if bug == "x0" else x - sigma * eps
    d = eps / sigma if bug == "derivative" else eps  # dx/dsigma = (x - x0) / sigma = eps
    step = sigma - sigma_next if bug == "sign" else sigma_next - sigma
    return x + step * d, x0


_register(Exercise(
    "euler_step", "05_sampling", _euler_name, "euler_step(x, eps, sigma, sigma_next)",
    "the Euler step on dx/dsigma = eps (Karras et al. 2022, Algorithm 1 without its correction)",
    _euler_reference, _euler_cases, returns=("x_next", "x0")), _euler_bugs, {
    "sign": "sigma decreases, and dx/dsigma = eps: x_next = x + (sigma_next - sigma) * eps.",
    "derivative": "the derivative dx/dsigma = (x - z0_hat) / sigma is eps itself: do not divide by sigma "
                  "again.",
    "x0": "in this variance-exploding state x = z_0 + sigma * eps, so the predicted z_0 is x - sigma * eps.",
})  # fmt: skip


# === lesson 09: training ==================================================================================
def _loss_cases():
    m, m64 = ToyModel(), ToyModel(dtype=torch.float64)
    z0, noise, context = _randn(4, 4, 8, 8), _randn(4, 4, 8, 8), _randn(4, 7, 6)
    t = torch.tensor([0, 10, 500, 999])
    return [case("min-SNR 5, t = 0, 10, 500, 999", m, z0, t, noise, context),
            case("snr_gamma None (the plain Eq. 2)", m, z0, t, noise, context, snr_gamma=None),
            case("batch 1, t = 999", m, z0[:1], t[-1:], noise[:1], context[:1]),
            case("float64, snr_gamma 1", m64, z0.double(), t, noise.double(), context.double(),
                 snr_gamma=1.0),
            case("no context, snr_gamma None", m, z0, t.flip(0), noise, None, snr_gamma=None)]  # fmt: skip


def _loss_bugs(m, z0, t, noise, context, snr_gamma=5.0, *, bug):
    z_t = z0 if bug == "z0 input" else schedule.q_sample(z0, t, noise, m.alphas_cumprod)
    eps = m.predict_noise(z_t, t, context)
    error = (eps - (z0 if bug == "z0 target" else noise)) ** 2
    per_sample = error.sum(dim=[1, 2, 3]) if bug == "sum" else error.mean(dim=[1, 2, 3])  # (B,)
    if snr_gamma is None or bug == "no weight":
        return per_sample.mean()
    s = schedule.snr(m.alphas_cumprod)[t]
    weight = s.clamp(max=snr_gamma) if bug == "x0 weight" else s.clamp(max=snr_gamma) / s
    return weight.mean() * per_sample.mean() if bug == "mean of weights" else (weight * per_sample).mean()


_register(Exercise(
    "eps_loss", "09_train_a_tiny_ldm", "train.eps_loss", "eps_loss(m, z0, t, noise, context, snr_gamma=5.0)",
    "LDM Eq. 2-3 (DDPM Eq. 14) with min-SNR weights (Hang et al. 2023)", train.eps_loss, _loss_cases),
    _loss_bugs, {
    "z0 target": "the target is the noise that made z_t, not z_0 (eps-prediction, LDM Eq. 2).",
    "z0 input": "the model sees the noised z_t = q_sample(z0, t, noise, m.alphas_cumprod), not z_0.",
    "no weight": "with snr_gamma set, weight each sample's loss by min(SNR_t, snr_gamma) / SNR_t.",
    "x0 weight": "min(SNR_t, gamma) alone is the weight for x_0-prediction; for eps-prediction divide it by "
                 "SNR_t.",
    "mean of weights": "weight each sample's own loss, then average: mean(w_i * l_i), not mean(w) * mean(l).",
    "sum": "average the squared error over the latent (a mean, as F.mse_loss), do not sum it.",
})  # fmt: skip


def _train_step_cases():
    def make(seed, optimizer, max_grad_norm, dtype=torch.float32):
        def build():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
                x, y = torch.randn(16, 4, dtype=dtype), 10 * torch.randn(16, 1, dtype=dtype)
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.5)  # a stale gradient, from an earlier step
            loss = F.mse_loss(model(x), y)
            return (model, optimizer(model.parameters()), loss), {"max_grad_norm": max_grad_norm}

        return build

    sgd, adamw = partial(torch.optim.SGD, lr=0.05), partial(torch.optim.AdamW, lr=0.01)
    momentum = partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    return [Case("SGD, no clipping", make(0, sgd, None)),
            Case("AdamW, max_grad_norm 0.1 (it clips)", make(1, adamw, 0.1)),
            Case("SGD with momentum, max_grad_norm 1000 (no effect)", make(2, momentum, 1000.0)),
            Case("float64, SGD, max_grad_norm 0.5", make(3, sgd, 0.5, torch.float64))]  # fmt: skip


def _after_step(result, args):
    """What a training step leaves: the loss it returns (a float) and the model's new parameters."""
    loss = result.item() if isinstance(result, Tensor) and result.numel() == 1 else result
    return loss, tuple(p.detach().clone() for p in args[0].parameters())


def _train_step_bugs(model, opt, loss, max_grad_norm=None, *, bug):
    if bug != "no zero_grad":
        opt.zero_grad(set_to_none=True)
    loss.backward()
    if bug == "unchanged":
        return loss.item()
    if max_grad_norm is not None and bug == "clip value":
        nn.utils.clip_grad_value_(model.parameters(), max_grad_norm)
    elif max_grad_norm is not None and bug != "no clip":
        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    return loss.item()


_register(Exercise(
    "train_step", "09_train_a_tiny_ldm", "train.train_step",
    "train_step(model, opt, loss, max_grad_norm=None)",
    "one optimiser step: zero_grad, backward, clip the gradient norm, step", train.train_step,
    _train_step_cases, observe=_after_step, changes_arguments=True), _train_step_bugs, {
    "no zero_grad": "call opt.zero_grad() before loss.backward(): otherwise the new gradients add to the old "
                    "ones.",
    "unchanged": "the parameters did not change: call opt.step() after loss.backward() (and opt.zero_grad() "
                 "before backward, not between the two).",
    "no clip": "with max_grad_norm, clip the gradients' total norm (nn.utils.clip_grad_norm_) after "
               "backward() and before opt.step().",
    "clip value": "clip the gradients' total norm (clip_grad_norm_), not each value (clip_grad_value_).",
})  # fmt: skip


# --- command line ----------------------------------------------------------------------------------------
def lessons() -> dict[str, list[Exercise]]:
    """The exercises grouped by lesson, in course order."""
    out: dict[str, list[Exercise]] = {}
    for ex in EXERCISES.values():
        out.setdefault(ex.lesson, []).append(ex)
    return out


def grade_file(path: str | Path) -> tuple[int, int]:
    """Grade every function defined in the file at `path` whose name is an exercise's; print each verdict.
    Returns (right, graded)."""
    path = Path(path)
    try:
        namespace = runpy.run_path(str(path), run_name="ldm_mini_exercise_file")
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path)]
        where = f" at line {frames[-1].lineno}: `{(frames[-1].line or '').strip()}`" if frames else ""
        print(f"{path.name} did not run: {type(e).__name__}: {e}{where}.")
        return 0, 0
    right = graded = 0
    for name in EXERCISES:
        fn = namespace.get(name)
        if not callable(fn):
            continue
        if getattr(getattr(fn, "__code__", None), "co_filename", None) != str(path):
            print(f"{name}: skipped: it is imported into {path.name}, not written there.")
            continue
        ok, verdict = grade(name, fn)
        print(verdict)
        right, graded = right + ok, graded + 1
    if not graded:
        print(f"{path.name} defines no function named like an exercise (python -m ldm_mini.exercises list).")
    return right, graded


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ldm_mini.exercises", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the exercises, lesson by lesson")
    p = sub.add_parser("check", help="grade the functions of a .py file named like exercises")
    p.add_argument("file", help="a Python file defining some of the exercises' functions")
    args = ap.parse_args(argv)
    if args.command == "list":
        for lesson, exs in lessons().items():
            print(f"{lesson} (notebooks/exercises/{lesson}.ipynb)")
            for ex in exs:
                print(f"  {ex.signature}\n      re-implements {ex.reimplements}: {ex.equation}")
        return 0
    right, graded = grade_file(args.file)
    if graded:
        print(f"{right} of {graded} right.")
    return 0 if graded and right == graded else 1


if __name__ == "__main__":
    sys.exit(main())
