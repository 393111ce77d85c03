"""Hostile inputs and faults: nothing is lost, nothing hangs, nothing half-written, every error one line.

Each test is one class of fault: a write that fails half way, two runs racing for one name, an output folder
that cannot be written (found before any compute), Ctrl-C, a non-finite sample, metadata that names a file,
a path typo that looks like a hub id, the same quick-start command pasted twice.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_pipeline, tiny_superres, tiny_txt2img
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ldm_mini
from ldm_mini import pipeline
from ldm_mini.__main__ import main
from ldm_mini.loading import write_atomically
from weights_tools.convert import convert

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reliability")
    return convert(save_pipeline(tiny_txt2img(tmp), tmp / "pipe"), tmp / "t2i.safetensors")


def run(argv) -> int:
    """main(argv)'s exit status, as the interpreter gives it (a SystemExit message goes to stderr: 1)."""
    try:
        return main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return e.code


def txt2img_argv(file, out, *extra):
    where = ["--out", str(out)] if out is not None else []
    return ["txt2img", PROMPT, "--weights", str(file), "--steps", "1", "--height", "16", "--width", "16",
            "--seed", "0", "--device", "cpu", *where, *extra]  # fmt: skip


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_a_write_that_fails_half_way_leaves_the_old_file_whole(tmp_path):
    good = tmp_path / "image.png"
    good.write_bytes(b"the good image")

    def half_then_full_disk(tmp: Path):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(good, half_then_full_disk, force=True)
    assert good.read_bytes() == b"the good image" and no_temporaries(tmp_path)


def test_two_runs_racing_for_one_name_the_second_refuses(tmp_path):
    target = tmp_path / "out.png"
    write_atomically(target, lambda tmp: tmp.write_bytes(b"first"))
    with pytest.raises(FileExistsError, match="exists: pass --force"):
        write_atomically(target, lambda tmp: tmp.write_bytes(b"second"))  # exists only now: still refused
    assert target.read_bytes() == b"first" and no_temporaries(tmp_path)


