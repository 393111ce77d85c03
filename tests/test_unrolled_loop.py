"""The unrolled DDIM loop of the ldm-celebahq-256 model card, written with ldm_mini's parts, gives exactly
(torch.equal, not a tolerance) what ldm_mini.unconditional gives: the pipeline is only this loop.

The loop is read from README.md (the python block after the marker line), so the README's code is
what is tested; it runs with the tiny random model of tests/helpers.py: `load` is patched to return it and
the settings line is shrunk to a few steps.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import save_pipeline, tiny_unconditional

import ldm_mini
from ldm_mini import load
from ldm_mini.pipeline import unconditional
from weights_tools.convert import convert

SETTINGS = re.compile(r"^seed, steps, size = .*$", re.MULTILINE)
README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- test_unrolled_loop -->"  # README.md: this line, then the ```python block of the loop


def readme_loop() -> str:
    """The python block that follows MARKER in README.md."""
    found = re.search(
        re.escape(MARKER) + r"\s*```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL
    )
    assert found, f"README.md must show the unrolled loop in a python block after {MARKER}"
    return found.group(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uncond")
    return load(convert(save_pipeline(tiny_unconditional(), tmp / "pipe"), tmp / "model.safetensors"))


def run_loop(code: str, m, seed: int, steps: int, size: int) -> dict:
    """exec the loop with `m` for load(...) and the given settings; returns its variables."""
    code, n = SETTINGS.subn(f"seed, steps, size = {seed}, {steps}, {size}", code)
    assert n == 1, "the loop must set `seed, steps, size = ...` on one line"
    namespace: dict = {}
    exec(compile(code, "<unrolled loop>", "exec"), namespace)
    return namespace


def test_readme_unrolled_loop_equals_the_pipeline(model, monkeypatch, tmp_path):
    code = readme_loop()
    monkeypatch.setattr(ldm_mini, "load", lambda path: model, raising=False)
    monkeypatch.chdir(tmp_path)  # the loop saves face.png here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared machine
    try:
        for seed, steps, size in [(0, 5, 16), (3, 3, 12)]:
            ns = run_loop(code, model, seed, steps, size)
            run = dict(num_inference_steps=steps, height=size, width=size, progress=False)
            z, pt, pil = (
                unconditional(model, generator=torch.Generator().manual_seed(seed), output_type=out, **run)
                for out in ("latent", "pt", "pil")
            )
            assert torch.equal(ns["z"], z) and torch.equal(ns["image"], pt)  # exactly, bit for bit
            assert np.array_equal(np.asarray(PIL.Image.open("face.png")), np.asarray(pil[0]))
    finally:
        torch.set_num_threads(threads)
