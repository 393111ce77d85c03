"""The command line (`python -m ldm_mini` / `ldm-mini`) and `verify`, on tiny converted models.

Commands run in-process through main(argv); one run goes through a subprocess (`python -m ldm_mini`).
Every command must write what it says (PNG present, text chunk with the settings, path printed); bad
arguments exit with code 2 and a message naming the problem; outputs are never overwritten without
--force. `verify` must pass on a converted model and fail, naming the stage, when one weight of the file
differs from the original the file was converted from.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize_, save_pipeline, tiny_model, tiny_superres, tiny_txt2img, tiny_unconditional
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ldm_mini
from ldm_mini.__main__ import main
from ldm_mini.unet import UNet, UNetConfig
from ldm_mini.verify import SAMPLE_ATOL, STAGE_ATOL, autoencoder_kwargs, unet_kwargs
from weights_tools.convert import convert
from weights_tools.diffusers_format import autoencoder_config, unet_config

ROOT = Path(__file__).resolve().parents[1]
REALCONFIGS = Path(__file__).parent / "realconfigs"
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (diffusers folder, converted file). txt2img: KL f4 (32 px -> 8x8 latent); the others VQ f2."""
    tmp = tmp_path_factory.mktemp("cli")
    out = {}
    for kind, make in (("txt2img", lambda: tiny_txt2img(tmp)), ("unconditional", tiny_unconditional),
                       ("superres", tiny_superres)):  # fmt: skip
        folder = save_pipeline(make(), tmp / kind)
        out[kind] = (folder, convert(folder, tmp / f"{kind}.safetensors"))
    return out


def written(stdout: str) -> list[Path]:
    """The paths the command says it wrote ("wrote PATH (WxH, seed S)")."""
    return [Path(p) for p in re.findall(r"^wrote (.+?) \(", stdout, flags=re.M)]


def exit_code(argv) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_txt2img_writes_pngs_with_settings(tiny, tmp_path, capsys):
    file = tiny["txt2img"][1]
    argv = ["txt2img", PROMPT, "--weights", str(file), "--steps", "2", "-n", "2", "--seed", "7"]
    argv += ["--guidance", "2", "--height", "32", "--width", "32", "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 0
    paths = written(capsys.readouterr().out)
    assert len(paths) == 2 and all(p.parent == tmp_path and p.is_file() for p in paths)
    texts = [Image.open(p).text for p in paths]
    for text, seed in zip(texts, (7, 8), strict=True):
        assert text["prompt"] == PROMPT and text["seed"] == str(seed) and text["steps"] == "2"
        assert text["sampler"] == "ddim" and text["guidance"] == "2.0" and text["weights"] == str(file)
    # image i uses seed + i: the second PNG is exactly the library's image for seed 8
    m = ldm_mini.load(file)
    ref = ldm_mini.txt2img(m, PROMPT, num_inference_steps=2, guidance_scale=2.0, height=32, width=32,
                           generator=torch.Generator().manual_seed(8), progress=False)[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(paths[1])), np.asarray(ref))


def test_the_command_line_and_the_python_call_give_the_same_image(tmp_path, capsys):
    """No --weights: the embedded shapes model, at its recommended settings (20 DDIM steps, guidance 2) and
    its trained size (64 x 64); ldm_mini.txt2img with no settings draws exactly the same picture."""
    argv = ["txt2img", PROMPT, "--seed", "0", "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 0
    (path,) = written(capsys.readouterr().out)
    text = Image.open(path).text
    assert (text["weights"], text["steps"], text["guidance"], text["size"]) == (
        "shapes",
        "20",
        "2.0",
        "64x64",
    )
    ref = ldm_mini.txt2img(
        ldm_mini.load(), PROMPT, generator=torch.Generator().manual_seed(0), progress=False
    )
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(ref[0]))


def test_info_lists_the_vocabulary(capsys):
    assert main(["info", "shapes", "--vocab"]) == 0
    tokens = capsys.readouterr().out.splitlines()
    assert (
        tokens[:2] == ["[PAD]", "[UNK]"]
        and "circle" in tokens
        and tokens == ldm_mini.load().tokenizer.vocab_text.split("\n")[:-1]
    )


