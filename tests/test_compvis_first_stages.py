"""The CompVis zoo's nine first stages (models/first_stage_models/*) convert on their own, as a user converts
a released one: `python -m weights_tools.convert model.ckpt OUT.safetensors --config config.yaml` writes a
file of kind "autoencoder" that `ldm_mini.load_autoencoder` reads.

- At full size on the meta device, each released yaml builds exactly the state_dict the original code builds
  from it (full_size_keys.json.gz, tests/compvis_refs), but for the training loss.* that the converter drops.
- The tiny random model.ckpt of tests/compvis_refs/<name> (deflate-compressed: read without mmap) converts,
  loads, and computes what the original computed (test_autoencoder.check_against_the_original: atol 1e-5,
  the numbers are there; the converted file gives the same tensors bit for bit as the converter's tables).
- Wrong inputs are one-line errors that say what to pass instead.
"""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_autoencoder import FIRST_STAGES, check_against_the_original, compvis_first_stage

import ldm_mini
from ldm_mini.loading import build_empty_autoencoder, read_metadata, write_file
from weights_tools import compvis
from weights_tools.common import ConversionError
from weights_tools.convert import convert
from weights_tools.info import summary

ROOT = Path(__file__).resolve().parents[1]
REFS = ROOT / "tests" / "compvis_refs"
RELEASED = ROOT / "tests" / "realconfigs" / "compvis"
DTYPES = {"float32": torch.float32, "int32": torch.int32, "int64": torch.int64}
# the training configs of the same four KL autoencoders (configs/autoencoder/*.yaml, same format)
TRAINING_CONFIGS = {"autoencoder_kl_64x64x3": "kl-f4", "autoencoder_kl_32x32x4": "kl-f8",
                    "autoencoder_kl_16x16x16": "kl-f16", "autoencoder_kl_8x8x64": "kl-f32"}  # fmt: skip


def released_yaml(name: str) -> Path:
    return RELEASED / json.loads((REFS / name / "reference.json").read_text())["released_yaml"]


@pytest.mark.parametrize("name", FIRST_STAGES)
def test_the_released_yaml_builds_the_released_checkpoints_keys(name):
    """Full size, meta device: the converter maps every key of the original's state_dict but loss.*, and
    the model of the yaml takes exactly those (keys and shapes; the converter checks them itself too)."""
    keys = json.load(gzip.open(REFS / name / "full_size_keys.json.gz"))["keys"]
    with torch.device("meta"):
        state = {k: torch.empty(shape, dtype=DTYPES[dtype]) for k, shape, dtype in keys}
    cfg = compvis.first_stage_config(released_yaml(name))
    tensors, meta = compvis.convert_first_stage_state_dict(state, cfg, name)
    want = build_empty_autoencoder(meta).state_dict()
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in want.items()}
    kept = [k for k in state if not k.startswith("loss.")]
    assert len(tensors) == len(kept) and len(kept) < len(state)  # 1x1 convs -> Linear: same count


