"""diffusers pipeline folder -> weights_tools.convert -> ldm_mini.load: equal outputs, module by module.

Tolerance: float32 on CPU, outputs of order 1; atol=1e-5 is far above float32 round-off of these tiny
models (~1e-6) and far below any real mistake (a wrong scale, a transposed head: ~1e-1).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    fp16_variant,
    resave_legacy,
    save_pipeline,
    tiny_superres,
    tiny_txt2img,
    tiny_unconditional,
)
from safetensors import safe_open

import ldm_mini
from weights_tools.common import ConversionError
from weights_tools.convert import convert

ATOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]


def close(ours, ref, atol=ATOL):
    torch.testing.assert_close(ours, ref, rtol=0, atol=atol)
    return (ours - ref).abs().max().item()


@pytest.fixture(scope="module")
def txt2img(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("txt2img")
    pipe = tiny_txt2img(tmp)
    folder = save_pipeline(pipe, tmp / "pipe")
    return pipe, folder, convert(folder, tmp / "model.safetensors")


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uncond")
    pipe = tiny_unconditional()
    folder = save_pipeline(pipe, tmp / "pipe")
    return pipe, folder, convert(folder, tmp / "model.safetensors")


@pytest.fixture(scope="module")
def superres(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("superres")
    pipe = tiny_superres()
    folder = save_pipeline(pipe, tmp / "pipe")
    return pipe, folder, convert(folder, tmp / "model.safetensors")


@torch.no_grad()
@pytest.mark.parametrize("batch, size", [(1, 8), (2, (8, 12))])
def test_txt2img_modules_match(txt2img, batch, size):
    pipe, _, path = txt2img
    m = ldm_mini.load(path)
    assert m.kind == "txt2img" and m.scale_factor == pytest.approx(0.18215)
    prompts = ["a red circle above a blue square", "an unknown photo!"][:batch]
    ids = m.tokenize(prompts)
    ref_ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(ids, ref_ids)
    context = m.encode_text(ids)
    close(context, pipe.bert(ref_ids)[0])
    h, w = (size, size) if isinstance(size, int) else size
    x, t = (
        torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(1)),
        torch.tensor([981, 1][:batch]),
    )
    close(m.predict_noise(x, t, context), pipe.unet(x, t, context).sample)
    img = torch.randn(batch, 3, 4 * h, 4 * w, generator=torch.Generator().manual_seed(2))
    posterior, ref_posterior = m.autoencoder.encode(img), pipe.vqvae.encode(img).latent_dist
    close(posterior.mean, ref_posterior.mean)
    close(posterior.std, ref_posterior.std)
    close(m.decode(x), pipe.vqvae.decode(x / pipe.vqvae.config.scaling_factor).sample)


@torch.no_grad()
@pytest.mark.parametrize("fixture", ["unconditional", "superres"])
def test_vq_pipelines_modules_match(request, fixture):
    pipe, _, path = request.getfixturevalue(fixture)
    m = ldm_mini.load(path)
    assert m.kind == fixture and m.scale_factor == 1.0
    g = torch.Generator().manual_seed(0)
    x, low = torch.randn(2, 3, 8, 10, generator=g), torch.rand(2, 3, 8, 10, generator=g) * 2 - 1
    t = torch.tensor([10, 700])
    cond = low if fixture == "superres" else None
    ref_in = torch.cat([x, low], 1) if fixture == "superres" else x
    close(m.predict_noise(x, t, cond), pipe.unet(ref_in, t).sample)
    img = torch.randn(2, 3, 16, 20, generator=g)
    h = m.autoencoder.encode(img)
    close(h, pipe.vqvae.encode(img).latents)
    z_q, _ = m.autoencoder.quantize(h)
    close(z_q, pipe.vqvae.quantize(h)[0])
    close(m.decode(x), pipe.vqvae.decode(x).sample)  # quantises first, as diffusers' decode does
    close(m.decode(x, quantize=False), pipe.vqvae.decode(x, force_not_quantize=True).sample)


def test_metadata_records_the_source(txt2img, superres):
    for (_, _, path), schedule in ((txt2img, (1, False)), (superres, (0, True))):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        m = ldm_mini.load(path)
        assert (m.schedule.steps_offset, m.schedule.set_alpha_to_one) == schedule
        assert m.schedule.beta_schedule == "scaled_linear" and meta["format"] == "ldm_mini/2"
    assert "tokenizer_vocab" in safe_open(str(txt2img[2]), "pt").metadata()


@torch.no_grad()
def test_legacy_bin_folder_converts_to_the_same_file(txt2img, unconditional, tmp_path):
    """A folder re-saved as an early diffusers release (.bin, query/key/value/proj_attn) gives the same
    tensors as the modern one."""
    for pipe, name in ((txt2img[0], "t"), (unconditional[0], "u")):
        folder = save_pipeline(pipe, tmp_path / name)
        resave_legacy(folder)
        assert list(folder.glob("*/*.bin")) and not list(folder.glob("unet/*.safetensors"))
        legacy = ldm_mini.load(convert(folder, tmp_path / f"{name}.safetensors"))
        modern = ldm_mini.load((txt2img if name == "t" else unconditional)[2])
        for (k, a), (k2, b) in zip(
            sorted(legacy.state_dict().items()), sorted(modern.state_dict().items()), strict=True
        ):
            assert k == k2 and torch.equal(a, b), k


def test_fp16_variant_and_dtype_option(unconditional, tmp_path):
    pipe = unconditional[0]
    folder = save_pipeline(pipe, tmp_path / "pipe")
    fp16_variant(folder)
    m = ldm_mini.load(convert(folder, tmp_path / "half.safetensors"))
    ref = ldm_mini.load(unconditional[2])
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v.half().float()), k
    half = convert(unconditional[1], tmp_path / "half2.safetensors", dtype="float16")
    assert half.stat().st_size < 0.6 * unconditional[2].stat().st_size
    assert ldm_mini.load(half).dtype == torch.float16
    assert ldm_mini.load(half, dtype=torch.float32).dtype == torch.float32


# --- bad input: one clear line, no partial output --------------------------------------------------
def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "weights_tools.convert", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_converts_and_refuses_to_overwrite(unconditional, tmp_path):
    out = tmp_path / "m.safetensors"
    ok = run_cli(unconditional[1], out)
    assert ok.returncode == 0 and str(out) in ok.stdout and out.is_file()
    again = run_cli(unconditional[1], out)
    assert again.returncode == 1 and "--force" in again.stderr and "Traceback" not in again.stderr
    assert run_cli(unconditional[1], out, "--force").returncode == 0


@pytest.mark.parametrize(
    "damage, message",
    [
        ("not_a_pipeline", "no model_index.json"),
        ("missing_component", "component vqvae/ is missing"),
        ("truncated", "truncated"),
        ("wrong_class", "is not one of"),
    ],
)
def test_bad_folders_give_one_clear_line(unconditional, tmp_path, damage, message):
    folder = save_pipeline(unconditional[0], tmp_path / "pipe")
    if damage == "not_a_pipeline":
        (folder / "model_index.json").unlink()
    elif damage == "missing_component":
        for f in (folder / "vqvae").iterdir():
            f.unlink()
        (folder / "vqvae").rmdir()
    elif damage == "truncated":
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "wrong_class":
        index = folder / "model_index.json"
        index.write_text(index.read_text().replace("LDMPipeline", "StableDiffusionPipeline"))
    out = tmp_path / "out.safetensors"
    with pytest.raises(ConversionError, match=message):
        convert(folder, out)
    result = run_cli(folder, out)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and message in result.stderr
    assert list(tmp_path.glob("*.safetensors")) == [] and list(tmp_path.glob(".*.tmp")) == []


def test_load_names_a_wrong_key(unconditional, tmp_path):
    from safetensors.torch import load_file, save_file

    path = unconditional[2]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state["unet.conv_in.weight"] = state["unet.conv_in.weight"][:, :2].contiguous()
    state["unet.extra.weight"] = state.pop("unet.conv_out.bias")
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"unet\.conv_out\.bias.*unet\.extra\.weight.*unet\.conv_in\.weight"):
        ldm_mini.load(tmp_path / "bad.safetensors")


# --- the published configs at full size, without weights ---------------------------------------------
REAL = Path(__file__).parent / "realconfigs"
HUB_FOLDERS = ["ldm-text2im-large-256", "ldm-celebahq-256", "ldm-super-resolution-4x-openimages"]


@pytest.mark.parametrize("name", HUB_FOLDERS)
def test_published_configs_map_every_key_at_full_size(name):
    """The converter's reading of each published config.json builds (on the meta device, no memory) a
    model with exactly the keys and shapes of the diffusers model of that config, after the key tables."""
    import diffusers
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    from ldm_mini.loading import build_empty, from_diffusers_names, make_metadata
    from weights_tools import diffusers_format as fmt

    folder = REAL / name
    unet_c, vae_c = (fmt.read_json(folder / c / "config.json") for c in ("unet", "vqvae"))
    kind = fmt.PIPELINES[fmt.read_json(folder / "model_index.json")["_class_name"]]
    bert_c = fmt.read_json(folder / "bert" / "config.json") if kind == "txt2img" else None
    text = fmt.bert_config(bert_c, name) if bert_c else None
    meta = make_metadata(
        kind=kind,
        unet=fmt.unet_config(unet_c, name),
        autoencoder=fmt.autoencoder_config(vae_c, name),
        schedule=fmt.schedule_config(fmt.read_json(folder / "scheduler" / "scheduler_config.json"), name),
        scale_factor=fmt.scale_factor_of(vae_c, kind),
        text_encoder=text,
    )
    ours = {k: tuple(v.shape) for k, v in build_empty(meta).state_dict().items()}
    with torch.device("meta"):
        refs = {
            "unet": getattr(diffusers, unet_c["_class_name"]).from_config(unet_c),
            "autoencoder": getattr(diffusers, vae_c["_class_name"]).from_config(vae_c),
        }
        if kind == "txt2img":
            refs["text_encoder"] = LDMBertModel(LDMBertConfig(**bert_c))
    want = {}
    for prefix, ref in refs.items():
        table = fmt.LDMBERT if prefix == "text_encoder" else fmt.LEGACY_ATTENTION
        state = from_diffusers_names(fmt.rename(ref.state_dict(), table))
        want.update({f"{prefix}.{k}": tuple(v.shape) for k, v in state.items()})
    assert sorted(ours.keys() - want.keys()) == [] and sorted(want.keys() - ours.keys()) == []
    assert ours == want
    expected_scale = {"txt2img": 0.18215, "unconditional": 1.0, "superres": 1.0}[kind]
    assert float(meta["scale_factor"]) == expected_scale
