"""The teaching notebooks: committed without outputs, and executed top to bottom without an error.

Each notebook runs in a fresh `python3` kernel (the venv's ipykernel) with notebooks/ as its working
directory, on the embedded shapes model and the tiny random stand-ins, on the CPU. A failing cell, and so
every toy-vs-library assertion inside the notebooks (hand-written DDIM == samplers.ddim, ...), fails the
test with the cell's traceback. The seven together take about 1 minute on 2 CPU cores (notebooks/README.md
lists each one's time); they are the slowest tests of the suite by design: they run the whole library.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = [
    "01_noise_schedule",
    "02_autoencoder",
    "03_text_encoder",
    "04_unet",
    "05_sampling",
    "06_verify_against_diffusers",
    "07_super_resolution_and_unconditional",
]
CELL_TIMEOUT = 300  # seconds for one cell; the slowest takes ~20 s here
NOTEBOOKS = [FOLDER / f"{name}.ipynb" for name in EXPECTED]


def test_the_seven_notebooks_and_nothing_else():
    assert sorted(p.stem for p in FOLDER.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
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
def test_runs_top_to_bottom(path, monkeypatch):
    if "OMP_NUM_THREADS" not in os.environ:
        # The models are tiny: one thread is as fast, and it does not fight other processes for the cores
        # (two threads on two busy cores made a UNet call ~10x slower here). A test setting only.
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(FOLDER)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell and its traceback
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} showed no figure"
