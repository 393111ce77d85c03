"""Latent Diffusion's first stage: an image autoencoder, KL-regularised (KL-f8) or vector-quantised (VQ-f4).

LDM   Rombach et al. 2022, arXiv:2112.10752, Sec. 3.1 "Perceptual Image Compression": an encoder E maps an
      image x (H, W, 3) to z = E(x) (h, w, c) with h = H / f, f = 2^m; a decoder D gives x~ = D(z). The
      diffusion model then works on z. Two regularisations keep the latent space tame:
        KL-reg  a slight KL penalty towards N(0, I), as in a VAE (our AutoencoderKL, KL-f8 for text2im);
        VQ-reg  a vector-quantisation layer that is "absorbed by the decoder" (our VQModel, VQ-f4 for
                celebahq and super-resolution).
VAE   Kingma & Welling 2014, arXiv:1312.6114: reparameterised sample z = mu + sigma * eps (Sec. 2.4), KL of a
      diagonal Gaussian to N(0, I) in closed form (Appendix B).
VQ    van den Oord et al. 2017, arXiv:1711.00937: z_q = e_k with k = argmin_j ||z_e - e_j||_2 (Eq. 1-2).
The network is the VQGAN/LDM convolutional encoder/decoder (CompVis `diffusionmodules/model.py`): ResNet
blocks, a single-head self-attention in the middle (none in vq-f4-noattn), more of them after every ResNet
block of the low-resolution levels in kl-f16/f32 and vq-f8/f16 (`attn_resolutions`), stride-2 convs down and
nearest-neighbour x2 up.
Images are (B, 3, H, W) in [-1, 1]. State-dict keys are diffusers' AutoencoderKL / VQModel names, but for
the attention's to_out (diffusers' to_out.0, see loading.DIFFUSERS_RENAMES).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class AutoencoderConfig:
    """Defaults: KL-f8 of ldm-text2im-large-256 (CompVis kl-f8 ddconfig). YAML field names."""

    kind: str = "kl"  # "kl" | "vq"
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # one level per entry; a x2 downsample between levels
    num_res_blocks: int = 2  # per encoder level; the decoder uses num_res_blocks + 1
    z_channels: int = 4  # encoder output channels (KL: per moment; encoder emits 2x)
    embed_dim: int = 4  # latent channels after quant_conv (diffusers latent_channels)
    n_embed: int = 0  # VQ codebook size (0 for KL)
    norm_num_groups: int = 32
    # In-level attention (CompVis ddconfig names): level L is said to work at resolution / 2^L, the image side
    # it had in training, whatever the input size now; each level whose side is in attn_resolutions follows
    # every ResnetBlock with a SelfAttention (diffusers: AttnDownEncoderBlock2D / AttnUpDecoderBlock2D).
    resolution: int = 256
    attn_resolutions: tuple[int, ...] = ()  # e.g. (32,) for vq-f8: level 3 of 4 (256 / 2^3 = 32)
    mid_attention: bool = True  # False: no mid-block attention (vq-f4-noattn; CompVis attn_type "none")


KL_F8 = AutoencoderConfig()  # ldm-text2im-large-256: 8x downsampling, 4 latent channels
VQ_F4 = AutoencoderConfig(  # ldm-celebahq-256 and ldm-super-resolution-4x: 4x downsampling, 3 channels
    kind="vq", ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, embed_dim=3, n_embed=8192
)

EPS = 1e-6  # every GroupNorm of the first stage (the UNet's use 1e-5)


def check_config(cfg: AutoencoderConfig) -> None:
    """Raise a ValueError that names the bad field and the fix."""
    if cfg.kind not in ("kl", "vq"):
        raise ValueError(f"AutoencoderConfig.kind must be 'kl' or 'vq', got {cfg.kind!r}.")
    if cfg.kind == "vq" and cfg.n_embed <= 0:
        raise ValueError(f"kind='vq' needs a codebook: set n_embed > 0 (VQ-f4 uses 8192), got {cfg.n_embed}.")
    if cfg.kind == "kl" and cfg.n_embed != 0:
        raise ValueError(f"n_embed is the VQ codebook size; set n_embed=0 for kind='kl', got {cfg.n_embed}.")
    if not cfg.ch_mult or cfg.num_res_blocks < 1:
        raise ValueError(
            f"need at least one level and one res block, got ch_mult={cfg.ch_mult}, "
            f"num_res_blocks={cfg.num_res_blocks}."
        )
    bad = [cfg.ch * m for m in cfg.ch_mult if (cfg.ch * m) % cfg.norm_num_groups]
    if bad:
        raise ValueError(
            f"GroupNorm needs channels divisible by norm_num_groups={cfg.norm_num_groups}, but "
            f"ch * ch_mult gives {bad}: change ch, ch_mult or norm_num_groups."
        )
    if cfg.resolution < 1:
        raise ValueError(
            f"resolution is the training image side (256 for every CompVis model), got {cfg.resolution}."
        )
    sides = [cfg.resolution // 2**i for i in range(len(cfg.ch_mult))]
    if not set(cfg.attn_resolutions) <= set(sides):
        raise ValueError(
            f"attn_resolutions {cfg.attn_resolutions} must be among the level sides resolution / 2^level = "
            f"{sides} (resolution={cfg.resolution}): no level works at "
            f"{sorted(set(cfg.attn_resolutions) - set(sides))}."
        )


def attention_levels(cfg: AutoencoderConfig) -> list[bool]:
    """Per level, in encoder order (level 0: full resolution): whether attention follows its ResnetBlocks."""
    return [cfg.resolution // 2**i in cfg.attn_resolutions for i in range(len(cfg.ch_mult))]


# ----------------------------------------------------------------------------------------------------------
# Building blocks (keys: norm1/conv1/norm2/conv2/conv_shortcut, group_norm/to_q/to_k/to_v/to_out, conv)


class ResnetBlock(nn.Module):
    """x + F(x), F = GroupNorm, SiLU, conv3x3, GroupNorm, SiLU, conv3x3; no timestep input here."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=EPS)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # 1x1 conv on the skip path only where the width changes (CompVis "nin_shortcut")
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout sits before conv2 in training; 0 at inference
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all h*w positions, with a residual (CompVis AttnBlock).

    CompVis used 1x1 convs for q/k/v/proj; they are the same maps as Linear layers on (B, h*w, C).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)  # diffusers: to_out.0 (to_out.1 is a Dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # GroupNorm on the (B, C, h*w) view, as diffusers (on channels-last input the 4-D kernel rounds
        # differently)
        y = self.group_norm(x.flatten(2)).transpose(1, 2)  # (B, C, h, w) -> (B, C, h*w) -> (B, h*w, C)
        q, k, v = (proj(y).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, h*w, C)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v: (B, 1, h*w, C)
        y = self.to_out(y.squeeze(1)).transpose(1, 2).reshape(b, c, h, w)  # (B, h*w, C) -> (B, C, h, w)
        # y is a channels-last view; with y first, the sum keeps that layout, as in diffusers, so the convs
        # after it run the same kernels (x + y would be contiguous and differ by ~1e-6 from diffusers).
        return y + x


