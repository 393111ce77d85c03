"""weights_tools: each fault gives its one-line error; downloads fail fast offline; inspect; half precision.

Faults are tried through the CLI where the user meets them (`python -m weights_tools.convert`: exit code 1,
one line on stderr, no traceback) and through the API, with the exact message.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml
from helpers import save_pipeline, tiny_unconditional
from safetensors import safe_open
from test_compvis import tiny_checkpoint

from ldm_mini import load
from ldm_mini.hub import wanted_files
from weights_tools import compvis
from weights_tools.common import ConversionError, Inert, read_tensors
from weights_tools.convert import convert
from weights_tools.info import summary

ROOT = Path(__file__).resolve().parents[1]


def cli(module: str, *args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def one_line_error(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 1, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: ")
    return lines[0][len("error: ") :]


@pytest.fixture(scope="module")
def uncond(tmp_path_factory):
    """A tiny celebahq-like CompVis checkpoint and its yaml."""
    tmp = tmp_path_factory.mktemp("faults")
    ckpt, yaml_path, _ = tiny_checkpoint(tmp, "unconditional")
    return ckpt, yaml_path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".tmp" or p.name.endswith(".safetensors"))


# --- unpickling never runs code ---------------------------------------------------------------------------
class Payload:
    """The classic pickle attack: unpickling calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["state_dict", "extras"])
def test_pickled_callable_is_refused_and_never_runs(tmp_path, uncond, where):
    marker = tmp_path / "PWNED"
    state = torch.load(uncond[0], weights_only=True)
    if where == "state_dict":
        state["state_dict"]["model.diffusion_model.evil"] = Payload(marker)
    else:
        state["callbacks"] = Payload(marker)
    torch.save(state, tmp_path / "evil.ckpt")
    message = one_line_error(
        cli(
            "weights_tools.convert",
            tmp_path / "evil.ckpt",
            tmp_path / "out.safetensors",
            "--config",
            uncond[1],
        )
    )
    assert message == (
        f"{tmp_path / 'evil.ckpt'}: refused to unpickle it: it holds more than tensors (the global "
        "posix.system). Weight files are only read with torch.load(weights_only=True); a file that needs "
        "more could run code."
    )
    assert not marker.exists() and leftovers(tmp_path) == []


def fake_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        value.__module__, value.__qualname__ = name, key
        setattr(module, key, value)
    return module


def test_lightning_extras_become_inert_and_their_code_never_runs(tmp_path, uncond, monkeypatch):
    """A Lightning checkpoint may name pytorch_lightning / omegaconf classes outside state_dict. They are
    read as Inert placeholders; even a payload living under such a name is never called."""
    marker = tmp_path / "PWNED"

    def touch(path):  # would create the marker if anything called it
        Path(path).touch()

    class ModelCheckpoint:
        pass

    class Trap:
        def __reduce__(self):
            return touch, (str(marker),)

    for name, module in {
        "pytorch_lightning": fake_module("pytorch_lightning"),
        "pytorch_lightning.callbacks": fake_module(
            "pytorch_lightning.callbacks", touch=touch, ModelCheckpoint=ModelCheckpoint
        ),
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    state = torch.load(uncond[0], weights_only=True)
    state["callbacks"] = {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}, "trap": Trap()}
    torch.save(state, tmp_path / "lightning.ckpt")
    obj = read_tensors(tmp_path / "lightning.ckpt")  # the fake modules are importable here: still inert
    assert not marker.exists()
    assert obj["callbacks"]["trap"].__class__ is Inert and Inert in obj["callbacks"]
    convert(tmp_path / "lightning.ckpt", tmp_path / "out.safetensors", config=uncond[1])
    assert not marker.exists()
    torch.load(tmp_path / "lightning.ckpt", weights_only=False)  # control: plain unpickling WOULD run it
    assert marker.exists()
    # the same names inside state_dict are refused
    state["state_dict"]["model.diffusion_model.trap"] = Trap()
    torch.save(state, tmp_path / "lightning2.ckpt")
    with pytest.raises(ConversionError, match=r"refused to unpickle it: .*the global pytorch_lightning"):
        read_tensors(tmp_path / "lightning2.ckpt")


