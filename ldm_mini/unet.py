"""The denoising UNet eps_theta(z_t, t, y) of latent diffusion: one class for every LDM of the CompVis zoo.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv:2112.10752:
  Eq. 2  the UNet predicts the noise eps in the latent z_t at step t: || eps - eps_theta(z_t, t) ||^2;
  Eq. 3  the same loss with the conditioning, eps_theta(z_t, t, tau(y)).
  Sec. 3.3 (unnumbered) cross-attention: softmax(Q K^T / sqrt(d)) V with Q = W_Q phi_i(z_t), K = W_K tau(y),
         V = W_V tau(y); phi_i(z_t) are the UNet's flattened features, tau(y) the text encoder's tokens.
The body is the ADM UNet (Dhariwal & Nichol 2021, arXiv:2105.05233) as in CompVis openaimodel.py: ResBlocks
with an additive timestep embedding, attention at chosen resolutions, skip connections from the encoder half
to the decoder half. The timestep embedding is the sinusoidal one of Vaswani et al. 2017 (Sec. 3.5).

Three kinds of conditioning, one class:
  TEXT2IM_256   cross-attention to LDMBert tokens, context (B, 77, 1280)    (SpatialTransformer blocks)
  CELEBAHQ_256  unconditional                                              (plain self-attention blocks)
  SUPERRES_4X   the low-res image is concatenated to z_t on dim 1 before the call (in_channels 3 + 3 = 6)
Two more ADM options (Dhariwal & Nichol Sec. 3), UNetConfig fields named as in the CompVis yamls:
  use_scale_shift_norm  the time embedding scales and shifts the second GroupNorm's output (ADM's AdaGN)
                        instead of being added before it                       (lsun_churches256)
  resblock_updown       the resampling between levels is a ResBlock that average-pools / upsamples inside,
                        not a strided conv / an upsample + conv             (lsun_churches256, inpainting_big)
(lsun_churches256 also has 5 levels, channel_mult (1, 2, 2, 4, 4); inpainting_big concatenates the masked
image's latent and the mask to z_t: in_channels 3 + 3 + 1 = 7. Both use the plain self-attention blocks.)
state_dict keys are the names of diffusers' UNet2DConditionModel (context_dim set) / UNet2DModel (context_dim
None) but for the fragments of loading.DIFFUSERS_RENAMES (diffusers' to_out.0 is to_out here, ff.net.0.proj
and ff.net.2 are ff.proj_in and ff.proj_out): the modules read as the math, not as a Sequential of slots.
(diffusers: use_scale_shift_norm is resnet_time_scale_shift="scale_shift"; resblock_updown is the block types
ResnetDownsampleBlock2D / ResnetUpsampleBlock2D, or AttnDown/UpBlock2D with down/upsample_type="resnet".)
Plain PyTorch layers throughout, bit-identical to diffusers (CPU, float32); ldm_mini/fast.py swaps in faster
CPU layers at load time.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class UNetConfig:
    """Defaults: ldm-text2im-large-256 (CompVis txt2img-1p4B-eval.yaml). CompVis YAML field names.

    The head-count trap: CompVis names the number of heads `num_heads` and the size of a head
    `num_head_channels` (set one). diffusers stores either in ONE field, `attention_head_dim`: in the text2im
    UNet2DConditionModel config it is the NUMBER of heads (8, so a head has C/8 channels), in the celebahq
    and super-res UNet2DModel configs it is the SIZE of a head (32, so a level of C channels has C/32 heads).
    """

    in_channels: int = 4  # superres: 6 = 3 latent + 3 low-res image channels (concat)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors ds, not pixels
    num_heads: int | None = 8  # set exactly one of num_heads / num_head_channels
    num_head_channels: int | None = None
    context_dim: int | None = 1280  # cross-attention when set; None: self-attention only (celebahq, superres)
    transformer_depth: int = 1
    norm_num_groups: int = 32
    image_size: int = 32  # latent side the model was trained at (diffusers `sample_size`); sets default sizes
    use_scale_shift_norm: bool = False  # ResBlocks: norm2(h) * (1 + scale) + shift (lsun_churches256)
    resblock_updown: bool = False  # ResBlocks resample between levels (lsun_churches256, inpainting_big)

    def __post_init__(self):
        # YAML/JSON give lists; keep tuples so that configs compare equal and stay hashable.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError(
                f"UNetConfig: set exactly one of num_heads ({self.num_heads}) and num_head_channels "
                f"({self.num_head_channels}); pass the other as None."
            )
        for level, mult in enumerate(self.channel_mult):
            c = self.model_channels * mult
            if c % self.norm_num_groups:
                raise ValueError(
                    f"UNetConfig: level {level} has {c} channels, not divisible by norm_num_groups "
                    f"{self.norm_num_groups}; change model_channels, channel_mult or norm_num_groups."
                )
            if c % (self.num_heads or self.num_head_channels):
                raise ValueError(
                    f"UNetConfig: level {level} has {c} channels, not divisible by num_heads or "
                    f"num_head_channels {self.num_heads or self.num_head_channels}; change one of them."
                )

    def heads(self, channels: int) -> int:
        """Number of attention heads at a level with `channels` channels (CompVis rule)."""
        return self.num_heads if self.num_heads is not None else channels // self.num_head_channels


TEXT2IM_256 = UNetConfig()  # 1.45B LDM-KL-8-G; attention at ds 1, 2, 4 (levels 0-2) + mid
CELEBAHQ_256 = UNetConfig(  # celebahq-ldm-vq-4.yaml; attention at ds 2, 4, 8 (levels 1-3) + mid
    in_channels=3,
    out_channels=3,
    model_channels=224,
    channel_mult=(1, 2, 3, 4),
    attention_resolutions=(8, 4, 2),
    num_heads=None,
    num_head_channels=32,
    context_dim=None,
    image_size=64,
)
SUPERRES_4X = UNetConfig(  # bsr_sr/config.yaml; ds 16 is never reached: attention at level 3 (ds 8) + mid
    in_channels=6,
    out_channels=3,
    model_channels=160,
    channel_mult=(1, 2, 2, 4),
    attention_resolutions=(16, 8),
    num_heads=None,
    num_head_channels=32,
    context_dim=None,
    image_size=64,
)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t w_i) | sin(t w_i)], w_i = max_period^(-i / (dim/2)).

    cos first and w_0 = 1 are CompVis' choice (= diffusers flip_sin_to_cos=True, freq_shift=0).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None, :]  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, dim)


class TimestepMLP(nn.Module):
    """The 2-layer MLP after the sinusoid: model_channels -> 4 * model_channels."""

    def __init__(self, channels: int, time_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(channels, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv + projected time embedding, GroupNorm-SiLU-conv + shortcut (1x1 conv if C changes).

    `emb` arrives with SiLU applied (once, in UNet.forward, instead of in every block as in CompVis).
    scale_shift (UNetConfig.use_scale_shift_norm): the embedding is projected to 2 * C_out channels, a scale
      and a shift per channel, which modulate norm2's output: h = norm2(h) * (1 + scale) + shift (ADM's
      adaptive GroupNorm, Dhariwal & Nichol 2021 Sec. 3); without it one shift per channel is added before
      norm2 (which subtracts each group's mean: only the differences of the shifts within a group survive).
    resample "down" / "up" (UNetConfig.resblock_updown): the block is the resampler between two levels. After
      norm1 and SiLU, h and the skip x are both average-pooled 2x2 / nearest-upsampled (no weights), then
      conv1 and the rest as usual; in and out channels are equal, so the shortcut is the resampled x itself.
    """

    def __init__(
        self, in_ch: int, out_ch: int, time_dim: int, groups: int, scale_shift: bool = False,
        resample: str | None = None,
    ):  # fmt: skip
        super().__init__()
        if resample not in (None, "down", "up"):
            raise ValueError(f"ResBlock: resample must be None, 'down' or 'up', not {resample!r}")
        self.scale_shift, self.resample = scale_shift, resample
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-5)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, 2 * out_ch if scale_shift else out_ch)  # [scale | shift]
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-5)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)  # dropout before it is 0 for every LDM model
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, emb: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """x (B, C_in, H, W), emb (B, time_dim); size: resample="up" only, the (h, w) to upsample to."""
        h = F.silu(self.norm1(x))  # (B, C_in, H, W)
        if self.resample == "down":  # (B, C, H/2, W/2), odd sizes round down
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        elif self.resample == "up":  # (B, C, 2H, 2W), or the odd size of the skip the output meets
            h, x = F.interpolate(h, size=size, mode="nearest"), F.interpolate(x, size=size, mode="nearest")
        h = self.conv1(h)  # (B, C_out, H', W')
        e = self.time_emb_proj(emb)[:, :, None, None]  # (B, C_out or 2 * C_out, 1, 1): per channel
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)  # (B, C_out, 1, 1) each, scale first (CompVis and diffusers)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)  # one shift per channel
        h = self.conv2(F.silu(h))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h  # skip first, as diffusers (see SelfAttentionBlock.forward)