class Downsample(nn.Module):
    """3x3 conv with stride 2 after padding one zero row/column at the bottom/right only (h -> floor(h/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding as in the original (TensorFlow "SAME"-style): pad (left, right, top, bottom)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, h, w) -> (B, C, h/2, w/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2h, 2w)


class Level(nn.Module):
    """One resolution level: `n` ResnetBlocks, each followed by a SelfAttention when `attention`, then an
    optional Downsample or Upsample.

    Empty lists mean "none": `attentions` at most levels, the resampler (`downsamplers.0.conv`,
    `upsamplers.0.conv` in the checkpoint) at the last level.
    """

    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, attention: bool = False,
                 down: bool = False, up: bool = False):  # fmt: skip
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(out_ch if i else in_ch, out_ch, groups) for i in range(n))
        self.attentions = nn.ModuleList(SelfAttention(out_ch, groups) for _ in range(n if attention else 0))
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if down else [])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if up else [])

    def forward(self, x: Tensor) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions:
                x = self.attentions[i](x)
        for resample in [*self.downsamplers, *self.upsamplers]:
            x = resample(x)
        return x


class MidBlock(nn.Module):
    """ResnetBlock, self-attention (unless `attention` is False), ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:  # one or none
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, out_channels, H/f, W/f), f = 2^(len(ch_mult) - 1).

    attends: per level (level 0 first), whether it has attention (attention_levels)."""

    def __init__(self, in_ch: int, out_ch: int, widths: list[int], num_res_blocks: int, groups: int,
                 attends: list[bool], mid_attention: bool):  # fmt: skip
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        last = len(widths) - 1
        self.down_blocks = nn.ModuleList(
            Level(widths[max(i - 1, 0)], widths[i], num_res_blocks, groups, attends[i], down=i < last)
            for i in range(len(widths))
        )
        self.mid_block = MidBlock(widths[-1], groups, mid_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)  # (B, widths[0], H, W)
        for level in self.down_blocks:
            x = level(x)  # halves h and w, except the last level
        x = self.mid_block(x)  # (B, widths[-1], H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, out_channels, H/f, W/f)


class Decoder(nn.Module):
    """(B, in_channels, h, w) -> (B, out_channels, h*f, w*f); the encoder's levels in reverse order.

    widths and attends are given in encoder order (level 0 first), as the Encoder's."""

    def __init__(self, in_ch: int, out_ch: int, widths: list[int], num_res_blocks: int, groups: int,
                 attends: list[bool], mid_attention: bool):  # fmt: skip
        super().__init__()
        rev, rev_attends = widths[::-1], attends[::-1]  # lowest resolution (widest) first
        self.conv_in = nn.Conv2d(in_ch, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, mid_attention)
        # One more ResnetBlock per level than the encoder (as in CompVis); upsample on all but the last level
        self.up_blocks = nn.ModuleList(
            Level(rev[max(i - 1, 0)], rev[i], num_res_blocks + 1, groups, rev_attends[i], up=i < len(rev) - 1)
            for i in range(len(rev))
        )
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=EPS)
        self.conv_out = nn.Conv2d(rev[-1], out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))  # (B, widths[-1], h, w)
        for level in self.up_blocks:
            x = level(x)  # doubles h and w, except the last level
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, out_channels, h*f, w*f)


