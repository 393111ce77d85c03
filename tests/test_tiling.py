"""Tiled decoding and denoising (ldm_mini/tiling.py): exact where it must be, close where it can only be.

Exact (atol 1e-6, float32 round-off of the blend's multiply-divide): one tile as large as the input, and any
tiling of a per-pixel function (the blend weights cover every pixel and sum to 1, at every scale).
Close: with real overlapping tiles, GroupNorm statistics and attention see one tile, so a random-weight
network differs from its untiled self. Measured on the tiny super-resolution model below (outputs of mean
|value| ~0.45): the tiled decode differs by 0.03 on average (max 0.47), the tiled UNet by 0.05 (max 0.32).
Random weights are the worst case (no spatial smoothness); the asserted bounds are these measurements plus
a margin, to catch a broken blend (a missing tile, a wrong offset: mean differences of order 0.3 and more).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_

import ldm_mini
from ldm_mini.autoencoder import AutoencoderConfig, VQModel
from ldm_mini.model import LatentDiffusion
from ldm_mini.schedule import ScheduleConfig
from ldm_mini.tiling import TiledModel, blend_tiles, decode_tiled, predict_noise_tiled, ramp, tile_starts
from ldm_mini.unet import UNet, UNetConfig

EXACT = 1e-6


@pytest.fixture(scope="module")
def model() -> LatentDiffusion:
    """A tiny super-resolution LDM (VQ-f2 first stage, self-attention UNet), random weights, float32."""
    unet = UNet(UNetConfig(in_channels=6, out_channels=3, model_channels=32, channel_mult=(1, 2),
                           num_res_blocks=1, attention_resolutions=(2,), num_heads=None, num_head_channels=8,
                           context_dim=None, norm_num_groups=8))  # fmt: skip
    vq = VQModel(AutoencoderConfig(kind="vq", ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=3,
                                   embed_dim=3, n_embed=32, norm_num_groups=8))  # fmt: skip
    randomize_(unet, 0)
    randomize_(vq, 1)
    schedule = ScheduleConfig(beta_start=0.0015, beta_end=0.0155)
    return LatentDiffusion("superres", unet.eval(), vq.eval(), schedule, 1.0).requires_grad_(False)


def inputs(h: int, w: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, h, w, generator=g), torch.rand(1, 3, h, w, generator=g) * 2 - 1


@pytest.mark.parametrize(
    "size, tile, overlap", [(48, 16, 4), (50, 16, 5), (17, 16, 15), (16, 16, 4), (5, 16, 4)]
)
def test_tiles_cover_the_image_with_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    ends = [min(s + tile, size) for s in starts]
    assert starts[0] == 0 and ends[-1] == size
    assert all(e - s_next >= overlap for e, s_next in zip(ends, starts[1:], strict=False))  # shared pixels
    assert starts == sorted(set(starts))


def test_ramp_is_positive_and_flat_inside():
    r = ramp(10, 3)
    torch.testing.assert_close(r, torch.tensor([1, 2, 3, 4, 4, 4, 4, 3, 2, 1]) / 4, rtol=0, atol=0)
    assert (ramp(5, 0) == 1).all()


@pytest.mark.parametrize("scale", [1, 4])
@pytest.mark.parametrize("tile, overlap", [(8, 2), (13, 5), (64, 8)])
def test_per_pixel_function_is_unchanged_by_tiling(scale, tile, overlap):
    """The blend itself: every pixel covered, weights summing to 1, tiles put back at their place."""
    x, low = inputs(29, 40)

    def fn(xt, lt):  # per pixel, with a second tiled input and a x`scale` upsampling
        return F.interpolate(torch.tanh(xt) * lt + 1.0, scale_factor=scale, mode="nearest")

    got = blend_tiles(fn, x, tile, overlap, scale, extra=low)
    torch.testing.assert_close(got, fn(x, low), rtol=0, atol=EXACT)


def test_one_tile_equals_untiled(model):
    z, low = inputs(24, 20)
    with torch.no_grad():
        torch.testing.assert_close(
            decode_tiled(model, z, tile=24, overlap=4), model.decode(z), rtol=0, atol=EXACT
        )
        eps = predict_noise_tiled(model, z, 500, low, tile=32, overlap=8)
        torch.testing.assert_close(eps, model.predict_noise(z, 500, low), rtol=0, atol=EXACT)


def test_tiled_is_close_to_untiled(model):
    z, low = inputs(48, 48)
    with torch.no_grad():
        image, eps = model.decode(z), model.predict_noise(z, 500, low)
        d_image = (decode_tiled(model, z, tile=32, overlap=8) - image).abs()
        d_eps = (predict_noise_tiled(model, z, 500, low, tile=32, overlap=16) - eps).abs()
    print(
        f"tiled decode: mean {d_image.mean():.3f} max {d_image.max():.3f} (|image| {image.abs().mean():.3f})"
    )
    print(f"tiled UNet: mean {d_eps.mean():.3f} max {d_eps.max():.3f} (|eps| {eps.abs().mean():.3f})")
    assert d_image.mean() < 0.06 and d_image.max() < 0.8  # measured 0.031 / 0.47
    assert d_eps.mean() < 0.09 and d_eps.max() < 0.6  # measured 0.045 / 0.24


def test_no_seam_at_tile_borders(model):
    """Across a tile border the tiled image changes no more than the untiled image does (no step)."""
    z, _ = inputs(48, 48)
    with torch.no_grad():
        image, tiled = model.decode(z), decode_tiled(model, z, tile=32, overlap=8)
    f = model.downsample_factor
    # tiles start at 0 and 16 (latent), so the second tile's first column is 16 * f; look at every column
    step = lambda img: (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))  # noqa: E731  (W - 1,)
    border = [16 * f - 1, 32 * f - 1]  # where one tile's weight starts / stops ramping
    assert (step(tiled)[border] < 1.5 * step(image).mean()).all()


def test_tiled_model_runs_the_superres_pipeline(model):
    """TiledModel stands in for m: one tile covering everything gives the untiled pipeline's image."""
    _, low = inputs(24, 24)
    kw = dict(num_inference_steps=2, generator=None, output_type="pt", progress=False)
    want = ldm_mini.superres(model, low, latents=inputs(24, 24)[0], **kw)
    same = ldm_mini.superres(TiledModel(model, decode_tile=24, unet_tile=24, unet_overlap=8), low,
                             latents=inputs(24, 24)[0], **kw)  # fmt: skip
    torch.testing.assert_close(same, want, rtol=0, atol=1e-5)
    small = TiledModel(model, decode_tile=16, decode_overlap=4, unet_tile=16, unet_overlap=8)
    tiled = ldm_mini.superres(small, low, latents=inputs(24, 24)[0], **kw)
    assert tiled.shape == want.shape == (1, 3, 48, 48)
    assert (tiled - want).abs().mean() < 0.1
    assert TiledModel(model).kind == "superres"  # everything else is m's
    # the pipeline's own arguments do the same
    by_args = ldm_mini.superres(model, low, latents=inputs(24, 24)[0], decode_tile=16, unet_tile=16, **kw)
    by_model = ldm_mini.superres(
        TiledModel(model, decode_tile=16, unet_tile=16), low, latents=inputs(24, 24)[0], **kw
    )
    torch.testing.assert_close(by_args, by_model, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(decode_tile=0), "decode_tile must be a positive"),
        (dict(decode_tile=16, decode_overlap=16), "overlap must be an integer from 0 to"),
        (dict(unet_tile=8, unet_overlap=-1), "overlap must be an integer from 0 to"),
        (dict(decode_tile=12.5), "decode_tile must be a positive"),
    ],
)
def test_bad_tiles_give_clear_errors(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TiledModel(model, **kwargs)