@pytest.mark.parametrize("training, name", sorted(TRAINING_CONFIGS.items()))
def test_training_configs_are_the_released_first_stages(training, name):
    """configs/autoencoder/*.yaml (what trained them) read into the released models' configs."""
    yaml_path = RELEASED / "configs" / "autoencoder" / f"{training}.yaml"
    assert compvis.is_first_stage(yaml_path)
    assert compvis.first_stage_config(yaml_path) == compvis.first_stage_config(released_yaml(name))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Each tiny model.ckpt converted as the command line converts it (the zip is deflated: read_tensors
    reads it without mmap)."""
    tmp = tmp_path_factory.mktemp("first_stages")
    return {
        name: convert(REFS / name / "model.ckpt", tmp / f"{name}.safetensors", REFS / name / "config.yaml")
        for name in FIRST_STAGES
    }


@pytest.mark.parametrize("name", FIRST_STAGES)
@torch.no_grad()
def test_converted_file_matches_the_original(name, converted, monkeypatch):
    model = ldm_mini.load_autoencoder(converted[name])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    tables, refs = compvis_first_stage(name)  # the converter's tables without the file
    assert model.config == tables.config
    want = tables.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    check_against_the_original(model, refs, monkeypatch)
    meta = read_metadata(converted[name])
    assert meta["kind"] == "autoencoder" and meta["source"].startswith("CompVis checkpoint model.ckpt")
    assert f"{sum(p.numel() for p in model.parameters()) / 1e6:9.2f} M parameters  F32" in summary(
        converted[name]
    )


def test_load_autoencoder_dtype_device_and_kinds(converted, tmp_path):
    path = converted["vq-f8"]
    half = ldm_mini.load_autoencoder(path, dtype="float16")
    assert all(p.dtype == torch.float16 for p in half.parameters())
    if not torch.cuda.is_available():  # the same check (and message) as ldm_mini.load's
        with pytest.raises(ValueError, match=r"device='cuda': no CUDA device is available here"):
            ldm_mini.load_autoencoder(path, device="cuda")
    with pytest.raises(ValueError, match=r"a first-stage autoencoder alone, .*ldm_mini\.load_autoencoder$"):
        ldm_mini.load(path)
    ldm = convert(
        REFS / "cin256" / "model.ckpt", tmp_path / "cin256.safetensors", REFS / "cin256" / "config.yaml"
    )
    with pytest.raises(ValueError, match=r"holds a 'class' latent diffusion model, .*ldm_mini\.load "):
        ldm_mini.load_autoencoder(ldm)
    # write_file checks an autoencoder file against its own model, as an LDM file
    tensors, meta = load_file(path), read_metadata(path)
    del tensors["encoder.down_blocks.3.attentions.1.to_q.weight"]
    with pytest.raises(ValueError, match=r"does not fit VQModel: 1 missing \['encoder\.down_blocks\.3\."):
        write_file(tmp_path / "broken.safetensors", tensors, meta)
    assert not (tmp_path / "broken.safetensors").exists()


def cli_error(*args) -> str:
    run = subprocess.run([sys.executable, "-m", "weights_tools.convert", *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 1 and run.stdout == "", run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0].removeprefix("error: ")


def test_the_command_line_and_bad_input(converted, tmp_path):
    vq8, vq16, cin = (REFS / n / "model.ckpt" for n in ("vq-f8", "vq-f16", "cin256"))
    yaml8, yaml16, cin_yaml = (REFS / n / "config.yaml" for n in ("vq-f8", "vq-f16", "cin256"))
    out = tmp_path / "vq-f8.safetensors"
    run = subprocess.run([sys.executable, "-m", "weights_tools.convert", vq8, out, "--config", yaml8],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0 and run.stdout.startswith(f"wrote {out}"), run.stderr
    assert load_file(out).keys() == load_file(converted["vq-f8"]).keys()
    assert cli_error(vq8, out, "--config", yaml8) == f"{out} exists: pass --force to overwrite it"
    new = tmp_path / "new.safetensors"
    # the yaml of another first stage: vq-f16 has attention at level 4, vq-f8 at level 3
    assert cli_error(vq8, new, "--config", yaml16) == (
        f"{vq8}: encoder.down.3.attn.0.norm.weight: the yaml's model has no such weight: is the yaml the one "
        "for this checkpoint?"
    )
    assert cli_error(vq16, new, "--config", yaml8).startswith(f"{vq16}: encoder.down.")
    # an LDM checkpoint with a first stage's yaml, and the other way round
    assert cli_error(cin, new, "--config", yaml8) == (
        f"{cin}: no encoder.conv_in.weight, so not a CompVis first-stage checkpoint (a LatentDiffusion "
        "checkpoint: pass its yaml)"
    )
    assert cli_error(vq8, new, "--config", cin_yaml) == (
        f"{vq8}: no model.diffusion_model.* weights, so not a CompVis LatentDiffusion checkpoint (a "
        "first-stage autoencoder checkpoint: pass its yaml, models/first_stage_models/*/config.yaml)"
    )
    assert cli_error(vq8, new, "--config", yaml8, "--no-ema").startswith(
        f"{yaml8}: a first-stage autoencoder has no EMA weights and no latent scale factor"
    )
    assert not new.exists()
    with pytest.raises(ConversionError, match="a first-stage autoencoder alone, not a LatentDiffusion model"):
        compvis.model_configs(yaml8)
    with pytest.raises(
        ConversionError, match="not a first-stage autoencoder: convert it with convert_checkpoint"
    ):
        compvis.first_stage_config(cin_yaml)