# --- damaged or foreign input ------------------------------------------------------------------------------
def test_truncated_and_corrupt_checkpoints(tmp_path, uncond):
    data = uncond[0].read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.ckpt").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    expected = {
        "truncated.ckpt": "cannot read it (RuntimeError: PytorchStreamReader failed reading zip archive: "
        "failed finding central directory); truncated or corrupt?",
        "corrupt.ckpt": "cannot read it (not a PyTorch pickle); truncated or corrupt?",
        "empty.ckpt": "the file is empty; truncated download?",
    }
    for name, reason in expected.items():
        message = one_line_error(
            cli("weights_tools.convert", tmp_path / name, tmp_path / "out.safetensors", "--config", uncond[1])
        )
        assert message == f"{tmp_path / name}: {reason}"
    assert leftovers(tmp_path) == []


def test_checkpoint_of_another_model_kind(tmp_path, uncond):
    from diffusers import UNet2DModel

    # a first-stage autoencoder checkpoint (ldm.models.autoencoder layout), with the LDM's yaml ...
    state = {
        k.removeprefix("first_stage_model."): v
        for k, v in torch.load(uncond[0])["state_dict"].items()
        if k.startswith("first_stage_model.")
    }
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "vq.ckpt")
    with pytest.raises(ConversionError) as e:
        convert(tmp_path / "vq.ckpt", tmp_path / "out.safetensors", config=uncond[1])
    assert str(e.value) == (
        f"{tmp_path / 'vq.ckpt'}: no model.diffusion_model.* weights, so not a CompVis LatentDiffusion "
        "checkpoint (a first-stage autoencoder checkpoint: pass its yaml, "
        "models/first_stage_models/*/config.yaml)"
    )
    # ... and with a first stage's yaml (the released vq-f4's: full size, so the shapes do not fit)
    first_stage_yaml = ROOT / "tests/realconfigs/compvis/models/first_stage_models/vq-f4/config.yaml"
    message = one_line_error(
        cli(
            "weights_tools.convert",
            tmp_path / "vq.ckpt",
            tmp_path / "out.safetensors",
            "--config",
            first_stage_yaml,
        )
    )
    assert (
        message.startswith(f"{tmp_path / 'vq.ckpt'}: ")
        and "is the yaml the one for this checkpoint?" in message
    )
    # a diffusers .bin
    unet = UNet2DModel(
        block_out_channels=(32, 32),
        layers_per_block=1,
        norm_num_groups=32,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
    )
    torch.save(unet.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(
        ConversionError, match=r"not a CompVis LatentDiffusion checkpoint \(a diffusers \.bin\? "
    ):
        convert(tmp_path / "diffusion_pytorch_model.bin", tmp_path / "out.safetensors", config=uncond[1])
    assert leftovers(tmp_path) == []


def edited_yaml(src: Path, dst: Path, edit) -> Path:
    config = yaml.safe_load(src.read_text())
    edit(config["model"]["params"])
    dst.write_text(yaml.safe_dump(config))
    return dst


def test_yaml_that_does_not_match_the_checkpoint(tmp_path, uncond):
    ckpt, src = uncond

    def wider(p):
        p["unet_config"]["params"]["model_channels"] = 64

    message = one_line_error(
        cli(
            "weights_tools.convert",
            ckpt,
            tmp_path / "out.safetensors",
            "--config",
            edited_yaml(src, tmp_path / "wider.yaml", wider),
        )
    )
    assert message == (
        f"{ckpt}: model.diffusion_model.input_blocks.0.0.weight has shape (32, 3, 3, 3) but the yaml's model "
        "needs (64, 3, 3, 3) (unet.conv_in.weight): is the yaml the one for this checkpoint?"
    )

    def deeper(p):
        p["unet_config"]["params"]["num_res_blocks"] = 2

    with pytest.raises(ConversionError) as e:
        convert(ckpt, tmp_path / "out.safetensors", config=edited_yaml(src, tmp_path / "deeper.yaml", deeper))
    assert str(e.value) == (
        f"{ckpt}: model.diffusion_model.input_blocks.2.0.op.weight: the yaml's model has no "
        "such weight: is the yaml the one for this checkpoint?"
    )

    def more_attention(p):
        p["unet_config"]["params"]["attention_resolutions"] = [1, 2]

    with pytest.raises(ConversionError) as e:
        convert(
            ckpt,
            tmp_path / "out.safetensors",
            config=edited_yaml(src, tmp_path / "attn.yaml", more_attention),
        )
    assert str(e.value) == (
        f"{ckpt}: 30 weight(s) of the yaml's model are missing, e.g. "
        "unet.down_blocks.0.attentions.0.group_norm.bias: is the yaml the one for this checkpoint?"
    )

    def schedule(p):
        p["linear_end"] = 0.0155

    with pytest.raises(ConversionError) as e:
        convert(
            ckpt, tmp_path / "out.safetensors", config=edited_yaml(src, tmp_path / "sched.yaml", schedule)
        )
    assert str(e.value) == (
        f"{ckpt}: its alphas_cumprod buffer is not the yaml's schedule (scaled_linear 0.0015 -> "
        "0.0155, T=1000): is the yaml the one for this checkpoint?"
    )
    assert leftovers(tmp_path) == []


def test_unknown_conditioning_kind(tmp_path, uncond):
    ckpt, src = uncond

    def clip_conditional(p):  # a CLIP text encoder: no released LDM of this repo uses one
        p["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
        p["conditioning_key"] = "crossattn"

    path = edited_yaml(src, tmp_path / "clip.yaml", clip_conditional)
    message = one_line_error(
        cli("weights_tools.convert", ckpt, tmp_path / "out.safetensors", "--config", path)
    )
    assert message == (
        f"{path}: model.params: conditioning_key 'crossattn' with cond_stage_config "
        "'ldm.modules.encoders.modules.FrozenCLIPEmbedder' is not supported: ldm_mini converts crossattn + "
        "BERTEmbedder (txt2img, layout) or ClassEmbedder (class), concat + SpatialRescaler (semantic), "
        "__is_first_stage__ (inpaint) or torch.nn.Identity (superres), and unconditional models"
    )


# --- the output file ------------------------------------------------------------------------------------
def test_existing_output_needs_force(tmp_path, uncond):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    message = one_line_error(cli("weights_tools.convert", uncond[0], out, "--config", uncond[1]))
    assert message == f"{out} exists: pass --force to overwrite it"
    assert out.read_bytes() == b"precious"
    convert(uncond[0], out, config=uncond[1], force=True)
    assert load(out).kind == "unconditional"


@pytest.mark.parametrize("failure", [OSError("No space left on device"), KeyboardInterrupt()])
def test_no_partial_file_when_writing_fails(tmp_path, uncond, monkeypatch, failure):
    import ldm_mini.loading

    def save_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # some bytes reached the disk
        raise failure

    monkeypatch.setattr(ldm_mini.loading, "save_file", save_half_then_fail)
    with pytest.raises(type(failure)):
        convert(uncond[0], tmp_path / "out.safetensors", config=uncond[1])
    assert leftovers(tmp_path) == []


def test_float16_halves_the_file_and_round_trips_exactly(tmp_path, uncond):
    full = convert(uncond[0], tmp_path / "f32.safetensors", config=uncond[1])
    run = cli(
        "weights_tools.convert",
        uncond[0],
        tmp_path / "f16.safetensors",
        "--config",
        uncond[1],
        "--dtype",
        "float16",
    )
    assert run.returncode == 0, run.stderr
    half = tmp_path / "f16.safetensors"
    ratio = half.stat().st_size / full.stat().st_size
    assert 0.49 < ratio < 0.51, ratio
    m = load(half, dtype=torch.float32)  # into float32 ...
    assert all(p.dtype == torch.float32 for p in m.parameters())
    with safe_open(str(half), framework="pt") as f:  # ... and back to float16: bit for bit
        for key, value in m.state_dict().items():
            stored = f.get_tensor(key)
            assert stored.dtype == torch.float16 and torch.equal(value.half(), stored), key
    assert "F16" not in summary(full) and "F16" in summary(half)
    bf16 = convert(uncond[0], tmp_path / "bf16.safetensors", config=uncond[1], dtype="bfloat16")
    assert 0.49 < bf16.stat().st_size / full.stat().st_size < 0.51
    m = load(bf16, dtype="float32")
    with safe_open(str(bf16), framework="pt") as f:
        assert all(torch.equal(v.bfloat16(), f.get_tensor(k)) for k, v in m.state_dict().items())


# --- inspect -------------------------------------------------------------------------------------------
def test_inspect_reads_the_header_only(tmp_path, uncond, monkeypatch):
    path = convert(uncond[0], tmp_path / "m.safetensors", config=uncond[1])
    m = load(path)
    import ldm_mini.loading

    monkeypatch.setattr(ldm_mini.loading, "build_empty", None)  # inspect must not build a model
    text = summary(path)
    for part in ("unet", "autoencoder"):
        count = sum(p.numel() for p in getattr(m, part).parameters())
        assert f"{count / 1e6:9.2f} M parameters  F32" in text
    assert "kind          unconditional" in text and "text_encoder  -" in text
    assert "beta_schedule=scaled_linear" in text and "steps_offset=1" in text
    run = cli("weights_tools.info", path)
    assert run.returncode == 0 and run.stdout.strip() == text
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 100)
    assert one_line_error(cli("weights_tools.info", tmp_path / "bad.safetensors")).startswith(
        f"{tmp_path / 'bad.safetensors'}: not a .safetensors file (header length"
    )


# --- download ------------------------------------------------------------------------------------------
def test_wanted_files_pick_one_weight_format_per_component():
    files = [
        "model_index.json",
        "README.md",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vqvae/config.json",
        "vqvae/diffusion_pytorch_model.fp16.bin",
        "bert/config.json",
        "bert/pytorch_model.bin",
        "tokenizer/vocab.txt",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
        "unet/flax_model.msgpack",
    ]
    assert wanted_files(files) == [
        "bert/config.json",
        "bert/pytorch_model.bin",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.txt",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vqvae/config.json",
        "vqvae/diffusion_pytorch_model.fp16.bin",
    ]


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_download_offline_fails_fast_with_one_line(tmp_path, env):
    start = time.monotonic()
    run = cli(
        "weights_tools.download",
        "CompVis/ldm-celebahq-256",
        tmp_path / "out.safetensors",
        env={"HF_HOME": str(tmp_path / "hf"), **env},
        timeout=60,
    )
    assert time.monotonic() - start < 10
    message = one_line_error(run)
    assert message.startswith("cannot download CompVis/ldm-celebahq-256 and it is not in the cache (")
    assert message.endswith(
        "Without network: download the folder elsewhere (`hf download CompVis/ldm-celebahq-256 "
        "--local-dir FOLDER`), copy it here, then run `python -m weights_tools.convert FOLDER "
        "OUT.safetensors`"
    )
    assert leftovers(tmp_path) == []


def test_download_uses_the_cache_offline(tmp_path):
    """A pipeline already in huggingface_hub's cache converts without network."""
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny-ldm" / "snapshots" / ("0" * 40)
    save_pipeline(tiny_unconditional(), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    run = cli(
        "weights_tools.download",
        "someone/tiny-ldm",
        tmp_path / "tiny.safetensors",
        env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr
    assert load(tmp_path / "tiny.safetensors").kind == "unconditional"


def test_packaged_vocab_is_checked(tmp_path, monkeypatch):
    assert compvis.packaged_vocab().count("\n") == 30522
    tampered = tmp_path / "vocab.txt"
    tampered.write_text(compvis.VOCAB.read_text().replace("[unused0]", "[SLOT]"))
    monkeypatch.setattr(compvis, "VOCAB", tampered)
    with pytest.raises(
        ConversionError, match=r"vocab.txt: sha256 is not bert-base-uncased's \(07eced375cec\.\.\.\)"
    ):
        compvis.packaged_vocab()