class Attention(nn.Module):
    """Multi-head attention of queries x (B, N, C) over context (B, L, C_ctx); self-attention if no context.

    Set `keep_attention = True` to store the softmax probabilities in `attention_probs` (B, heads, N, L)
    at every forward call: they are computed explicitly, beside the fused kernel, whose output is still the
    one used, so that looking at the maps never changes a sample (not even in the last bit).
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, heads * head_dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, heads * head_dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, heads * head_dim, bias=qkv_bias)
        self.to_out = nn.Linear(heads * head_dim, query_dim)  # diffusers: to_out.0 (to_out.1 is a Dropout)
        self.keep_attention = False
        self.attention_probs: Tensor | None = None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        # LDM Sec. 3.3: Q = W_Q phi(z), K = W_K tau(y), V = W_V tau(y); split the width into heads.
        q = self.to_q(x)  # (B, N, heads*d)
        k, v = self.to_k(context), self.to_v(context)  # (B, L, heads*d)
        q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in (q, k, v))  # (B, heads, N|L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(Q K^T / sqrt(d)) V, (B, heads, N, d)
        self.attention_probs = None
        if self.keep_attention:  # the same softmax, written out to be kept
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, heads, N, L)
            self.attention_probs = scores.softmax(dim=-1).detach()  # each query's weights over the L keys
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, C)


class SelfAttentionBlock(Attention):
    """The legacy attention block of celebahq/superres: x + Attention(GroupNorm(x)) over all h*w positions."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__(channels, channels, heads, channels // heads, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-5)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:  # context: always None here
        b, c, h, w = x.shape
        tokens = self.group_norm(x.flatten(2)).transpose(1, 2)  # (B, C, h, w) -> (B, C, h*w) -> (B, h*w, C)
        out = super().forward(tokens).transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w), channels-last
        # A sum takes the memory layout of its first operand, and that layout picks the next conv's kernel:
        # adding in diffusers' order (here and in ResBlock) gives bit-identical outputs, not just to ~1e-6.
        return out + x