# ----------------------------------------------------------------------------------------------------------
# KL-regularised autoencoder


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(exp(logvar))) of the KL autoencoder.

    The encoder predicts a distribution, not a point: training samples z from it (reparameterised) and
    penalises its KL to N(0, I) with a tiny weight (1e-6 for kl-f8), which keeps the latent scale bounded
    without blurring. LDM training encodes each image batch with a posterior sample (times scale_factor);
    generation only decodes, so it never touches this class.
    """

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, 2C, h, w) -> 2 x (B, C, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as the original: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None,
               noise: Tensor | None = None) -> Tensor:  # fmt: skip
        """z = mean + std * eps, eps ~ N(0, I), drawn as diffusers' randn_tensor draws it.

        The noise is drawn on the generator's device (CPU generator -> CPU noise, then moved), with
        the latent's dtype; a list of generators draws one batch element from each. noise: eps given
        instead of drawn (the mean's shape; train.py draws it for a whole batch and gives each rank its rows).
        """
        shape, device, dtype = self.mean.shape, self.mean.device, self.mean.dtype
        if noise is not None:
            if noise.shape != shape:
                raise ValueError(
                    f"noise must have the posterior's shape {tuple(shape)}, got {tuple(noise.shape)}"
                )
            return self.mean + self.std * noise.to(device, dtype)
        if isinstance(generator, list) and len(generator) == 1:
            generator = generator[0]
        if isinstance(generator, list):
            if len(generator) != shape[0]:
                raise ValueError(
                    f"got {len(generator)} generators for a batch of {shape[0]}: pass one per "
                    "batch element, or a single generator."
                )
            eps = torch.cat(
                [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
            )
        else:
            rand_device = device if generator is None else generator.device
            eps = torch.randn(shape, generator=generator, device=rand_device, dtype=dtype)
        return self.mean + self.std * eps.to(device)

    def mode(self) -> Tensor:
        """The most likely latent: the mean (what LDM uses unless it samples)."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per batch element (Kingma & Welling, Appendix B): (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (LDM "KL-reg"). encode(img) -> DiagonalGaussian; decode(z) -> img."""

    def __init__(self, cfg: AutoencoderConfig = KL_F8):
        super().__init__()
        check_config(cfg)
        if cfg.kind != "kl":
            raise ValueError(f"AutoencoderKL needs kind='kl', got {cfg.kind!r}: use build_autoencoder(cfg).")
        self.config = cfg
        shape = ([cfg.ch * m for m in cfg.ch_mult], cfg.num_res_blocks, cfg.norm_num_groups,
                 attention_levels(cfg), cfg.mid_attention)  # fmt: skip
        # "double_z": the encoder emits mean and log-variance, z_channels each
        self.encoder = Encoder(cfg.in_channels, 2 * cfg.z_channels, *shape)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)  # moments -> moments
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg.z_channels, cfg.out_channels, *shape)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim

    def encode(self, img: Tensor) -> DiagonalGaussian:
        moments = self.quant_conv(self.encoder(img))  # (B, 3, H, W) -> (B, 2 * embed_dim, H/f, W/f)
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))  # (B, embed_dim, h, w) -> (B, 3, h*f, w*f)

    def forward(self, img: Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None):
        """Reconstruct: encode, take the posterior's mode (or a sample), decode."""
        posterior = self.encode(img)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)


