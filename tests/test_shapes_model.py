"""The embedded shapes model (ldm_mini/weights/shapes.safetensors, trained by ldm_mini/train.py).

It loads by default and by name, is small, and draws a fixed prompt deterministically and correctly by
the analytic judge (benchmarks/shapes_judge.py). The quality figures over 200 prompts are a benchmark
(benchmarks/eval_shapes.py), not a test."""

import torch

from benchmarks.shapes_judge import judge
from ldm_mini import loading
from ldm_mini.pipeline import txt2img

PROMPT = "a red circle above a blue square"
# The recommended settings (DDIM, "trailing" spacing from the file, guidance 2). The model draws this prompt
# right for about half of the seeds (22 of seeds 0-39; its usual mistake swaps the two colours); seed 1 is
# one of them. The test pins that draw: it must stay deterministic and right.
STEPS, GUIDANCE, SEED = 10, 2.0, 1


def test_shipped_model_loads_by_default_and_by_name():
    path = loading.resolve(None)
    assert path == loading.resolve("shapes") == loading.EMBEDDED["shapes"]
    assert path.stat().st_size <= 20_000_000  # the budget for a file inside the package
    m = loading.load()
    assert m.kind == "txt2img" and m.tokenizer is not None
    assert (m.latent_channels, m.downsample_factor) == (4, 4)  # 64x64 images <-> 16x16x4 latents
    assert m.tokenizer.pieces(PROMPT) == PROMPT.split()  # every caption word is one WordPiece
    assert 0.1 < m.scale_factor < 10


def generate(m):
    gen = torch.Generator().manual_seed(SEED)
    return txt2img(m, PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
                   generator=gen, output_type="pt", progress=False)  # fmt: skip


def test_fixed_prompt_is_deterministic_and_judged_right():
    m = loading.load("shapes", dtype="float32")
    a, b = generate(m), generate(m)
    assert a.shape == (1, 3, 64, 64)
    assert torch.equal(a, b)  # same seed, same image, bit for bit
    verdict = judge(a[0], PROMPT, value_range=(0.0, 1.0))
    assert verdict["correct"], verdict  # the failing attributes and the blobs the judge found