class FeedForward(nn.Module):
    """GEGLU MLP (Shazeer 2020, arXiv:2002.05202), width 4 * dim: [h | gate] = x W_in, (h * gelu(gate)) W_out.

    proj_in is the GEGLU's one Linear for both the value h and the gate, as in CompVis' GEGLU. (CompVis and
    diffusers hold the three steps in a Sequential, GEGLU, Dropout(p = 0), Linear: keys ff.net.0.proj,
    ff.net.2, renamed by loading.DIFFUSERS_RENAMES.)
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * 4 * dim)
        self.proj_out = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj_in(x).chunk(2, dim=-1)  # (B, N, 4*dim) each
        return self.proj_out(h * F.gelu(gate))  # (B, N, dim)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention to the context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads, dim // heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, dim // heads, qkv_bias=False)  # LDM Sec. 3.3
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, h*w, C)
        x = x + self.attn2(self.norm2(x), context)  # queries from the image, keys/values from the text
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features as h*w tokens through transformer blocks, with a residual around the whole (text2im)."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        blocks = [TransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        self.transformer_blocks = nn.ModuleList(blocks)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x))  # (B, C, h, w)
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, h*w, C): one token per position
        for block in self.transformer_blocks:
            y = block(y, context)
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, h, w)
        return x + self.proj_out(y)


def make_attention(channels: int, heads: int, context_dim: int | None, depth: int, groups: int) -> nn.Module:
    """SpatialTransformer with cross-attention if there is a context, else the legacy self-attention block."""
    if context_dim is None:
        return SelfAttentionBlock(channels, heads, groups)
    return SpatialTransformer(channels, heads, context_dim, depth, groups)


class Downsample(nn.Module):
    """Halve h and w with a stride-2 3x3 conv (odd sizes round up)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (2x, or the odd size of the skip it meets), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """One encoder level: n x (ResBlock [-> attention]), then a downsampler unless it is the last level.

    Every ResBlock/attention output and the downsampler's output are pushed on `skips` for the decoder.
    heads = 0: no attention at this level. downsample: "conv" (Downsample), "resblock" (a ResBlock that
    average-pools, UNetConfig.resblock_updown) or None (the last level).
    """

    def __init__(
        self, in_ch, out_ch, time_dim, n, groups, heads, context_dim, depth, downsample: str | None,
        scale_shift: bool,
    ):  # fmt: skip
        super().__init__()
        ins = [in_ch] + [out_ch] * (n - 1)
        self.resnets = nn.ModuleList(ResBlock(c, out_ch, time_dim, groups, scale_shift) for c in ins)
        attns = [make_attention(out_ch, heads, context_dim, depth, groups) for _ in ins] if heads else []
        self.attentions = nn.ModuleList(attns)
        self.downsamplers = nn.ModuleList()  # diffusers' name: a list of 0 or 1
        if downsample == "conv":
            self.downsamplers.append(Downsample(out_ch))
        elif downsample == "resblock":
            self.downsamplers.append(ResBlock(out_ch, out_ch, time_dim, groups, scale_shift, resample="down"))

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, skips: list[Tensor]) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions:
                h = self.attentions[i](h, context)
            skips.append(h)
        for down in self.downsamplers:
            # (B, C, H/2, W/2); odd sizes: the conv rounds up, the average pool down
            h = down(h, emb) if isinstance(down, ResBlock) else down(h)
            skips.append(h)
        return h


