"""The embedded shapes model (ldm_mini/weights/shapes.safetensors, trained by ldm_mini/train.py).

It loads by default and by name, is small, and draws a fixed prompt deterministically and correctly by
the analytic judge (benchmarks/shapes_judge.py). The quality figures over 200 prompts are a benchmark
(benchmarks/eval_shapes.py), not a test."""

import re
from pathlib import Path

import numpy as np
import PIL.Image
import torch

import ldm_mini
from benchmarks.shapes_judge import judge
from ldm_mini import hub, loading, shapes
from ldm_mini.pipeline import txt2img
from ldm_mini.train import GRID_PROMPTS

PROMPT = "a red circle above a blue square"
# The recommended settings (DDIM, "trailing" spacing from the file, guidance 2) at 10 steps. The shipped model
# draws this prompt right for every one of seeds 0-39 (benchmarks/RESULTS.md); the test pins seed 1's draw:
# it must stay deterministic and right.
STEPS, GUIDANCE, SEED = 10, 2.0, 1


def test_shipped_model_loads_by_default_and_by_name():
    path = hub.resolve(None)
    assert path == hub.resolve("shapes") == loading.EMBEDDED["shapes"]
    assert path.stat().st_size <= 20_000_000  # the budget for a file inside the package
    m = ldm_mini.load()
    assert m.kind == "txt2img" and m.tokenizer is not None
    assert (m.latent_channels, m.downsample_factor) == (4, 4)  # 64x64 images <-> 16x16x4 latents
    assert m.tokenizer.pieces(PROMPT) == PROMPT.split()  # every caption word is one WordPiece
    assert 0.1 < m.scale_factor < 10


def generate(m):
    gen = torch.Generator().manual_seed(SEED)
    return txt2img(m, PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
                   generator=gen, output_type="pt", progress=False)  # fmt: skip


def test_fixed_prompt_is_deterministic_and_judged_right():
    m = ldm_mini.load("shapes", dtype="float32")
    a, b = generate(m), generate(m)
    assert a.shape == (1, 3, 64, 64)
    assert torch.equal(a, b)  # same seed, same image, bit for bit
    verdict = judge(a[0], PROMPT, value_range=(0.0, 1.0))
    assert verdict["correct"], verdict  # the failing attributes and the blobs the judge found


def test_one_to_three_shapes_and_held_out_pairs_are_judged_right():
    """The training grid's prompts (1, 2 and 3 shapes; the last two with colour+shape pairs never seen in
    training) in one batch, one seed: every image right. (Over 400 prompts: the benchmark.)"""
    assert sum(shapes.is_heldout(shapes.parse_caption(p)) for p in GRID_PROMPTS) == 2
    m = ldm_mini.load("shapes", dtype="float32")
    gen = torch.Generator().manual_seed(0)
    images = txt2img(m, GRID_PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
                     generator=gen, output_type="pt", progress=False)  # fmt: skip
    verdicts = {p: judge(im, p, value_range=(0.0, 1.0)) for p, im in zip(GRID_PROMPTS, images, strict=True)}
    assert [p for p, v in verdicts.items() if not v["correct"]] == [], verdicts


def test_readme_example_runs_as_written_and_draws_the_prompt(tmp_path, monkeypatch):
    """README's first Python block, exactly as printed, with no setting given: the picture is the one the
    model was trained to make (64 x 64, its recommended 20 steps at guidance 2), and it is right."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- test_readme_example -->\s*```python\n(.*?)```", readme, re.DOTALL)
    assert found, "README.md must keep its first example after the test_readme_example marker"
    monkeypatch.chdir(tmp_path)
    exec(compile(found.group(1), "<README example>", "exec"), {})
    image = PIL.Image.open(tmp_path / "shapes.png")
    assert image.size == (64, 64)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    verdict = judge(pixels, PROMPT, value_range=(0.0, 1.0))
    assert verdict["correct"], verdict
