"""Tiled decoding and tiled denoising: large images in bounded memory (4x super-resolution to 2048x2048).

Why. The first stage's decoder ends in full-resolution convolutions (128-256 channels at 2048x2048: 2-4 GB
per activation in float32), and its mid-block self-attention is global over the latent: a 512x512 latent is
262144 tokens, so one attention call costs 4 * 262144^2 * 512 = 1.4e14 FLOP, minutes to hours on a CPU
(diffusers issue 1434 is the GPU version of the same wall). The UNet is cheaper (its attention runs at 1/8 of
the latent size), but its activations still grow with the image.

How. Cut the latent into overlapping tiles, run the network on each tile alone, and blend the tiles where
they overlap with weights that ramp linearly from a tile's border to its inside. After dividing by the sum
of the weights, every output pixel is a convex combination of the tiles covering it, and the combination
changes smoothly across an overlap, so there is no seam (the averaging of overlapping windows of
MultiDiffusion, Bar-Tal et al. 2023, arXiv:2302.08113, Eq. 5, with linear instead of uniform weights; the
same linear blend as diffusers' AutoencoderKL.tiled_decode).

What it costs. Inside a tile, GroupNorm statistics and attention see that tile only, and convolutions near a
tile border see the tile's zero padding instead of the neighbour: the tiled result is close to the untiled
one, not equal (tests/test_tiling.py states the measured difference). One tile as large as the input gives
the untiled result up to rounding.

Use: `ldm_mini.superres(TiledModel(m, decode_tile=128), image)`: the pipeline and the samplers only call
m.predict_noise and m.decode, which TiledModel replaces; everything else is m's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of length `tile` that cover [0, size), neighbours sharing at least `overlap`.

    The tiles are spread evenly, the first at 0 and the last ending at `size`; one tile if tile >= size.
    """
    if tile >= size:
        return [0]
    n = math.ceil((size - tile) / (tile - overlap)) + 1  # fewest tiles with steps of at most tile - overlap
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def ramp(n: int, overlap: int) -> Tensor:
    """Blend weights (n,) of one tile side: 1/(overlap+1), 2/(overlap+1), ... up to 1 inside, and back down.

    Never 0, so a pixel that only one tile covers (at the image border) gets exactly that tile's value.
    """
    i = torch.arange(n, dtype=torch.float32)
    return torch.minimum(i + 1, n - i).clamp(max=overlap + 1) / (overlap + 1)


def check_tile(tile: int, overlap: int | None, name: str) -> int:
    """Raise a ValueError naming the problem, or return the overlap (None: a quarter of the tile)."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"{name} must be a positive number of latent pixels, got {tile!r}")
    overlap = tile // 4 if overlap is None else overlap
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(
            f"the overlap must be an integer from 0 to {name} - 1 = {tile - 1} latent pixels, got "
            f"{overlap!r}; about a quarter of the tile hides the seams"
        )
    return overlap


@torch.no_grad()
def blend_tiles(
    fn, x: Tensor, tile: int, overlap: int, scale: int = 1, extra: Tensor | None = None
) -> Tensor:
    """fn over overlapping tiles of x (B, C, h, w), blended: -> (B, C', h * scale, w * scale).

    fn(x_tile, extra_tile) must map a (B, C, th, tw) tile to (B, C', th * scale, tw * scale); `extra` is an
    optional second input with x's h and w (the low-res image of super-resolution), tiled alongside.
    Sums run in float32 whatever fn's dtype; the result has fn's dtype.
    """
    overlap = check_tile(tile, overlap, "tile")
    b, _, h, w = x.shape
    total = weight = None
    for top in tile_starts(h, tile, overlap):
        for left in tile_starts(w, tile, overlap):
            window = (..., slice(top, top + tile), slice(left, left + tile))
            y = fn(x[window], None if extra is None else extra[window])  # (B, C', th * scale, tw * scale)
            th, tw = y.shape[-2:]
            if total is None:
                total = torch.zeros(b, y.shape[1], h * scale, w * scale, device=y.device)
                weight = torch.zeros(h * scale, w * scale, device=y.device)
            wgt = (ramp(th, overlap * scale)[:, None] * ramp(tw, overlap * scale)[None, :]).to(y.device)
            out = (..., slice(top * scale, top * scale + th), slice(left * scale, left * scale + tw))
            total[out] += y.float() * wgt  # (B, C', th, tw) * (th, tw)
            weight[out] += wgt
    return (total / weight).to(y.dtype)  # normalise: the weights of each pixel sum to 1


def decode_tiled(m, z: Tensor, tile: int = 128, overlap: int = 16, quantize: bool = True) -> Tensor:
    """m.decode(z) tile by tile: latent (B, c, h, w) -> image (B, 3, h*f, w*f) in [-1, 1].

    tile and overlap are in latent pixels (f = m.downsample_factor output pixels each). VQ quantisation is
    per pixel, so tiling does not change it; the decoder's GroupNorm and mid-block attention see one tile.
    """
    return blend_tiles(lambda zt, _: m.decode(zt, quantize=quantize), z, tile, overlap, m.downsample_factor)


def predict_noise_tiled(
    m, x: Tensor, t, cond: Tensor | None = None, tile: int = 128, overlap: int = 32
) -> Tensor:
    """m.predict_noise(x, t, cond) tile by tile: (B, c, h, w) -> eps (B, c, h, w).

    A super-resolution model's low-res image is cut with x; a text context is the same for every tile.
    """
    spatial = cond if m.kind == "superres" else None
    return blend_tiles(
        lambda xt, ct: m.predict_noise(xt, t, cond if ct is None else ct), x, tile, overlap, 1, spatial
    )


class TiledModel:
    """The model container m, with predict_noise and decode run tile by tile; every other attribute is m's.

    decode_tile / unet_tile: tile sizes in latent pixels, None to run that network untiled; the overlaps
    default to a quarter of the tile. Pass it where a pipeline or sampler takes m:
    `ldm_mini.superres(TiledModel(m), image)` (or `ldm_mini.superres(m, image, decode_tile=128)`).
    """

    def __init__(
        self,
        m,
        decode_tile: int | None = 128,
        unet_tile: int | None = None,
        decode_overlap: int | None = None,
        unet_overlap: int | None = None,
    ):
        if decode_tile is not None:
            decode_overlap = check_tile(decode_tile, decode_overlap, "decode_tile")
        if unet_tile is not None:
            unet_overlap = check_tile(unet_tile, unet_overlap, "unet_tile")
        self.m = m
        self.decode_tile, self.decode_overlap = decode_tile, decode_overlap
        self.unet_tile, self.unet_overlap = unet_tile, unet_overlap

    def predict_noise(self, x: Tensor, t, cond: Tensor | None = None) -> Tensor:
        if self.unet_tile is None:
            return self.m.predict_noise(x, t, cond)
        return predict_noise_tiled(self.m, x, t, cond, self.unet_tile, self.unet_overlap)

    def decode(self, z: Tensor, quantize: bool = True) -> Tensor:
        if self.decode_tile is None:
            return self.m.decode(z, quantize=quantize)
        return decode_tiled(self.m, z, self.decode_tile, self.decode_overlap, quantize)

    def __getattr__(self, name: str):  # only called for what is not defined above: kind, schedule, ...
        return getattr(self.m, name)
