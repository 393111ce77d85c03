"""Helpers for the notebooks: example images, image grids, latents, heat maps, attention maps, sliders.

Every drawing function takes an optional matplotlib Axes (a new figure when None), always sets a title and
both axis labels, and returns the Axes. Grids are ONE Axes with the images tiled: the tick labels name the
rows and columns (a timestep, a prompt, a channel), so a grid reads like a table.

Images are tensors (B, 3, H, W) in [-1, 1], the model's convention; latents (B, c, h, w) are drawn one
channel per column with a shared, symmetric colour scale (blue negative, red positive).
matplotlib is needed here only (pip install matplotlib); the rest of ldm_mini does not import this module.
"""

from __future__ import annotations

import os

import numpy as np
import torch.nn.functional as F
from torch import Tensor

try:
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
except ImportError as e:  # pragma: no cover - a dev dependency
    raise ImportError("ldm_mini.viz draws with matplotlib: `pip install matplotlib`") from e

from . import shapes


# --- example images ---------------------------------------------------------------------
def example_images(n: int, size: int = 64, seed: int = 0) -> tuple[Tensor, list[str]]:
    """n scenes of the shapes world (shapes.py): images (n, 3, size, size) in [-1, 1] and their captions.
    The 64x64 drawings are scaled to `size` with nearest-neighbour (a multiple of 64 keeps edges crisp)."""
    images, captions, _ = shapes.sample_batch(n, seed)  # (n, 3, 64, 64)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="nearest")
    return images, captions


# --- images and grids -------------------------------------------------------------------------------------
def to_numpy(images: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(B, C, H, W) or (C, H, W) tensor -> numpy (B, H, W, C) / (H, W, C), value_range mapped to [0, 1]."""
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    return x.movedim(-3, -1).numpy()


def tile(images: np.ndarray, ncol: int, pad: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """(N, H, W, C) -> one (rows * (H + pad) - pad, ncol * (W + pad) - pad, C) array, row by row."""
    n, h, w, c = images.shape
    rows = -(-n // ncol)  # ceil
    out = np.full((rows * (h + pad) - pad, ncol * (w + pad) - pad, c), pad_value, dtype=np.float32)
    for i, im in enumerate(images):
        r, k = divmod(i, ncol)
        out[r * (h + pad) : r * (h + pad) + h, k * (w + pad) : k * (w + pad) + w] = im
    return out


def _axes(ax, width: float = 8.0, height: float = 4.0):
    if ax is None:
        _, ax = plt.subplots(figsize=(width, height))
    return ax


def _label_grid(ax, shape, rows, ncol, pad, title, xlabel, ylabel, col_labels, row_labels):
    h, w = shape
    ax.set_xticks([k * (w + pad) + w / 2 for k in range(ncol)] if col_labels is not None else [])
    ax.set_yticks([r * (h + pad) + h / 2 for r in range(rows)] if row_labels is not None else [])
    if col_labels is not None:
        ax.set_xticklabels([str(s) for s in col_labels], fontsize=8)
    if row_labels is not None:
        ax.set_yticklabels([str(s) for s in row_labels], fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def image_grid(images: Tensor, ncol: int | None = None, title: str = "", xlabel: str = "", ylabel: str = "",
               col_labels=None, row_labels=None, ax=None, value_range=(-1.0, 1.0), pad: int = 2):  # fmt: skip
    """Draw RGB images (N, 3, H, W) in value_range (default [-1, 1]) as one grid, ncol per row (default all).

    col_labels / row_labels: tick labels under the columns / beside the rows (e.g. timesteps, prompts)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"image_grid wants RGB images (N, 3, H, W), got {tuple(images.shape)}: "
                         "draw latents with show_latents")  # fmt: skip
    ncol = ncol or images.shape[0]
    rows = -(-images.shape[0] // ncol)
    grid = tile(to_numpy(images, value_range), ncol, pad)
    ax = _axes(ax, width=min(2.0 * ncol, 16.0), height=min(2.0 * rows, 16.0) + 0.6)
    ax.imshow(grid, interpolation="nearest")
    return _label_grid(ax, images.shape[-2:], rows, ncol, pad, title, xlabel, ylabel, col_labels, row_labels)


def map_grid(values: Tensor, title: str, xlabel: str, ylabel: str, col_labels=None, row_labels=None, ax=None,
             cmap: str = "magma", symmetric: bool = False, limit=None, label: str = "value"):  # fmt: skip
    """Draw single-channel maps (R, C, h, w) as an R x C grid with ONE colour scale and a colour bar.
    symmetric: a scale centred on 0 (half-width `limit`, default the largest |value|); else min..max."""
    r, c, h, w = values.shape
    x = values.detach().float().cpu()
    if symmetric:
        limit = float(x.abs().max()) if limit is None else limit
        vmin, vmax = -limit, limit
    else:
        vmin, vmax = float(x.min()), float(x.max())
    pad = 1
    grid = tile(x.reshape(r * c, h, w, 1).numpy(), c, pad, pad_value=np.nan)[..., 0]  # NaN: blank padding
    ax = _axes(ax, width=min(1.3 * c + 1.5, 16.0), height=min(1.1 * r, 12.0) + 0.8)
    shown = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label=label)
    return _label_grid(ax, (h, w), r, c, pad, title, xlabel, ylabel, col_labels, row_labels)