def test_sample_and_upscale(tiny, tmp_path, capsys):
    out = tmp_path / "face.png"
    argv = [
        "sample",
        "--weights",
        str(tiny["unconditional"][1]),
        "--steps",
        "2",
        "--seed",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert written(capsys.readouterr().out) == [out] and Image.open(out).size == (
        16,
        16,
    )  # image_size 8 x f 2
    assert Image.open(out).text["model"] == "unconditional"

    low = tmp_path / "low.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(low)
    argv = ["upscale", str(low), "--weights", str(tiny["superres"][1]), "--steps", "2", "--seed", "3",
            "--eta", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    (path,) = written(capsys.readouterr().out)
    assert path == tmp_path / "low-x2-3.png"
    # the pipeline cuts the input down to multiples of 32 (32x32), the VQ f2 decoder doubles it
    assert Image.open(path).size == (64, 64) and Image.open(path).text["image"] == str(low)


def with_metadata(file: Path, out: Path, tensors=None, **extra) -> Path:
    """A copy of a weight file with extra metadata (and other tensors, when given)."""
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    save_file(tensors if tensors is not None else load_file(str(file)), str(out), metadata={**meta, **extra})
    return out


def test_settings_come_from_the_flags_then_the_file_then_the_pipeline(tiny, tmp_path, capsys):
    file = with_metadata(tiny["txt2img"][1], tmp_path / "rec.safetensors",
                         recommended='{"steps": 1, "guidance": 2.5, "sampler": "plms"}')  # fmt: skip
    common = ["--weights", str(file), "--height", "16", "--width", "16", "--seed", "0"]
    assert main(["txt2img", "x", *common, "--out", str(tmp_path / "a.png")]) == 0
    assert main(["txt2img", "x", *common, "--steps", "2", "--out", str(tmp_path / "b.png")]) == 0
    a, b = (Image.open(tmp_path / n).text for n in ("a.png", "b.png"))
    assert (a["steps"], a["guidance"], a["sampler"], a["eta"]) == ("1", "2.5", "plms", "0.0")  # eta: default
    assert (b["steps"], b["guidance"], b["sampler"]) == ("2", "2.5", "plms")
    assert main(["info", str(file)]) == 0 and '"guidance": 2.5' in capsys.readouterr().out


def test_info(tiny, capsys):
    assert main(["info", str(tiny["txt2img"][1])]) == 0
    out = capsys.readouterr().out
    assert "kind          txt2img" in out and "M parameters" in out and "F32" in out and "MiB" in out


def test_hub_id_is_converted_once_into_the_cache(tiny, tmp_path, monkeypatch, capsys):
    import ldm_mini.hub

    calls = []

    def fake_download(repo_id, out):  # no network here: "download" = copy the tiny converted file
        calls.append(repo_id)
        Path(out).write_bytes(tiny["txt2img"][1].read_bytes())
        return Path(out)

    monkeypatch.setenv("LDM_MINI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ldm_mini.hub, "download", fake_download)
    for _ in range(2):
        assert main(["info", "CompVis/ldm-text2im-large-256"]) == 0
    assert calls == ["CompVis/ldm-text2im-large-256"]
    assert (tmp_path / "cache" / "CompVis--ldm-text2im-large-256.safetensors").is_file()
    assert "kind          txt2img" in capsys.readouterr().out


BAD = [  # (argv with {t} {u} {s} for the tiny files, message expected on stderr)
    ([], "choose a command"),
    (["txt2img", "x", "--weights", "missing.safetensors"], "no weight file"),
    (["txt2img", "x", "--weights", "{u}"], "use `ldm-mini sample`"),
    (["sample", "--weights", "{t}"], "use `ldm-mini txt2img`"),
    (["txt2img", "x", "--weights", "{t}", "--steps", "0"], "--steps must be from 1 to 1000"),
    (["txt2img", "x", "--weights", "{t}", "--steps", "two"], "invalid int value"),
    (["sample", "--weights", "{u}", "--steps", "1000"], "at 1000 steps: use at most 999 steps"),
    (["txt2img", "x", "--weights", "{t}", "--guidance", "nan"], "--guidance must be a finite number"),
    (["txt2img", "x", "--weights", "{t}", "--height", "0"], "--height must be a positive multiple of 4"),
    (["txt2img", "x", "--weights", "{t}", "--seed", str(2**64)], "--seed must be from 0 to"),
    (["txt2img", "x", "--weights", "{t}", "-n", "1000000"], "at most 100,000"),
    (["verify", "{t}", "--guidance", "nan"], "--guidance must be a finite number"),
    (["txt2img", "x", "--weights", "{t}", "--eta", "0.5", "--sampler", "plms"], "needs --sampler ddim"),
    (["txt2img", "x", "--weights", "{t}", "--eta", "-1"], "--eta must be >= 0"),
    (["txt2img", "x", "--weights", "{t}", "--sampler", "euler_a"], "invalid choice"),
    (["txt2img", "x", "--weights", "{t}", "--height", "30"], "multiples of 4"),
    (["txt2img", "x", "--weights", "{t}", "-n", "0"], "-n/--num-images must be >= 1"),
    (["sample", "--weights", "{u}", "--out", "x.jpg"], "a folder or a .png file"),
    (["upscale", "missing.png", "--weights", "{s}"], "cannot read the image"),
    (["info", "missing.safetensors"], "no weight file"),
    (["verify", "{t}", "--reference", "not-a-folder"], "diffusers pipeline folder or a hub id"),
    (["txt2img", "x", "--weights", "{t}", "--threads", "0"], "--threads must be >= 1"),
    (["verify", "{t}", "--threads", "-2"], "--threads must be >= 1"),
]


def test_threads_sets_torchs_cpu_threads_and_its_help_says_when(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))  # the test's own threads stay
    calls = []
    argv = ["txt2img", "x", "--weights", str(tiny["txt2img"][1]), "--steps", "1", "--out", str(tmp_path)]
    assert main(argv) == 0 and calls == []  # default: torch's own (all cores)
    assert main([*argv, "--threads", "1", "--force"]) == 0 and calls == [1]
    assert exit_code(["txt2img", "--help"]) == 0
    assert "1 when other processes keep the CPU busy" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a)[:40] or "none" for a, _ in BAD])