class UpBlock(nn.Module):
    """One decoder level: (n+1) x (concat a skip -> ResBlock [-> attention]), then an upsampler unless last.

    skip_chs: channels of the skips this level pops, in pop order. heads = 0: no attention at this level.
    upsample: "conv" (Upsample), "resblock" (a ResBlock that upsamples, UNetConfig.resblock_updown) or None.
    """

    def __init__(
        self, in_ch, out_ch, skip_chs, time_dim, groups, heads, context_dim, depth, upsample: str | None,
        scale_shift: bool,
    ):  # fmt: skip
        super().__init__()
        ins = [(in_ch if i == 0 else out_ch) + s for i, s in enumerate(skip_chs)]
        self.resnets = nn.ModuleList(ResBlock(c, out_ch, time_dim, groups, scale_shift) for c in ins)
        attns = [make_attention(out_ch, heads, context_dim, depth, groups) for _ in ins] if heads else []
        self.attentions = nn.ModuleList(attns)
        self.upsamplers = nn.ModuleList()
        if upsample == "conv":
            self.upsamplers.append(Upsample(out_ch))
        elif upsample == "resblock":
            self.upsamplers.append(ResBlock(out_ch, out_ch, time_dim, groups, scale_shift, resample="up"))

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, skips: list[Tensor]) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)  # (B, C + C_skip, H, W) -> (B, C_out, H, W)
            if self.attentions:
                h = self.attentions[i](h, context)
        for up in self.upsamplers:
            size = skips[-1].shape[-2:]  # the next skip's size: 2x, or odd as on the way down
            h = up(h, emb, size) if isinstance(up, ResBlock) else up(h, size)
        return h


class MidBlock(nn.Module):
    """At the lowest resolution: ResBlock -> attention -> ResBlock (attention in every published model)."""

    def __init__(self, channels, time_dim, groups, heads, context_dim, depth, scale_shift: bool):
        super().__init__()
        resnets = [ResBlock(channels, channels, time_dim, groups, scale_shift) for _ in range(2)]
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([make_attention(channels, heads, context_dim, depth, groups)])

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        h = self.resnets[0](h, emb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, emb)


