"""ldm_mini/exercises.py, the graders of the course kit.

Every grader accepts the library's own function and a solution written out from the equations
(tests/exercise_solutions.py); every recorded wrong version is rejected with its hint (table-driven, from the
graders' own tables), and so are a few wrong versions written the way a student would; a blank says "not
implemented yet", a crash gives its message and the line of the student's code, never a traceback; the
command line lists the exercises and grades a file. The whole file takes ~15 s on 2 CPU cores.
"""

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import exercise_solutions
import pytest
import torch

from ldm_mini import exercises

ROOT = Path(__file__).resolve().parents[1]
NAMES = list(exercises.EXERCISES)
MISTAKES = [(name, wrong, hint) for name, ex in exercises.EXERCISES.items() for wrong, hint in ex.mistakes]


def mistake_id(value):
    return value.keywords["bug"].replace(" ", "_") if hasattr(value, "keywords") else None


def test_the_course_has_the_exercises_of_the_issue():
    assert {"scaled_linear_betas", "cosine_betas", "alphas_cumprod", "q_sample", "posterior_sample",
            "posterior_kl", "scale_factor", "timestep_embedding", "attention", "cross_attention", "resblock",
            "ddpm_step", "ddim_sigma", "ddim_step", "guided_eps", "eps_loss", "train_step", "plms_eps",
            "euler_step"} <= set(NAMES)  # fmt: skip
    for ex in exercises.EXERCISES.values():
        assert ex.name in ex.signature and ex.mistakes, ex.name
        assert (ROOT / "notebooks" / "exercises" / f"{ex.lesson}.ipynb").exists(), ex.lesson


@pytest.mark.parametrize("name", NAMES)
def test_the_library_function_is_right(name, capsys):
    assert exercises.check(name, exercises.EXERCISES[name].reference)
    out = capsys.readouterr().out
    assert out.startswith(f"{name}: right. It equals ") and out.count("\n") == 1, out


@pytest.mark.parametrize("name", NAMES)
def test_a_solution_written_from_the_equations_is_right(name):
    ok, verdict = exercises.grade(name, getattr(exercise_solutions, name))
    assert ok, verdict


@pytest.mark.parametrize("name, wrong, hint", MISTAKES, ids=mistake_id)
def test_each_recorded_mistake_is_rejected_with_its_hint(name, wrong, hint):
    ok, verdict = exercises.grade(name, wrong)
    assert not ok
    assert verdict.startswith(f"{name}: not right yet: ") and verdict.endswith(f" Hint: {hint}"), verdict


