"""ldm_mini.fast: each fast layer takes its kernel only where it should, and load() swaps them in or not.

The parity of whole models with and without the fast layers is in test_unet.py and test_bert.py.
"""

import json

import pytest
import torch
from safetensors.torch import load_file as read_tensors
from safetensors.torch import save_file
from torch import nn

import ldm_mini
from ldm_mini import fast
from ldm_mini.loading import EMBEDDED, load_file, read_metadata, to_diffusers_names
from weights_tools.info import summary

needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")


def ops(fn) -> set[str]:
    """The aten operators one call runs."""
    with torch.autograd.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.function_events}


def pair(plain: nn.Module, cls):
    return plain, fast.rebuilt(plain, cls)


@needs_mkldnn
def test_fast_linear_runs_as_a_onednn_convolution_only_where_it_pays():
    torch.manual_seed(0)
    plain, layer = pair(nn.Linear(32, 48), fast.FastLinear)
    assert layer.weight is plain.weight and layer.bias is plain.bias  # the same Parameter objects
    x = torch.randn(2, 77, 32)  # 154 rows
    with torch.no_grad():
        assert "aten::mkldnn_convolution" in ops(lambda: layer(x))
        torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=1e-5)
        plain64, layer64 = pair(nn.Linear(32, 48, dtype=torch.float64), fast.FastLinear)
        falls_back = {
            "fewer than 128 rows": (plain, layer, x[:1, :100]),
            "not contiguous": (plain, layer, x.transpose(0, 1)),
            "2-D": (plain, layer, x[0]),
            "float64": (plain64, layer64, x.double()),
        }
        for why, (p, f, y) in falls_back.items():
            assert "aten::mkldnn_convolution" not in ops(lambda f=f, y=y: f(y)), why
            assert torch.equal(f(y), p(y)), why
    y = x.clone().requires_grad_()  # autograd on (training): nn.Linear itself
    assert "aten::mkldnn_convolution" not in ops(lambda: layer(y))
    assert torch.equal(layer(y), plain(y))


def test_fast_conv3x3_runs_as_one_matrix_product_at_8x8_and_below():
    torch.manual_seed(0)
    plain, layer = pair(nn.Conv2d(16, 24, 3, padding=1), fast.FastConv3x3)
    with torch.no_grad():
        for h, w, fast_path in [(4, 4, True), (8, 8, True), (3, 5, True), (9, 8, False), (16, 16, False)]:
            x = torch.randn(2, 16, h, w)
            assert ("aten::im2col" in ops(lambda x=x: layer(x))) == fast_path, (h, w)
            got, want = layer(x), plain(x)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            if not fast_path:
                assert torch.equal(got, want)
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    assert "aten::im2col" not in ops(lambda: layer(x))  # autograd on: nn.Conv2d itself
    assert torch.equal(layer(x), plain(x))


def test_enable_picks_the_unet_and_text_encoder_layers_and_disable_undoes_it():
    m = load_file(EMBEDDED["shapes"], fast=False)
    kinds = lambda: {n: type(mod) for n, mod in m.named_modules()}  # noqa: E731
    plain, state = kinds(), m.state_dict(keep_vars=True)
    assert not fast.is_enabled(m)
    fast.enable(m)
    swapped = {n: (plain[n], t) for n, t in kinds().items() if t is not plain[n]}
    assert swapped and all(t in (fast.FastLinear, fast.FastConv3x3) for _, t in swapped.values())
    assert all(n.startswith(("unet.", "text_encoder.")) for n in swapped)  # the autoencoder stays plain
    # every Linear of the UNet and LDMBert; the 3x3 stride-1 convs only (not Downsample's, not the 1x1s)
    kept = [t for n, t in plain.items() if n.startswith(("unet.", "text_encoder.")) and n not in swapped]
    assert nn.Linear not in kept and nn.Conv2d in kept
    assert type(m.unet.down_blocks[0].downsamplers[0].conv) is nn.Conv2d
    assert type(m.unet.down_blocks[1].attentions[0].proj_in) is nn.Conv2d
    assert type(m.unet.down_blocks[0].resnets[0].conv1) is fast.FastConv3x3
    # the same Parameter objects under the same keys, in the same order
    after = m.state_dict(keep_vars=True)
    assert list(after) == list(state) and all(after[k] is state[k] for k in state)
    enabled = kinds()
    assert fast.enable(m) is m and kinds() == enabled  # enabling twice changes nothing
    fast.disable(m)
    assert kinds() == plain and not fast.is_enabled(m)
    assert all(a is b for a, b in zip(m.state_dict(keep_vars=True).values(), state.values(), strict=True))


def test_load_swaps_the_fast_layers_in_only_where_asked():
    assert fast.default_on("cpu") == torch.backends.mkldnn.is_available()
    assert not fast.default_on("cuda") and not fast.default_on(torch.device("meta"))
    assert fast.is_enabled(load_file(EMBEDDED["shapes"])) == fast.default_on("cpu")
    assert not fast.is_enabled(load_file(EMBEDDED["shapes"], fast=False))
    assert fast.is_enabled(ldm_mini.load("shapes", fast=True))
    assert not fast.is_enabled(ldm_mini.load("shapes", fast=False))


def test_reads_ldm_mini_1_files(tmp_path):
    """ldm_mini/1 files hold diffusers' key names (to_out.0, ff.net.0.proj, ff.net.2): renamed on loading."""
    path = EMBEDDED["shapes"]
    meta = read_metadata(path)
    assert meta["format"] == "ldm_mini/2"
    old = tmp_path / "v1.safetensors"
    save_file(
        to_diffusers_names(read_tensors(str(path))), str(old), metadata={**meta, "format": "ldm_mini/1"}
    )
    assert any(".ff.net.2." in k for k in read_tensors(str(old)))
    new, legacy = load_file(path, fast=False), load_file(old, fast=False)
    a, b = new.state_dict(), legacy.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "ldm_mini/1" in summary(old) and json.loads(read_metadata(old)["recommended"])


def test_the_command_lines_no_fast_draws_with_the_plain_layers(tmp_path, monkeypatch, capsys):
    """--no-fast: load(fast=False), so the PNG is the plain (diffusers-identical) layers' image."""
    from PIL import Image

    from ldm_mini.__main__ import main

    loaded = []
    original = ldm_mini.__main__.load

    def spy(*args, **kwargs):
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(ldm_mini.__main__, "load", spy)
    argv = ["txt2img", "a red circle", "--steps", "2", "--seed", "0", "--device", "cpu"]
    assert main([*argv, "--no-fast", "--out", str(tmp_path / "plain.png")]) == 0
    assert not fast.is_enabled(loaded[-1])
    m = ldm_mini.load(fast=False)
    g = torch.Generator().manual_seed(0)
    ref = ldm_mini.txt2img(m, "a red circle", num_inference_steps=2, generator=g, progress=False)[0]
    assert Image.open(tmp_path / "plain.png").tobytes() == ref.tobytes()
