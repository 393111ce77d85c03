"""Many images: the command line under torchrun, --batch-size, --skip-existing and --prompts.

Real `torchrun --nproc_per_node=2 -m ldm_mini ...` jobs (gloo on the CPU) on the embedded shapes models at 2
steps. Every image of a job must be the single-process image of its seed, byte for byte; rank 0's manifest
must list every image once with the sha256 of its file; a rerun must make only the missing images. Every
process runs one thread, as this test process does (conftest): on a CPU the thread count moves floats too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_mini.__main__ import MANIFEST, main

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle above a blue square"
TXT2IMG = ["txt2img", PROMPT, "--steps", "2", "-n", "5", "--seed", "3", "--device", "cpu"]  # seeds 3 .. 7
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "ldm_mini"]  # fmt: skip
SAMPLE = ["sample", "--weights", "shapes-uncond", "--steps", "2", "-n", "3", "--seed", "0", "--device", "cpu"]


def torchrun(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m ldm_mini ARGV` (standalone: a free local port)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run([*TORCHRUN, *argv], capture_output=True, text=True, env=env, timeout=120, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def summary(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if " images in " in line]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, bytes]:
    """The plain single-process run of TXT2IMG: file name -> PNG bytes."""
    out = tmp_path_factory.mktemp("single")
    assert main([*TXT2IMG, "--out", str(out)]) == 0
    return pngs(out)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """TXT2IMG as a torchrun job of two processes."""
    tmp = tmp_path_factory.mktemp("job")
    return tmp / "out", torchrun([*TXT2IMG, "--out", str(tmp / "out")], cwd=tmp)


def test_torchrun_splits_the_seeds_and_gives_the_single_process_images(single, job):
    out, proc = job
    assert len(single) == 5 and pngs(out) == single  # the same names (NAME-SEED.png), the same bytes
    for rank, seeds in ((0, (3, 5, 7)), (1, (4, 6))):  # round robin: seed 3 + k on rank k % 2
        for seed in seeds:
            assert f"[rank {rank}] image {seed - 2}/5, seed {seed}" in proc.stderr, (rank, seed)
    line = f"5 images in {out}: 5 written by 2 processes, 0 already there; manifest {out / MANIFEST}"
    assert summary(proc.stdout) == [line]  # printed by rank 0 only


def test_the_manifest_lists_every_image_once_with_its_sha256(job):
    out, _ = job
    lines = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert [line["seed"] for line in lines] == [3, 4, 5, 6, 7]
    assert sorted(line["file"] for line in lines) == sorted(p.name for p in out.glob("*.png"))
    for line in lines:
        png = out / line["file"]
        assert line["sha256"] == hashlib.sha256(png.read_bytes()).hexdigest()
        assert line["prompt"] == PROMPT and line["file"].endswith(f"-{line['seed']}.png")
        assert line["settings"] == {k: v for k, v in Image.open(png).text.items()
                                    if k not in ("prompt", "seed", "software")}  # fmt: skip
        assert line["settings"]["steps"] == "2" and line["settings"]["weights"] == "shapes"


def test_a_rerun_makes_only_the_missing_image(single, job, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(job[0], out)  # copy2: the modification times too
    lost = next(out.glob("*-5.png"))
    lost.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    proc = torchrun([*TXT2IMG, "--out", str(out)], cwd=tmp_path)
    assert pngs(out) == single
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p != lost}
    assert after == before  # the others were kept as they were
    assert proc.stdout.count("wrote ") == 1 and f"wrote {lost} " in proc.stdout
    assert "[rank 0] image 3/5, seed 5" in proc.stderr  # what is left is dealt anew: its one batch to rank 0
    assert "1 written by 2 processes, 4 already there" in summary(proc.stdout)[0]
    lines = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert len(lines) == 5 and all(line["sha256"] == hashlib.sha256(single[line["file"]]).hexdigest()
                                   for line in lines)  # fmt: skip


def test_torchrun_sample_with_batch_size_gives_the_single_process_images(tmp_path):
    """Another command, batched. Batches are fixed by the seeds ([0, 1], [2]), so a batched image does not
    depend on the number of processes. It may differ from its batch-of-one image: batched kernels round
    differently (measured: ~2e-6 on [0, 1]), which moves a few pixel values by one level; a batch of one is
    the plain image."""
    assert main([*SAMPLE, "--out", str(tmp_path / "plain")]) == 0
    assert main([*SAMPLE, "--batch-size", "2", "--skip-existing", "--out", str(tmp_path / "one")]) == 0
    proc = torchrun([*SAMPLE, "--batch-size", "2", "--out", str(tmp_path / "two")], cwd=tmp_path)
    plain, batched = pngs(tmp_path / "plain"), pngs(tmp_path / "one")
    assert sorted(batched) == ["sample-0.png", "sample-1.png", "sample-2.png"] == sorted(plain)
    assert pngs(tmp_path / "two") == batched and "3 written by 2 processes" in summary(proc.stdout)[0]
    assert "[rank 0] images 1-2/3, seeds 0-1" in proc.stderr and "[rank 1] image 3/3, seed 2" in proc.stderr
    assert Image.open(tmp_path / "two" / "sample-0.png").text["batch"] == "seeds 0-1"  # it made the pixels
    assert "batch" not in Image.open(tmp_path / "two" / "sample-2.png").text
    assert batched["sample-2.png"] == plain["sample-2.png"]
    for name in batched:
        a, b = (np.asarray(Image.open(BytesIO(png[name]))).astype(int) for png in (batched, plain))
        assert np.abs(a - b).max() <= 1, name
    lines = [json.loads(line) for line in (tmp_path / "two" / MANIFEST).read_text().splitlines()]
    assert [(line["seed"], line["prompt"], line["settings"]["model"]) for line in lines] == [
        (seed, None, "unconditional") for seed in (0, 1, 2)
    ]


def test_a_rerun_makes_a_batch_whole_and_the_manifest_keeps_other_jobs(tmp_path, capsys):
    """With --batch-size 2 an image depends on its batch, so a batch with one image missing is made whole (the
    other one is not rewritten): the image made again has the same bytes. Another job into the same folder
    adds its lines to the manifest."""
    argv = [*SAMPLE, "--batch-size", "2", "--skip-existing", "--out", str(tmp_path)]
    assert main(argv) == 0
    before, kept = pngs(tmp_path), (tmp_path / "sample-0.png").stat().st_mtime_ns
    (tmp_path / "sample-1.png").unlink()  # of the batch [0, 1]; alone it would differ (here, measured)
    capsys.readouterr()
    assert main(argv) == 0
    assert pngs(tmp_path) == before and (tmp_path / "sample-0.png").stat().st_mtime_ns == kept
    assert "3 images in" in (out := capsys.readouterr().out) and "1 written, 2 already there" in out
    other = ["txt2img", PROMPT, "--steps", "2", "--device", "cpu", "--skip-existing", "--out", str(tmp_path)]
    assert main(other) == 0
    lines = [json.loads(line) for line in (tmp_path / MANIFEST).read_text().splitlines()]
    files = ["sample-0.png", "sample-1.png", "sample-2.png", "a-red-circle-above-a-blue-square-0.png"]
    assert [line["file"] for line in lines] == files


def test_prompts_file_makes_each_prompt_with_each_seed(tmp_path, capsys):
    prompts = ["a red circle", "A Red  Circle", "a blue square"]  # the first two slug alike
    file = tmp_path / "prompts.txt"
    file.write_text(f"# shapes\n{prompts[0]}\n\n{prompts[1]}\n{prompts[2]}\n{prompts[0]}\n")  # a repeat: once
    argv = ["txt2img", "--prompts", str(file), "--steps", "2", "-n", "2", "--seed", "1", "--device", "cpu"]
    assert main([*argv, "--skip-existing", "--out", str(tmp_path / "many")]) == 0
    many = pngs(tmp_path / "many")
    assert len(many) == 6 and "6 images in" in capsys.readouterr().out
    for prompt in prompts:
        tag = hashlib.sha256(prompt.encode()).hexdigest()[:8]
        out = tmp_path / tag
        assert main(["txt2img", prompt, *argv[3:], "--out", str(out)]) == 0  # one prompt, in a plain run
        for name, data in pngs(out).items():  # slug-SEED.png -> slug-HASH-SEED.png
            stem, seed = name.rsplit("-", 1)
            assert many[f"{stem}-{tag}-{seed}"] == data
    lines = [json.loads(line) for line in (tmp_path / "many" / MANIFEST).read_text().splitlines()]
    assert [(line["prompt"], line["seed"]) for line in lines] == [(p, s) for p in prompts for s in (1, 2)]
    for bad, message in ((argv[:1], "give a prompt, or --prompts FILE"), ([*argv, "x"], "not both"),
                         ([*argv, "--out", str(tmp_path / "a.png")], "give --out a folder")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_batch_job_rules(tmp_path, capsys):
    """A batch job needs a folder, keeps only files of its own settings, and defaults to seed 0; a plain run
    into the same folder still refuses taken names, as before."""
    argv = ["txt2img", PROMPT, "--steps", "2", "--device", "cpu", "--skip-existing"]
    for extra, message in ((["--out", str(tmp_path / "a.png")], "needs --out DIR/, a folder"),
                           ([], "needs --out DIR/, a folder"),
                           (["--out", str(tmp_path), "--force"], "choose one")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main([*argv, *extra])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path)]) == 0
    (made,) = tmp_path.glob("*.png")
    assert made.name.endswith("-0.png")  # the default seed of a batch job
    with pytest.raises(SystemExit) as e:  # the file there is not this job's image
        main([*argv, "--steps", "3", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{made} was made with other settings (steps 2, not 3)" in err
    with pytest.raises(SystemExit) as e:
        main([*argv[:-1], "--seed", "0", "--out", str(tmp_path)])
    assert e.value.code == 2 and "already exists: pass --force" in capsys.readouterr().err
