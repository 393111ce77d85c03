"""The conditioning encoders tau_theta of the class, semantic and layout models (LDM Sec. 3.3).

Rombach et al. 2022 (arXiv:2112.10752) condition the UNet on y through a domain-specific encoder tau_theta(y)
whose output enters either the cross-attention layers (a sequence of D-dim tokens, Sec. 3.3) or the UNet's
input, concatenated to z_t (a spatial map at the latent's size). The text encoder LDMBert has its own
module (bert.py); this one holds the three small others of the released CompVis models:

    ClassEmbedder     cin256-v2, cin256: a class label -> one context token (B, 1, D), cross-attention.
                      cin256-v2 has 1001 rows: row 1000 is the "no class" label its notebook uses as the
                      unconditional branch of classifier-free guidance.
    SpatialRescaler   semantic_synthesis256: a one-hot segmentation map (B, 182, H, W) -> (B, 3, H/4, W/4),
                      bilinear downsampling then a 1x1 conv, concatenated to z_t.
    LayoutTokenizer   layout2img-openimages256: boxes with class labels -> 92 token ids, which a BERT-like
                      transformer (bert.LDMBert, vocabulary 8192) turns into the cross-attention context.
                      It has no weights: the fixed "tokenizer" of a layout, as tokenizer.py is of text.

The inpainting model's encoder is the first stage itself (model.LatentDiffusion.inpaint_condition) and the
super-resolution model's is the identity (the low-res image is concatenated as it is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ClassEmbedderConfig:
    """Defaults: cin256-v2 (ClassEmbedder n_classes 1001, embed_dim 512)."""

    n_classes: int = 1001
    embed_dim: int = 512  # = the UNet's context_dim
    # The label of the learned "no class" row, for classifier-free guidance; None if the model has none
    # (cin256: 1000 rows, the 1000 ImageNet classes, sampled without guidance).
    unconditional_class: int | None = 1000

    def __post_init__(self):
        uc = self.unconditional_class
        if uc is not None and not 0 <= uc < self.n_classes:
            raise ValueError(
                f"ClassEmbedderConfig: unconditional_class {uc} is not one of the {self.n_classes} classes"
            )


class ClassEmbedder(nn.Module):
    """tau_theta(y) for a class label y: one learned D-dim vector per class, as a sequence of length 1."""

    def __init__(self, cfg: ClassEmbedderConfig):
        super().__init__()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.n_classes, cfg.embed_dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding(labels)[:, None, :]  # (B,) -> (B, 1, D): one token to cross-attend to


@dataclass(frozen=True)
class SpatialRescalerConfig:
    """Defaults: semantic_synthesis256 (SpatialRescaler n_stages 2, bilinear, x0.5, 182 -> 3, no bias)."""

    n_stages: int = 2
    method: str = "bilinear"
    multiplier: float = 0.5
    in_channels: int = 182  # COCO-Stuff's 182 classes: the one-hot map's channels
    out_channels: int = 3
    bias: bool = False

    def __post_init__(self):
        if self.method not in ("nearest", "bilinear", "bicubic", "area"):
            raise ValueError(f"SpatialRescalerConfig: unknown interpolation method {self.method!r}")

    @property
    def factor(self) -> int:
        """How much smaller the output is than the map: 4 for the released model (two halvings)."""
        return round(1 / self.multiplier**self.n_stages)


class SpatialRescaler(nn.Module):
    """tau_theta of a segmentation map: resize it to the latent's size, mix its channels down to a few.

    Bilinear downsampling by exactly 1/2 (align_corners=False) is a 2x2 mean, so two stages give each latent
    position the class frequencies of its 4x4 pixel block; a 1x1 conv maps 182 frequencies to 3 channels
    that are concatenated to z_t (B, 3 + 3, h, w).
    """

    def __init__(self, cfg: SpatialRescalerConfig):
        super().__init__()
        self.config = cfg
        self.channel_mapper = nn.Conv2d(cfg.in_channels, cfg.out_channels, 1, bias=cfg.bias)

    def forward(self, one_hot: Tensor) -> Tensor:
        x = one_hot  # (B, classes, H, W)
        for _ in range(self.config.n_stages):
            x = F.interpolate(x, scale_factor=self.config.multiplier, mode=self.config.method)
        return self.channel_mapper(x)  # (B, out_channels, H / factor, W / factor)


@dataclass(frozen=True)
class LayoutConfig:
    """Defaults: layout2img-openimages256 (taming-transformers' ObjectsBoundingBoxConditionalBuilder with
    8192 tokens, 30 objects, the crop encoded, the "group of" flag used).

    n_classes is not stated by the released files (the OpenImages dataset code is not in the CompVis repo);
    601, every boxable OpenImages class, is the assumption of tests/compvis_refs (README section 3.5).
    """

    n_tokens: int = 8192  # the layout transformer's vocabulary
    n_classes: int = 601
    max_objects: int = 30

    @property
    def grid(self) -> int:
        """Sections of the coordinate grid per axis: a corner is one of grid^2 tokens (90 x 90 = 8100)."""
        return math.isqrt(self.n_tokens)

    @property
    def length(self) -> int:
        """Tokens per layout: 3 per object (class, top-left, bottom-right) and 2 for the crop."""
        return 3 * self.max_objects + 2


class LayoutTokenizer:
    """A layout -> (B, 92) token ids, the input of the layout model's transformer.

    A layout is a list of objects (class, (x0, y0, w, h)) or (class, (x0, y0, w, h), is_group_of), with box
    coordinates relative to the image, in [0, 1], (0, 0) at the top left. Each object becomes 3 tokens:
        class        class + n_classes * is_group_of   ("a group of cars" is its own token)
        top-left     corner(x0, y0)
        bottom-right corner(x0 + w, y0 + h), corner(x, y) = round(y (grid-1)) * grid + round(x (grid-1))
    (Python's round: half to even, as the original builder). Unused object slots are the "none" token
    n_tokens - 1, three at a time, after the objects; the last two tokens are the crop's corners,
    (0, 8099) for the whole image. The original builder shuffles the objects at every call; here they keep
    the given order, so that one layout is one input (the order changes the sample: BERT has positions).
    """

    def __init__(self, cfg: LayoutConfig = LayoutConfig()):
        self.config = cfg

    def corner(self, x: float, y: float) -> int:
        g = self.config.grid
        return round(y * (g - 1)) * g + round(x * (g - 1))

    def check(self, layout: list) -> list[tuple[int, tuple[float, float, float, float], bool]]:
        """One image's objects as (class, box, is_group_of), or a one-line ValueError naming the bad one."""
        cfg = self.config
        if len(layout) > cfg.max_objects:
            raise ValueError(f"a layout holds at most {cfg.max_objects} objects, got {len(layout)}")
        objects = []
        for i, obj in enumerate(layout):
            if not isinstance(obj, list | tuple) or len(obj) not in (2, 3):
                raise ValueError(
                    f"layout object {i}: expected (class, (x0, y0, w, h)[, is_group_of]), got {obj!r}"
                )
            label, box, group = obj[0], obj[1], bool(obj[2]) if len(obj) == 3 else False
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < cfg.n_classes:
                raise ValueError(f"layout object {i}: class {label!r} is not an int in [0, {cfg.n_classes})")
            if len(box) != 4 or not all(isinstance(v, int | float) and math.isfinite(v) for v in box):
                raise ValueError(f"layout object {i}: the box must be 4 numbers (x0, y0, w, h), got {box!r}")
            x0, y0, w, h = (float(v) for v in box)
            if w <= 0 or h <= 0 or x0 < 0 or y0 < 0 or x0 + w > 1 + 1e-6 or y0 + h > 1 + 1e-6:
                raise ValueError(
                    f"layout object {i}: the box (x0, y0, w, h) = {box!r} is not inside the image: "
                    "coordinates are relative to its size, 0 <= x0, y0 and x0 + w, y0 + h <= 1, with w, h > 0"
                )
            objects.append((label, (x0, y0, w, h), group))
        return objects

    def __call__(self, layouts: list) -> Tensor:
        """A batch of layouts (a list of lists of objects) -> token ids (B, 3 * max_objects + 2) int64."""
        cfg = self.config
        none = cfg.n_tokens - 1
        rows = []
        for layout in layouts:
            row = []
            for label, (x0, y0, w, h), group in self.check(layout):
                row += [label + cfg.n_classes * group, self.corner(x0, y0), self.corner(x0 + w, y0 + h)]
            row += [none] * (3 * cfg.max_objects - len(row))
            row += [self.corner(0.0, 0.0), self.corner(1.0, 1.0)]  # the crop: the whole image
            rows.append(row)
        return torch.tensor(rows, dtype=torch.int64)  # (B, 92)
