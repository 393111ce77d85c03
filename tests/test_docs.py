"""What README.md tells a new user to paste works as written: every Python block is self-contained (its
imports included: ruff finds no undefined name in it), and the Jupyter command names an extra that installs
what the notebooks need (JupyterLab, the kernel, matplotlib, ipywidgets for the sliders and tqdm's bars)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)


def undefined_names(code: str) -> subprocess.CompletedProcess:
    """ruff's F821 (undefined name) on a piece of code; ruff is in the dev extra."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    argv = [ruff, "check", "--no-cache", "--select", "F821", "--stdin-filename", "block.py", "-"]
    return subprocess.run(argv, input=code, capture_output=True, text=True)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_every_python_block_of_the_readme_has_its_imports(block):
    out = undefined_names(block)
    assert out.returncode == 0, f"README block uses names it does not import:\n{out.stdout}\n{block}"


def test_the_readme_has_python_blocks_and_the_check_can_fail():
    assert len(BLOCKS) >= 3
    out = undefined_names("m = ldm_mini.load()\n")
    assert out.returncode == 1 and "ldm_mini" in out.stdout


def test_the_jupyter_command_names_an_extra_with_what_the_notebooks_need():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert 'pip install -e ".[notebooks]" && jupyter lab notebooks/' in README
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"jupyterlab", "ipykernel", "matplotlib", "ipywidgets"} <= set(extras["notebooks"])
    assert {"ipykernel", "matplotlib", "ipywidgets", "nbclient"} <= set(extras["dev"])  # the tests run them


def test_the_cpu_torch_advice_comes_before_the_first_install_command():
    advice = README.index("install a CPU build of torch first")
    assert advice < README.index("pip install -e"), (
        "say how to get a CPU torch before the command that pulls one"
    )
    assert "--index-url https://download.pytorch.org/whl/cpu" in README[advice : advice + 300]
