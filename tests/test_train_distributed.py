"""ldm_mini/train.py under torchrun: 2 gloo ranks on the CPU follow one process's trajectory.

The ranks split the same global batch (--batch 4: 2 images each), draw every random number as one process
draws it, and DDP averages their gradients. The result is the single-process one up to float rounding,
not bit for bit: a rank's convolutions run on 2 images instead of 4 (other kernels, other blocking) and the
gradient is (g_0 + g_1) / 2, summed in another order than the 4-image mean: ~1e-7 relative differences,
which a few AdamW steps carry into the weights (measured misses, printed by the tests: weights <= 7e-5,
moments <= 1e-4 of their tensor's largest value). One kind of parameter is left out: the attention key
biases (to_k.bias). Softmax ignores a shift shared by all keys, so their exact gradient is zero and what
they get is rounding noise; AdamW's first steps are ~lr * sign(gradient), so a coin toss moves them by up
to lr per step in either direction. They change nothing the model computes.

Each test starts torchrun once (two fresh processes importing torch: ~10 s on 2 busy cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_mini import train

ROOT = Path(__file__).resolve().parents[1]
TOL_WEIGHTS = 2e-4  # absolute, on weights and EMAs (of order 0.1) after 4 steps of lr <= 2e-3
TOL_MOMENTS = 1e-3  # AdamW's moments, relative to their tensor's largest value (their scale varies by 1e10)


def stage_args(out, stage, *extra):
    """The tiny settings of test_train.run_stage, on a global batch of 4."""
    common = ["--out", str(out), "--batch", "4", "--steps", "4", "--warmup", "2", "--no-progress"]
    common += ["--grid-every", "3", "--log-every", "1"]
    if stage == "diffusion":
        common += ["--scale-images", "8"]
    return [stage, *common, *extra]


def single(out, stage, *extra):
    train.main(stage_args(out, stage, *extra))
    return torch.load(out / f"{stage}.pt", weights_only=True)


def torchrun(out, stage, *extra, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    done = subprocess.run([*cmd, "-m", "ldm_mini.train", *stage_args(out, stage, *extra)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("checkpoint") == 1, done.stdout  # rank 0 alone prints
    return torch.load(out / f"{stage}.pt", weights_only=True)


def differences(a, b, path=""):
    """(max |a - b|, max |b|, path) of every float tensor of two checkpoints; all else must be equal."""
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return [((a - b).abs().max().item(), b.abs().max().item(), path)]
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
        return []
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        return [d for k in a if k not in ("elapsed", "args") for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list | tuple):
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")
        ]
    assert a == b, path
    return []


def assert_close_states(a, b, what):
    """Weights and EMAs within TOL_WEIGHTS, AdamW moments within TOL_MOMENTS, but for the key biases."""
    names = list(a["model"])  # the optimizer's parameter i is the model's i-th tensor
    weights, moments = [], []
    for diff, size, path in differences(a, b):
        if path.startswith(".opt.state."):
            if "to_k.bias" not in names[int(path.split(".")[3])]:
                moments.append((diff / max(size, 1e-30), path))
        elif "to_k.bias" not in path:
            weights.append((diff, path))
    print(f"{what}: weights {max(weights)[0]:.1e} at {max(weights)[1]}, moments {max(moments)[0]:.1e}")
    assert max(weights)[0] <= TOL_WEIGHTS, max(weights)
    assert max(moments)[0] <= TOL_MOMENTS, max(moments)


def log(out, stage):
    return [json.loads(line) for line in (out / f"{stage}_log.jsonl").read_text().splitlines()]


def assert_close_logs(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x.keys() - {"time"}:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (k, x, y)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_autoencoder_on_two_ranks_follows_one_process(tmp_path, kind):
    """The same weights, optimizer moments and random states after 4 steps; the logs carry the whole batch's
    losses. VQ: the code counts are summed over the ranks, so the restart at step 4 restarts the same codes
    (the same perplexity and number, the same encoder outputs from the same draws). It restarts only at the
    last step: restarted codes are copies of nearby encoder outputs, near-ties for the next steps' argmin,
    which float rounding then decides (a code used or not, a different restart): chaotic, as with any
    change of kernel, even in one process."""
    extra = ["--kind", kind, "--restart-every", "4"]
    ref = single(tmp_path / "one", "autoencoder", *extra)
    ddp = torchrun(tmp_path / "two", "autoencoder", *extra)
    assert_close_states(ddp, ref, f"autoencoder {kind}, 2 ranks vs 1 process")
    assert_close_logs(log(tmp_path / "two", "autoencoder"), log(tmp_path / "one", "autoencoder"))
    if kind == "vq":
        assert log(tmp_path / "two", "autoencoder")[-1]["restarted"] > 0
    files = sorted(p.name for p in (tmp_path / "two").iterdir())  # rank 0 wrote each once: 4 log lines
    assert files == [
        "autoencoder.pt",
        "autoencoder_000003.png",
        "autoencoder_000004.png",
        "autoencoder_log.jsonl",
    ]
    assert len(log(tmp_path / "two", "autoencoder")) == 4


@pytest.mark.parametrize("task", ["txt2img", "inpaint"])
def test_diffusion_cut_on_two_ranks_resumes_on_one(tmp_path, task):
    """txt2img (caption dropout, LDMBert, KL posterior samples) and inpainting (random masks per image):
    2 ranks stopped at step 2 match one process at step 2; that checkpoint resumed by a single process
    matches one uninterrupted process at step 4 (a checkpoint holds nothing of the world size)."""
    if task == "txt2img":  # a KL stage 1 of 2 steps, for its latent shape
        single(tmp_path / "ae", "autoencoder", "--steps", "2", "--batch", "2")
        extra = ["--task", task, "--autoencoder", str(tmp_path / "ae")]
    else:
        extra = ["--task", task, "--autoencoder", "shapes-vq"]
    extra += ["--grid-every", "100"]  # one grid, at the end (the autoencoder test checks who writes them)
    half = single(tmp_path / "one", "diffusion", *extra, "--stop-at", "2")
    ddp = torchrun(tmp_path / "two", "diffusion", *extra, "--stop-at", "2")
    assert ddp["step"] == half["step"] == 2
    assert_close_states(ddp, half, f"{task}: 2 ranks vs 1 process, step 2")
    full = single(tmp_path / "one", "diffusion", *extra, "--resume")  # (resuming is exact: test_train)
    resumed = single(tmp_path / "two", "diffusion", *extra, "--resume")
    assert_close_states(resumed, full, f"{task}: 2 ranks then 1 vs 1 process, step 4")
    assert_close_logs(log(tmp_path / "two", "diffusion"), log(tmp_path / "one", "diffusion"))


def test_batch_must_split_equally_over_the_ranks():
    assert train.batch_part(6, 1, 3) == slice(2, 4)
    assert train.batch_part(5, 0, 1) == slice(0, 5)
    with pytest.raises(ValueError, match="--batch 5 is the global batch, split equally over 2 ranks"):
        train.batch_part(5, 0, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--device cuda: torch sees no CUDA device"):
        train.main(stage_args(tmp_path, "autoencoder", "--device", "cuda"))


def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    """--precision bf16 runs (CPU autocast) and stays near the float32 run after 2 steps."""
    bf16 = single(tmp_path / "bf16", "autoencoder", "--steps", "2", "--precision", "bf16")
    fp32 = single(tmp_path / "fp32", "autoencoder", "--steps", "2")
    loss = {p: log(tmp_path / p, "autoencoder")[-1]["loss"] for p in ("bf16", "fp32")}
    assert loss["bf16"] == pytest.approx(loss["fp32"], rel=0.05)
    assert all(v.dtype == torch.float32 for v in bf16["model"].values())  # the weights stay float32
    assert bf16["step"] == fp32["step"] == 2


# --- benchmarks/gpu_check.py: run by hand on a CUDA machine, never here; its command line is checked -------
def test_gpu_check_has_help_and_refuses_to_run_without_cuda(capsys):
    from benchmarks import gpu_check

    with pytest.raises(SystemExit) as done:
        gpu_check.main(["--help"])
    assert done.value.code == 0 and "--only" in capsys.readouterr().out
    if torch.cuda.is_available():
        return
    with pytest.raises(SystemExit) as done:
        gpu_check.main(["--only", "celebahq"])
    assert done.value.code == 2 and "runs on a GPU only" in capsys.readouterr().err
