"""Faster CPU layers for inference: the same parameters, other kernels, swapped in at load time.

The model files (unet.py, bert.py) call plain PyTorch layers, which give diffusers' outputs to the last bit.
On a CPU two of those layers leave speed behind, and this module replaces them in place by subclasses that
hold the SAME Parameter objects (state_dict keys and values do not change) and override only forward:

FastLinear(nn.Linear)   tokens x (B, N, C_in) -> (B, N, C_out) as a oneDNN 1x1 convolution.
    PyTorch's float32 matmul calls MKL, whose sgemm runs at AVX2 speed on AMD CPUs (~85 GFLOP/s per core on
    the benchmark machine, an AMD EPYC with AVX-512), while oneDNN's convolutions use AVX-512 (~175-200
    GFLOP/s). A Linear on N tokens is a 1x1 convolution of the (B, C_in, N, 1) image whose pixels are the
    tokens, a channels-last view of x (no copy): 2.0-2.2x faster per Linear at text2im's 32x32 and 16x16
    levels, 1.2-1.8x in LDMBert (154 rows).
    Plain nn.Linear instead: not on a CPU, not float32, autograd on (training is untouched), x not 3-D (the
    timestep MLP's (B, C)), fewer than 128 rows B * N (re-arranging the weights for oneDNN then costs more
    than it saves), x not contiguous (the "image" would not be channels-last and oneDNN would copy it).
FastConv3x3(nn.Conv2d)  a 3x3, stride-1, padding-1 conv at <= 8x8 pixels as one matrix product (im2col).
    At text2im's two lowest levels (8x8 and 4x4; batch 2: 128 or 32 output pixels) a 1280 -> 1280 conv is
    14.7 M weights for a few pixels, and the conv kernel spends most of its time re-arranging them; written
    as one matrix product over the pixels' 3x3 neighbourhoods it runs ~2x faster at 4x4 (float32 and
    bfloat16 alike).
    Plain nn.Conv2d instead: more than 64 pixels (there the conv kernel is faster), not on a CPU, autograd on.

Both round differently from the plain layers: outputs move by ~1e-6 in float32 (the parity tests check them
against diffusers at atol 1e-5; the plain layers at 0.0).

enable(model) swaps them into every UNet and LDMBert inside `model` (a LatentDiffusion, a UNet, an LDMBert):
every nn.Linear becomes a FastLinear, every 3x3 stride-1 padding-1 nn.Conv2d a FastConv3x3; the autoencoder
stays plain (its convs run at high resolution, where there is nothing to gain). disable(model) puts the plain
layers back (hooks registered on a swapped layer do not move with it). ldm_mini.load() enables them where
default_on(device): on a CPU with oneDNN (mkldnn) in the build; load(..., fast=False) and the command line's
--no-fast keep the plain layers. Models built directly (UNet(cfg)) are plain. The figures were measured on
one AMD CPU (benchmarks/RESULTS.md); on Intel CPUs MKL's sgemm uses AVX-512 too, and FastLinear may gain
less there (not measured).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bert import LDMBert
from .unet import UNet

MIN_ROWS = 128  # FastLinear: fewer rows B * N run as nn.Linear
MAX_PIXELS = 64  # FastConv3x3: more output pixels h * w (above 8x8) run as nn.Conv2d


def default_on(device: str | torch.device | None = None) -> bool:
    """Whether the fast layers are worth enabling for a model on `device` (default CPU): a CPU with oneDNN."""
    return torch.device(device or "cpu").type == "cpu" and torch.backends.mkldnn.is_available()


class FastLinear(nn.Linear):
    """nn.Linear; on (B, N, C_in) float32 CPU tokens at inference, through oneDNN's 1x1 convolution."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or torch.is_grad_enabled()
            or x.ndim != 3
            or x.shape[0] * x.shape[1] < MIN_ROWS
            or not x.is_contiguous()
            or not torch.backends.mkldnn.is_available()
        ):
            return super().forward(x)
        image = x.unsqueeze(2).permute(0, 3, 1, 2)  # (B, N, C_in) -> (B, C_in, N, 1): channels-last view
        weight = self.weight[:, :, None, None]  # (C_out, C_in) -> (C_out, C_in, 1, 1)
        out = torch.ops.aten.mkldnn_convolution(image, weight, self.bias, [0, 0], [1, 1], [1, 1], 1)
        return out.flatten(2).transpose(1, 2)  # (B, C_out, N, 1), channels-last -> (B, N, C_out), no copy


class FastConv3x3(nn.Conv2d):
    """A 3x3, stride-1, padding-1 nn.Conv2d; at <= 8x8 pixels on a CPU at inference, as one im2col product."""

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        if h * w > MAX_PIXELS or x.device.type != "cpu" or torch.is_grad_enabled():
            return super().forward(x)
        cols = F.unfold(x, 3, padding=1)  # (B, C_in*9, h*w): each pixel's 3x3 neighbourhood, zero-padded
        out = self.weight.flatten(1) @ cols  # (C_out, C_in*9) @ (B, C_in*9, h*w) -> (B, C_out, h*w)
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.view(b, -1, h, w)


def is_3x3(conv: nn.Conv2d) -> bool:
    """Whether FastConv3x3 computes this conv: 3x3, stride 1, zero padding 1, no dilation or groups."""
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


# the constructor arguments besides bias
LINEAR_ARGS = ["in_features", "out_features"]
CONV_ARGS = "in_channels out_channels kernel_size stride padding dilation groups padding_mode".split()


def rebuilt(layer: nn.Linear | nn.Conv2d, cls: type) -> nn.Module:
    """A `cls` layer holding `layer`'s own Parameter objects (built on the meta device: no copy, no init)."""
    names = LINEAR_ARGS if isinstance(layer, nn.Linear) else CONV_ARGS
    with torch.device("meta"):
        new = cls(**{name: getattr(layer, name) for name in names}, bias=layer.bias is not None)
    new.weight, new.bias = layer.weight, layer.bias
    return new.train(layer.training)


def swap(model: nn.Module, plan) -> None:
    """Replace each child c of every module inside `model` by plan(c) where that gives a class, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            cls = plan(child)
            if cls is not None:
                setattr(parent, name, rebuilt(child, cls))  # same slot, so state_dict keeps its key order


def fast_class(layer: nn.Module) -> type | None:
    if type(layer) is nn.Linear:
        return FastLinear
    if type(layer) is nn.Conv2d and is_3x3(layer):
        return FastConv3x3
    return None


def plain_class(layer: nn.Module) -> type | None:
    return {FastLinear: nn.Linear, FastConv3x3: nn.Conv2d}.get(type(layer))


def enable(model: nn.Module) -> nn.Module:
    """Swap the fast layers into every UNet and LDMBert inside `model`, in place; returns `model`."""
    for net in [m for m in model.modules() if isinstance(m, UNet | LDMBert)]:
        swap(net, fast_class)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Put the plain nn.Linear / nn.Conv2d back for every fast layer inside `model`, in place; returns it."""
    swap(model, plain_class)
    return model


def is_enabled(model: nn.Module) -> bool:
    """Whether `model` holds any fast layer."""
    return any(isinstance(m, FastLinear | FastConv3x3) for m in model.modules())