def test_bad_arguments_exit_2_with_a_clear_message(tiny, argv, message, capsys):
    names = {"t": tiny["txt2img"][1], "u": tiny["unconditional"][1], "s": tiny["superres"][1]}
    assert exit_code([a.format(**names) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_existing_output_is_kept_without_force(tiny, tmp_path, capsys):
    out = tmp_path / "taken.png"
    out.write_bytes(b"mine")
    argv = ["sample", "--weights", str(tiny["unconditional"][1]), "--steps", "1", "--out", str(out)]
    assert exit_code(argv) == 2
    assert "taken.png already exists: pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"
    assert main([*argv, "--force"]) == 0 and Image.open(out).size == (16, 16)


@pytest.mark.parametrize(
    "command", ["txt2img", "sample", "upscale", "class", "inpaint", "semantic", "layout", "info", "verify"]
)
def test_every_help_has_an_example(command, capsys):
    assert exit_code([command, "--help"]) == 0
    assert "example:\n  ldm-mini " + command in capsys.readouterr().out


def stages(stdout: str) -> dict[str, str]:
    """verify's table -> {stage: "pass" | "FAIL"}."""
    rows = re.findall(r"^(tokenizer|text encoder|unet step|decoder|sample) .*?  (pass|FAIL)", stdout, re.M)
    return dict(rows)


@pytest.mark.parametrize("kind, size", [("txt2img", 32), ("unconditional", 16), ("superres", 16)])
def test_verify_passes_on_a_converted_model(tiny, kind, size, capsys):
    argv = ["verify", str(tiny[kind][1]), "--size", str(size), "--steps", "3", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    print(out)  # pytest -s shows the table
    names = ["unet step", "decoder", "sample"]
    names = ["tokenizer", "text encoder", *names] if kind == "txt2img" else names
    assert stages(out) == dict.fromkeys(names, "pass")
    assert f"{STAGE_ATOL:.0e}" in out and f"{SAMPLE_ATOL:.0e}" in out and "all stages pass" in out


def test_verify_passes_with_heads_of_fixed_size_and_cross_attention(tiny, tmp_path, capsys):
    """The embedded shapes model's pattern: num_head_channels with cross-attention, i.e. a different head
    COUNT per level, which diffusers' UNet2DConditionModel takes as a per-level attention_head_dim tuple."""
    m = ldm_mini.load(tiny["txt2img"][1])
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                     num_heads=None, num_head_channels=16, context_dim=32, norm_num_groups=8)  # fmt: skip
    m.unet = randomize_(UNet(cfg), seed=3).eval()  # 2 heads at 32 channels, 4 at 64 (and in the mid block)
    path = ldm_mini.save(m, tmp_path / "heads.safetensors")
    assert main(["verify", str(path), "--size", "32", "--steps", "2", "--device", "cpu"]) == 0
    assert stages(capsys.readouterr().out)["unet step"] == "pass"


PUBLISHED = ["ldm-text2im-large-256", "ldm-celebahq-256", "ldm-super-resolution-4x-openimages"]
ARCHITECTURE = ["in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
                "layers_per_block", "attention_head_dim", "cross_attention_dim", "norm_num_groups",
                "sample_size", "latent_channels", "num_vq_embeddings", "vq_embed_dim"]  # fmt: skip


@pytest.mark.parametrize("name", PUBLISHED)
@pytest.mark.parametrize("part", ["unet", "vqvae"])
def test_inverse_config_mapping_rebuilds_the_published_models(name, part):
    """diffusers config.json -> ldm_mini config (weights_tools) -> diffusers kwargs (verify): the same class,
    architecture fields and parameter shapes as the published config (models built on the meta device)."""
    import diffusers

    config = json.loads((REALCONFIGS / name / part / "config.json").read_text())
    if part == "unet":
        cls, kwargs = unet_kwargs(unet_config(config, name))
    else:
        cls, kwargs = autoencoder_kwargs(autoencoder_config(config, name), scale_factor=1.0)
    assert cls == config["_class_name"]
    with torch.device("meta"):
        published = getattr(diffusers, cls).from_config(config)
        rebuilt = getattr(diffusers, cls)(**kwargs)

    def effective(config, field):
        value = config.get(field)
        if field == "vq_embed_dim" and value is None:  # None means latent_channels
            value = config.get("latent_channels")
        return tuple(value) if isinstance(value, list) else value

    for field in ARCHITECTURE if part == "unet" else set(ARCHITECTURE) - {"sample_size"}:  # VAE: tiling only
        assert effective(published.config, field) == effective(rebuilt.config, field), field
    shapes = [{k: tuple(v.shape) for k, v in model.state_dict().items()} for model in (published, rebuilt)]
    assert shapes[0] == shapes[1]


def test_verify_catches_an_implementation_difference(tiny, monkeypatch, capsys):
    """Without --reference both sides read the same file: verify then tests ldm_mini's code. A decoder that
    is off by 0.1% must fail the decoder stage (and leave the others alone)."""
    decode = ldm_mini.LatentDiffusion.decode
    monkeypatch.setattr(ldm_mini.LatentDiffusion, "decode", lambda m, z, quantize=True: decode(m, z) * 1.001)
    argv = ["verify", str(tiny["unconditional"][1]), "--size", "16", "--steps", "2", "--device", "cpu"]
    assert main(argv) == 1
    result = stages(capsys.readouterr().out)
    assert result["decoder"] == "FAIL" and result["unet step"] == "pass"


def test_verify_fails_on_a_perturbed_weight_naming_the_stage(tiny, tmp_path, capsys):
    folder, file = tiny["txt2img"]
    tensors = load_file(str(file))
    tensors["unet.conv_out.bias"][0] += 1e-2  # one number of the UNet's last layer
    bad = with_metadata(file, tmp_path / "perturbed.safetensors", tensors)
    argv = ["verify", str(bad), "--reference", str(folder), "--size", "32", "--steps", "3", "--device", "cpu"]
    assert main(argv) == 1  # against the original folder: the UNet differs
    out = capsys.readouterr().out
    print(out)
    result = stages(out)
    assert result["unet step"] == "FAIL" and result["text encoder"] == "pass" and result["decoder"] == "pass"
    assert "verify: FAIL (unet step" in out


def test_module_entry_point_in_a_subprocess(tiny, tmp_path):
    out = tmp_path / "one.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "ldm_mini", "sample", "--weights", str(tiny["unconditional"][1]), "--steps",
           "2", "--seed", "0", "--out", str(out), "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out} (16x16, seed 0)" in proc.stdout and out.is_file()
    assert "DDIM" in proc.stderr  # the tqdm bar over the steps


def test_sampler_and_sigmas_flags_are_recorded_and_give_the_librarys_image(tiny, tmp_path, capsys):
    file = tiny["txt2img"][1]
    argv = ["txt2img", PROMPT, "--weights", str(file), "--steps", "3", "--seed", "4", "--guidance", "2",
            "--sampler", "dpmpp_2m", "--sigmas", "karras", "--out", str(tmp_path / "k.png")]  # fmt: skip
    assert main(argv) == 0
    (path,) = written(capsys.readouterr().out)
    text = Image.open(path).text
    assert (text["sampler"], text["sigmas"], text["steps"]) == ("dpmpp_2m", "karras", "3")
    ref = ldm_mini.txt2img(ldm_mini.load(file), PROMPT, num_inference_steps=3, guidance_scale=2.0,
                           sampler="dpmpp_2m", sigmas="karras", generator=torch.Generator().manual_seed(4),
                           progress=False)[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(ref))
    argv = ["sample", "--weights", str(tiny["unconditional"][1]), "--steps", "2", "--seed", "1",
            "--sampler", "euler_ancestral", "--out", str(tmp_path / "a.png")]  # fmt: skip
    assert main(argv) == 0 and "sigmas" not in Image.open(tmp_path / "a.png").text  # only when given


@pytest.mark.parametrize("argv, message", [
    (["--sigmas", "karras"], "'ddim' has no option(s) ['--sigmas']"),
    (["--sampler", "heun", "--sigmas", "rho"], "invalid choice: 'rho'"),
    (["--sampler", "unipc", "--steps", "1000"], "use at most 999 steps"),
    (["--sampler", "euler", "--eta", "0.5"], "needs --sampler ddim"),
])  # fmt: skip
def test_bad_sampler_options_exit_2_before_any_weight_is_read(tiny, argv, message, capsys):
    assert exit_code(["txt2img", "x", "--weights", str(tiny["txt2img"][1]), *argv]) == 2
    assert message in capsys.readouterr().err


def test_help_shows_the_real_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["txt2img", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "(2.0 for the embedded shapes model), else 1.0" in text
        and "(20 for the embedded shapes model), else 50" in text
    )


# --- the task commands of the CompVis zoo: class, inpaint, semantic, layout --------------------------------
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """kind -> a weight file of a tiny model of that kind (helpers.tiny_model: 32 px images), and inputs."""
    tmp = tmp_path_factory.mktemp("zoo")
    files = {kind: ldm_mini.save(tiny_model(kind), tmp / f"{kind}.safetensors")
             for kind in ("class", "inpaint", "semantic", "layout")}  # fmt: skip
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp / "photo.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    Image.fromarray(mask).save(tmp / "mask.png")
    Image.fromarray(rng.integers(0, 5, (32, 32), dtype=np.uint8)).save(tmp / "labels.png")  # 5 classes
    (tmp / "boxes.json").write_text(
        json.dumps([[3, [0.1, 0.2, 0.5, 0.4]], [7, [0.5, 0.5, 0.25, 0.25], True]])
    )
    return files, tmp


ZOO_COMMANDS = {  # command -> (kind, its inputs, the Python call it must equal, its inputs there)
    "class": ("class", ["4", "--guidance", "2"], lambda m, t, **kw: ldm_mini.class_conditional(
        m, [4], guidance_scale=2.0, **kw)),
    "inpaint": ("inpaint", ["{t}/photo.png", "{t}/mask.png"], lambda m, t, **kw: ldm_mini.inpaint(
        m, Image.open(t / "photo.png"), Image.open(t / "mask.png"), **kw)),
    "semantic": ("semantic", ["{t}/labels.png"], lambda m, t, **kw: ldm_mini.semantic_synthesis(
        m, torch.from_numpy(np.asarray(Image.open(t / "labels.png")).astype(np.int64))[None], **kw)),
    "layout": ("layout", ["{t}/boxes.json"], lambda m, t, **kw: ldm_mini.layout_to_image(
        m, [(3, (0.1, 0.2, 0.5, 0.4)), (7, (0.5, 0.5, 0.25, 0.25), True)], **kw)),
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(ZOO_COMMANDS))
def test_task_commands_write_the_python_calls_image(zoo, command, tmp_path, capsys):
    files, t = zoo
    kind, args, call = ZOO_COMMANDS[command]
    argv = [command, *(a.format(t=t) for a in args), "--weights", str(files[kind]), "--steps", "3",
            "--seed", "5", "-n", "2", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    paths = written(capsys.readouterr().out)
    assert len(paths) == 2 and all(p.parent == tmp_path for p in paths)
    m = ldm_mini.load(files[kind])
    for seed, path in zip((5, 6), paths, strict=True):
        png = Image.open(path)
        assert png.text["model"] == kind and png.text["seed"] == str(seed) and png.text["steps"] == "3"
        want = call(m, t, num_inference_steps=3, generator=torch.manual_seed(seed), progress=False)[0]
        assert np.array_equal(np.asarray(png), np.asarray(want)), (command, seed)
    if command == "class":
        assert png.text["class"] == "4" and png.text["guidance"] == "2.0"
    if command == "inpaint":  # the kept pixels are the photo's
        keep = np.asarray(Image.open(t / "mask.png")) < 128
        assert np.array_equal(np.asarray(png)[keep], np.asarray(Image.open(t / "photo.png"))[keep])


def write(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def test_task_commands_refuse_bad_inputs_before_reading_weights(zoo, tmp_path, monkeypatch, capsys):
    """Each a one-line message and exit 2, with the weights never loaded (load is replaced by a failure)."""
    import ldm_mini.__main__ as cli

    files, t = zoo
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("weights were read"))
    photo, mask = str(t / "photo.png"), str(t / "mask.png")
    (tmp_path / "outside.json").write_text("[[3, [0.8, 0.2, 0.5, 0.4]]]")
    (tmp_path / "flat.json").write_text("[3, 0.8, 0.2]")
    (tmp_path / "class99.json").write_text("[[99999, [0.1, 0.1, 0.2, 0.2]]]")
    cases = [
        (["class", "11"], "class", "class label 11 is out of range: this model has classes 0 .. 10"),
        (["class", "-1"], "class", "class label -1 is out of range"),
        (["class", "3", "--height", "30"], "class", "multiples of 4"),
        (["inpaint", photo, write(tmp_path / "small.png", np.zeros((16, 32), np.uint8))], "inpaint",
         "the mask must be (B, 1, H, W) = (1, 1, 32, 32)"),
        (["inpaint", write(tmp_path / "odd.png", np.zeros((30, 30, 3), np.uint8)),
          write(tmp_path / "oddmask.png", np.zeros((30, 30), np.uint8))], "inpaint", "multiples of 4"),
        (["inpaint", photo, str(tmp_path / "missing.png")], "inpaint", "cannot read the image"),
        (["inpaint", photo, mask, "--guidance", "2"], "inpaint", "unrecognized arguments: --guidance"),
        (["semantic", write(tmp_path / "nine.png", np.full((32, 32), 9, np.uint8))], "semantic",
         "this model knows 5 classes, 0 .. 4"),
        (["semantic", photo], "semantic", "a label map is a one-channel PNG"),
        (["semantic", write(tmp_path / "s30.png", np.zeros((30, 32), np.uint8))], "semantic",
         "multiples of"),
        (["layout", str(tmp_path / "outside.json")], "layout", "is not inside the image"),
        (["layout", str(tmp_path / "flat.json")], "layout", "a layout is a JSON list of objects"),
        (["layout", str(tmp_path / "class99.json")], "layout", "99999"),
        (["layout", photo], "layout", "cannot read the layout"),
        (["class", "3"], "inpaint", "holds a model of kind 'inpaint', not 'class': use `ldm-mini inpaint`"),
    ]  # fmt: skip
    for argv, kind, message in cases:
        assert exit_code([*argv, "--weights", str(files[kind]), "--out", str(tmp_path)]) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert not list(tmp_path.glob("*-*.png"))  # nothing written
