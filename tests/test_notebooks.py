"""The teaching notebooks and the course's exercise notebooks: committed without outputs, and executed top to
bottom without an error.

Each notebook runs as notebooks/build_html.py runs it (its `execute`, imported from the script): in a fresh
`python3` kernel (the venv's ipykernel) with its folder as working directory, on the embedded shapes model
and the tiny random stand-ins, on the CPU, with LDM_MINI_STATIC=1, so ldm_mini.viz.sliders draws each figure
at its start values as a plain figure instead of showing ipywidgets sliders. That is also the stricter test:
ipywidgets' interact catches an exception raised inside a slider's drawing function and only shows it below
the sliders, while the static path raises it in the cell. A failing cell, and so every toy-vs-library
assertion inside the notebooks (hand-written DDIM == samplers.ddim, ...), fails the test with the cell's
traceback. Notebook 09 trains a model: here with a few steps of each stage (LDM_MINI_TRAIN_STEPS). The
executed lesson notebooks are kept for the session (`executed`): tests/test_notebooks_html.py renders those
to HTML instead of running every notebook a second time.
Each exercise notebook runs twice in one kernel: as committed, where every check says "not implemented yet",
then with its blanks filled by the worked solutions of tests/exercise_solutions.py, where every check is
right. The eight lesson notebooks take about 2.5 minutes on 2 CPU cores (notebooks/README.md lists each one's
time), 09 and the exercises together well under another; they are the slowest tests of the suite by design.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os
import re
from pathlib import Path

import exercise_solutions
import nbformat
import pytest

from ldm_mini import exercises

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = [
    "01_noise_schedule",
    "02_autoencoder",
    "03_text_encoder",
    "04_unet",
    "05_sampling",
    "06_verify_against_diffusers",
    "07_super_resolution_and_unconditional",
    "08_the_papers_tasks",
    "09_train_a_tiny_ldm",
]
EXERCISE_LESSONS = ["01_noise_schedule", "02_autoencoder", "03_text_encoder", "04_unet", "05_sampling",
                    "09_train_a_tiny_ldm"]  # fmt: skip
CELL_TIMEOUT = 300  # seconds for one cell; the slowest takes ~20 s here
NOTEBOOKS = [FOLDER / f"{name}.ipynb" for name in EXPECTED]
EXERCISE_NOTEBOOKS = [FOLDER / "exercises" / f"{name}.ipynb" for name in EXERCISE_LESSONS]
# LDM_MINI_TRAIN_STEPS for notebook 09 in the tests: steps of the autoencoder, of the diffusion model
QUICK_TRAINING = "6,6"


def test_the_notebooks_and_nothing_else():
    assert sorted(p.stem for p in FOLDER.glob("*.ipynb")) == EXPECTED
    assert sorted(p.stem for p in (FOLDER / "exercises").glob("*.ipynb")) == EXERCISE_LESSONS
    assert sorted({ex.lesson for ex in exercises.EXERCISES.values()}) == EXERCISE_LESSONS  # one per lesson


def load_build_html():
    """notebooks/build_html.py as a module (notebooks/ is not a package, and the library does not depend on
    nbconvert, so the build is a script beside the notebooks)."""
    spec = importlib.util.spec_from_file_location("build_html", FOLDER / "build_html.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_html = load_build_html()


def run(nb, folder: Path, **env) -> None:
    """Execute nb as the HTML build does (build_html.execute: a fresh kernel with `folder` as working
    directory, LDM_MINI_STATIC=1, `env` added), with a time limit per cell; raises on a failing cell."""
    if "OMP_NUM_THREADS" not in os.environ:
        # The models are tiny: one thread is as fast, and it does not fight other processes for the cores
        # (two threads on two busy cores made a UNet call ~10x slower here). A test setting only.
        env.setdefault("OMP_NUM_THREADS", "1")
    build_html.execute(nb, folder, timeout=CELL_TIMEOUT, **env)  # CellExecutionError: the cell, its traceback


# {lesson notebook: the notebook executed top to bottom, or the exception its execution raised}, for the
# session: test_runs_top_to_bottom fills it, the HTML test renders from it
EXECUTED: dict[Path, nbformat.NotebookNode | Exception] = {}


def executed(path: Path, tmp_path: Path) -> nbformat.NotebookNode:
    """The lesson notebook at `path` executed top to bottom (09 with QUICK_TRAINING steps, its run folder
    under tmp_path), once per session; raises again what its execution raised."""
    if path not in EXECUTED:
        nb = nbformat.read(path, as_version=4)
        # 09 trains with a few steps of each stage, in a run folder under tmp_path (tempfile.mkdtemp)
        env = (
            {"LDM_MINI_TRAIN_STEPS": QUICK_TRAINING, "TMPDIR": str(tmp_path)}
            if path.stem.startswith("09")
            else {}
        )
        try:
            run(nb, FOLDER, **env)
            EXECUTED[path] = nb
        except Exception as error:
            EXECUTED[path] = error
    if isinstance(EXECUTED[path], Exception):
        raise EXECUTED[path]
    return EXECUTED[path]


def text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.mark.parametrize("path", NOTEBOOKS + EXERCISE_NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_committed_stripped_seeded_and_ending_with_what_to_try(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, (
        f"{path.name}: cells {dirty} have outputs or execution counts: clear them before committing "
        "(Jupyter: Edit > Clear All Outputs, or `jupyter nbconvert --clear-output --inplace`)"
    )
    assert "manual_seed(SEED)" in code[0].source, f"{path.name}: seed the RNG in the first code cell"
    last = nb.cells[-1]
    assert last.cell_type == "markdown" and "What to try next" in last.source, (
        f"{path.name}: end with a 'What to try next' markdown cell"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, tmp_path):
    nb = executed(path, tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} showed no figure"
    # Under LDM_MINI_STATIC=1 a slider is a plain figure; the only widgets left are tqdm's progress bars
    # (the training loop's, in 09), which the HTML build draws at their end
    widgets = [
        o.data["text/plain"]
        for o in outputs
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert all(re.search(r"\d+%\|", bar) for bar in widgets), (
        f"{path.name}: widgets other than progress bars: {widgets}"
    )


def exercise_cells(nb) -> dict[str, int]:
    """{exercise name: index of the cell with its blank} (the cells tagged "exercise")."""
    found = {}
    for i, cell in enumerate(nb.cells):
        if "exercise" in cell.metadata.get("tags", []):
            found[re.match(r"def (\w+)\(", cell.source).group(1)] = i
    return found


@pytest.mark.parametrize("path", EXERCISE_NOTEBOOKS, ids=lambda p: p.stem)
def test_exercise_notebook_has_a_blank_and_a_check_per_exercise(path):
    nb = nbformat.read(path, as_version=4)
    blanks = exercise_cells(nb)
    assert list(blanks) == [ex.name for ex in exercises.EXERCISES.values() if ex.lesson == path.stem]
    for name, i in blanks.items():
        signature = exercises.EXERCISES[name].signature
        assert nb.cells[i].source.startswith(f"def {signature}:"), (
            f"{path.name}: {name} has not the signature {signature}"
        )
        assert "raise NotImplementedError" in nb.cells[i].source or nb.cells[i].source.rstrip().endswith(
            "..."
        )
        assert nb.cells[i + 1].source == f'exercises.check("{name}", {name});', (
            f"{path.name}: check {name} after it"
        )
        target = exercises.EXERCISES[name].reimplements.split(" ")[0]  # "samplers.ddim_step"
        assert "." not in target or target.split(".", 1)[1] in nb.cells[i - 1].source, (
            f"{path.name}: the markdown above {name} names the function it re-implements, {target}"
        )


@pytest.mark.parametrize("path", EXERCISE_NOTEBOOKS, ids=lambda p: p.stem)
def test_exercise_notebook_unfilled_then_filled(path):
    """As committed, every check says "not implemented yet" and nothing crashes; then (the same kernel) the
    whole notebook again with each blank replaced by its worked solution, and every check is right."""
    nb = nbformat.read(path, as_version=4)
    blanks = exercise_cells(nb)
    filled = copy.deepcopy(nb.cells)
    for cell in filled:
        cell.id = f"{cell.id}-filled"  # cell ids stay unique
    for name, i in blanks.items():
        filled[i].source = inspect.getsource(getattr(exercise_solutions, name))
    n = len(nb.cells)
    nb.cells = nb.cells + filled
    run(nb, path.parent)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    for name, i in blanks.items():
        assert (
            text(nb.cells[i + 1])
            == f"{name}: not implemented yet: fill in the blank, then run this check again.\n"
        )
        assert text(nb.cells[n + i + 1]).startswith(f"{name}: right. It equals "), text(nb.cells[n + i + 1])
    payoff = [
        i for i, c in enumerate(nb.cells[:n]) if c.cell_type == "code" and "exercises.grade(" in c.source
    ]
    for i in payoff:  # "your function at work" cells: a hint to fill in first, then a figure or a number
        assert text(nb.cells[i]).startswith("Fill in "), text(nb.cells[i])
        assert any("image/png" in o.get("data", {}) for o in nb.cells[n + i].outputs) or "your" in text(
            nb.cells[n + i]
        )