class UNet(nn.Module):
    """eps_theta(x, t, context): x (B, in_channels, h, w), t int|0-dim|(B,) -> eps (B, out_channels, h, w).

    context: (B, L, context_dim) for the cross-attention model, None otherwise.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch0, groups, n = cfg.model_channels, cfg.norm_num_groups, cfg.num_res_blocks
        time_dim = 4 * ch0
        chs = [ch0 * m for m in cfg.channel_mult]  # channels per level; level i works at ds = 2**i

        def heads_at(level: int) -> int:  # 0: no attention at this level
            return cfg.heads(chs[level]) if 2**level in cfg.attention_resolutions else 0

        # what every block is told: its attention's context and depth, how its ResBlocks take the time
        opts = {"context_dim": cfg.context_dim, "depth": cfg.transformer_depth}
        opts["scale_shift"] = cfg.use_scale_shift_norm
        resample = "resblock" if cfg.resblock_updown else "conv"  # between two levels, both ways
        self.time_embedding = TimestepMLP(ch0, time_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)

        skip_chs = [ch0]  # channels of every tensor the encoder pushes on the skip stack, conv_in's first
        self.down_blocks = nn.ModuleList()
        for level, out_ch in enumerate(chs):
            last = level == len(chs) - 1
            in_ch, heads, down = skip_chs[-1], heads_at(level), None if last else resample
            self.down_blocks.append(
                DownBlock(in_ch, out_ch, time_dim, n, groups, heads, **opts, downsample=down)
            )
            skip_chs += [out_ch] * (n if last else n + 1)

        self.mid_block = MidBlock(chs[-1], time_dim, groups, cfg.heads(chs[-1]), **opts)

        self.up_blocks = nn.ModuleList()
        in_ch = chs[-1]
        for level in reversed(range(len(chs))):
            pops = [skip_chs.pop() for _ in range(n + 1)]  # each decoder level takes n + 1 skips
            heads, up = heads_at(level), resample if level > 0 else None
            self.up_blocks.append(
                UpBlock(in_ch, chs[level], pops, time_dim, groups, heads, **opts, upsample=up)
            )
            in_ch = chs[level]

        self.conv_norm_out = nn.GroupNorm(groups, ch0, eps=1e-5)
        self.conv_out = nn.Conv2d(ch0, cfg.out_channels, 3, padding=1)

    def cross_attention_layers(self) -> list[tuple[str, Attention]]:
        """(name, module) of every cross-attention (attn2), in forward order (= registration order).

        Set `module.keep_attention = True` on one, call the UNet, read `module.attention_probs`
        (B, heads, h*w, L). Empty for models without cross-attention.
        """
        return [(name, m) for name, m in self.named_modules() if name.endswith(".attn2")]

    def forward(self, x: Tensor, t: Tensor | int, context: Tensor | None = None) -> Tensor:
        self._check_inputs(x, context)
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim > 1 or t.numel() not in (1, b):
            raise ValueError(
                f"UNet: t must be an int, a 0-dim tensor or a ({b},) tensor, not {tuple(t.shape)}"
            )
        t = t.reshape(-1).expand(b)  # (B,)

        t_freq = timestep_embedding(t, self.config.model_channels).to(x.dtype)  # (B, C0), to x's dtype
        emb = F.silu(self.time_embedding(t_freq))  # (B, 4*C0); the SiLU every ResBlock applies first, once

        h = self.conv_in(x)  # (B, C0, h, w)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, emb, context, skips)
        h = self.mid_block(h, emb, context)  # (B, C_last, h / 2^(levels-1), w / 2^(levels-1))
        for block in self.up_blocks:
            h = block(h, emb, context, skips)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, h, w)

    def _check_inputs(self, x: Tensor, context: Tensor | None) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"UNet: x must have shape (B, {cfg.in_channels}, h, w), got {tuple(x.shape)}. "
                "(Super-res: concatenate the low-res image to the latent on dim 1.)"
            )
        if cfg.context_dim is None and context is not None:
            raise ValueError(
                "UNet: this model has no cross-attention (context_dim=None): pass context=None "
                "(super-res conditioning goes into x, concatenated on dim 1)."
            )
        if cfg.context_dim is not None:
            if context is None:
                raise ValueError(
                    f"UNet: this model cross-attends to a context: pass context (B, L, {cfg.context_dim}), "
                    "e.g. the text encoder's output (for guidance, the empty prompt's in the other half)."
                )
            if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
                raise ValueError(
                    f"UNet: context must have shape ({x.shape[0]}, L, {cfg.context_dim}) to match x, "
                    f"got {tuple(context.shape)}"
                )