# Wrong versions as a student writes them (other code than the graders' tables), and the hint each must get.
def q_sample_alpha(x0, t, noise, alphas_cumprod):  # alpha_t = alpha-bar_t / alpha-bar_{t-1}
    alphas = alphas_cumprod / torch.cat([torch.ones(1), alphas_cumprod[:-1]])
    a = alphas[t].to(x0.dtype).reshape(-1, *[1] * (x0.dim() - 1))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def embedding_sin_first(t, dim, max_period=10000.0):
    freqs = max_period ** (-torch.arange(dim // 2) / (dim // 2))
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def attention_wrong_axis(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-2) @ v


def guidance_swapped(m, x, t, cond=None, uncond=None, scale=1.0):
    e_c = m.predict_noise(x, t, cond)
    if scale == 1.0:
        return e_c
    e_u = m.predict_noise(x, t, uncond)
    return e_c + scale * (e_u - e_c)


def ddpm_fixed_large(z, eps, a_t, a_prev, noise=None, clip=False):
    alpha = a_t / a_prev
    x0 = (
        ((z - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        if clip
        else (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    )
    mean = a_prev.sqrt() * (1 - alpha) / (1 - a_t) * x0 + alpha.sqrt() * (1 - a_prev) / (1 - a_t) * z
    return (mean if noise is None else mean + (1 - alpha).sqrt() * noise), x0


def ddim_without_sigma(z, eps, a_t, a_prev, sigma=0.0, noise=None, clip=False):
    x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    x0 = x0.clamp(-1, 1) if clip else x0
    z_next = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return (z_next if noise is None else z_next + sigma * noise), x0


def loss_of_z0(m, z0, t, noise, context, snr_gamma=5.0):
    ab = m.alphas_cumprod[t].to(z0.dtype)[:, None, None, None]
    eps = m.predict_noise(ab.sqrt() * z0 + (1 - ab).sqrt() * noise, t, context)
    per_sample = ((eps - z0) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return per_sample.mean()
    snr = m.alphas_cumprod[t] / (1 - m.alphas_cumprod[t])
    return (snr.clamp(max=snr_gamma) / snr * per_sample).mean()


WRITTEN = [("q_sample", q_sample_alpha, "alpha"), ("timestep_embedding", embedding_sin_first, "sin first"),
           ("attention", attention_wrong_axis, "softmax axis"), ("guided_eps", guidance_swapped, "swapped"),
           ("ddpm_step", ddpm_fixed_large, "fixed_large"), ("ddim_step", ddim_without_sigma, "no sigma"),
           ("eps_loss", loss_of_z0, "z0 target")]  # fmt: skip


@pytest.mark.parametrize("name, fn, bug", WRITTEN, ids=[w[1].__name__ for w in WRITTEN])
def test_a_mistake_written_as_a_student_would_gets_its_hint(name, fn, bug):
    hint = dict((w.keywords["bug"], h) for w, h in exercises.EXERCISES[name].mistakes)[bug]
    ok, verdict = exercises.grade(name, fn)
    assert not ok and verdict.endswith(f"Hint: {hint}"), verdict


def test_an_unrecorded_mistake_names_the_first_case_that_differs():
    def q_sample(x0, t, noise, alphas_cumprod):
        return exercises.EXERCISES["q_sample"].reference(x0, t, noise, alphas_cumprod) * 1.01

    ok, verdict = exercises.grade("q_sample", q_sample)
    assert not ok
    assert verdict.startswith("q_sample: not right yet: the result differs from the library's by up to ")
    assert (
        "(t = 0, 250, 500, 999, batch 4); it is right on 0 of 6 cases. Compare each term with DDPM Eq. 4."
        in verdict
    )


def blank_dots(z, eps, a_t, a_prev, sigma=0.0, noise=None, clip=False):
    """A docstring, then the blank."""
    ...


def blank_raise(z, eps, a_t, a_prev, sigma=0.0, noise=None, clip=False):
    # YOUR CODE HERE
    raise NotImplementedError("fill me in")


def blank_in_result(z, eps, a_t, a_prev, sigma=0.0, noise=None, clip=False):
    x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return ..., x0


@pytest.mark.parametrize("fn", [None, ..., blank_dots, blank_raise, blank_in_result])
def test_a_blank_is_not_implemented_yet(fn, capsys):
    assert exercises.check("ddim_step", fn) is False
    out = capsys.readouterr().out
    assert out.startswith("ddim_step: not implemented yet") and out.count("\n") == 1, out


def test_a_crash_gives_its_message_and_the_line_of_the_students_code():
    def ddim_step(z, eps, a_t, a_prev, sigma=0.0, noise=None, clip=False):
        x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return x0 @ torch.ones(3, 3), x0  # (B, 4, 8, 8) @ (3, 3): a shape error

    line = inspect.getsourcelines(ddim_step)[1] + 2
    ok, verdict = exercises.grade("ddim_step", ddim_step)
    assert not ok and "Traceback" not in verdict and "\n" not in verdict
    assert verdict.startswith("ddim_step: your function raised RuntimeError: ")
    code = "return x0 @ torch.ones(3, 3), x0  # (B, 4, 8, 8) @ (3, 3): a shape error"
    assert verdict.endswith(f"at line {line} of test_exercises.py: `{code}`.")


def test_the_wrong_signature_names_the_right_one():
    ok, verdict = exercises.grade("ddim_sigma", lambda a_t, a_prev: a_t)
    assert not ok and verdict.endswith("give it the signature ddim_sigma(a_t, a_prev, eta).")


def test_forgetting_return_changing_an_argument_and_unknown_names():
    def ddim_sigma(a_t, a_prev, eta):
        eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()

    def euler_step(x, eps, sigma, sigma_next):
        x0 = x - sigma * eps
        x += (sigma_next - sigma) * eps
        return x, x0

    assert exercises.grade("ddim_sigma", ddim_sigma)[1].endswith("did you forget `return`?")
    assert "changed its argument `x` in place" in exercises.grade("euler_step", euler_step)[1]
    ok, verdict = exercises.grade("dim_step", exercise_solutions.ddim_step)
    assert not ok and verdict.startswith(
        "There is no exercise 'dim_step'; the exercises are: scaled_linear_betas"
    )
    assert "expected a function" in exercises.grade("q_sample", 3.0)[1]


def test_grading_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    exercises.grade("cross_attention", exercise_solutions.cross_attention)
    assert torch.equal(torch.rand(3), want)


def test_list_prints_every_exercise_by_lesson():
    out = subprocess.run([sys.executable, "-m", "ldm_mini.exercises", "list"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout  # fmt: skip
    for ex in exercises.EXERCISES.values():
        assert f"  {ex.signature}\n      re-implements {ex.reimplements}: " in out
        assert f"{ex.lesson} (notebooks/exercises/{ex.lesson}.ipynb)\n" in out


def test_check_grades_a_file(tmp_path, capsys):
    assert exercises.main(["check", str(Path(exercise_solutions.__file__))]) == 0
    out = capsys.readouterr().out
    assert out.count(": right. It equals ") == len(NAMES) and out.endswith(
        f"{len(NAMES)} of {len(NAMES)} right.\n"
    )

    mine = tmp_path / "mine.py"
    mine.write_text(textwrap.dedent('''
        import torch
        from ldm_mini.schedule import q_sample  # imported, not written here: skipped


        def alphas_cumprod(betas):
            return torch.cumprod(1 - betas, dim=0)


        def ddim_sigma(a_t, a_prev, eta):
            return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))


        def helper():  # not an exercise: ignored
            return 1
    '''))  # fmt: skip
    assert exercises.main(["check", str(mine)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("alphas_cumprod: right.")
    assert out[1] == "q_sample: skipped: it is imported into mine.py, not written there."
    assert out[2].startswith("ddim_sigma: not right yet:") and "square root" in out[2]
    assert out[3] == "1 of 2 right."


def test_check_a_file_that_does_not_run_or_defines_nothing(tmp_path, capsys):
    broken, empty = tmp_path / "broken.py", tmp_path / "empty.py"
    broken.write_text("import torch\nx = torch.ones(2) @ torch.ones(3)\n")
    empty.write_text("def helper():\n    return 1\n")
    assert exercises.main(["check", str(broken)]) == 1
    out = capsys.readouterr().out
    assert (
        out.startswith("broken.py did not run: RuntimeError: ") and "at line 2: `x = torch.ones(2) @" in out
    )
    assert exercises.main(["check", str(empty)]) == 1
    assert "empty.py defines no function named like an exercise" in capsys.readouterr().out