def show_latents(z: Tensor, title: str = "latent channels", row_labels=None, ax=None, limit=None,
                 ylabel: str = "sample"):  # fmt: skip
    """Draw latents (B, c, h, w): one row per batch element, one column per channel, one colour scale
    symmetric around 0 (blue negative, red positive; limit: its half-width, default the largest |value|)."""
    z = z[None] if z.ndim == 3 else z
    rows = row_labels if row_labels is not None else range(z.shape[0])
    return map_grid(z, title, "latent channel", ylabel, range(z.shape[1]), rows, ax=ax, cmap="RdBu_r",
                    symmetric=True, limit=limit)  # fmt: skip


def heatmap(values, title: str, xlabel: str, ylabel: str, ax=None, cmap: str = "magma", label: str = "",
            symmetric: bool = False, aspect="auto", **imshow_kwargs):  # fmt: skip
    """Draw a 2-D array (a difference map, an embedding table) with a labelled colour bar."""
    v = values.detach().float().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    if v.ndim != 2:
        raise ValueError(f"heatmap wants a 2-D array, got shape {v.shape}")
    if symmetric:
        limit = float(np.abs(v).max()) or 1.0
        imshow_kwargs = {"vmin": -limit, "vmax": limit, **imshow_kwargs}
    ax = _axes(ax, width=7.0, height=4.0)
    shown = ax.imshow(v, cmap=cmap, aspect=aspect, interpolation="nearest", **imshow_kwargs)
    ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def differences(images: Tensor, labels: list[str], reference: int = 0, title: str = "",
                value_range=(-1.0, 1.0)):  # fmt: skip
    """Images that look alike, and what tells them apart: the images (N, 3, H, W) in a row, and under each
    its difference to images[reference], |image - reference| averaged over RGB, all on ONE colour scale,
    labelled with the largest difference in units of the image's range. Returns the two Axes."""
    if len(labels) != images.shape[0]:
        raise ValueError(f"got {len(labels)} labels for {images.shape[0]} images: pass one label per image")
    span = value_range[1] - value_range[0]
    diff = (images - images[reference]).abs().float().mean(1).cpu() / span  # (N, H, W), share of the range
    width = min(2.2 * len(labels) + 1.5, 16.0)
    _, (top, bottom) = plt.subplots(2, 1, figsize=(width, 5.8), layout="constrained")
    image_grid(images, title=title, ylabel="image", col_labels=labels, ax=top, value_range=value_range)
    maxima = [f"max {d.max():.1e}" if i != reference else "(the reference)" for i, d in enumerate(diff)]
    title = f"|image - {labels[reference]}|, mean over RGB, one scale"
    map_grid(diff[None], title, "", "difference", col_labels=maxima, ax=bottom, label="share of the range")
    return top, bottom


