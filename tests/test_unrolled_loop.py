"""The unrolled DDIM loop of the ldm-celebahq-256 model card, written with ldm_mini's parts, gives exactly
(torch.equal, not a tolerance) what ldm_mini.unconditional gives: the pipeline is only this loop.

The loop is code in a string (LOOP; README.md shows the same code), run with the tiny random model of
tests/helpers.py: `load` is patched to return it and the settings line is shrunk to a few steps.
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
from ldm_mini.loading import load
from ldm_mini.pipeline import unconditional
from weights_tools.convert import convert

LOOP = """
import torch
from PIL import Image

from ldm_mini import load, samplers

m = load("celebahq.safetensors")  # python -m weights_tools.convert ./ldm-celebahq-256 celebahq.safetensors
seed, steps, size = 0, 200, 256  # the model card: 200 DDIM steps, eta = 0, 256 x 256 pixels
generator = torch.Generator().manual_seed(seed)
z = torch.randn(1, m.latent_channels, size // m.downsample_factor, size // m.downsample_factor,
                generator=generator)  # x_T ~ N(0, I), (1, 3, 64, 64)
s = m.schedule  # the source's DDIM convention (CompVis: t = 801, 601, ... + the final alpha-bar_0)
timesteps = samplers.ddim_timesteps(steps, s.num_train_timesteps, s.steps_offset, s.timestep_spacing)
alphas = samplers.ddim_alphas(m.alphas_cumprod, timesteps, s.set_alpha_to_one)  # (alpha-bar_t, _prev)
with torch.no_grad():
    for t, (a_t, a_prev) in zip(timesteps, alphas):
        eps = m.predict_noise(z, t)  # eps_theta(z_t, t)
        z, x0 = samplers.ddim_step(z, eps, a_t, a_prev)  # DDIM Eq. 12, eta = 0
    image = (m.decode(z) / 2 + 0.5).clamp(0, 1)  # D(z): [-1, 1] -> [0, 1], (1, 3, 256, 256)
Image.fromarray((image[0].permute(1, 2, 0) * 255).round().byte().numpy()).save("face.png")
"""
SETTINGS = re.compile(r"^seed, steps, size = .*$", re.MULTILINE)
README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- test_unrolled_loop -->"  # README.md: this line, then the ```python block of the loop


def readme_loop() -> str | None:
    """The python block that follows MARKER in README.md, if README.md has one."""
    text = README.read_text(encoding="utf-8") if README.exists() else ""
    found = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, re.DOTALL)
    return found.group(1) if found else None


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


@pytest.mark.parametrize("source", ["LOOP", "README.md"])
def test_unrolled_loop_equals_the_pipeline(model, monkeypatch, tmp_path, source):
    code = LOOP if source == "LOOP" else readme_loop()
    if code is None:
        pytest.skip(f"README.md has no {MARKER} block yet")
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