# ----------------------------------------------------------------------------------------------------------
# Vector-quantised autoencoder


class VectorQuantizer(nn.Module):
    """Snap each latent vector to its nearest codebook entry (VQ-VAE Eq. 1-2)."""

    def __init__(self, n_embed: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, dim)  # the codebook e: (n_embed, dim)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        b, c, hh, ww = h.shape
        flat = h.permute(0, 2, 3, 1).reshape(-1, c)  # (B, C, h, w) -> (B*h*w, C)
        # Nearest code by Euclidean distance. torch.cdist, as diffusers: near-ties then resolve the same way.
        # Always in float32 (a no-op for float32 models): in bfloat16/float16 the rounded distances would send
        # latents that lie near the middle of two codes to the other code, a visible change in the image.
        indices = torch.cdist(flat.float(), self.embedding.weight.float()).argmin(dim=1)  # (B*h*w,)
        z_q = self.embedding(indices).view(b, hh, ww, c)  # (B, h, w, C)
        # Straight-through estimator (VQ-VAE Sec. 3.2): value z_q, gradient flows to h as if z_q = h.
        # Written as diffusers and CompVis write it, so the values match theirs to the last bit.
        h = h.permute(0, 2, 3, 1)
        z_q = h + (z_q - h).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), indices.view(b, hh, ww)  # (B, C, h, w), (B, h, w)


class VQModel(nn.Module):
    """Vector-quantised autoencoder (LDM "VQ-reg").

    The diffusion model runs on the continuous pre-quantisation latent h = encode(img) (embed_dim
    channels); the quantiser belongs to the decoder ("absorbed by the decoder", Sec. 3.1). So decode()
    re-quantises first: the decoder was trained only on codebook vectors, and snapping a generated latent
    to the codebook puts it back on the inputs the decoder knows (CompVis decode_first_stage does this).
    """

    def __init__(self, cfg: AutoencoderConfig = VQ_F4):
        super().__init__()
        check_config(cfg)
        if cfg.kind != "vq":
            raise ValueError(f"VQModel needs kind='vq', got {cfg.kind!r}: use build_autoencoder(cfg).")
        self.config = cfg
        shape = ([cfg.ch * m for m in cfg.ch_mult], cfg.num_res_blocks, cfg.norm_num_groups,
                 attention_levels(cfg), cfg.mid_attention)  # fmt: skip
        self.encoder = Encoder(cfg.in_channels, cfg.z_channels, *shape)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg.z_channels, cfg.out_channels, *shape)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim

    def encode(self, img: Tensor) -> Tensor:
        """The continuous latent h before quantisation: (B, 3, H, W) -> (B, embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(img))

    def decode(self, z: Tensor, quantize: bool = True) -> Tensor:
        """(B, embed_dim, h, w) -> (B, 3, h*f, w*f); quantize=False feeds z to the decoder as it is."""
        if quantize:
            z, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Decode codebook indices (B, h, w) -> image (B, 3, h*f, w*f)."""
        z_q = self.quantize.embedding(indices)  # (B, h, w) -> (B, h, w, C)
        z_q = z_q.permute(0, 3, 1, 2).contiguous()  # (B, C, h, w), contiguous as in diffusers
        return self.decode(z_q, quantize=False)

    def forward(self, img: Tensor) -> Tensor:
        """Reconstruct: encode, quantise, decode."""
        return self.decode(self.encode(img))


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL | VQModel:
    """The autoencoder class for cfg.kind ("kl" -> AutoencoderKL, "vq" -> VQModel)."""
    check_config(cfg)
    return AutoencoderKL(cfg) if cfg.kind == "kl" else VQModel(cfg)