# --- cross-attention --------------------------------------------------------------------------------------
def attention_maps(probs: Tensor, latent_size: tuple[int, int]) -> Tensor:
    """Cross-attention probabilities (B, heads, n, L) kept by one Attention layer -> (B, L, h, w): for each
    text token, how strongly each image position attends to it, averaged over the heads. The layer's
    (h, w) is found from n and the latent's size (a level k of the UNet works at ceil(latent / 2^k))."""
    b, _, n, length = probs.shape
    for k in range(8):
        h, w = (-(-s // 2**k) for s in latent_size)
        if h * w == n:
            return probs.float().mean(dim=1).transpose(1, 2).reshape(b, length, h, w)  # (B, L, h, w)
    raise ValueError(f"{n} image positions fit no level of a {latent_size} latent: pass the latent's (h, w)")


def attention_overlay(image: Tensor, maps: Tensor, tokens: list[str], title: str = "cross-attention",
                      ax=None, alpha: float = 0.6, cmap: str = "jet",
                      shared_scale: bool = False):  # fmt: skip
    """The image, then one tile per token: its attention map (len(tokens), h, w), upsampled to the image
    size and blended over a grey copy of the image (image: (3, H, W)). Each map is scaled to its own maximum
    (where a token is read), or with shared_scale=True all to the largest weight of any (how much)."""
    if maps.shape[0] != len(tokens):
        raise ValueError(f"got {maps.shape[0]} maps for {len(tokens)} tokens: pass one map per token")
    size = image.shape[-2:]
    up = F.interpolate(maps[:, None].float().cpu(), size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = up.amax() if shared_scale else up.flatten(1).amax(dim=1)[:, None, None]
    up = up / peak.clamp(min=1e-12)  # (n, H, W) in [0, 1]
    rgb = to_numpy(image)  # (H, W, 3) in [0, 1]
    grey = np.repeat(rgb.mean(axis=-1, keepdims=True), 3, axis=-1)
    heat = colormaps[cmap](up.numpy())[..., :3]  # (n, H, W, 3)
    tiles = np.concatenate([rgb[None], (1 - alpha) * grey[None] + alpha * heat]).astype(np.float32)
    ax = _axes(ax, width=min(1.8 * len(tiles), 16.0), height=2.6)
    ax.imshow(tile(tiles, len(tiles)), interpolation="nearest")
    return _label_grid(ax, size, 1, len(tiles), 2, title, "token", "attention", ["image", *tokens], None)


# --- sliders ----------------------------------------------------------------------------------------------
def sliders(draw, **knobs):
    """Turn `draw`'s keyword arguments with sliders: draw(**values) draws its figure and shows it
    (plt.show()), again at every change.

    knobs: name=(first, last, step, start) for a slider of ints or floats (start: the value drawn first),
    or name=[choices] for a drop-down (the first drawn first). In Jupyter with ipywidgets installed (the
    notebooks extra) this is ipywidgets.interact with continuous_update off (a sample takes seconds, so the
    figure follows on release). Without ipywidgets, or in a static render (the environment variable
    LDM_MINI_STATIC=1, set by notebooks/build_html.py), it draws the start values once as a plain figure."""
    for name, knob in knobs.items():
        if not (isinstance(knob, tuple) and len(knob) == 4 or isinstance(knob, list) and knob):
            raise ValueError(f"knob {name!r}: give (first, last, step, start) for a slider or a non-empty "
                             f"[list] of choices, not {knob!r}")  # fmt: skip
    start = {k: (v[3] if isinstance(v, tuple) else v[0]) for k, v in knobs.items()}
    if os.environ.get("LDM_MINI_STATIC") == "1":  # a page has no kernel to move a slider
        return draw(**start)
    try:
        import ipywidgets
    except ImportError:
        return draw(**start)
    widgets = {}
    for name, knob in knobs.items():
        if isinstance(knob, tuple):
            first, last, step, value = knob
            kind = ipywidgets.IntSlider if all(isinstance(x, int) for x in knob) else ipywidgets.FloatSlider
            widgets[name] = kind(min=first, max=last, step=step, value=value, description=name,
                                 continuous_update=False)  # fmt: skip
        else:
            widgets[name] = ipywidgets.Dropdown(options=list(knob), value=knob[0], description=name)
    return ipywidgets.interact(draw, **widgets)