def test_the_cli_writes_atomically_under_a_size_limit(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "a.png"
    assert run(txt2img_argv(tiny, out)) == 0
    before = out.read_bytes()
    original = Image.Image.save

    def cut_short(self, fp, *args, **kwargs):  # as `ulimit -f`: the file stops growing, then an error
        original(self, fp, *args, **kwargs)
        Path(fp).write_bytes(Path(fp).read_bytes()[:20])
        raise OSError(27, "File too large")

    monkeypatch.setattr(Image.Image, "save", cut_short)
    assert run(txt2img_argv(tiny, out, "--force", "--seed", "1")) == 1
    assert "could not write" in capsys.readouterr().err
    assert out.read_bytes() == before and no_temporaries(tmp_path)


@pytest.mark.parametrize("make_bad", ["parent_is_a_file", "read_only"])
def test_an_unwritable_out_is_refused_before_any_compute(tiny, tmp_path, monkeypatch, capsys, make_bad):
    if make_bad == "parent_is_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "a.png"
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        out = folder / "a.png"

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("ldm_mini.__main__.tempfile.mkstemp", refuse)  # root ignores chmod: simulate
    monkeypatch.setattr(pipeline, "txt2img", lambda *a, **k: pytest.fail("sampled before checking --out"))
    assert run(txt2img_argv(tiny, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "cannot write into" in err[-1] and "Traceback" not in "".join(err)


def test_ctrl_c_is_one_line_and_leaves_no_file(tiny, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(ldm_mini.__main__.PIPELINES, "txt2img", interrupted)
    assert run(txt2img_argv(tiny, tmp_path / "a.png")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_a_non_finite_sample_is_refused_not_saved_black(tiny, tmp_path, monkeypatch, capsys):
    m = ldm_mini.load(tiny)
    monkeypatch.setattr(type(m), "decode", lambda self, z, quantize=True: torch.full_like(z, float("nan")))
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        ldm_mini.txt2img(m, PROMPT, num_inference_steps=1, height=16, width=16, progress=False)
    assert run(txt2img_argv(tiny, tmp_path / "a.png")) == 1
    assert "NaN or infinite" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_the_same_command_twice_keeps_both_images(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(txt2img_argv(tiny, None)) == 0 and run(txt2img_argv(tiny, None)) == 0
    names = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert names == ["a-red-circle-above-a-blue-square-0-1.png", "a-red-circle-above-a-blue-square-0.png"]
    assert run(txt2img_argv(tiny, tmp_path / "outputs")) == 2  # an explicit --out is never numbered on
    assert "already exists: pass --force" in capsys.readouterr().err


def test_a_vocabulary_in_the_metadata_is_data_never_a_path(tiny, tmp_path):
    """A tokenizer_vocab of one line was once opened as a file: /dev/stdin hung, /dev/zero filled memory."""
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text(ldm_mini.load(tiny).tokenizer.vocab_text)  # a valid vocabulary, by path
    with safe_open(str(tiny), "pt") as f:
        meta = f.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(tiny)), str(bad), metadata={**meta, "tokenizer_vocab": str(vocab_file)})
    with pytest.raises(ValueError, match="no \\[UNK\\] token"):  # one "token": the path's text itself
        ldm_mini.load(bad)


def test_a_path_typo_is_a_missing_file_not_a_hub_download(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setattr("ldm_mini.hub.download", lambda *a, **k: pytest.fail("tried the hub"))
    assert ldm_mini.hub.is_hub_id("CompVis/ldm-celebahq-256")
    for typo in ("models/celebahq.safetenors", "models/celebahq", "nowhere/celebahq.ckpt"):
        assert not ldm_mini.hub.is_hub_id(typo), typo
        assert run(["info", typo]) == 2
        assert "no weight file" in capsys.readouterr().err


def test_a_wrong_size_or_step_count_is_one_line_naming_the_flag(tiny, tmp_path, capsys):
    for extra, message in ((["--height", "0"], "--height must be a positive multiple of 4"),
                           (["--guidance", "inf"], "--guidance must be a finite number"),
                           (["--eta", "nan"], "--eta must be a finite number"),
                           (["--height", "1000000"], "--height 1000000 is over 4096 pixels")):  # fmt: skip
        assert run(txt2img_argv(tiny, tmp_path / "x.png", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.search(re.escape(message), err), err


def with_meta(file: Path, out: Path, **changes) -> Path:
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(file)), str(out), metadata={**meta, **changes})
    return out


@pytest.mark.parametrize("field, value, message", [
    ("unet_config", '{"model_channels": "abc"}', "UNetConfig.model_channels must be int, got 'abc'"),
    ("unet_config", "{not json", "unet_config is not valid JSON"),
    ("unet_config", "[1, 2]", "unet_config must be a JSON object"),
    ("schedule", '{"beta_schedule": 7}', "ScheduleConfig.beta_schedule must be str"),
    ("scale_factor", "nan", "scale factor must be a positive finite number"),
    ("scale_factor", "0", "scale factor must be a positive finite number"),
    ("scale_factor", "abc", "scale_factor 'abc' is not a number"),
    ("recommended", '{"steps": "many"}', "recommended 'steps' must be a int"),
    ("recommended", "{", "'recommended' metadata is not valid JSON"),
])  # fmt: skip
def test_bad_metadata_is_one_line_naming_the_field(tiny, tmp_path, field, value, message):
    if value.startswith('{"model_channels"'):  # one wrong field in an otherwise good config
        with safe_open(str(tiny), "pt") as f:
            value = json.dumps({**json.loads(f.metadata()["unet_config"]), **json.loads(value)})
    bad = with_meta(tiny, tmp_path / "bad.safetensors", **{field: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        ldm_mini.load(bad)
    assert run(["info", str(bad)]) in (0, 2)  # info reads the header only; never a traceback


def test_integer_weights_and_bad_scale_factors_are_never_written(tiny, tmp_path, capsys):
    m = ldm_mini.load(tiny)
    tensors = {k: v for k, v in m.state_dict().items()}
    name = next(iter(tensors))
    tensors[name] = tensors[name].to(torch.int32)
    with pytest.raises(ValueError, match="wrong kind of dtype"):
        ldm_mini.loading.write_file(tmp_path / "int.safetensors", tensors, ldm_mini.loading.metadata_of(m))
    folder = tiny.parent / "pipe"
    from weights_tools.convert import main as convert_main

    for bad in ("0", "nan", "-1"):
        assert convert_main([str(folder), str(tmp_path / f"sf{bad}.safetensors"), "--scale-factor", bad]) == 1
        assert "scale factor must be a positive finite number" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.safetensors"))


def test_unreadable_files_and_missing_devices_say_so(tiny, tmp_path):
    with pytest.raises(ValueError, match="cannot read .*Is a directory"):
        ldm_mini.loading.read_metadata(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available here.*use device='cpu'"):
            ldm_mini.load(tiny, device="cuda")


def test_a_yaml_value_of_the_wrong_type_is_one_line(tmp_path):
    from weights_tools import compvis
    from weights_tools.common import ConversionError

    real = Path(__file__).parent / "realconfigs" / "compvis" / "models" / "ldm" / "celeba256" / "config.yaml"
    cases = (
        (
            "model_channels: 224",
            'model_channels: "wide"',
            "UNetConfig.model_channels must be int, got 'wide'",
        ),
        ("linear_start: 0.0015", "linear_start: x", "linear_start: 'x' is not a number"),
    )
    for old, new, message in cases:
        text = real.read_text()
        assert old in text, old
        (tmp_path / "bad.yaml").write_text(text.replace(old, new))
        with pytest.raises(ConversionError, match=re.escape(message)) as e:
            compvis.model_configs(tmp_path / "bad.yaml")
        assert "\n" not in str(e.value)


def test_a_decompression_bomb_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    sr = convert(save_pipeline(tiny_superres(), tmp_path / "sr"), tmp_path / "sr.safetensors")
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 64x64 image is now over PIL's bomb limit
    assert run(["upscale", str(bomb), "--weights", str(sr), "--out", str(tmp_path / "up.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "cannot read the image" in err[-1] and "decompression bomb" in err[-1].lower()
