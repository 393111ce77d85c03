"""Parity of ldm_mini.unet.UNet with diffusers' UNet2DConditionModel / UNet2DModel (0.42.1).

Tiny random diffusers models with every parameter re-initialised (a fresh model has zero biases and unit
norm scales, which would hide a bias or norm wired to the wrong place), loaded strictly into ours; float32 on
CPU, outputs of order 1. Every parity test runs both ways: the plain model must equal diffusers bit for bit,
and with ldm_mini.fast's layers (other kernels, which round float32 differently; measured 1.2e-6 to 2.8e-6)
it must agree to atol 1e-5, rtol 0.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel, UNet2DModel
from helpers import randomize_

from ldm_mini import fast
from ldm_mini.loading import from_diffusers_names
from ldm_mini.unet import CELEBAHQ_256, SUPERRES_4X, TEXT2IM_256, Attention, UNet, UNetConfig
from weights_tools import diffusers_format

REALCONFIGS = Path(__file__).parent / "realconfigs"
ATOL = 1e-5  # float32, fast layers; a miss at 1e-5 on order-1 outputs is a real difference, not rounding

# Tiny versions of the three published patterns (see the presets in ldm_mini/unet.py).
TINY_TEXT2IM = UNetConfig(  # CrossAttnDown, Down: attention at every level but the last, + mid
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,), num_heads=2,
    context_dim=16, norm_num_groups=8,
)  # fmt: skip
TINY_TEXT2IM_DEEP = UNetConfig(  # 3 levels, 2 res blocks, 4 heads, 2 transformer blocks, 32 groups
    model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(2, 1), num_heads=4,
    context_dim=24, transformer_depth=2, norm_num_groups=32,
)  # fmt: skip
TINY_CELEBAHQ = UNetConfig(  # Down, AttnDown, AttnDown; heads of 16 channels (4 at 64 channels)
    in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
    attention_resolutions=(4, 2), num_heads=None, num_head_channels=16, context_dim=None, norm_num_groups=8,
)  # fmt: skip
TINY_SUPERRES = UNetConfig(  # Down, Down, AttnDown; ds 8 is never reached (as ds 16 in bsr_sr); in 3 + 3
    in_channels=6, out_channels=3, model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
    attention_resolutions=(8, 4), num_heads=None, num_head_channels=8, context_dim=None, norm_num_groups=8,
)  # fmt: skip


# The CompVis zoo's ResBlock options (lsun_churches256, inpainting_big) on the tiny UNets above; GroupNorms
# of 2 or more channels per group (with one, GroupNorm would erase the added time embedding and every bias).
TINY_SCALE_SHIFT = replace(TINY_CELEBAHQ, use_scale_shift_norm=True)
TINY_TEXT2IM_SCALE_SHIFT = replace(TINY_TEXT2IM, use_scale_shift_norm=True)  # UNet2DConditionModel: odd sizes
TINY_UPDOWN = replace(TINY_SUPERRES, resblock_updown=True)  # ResnetDownsampleBlock2D, ..., AttnDownBlock2D
TINY_CHURCHES = UNetConfig(  # lsun_churches256's pattern: 5 levels, attention at levels 0-3 + mid, both flags
    in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 1, 1, 2, 2), num_res_blocks=2,
    attention_resolutions=(1, 2, 4, 8), num_heads=None, num_head_channels=16, context_dim=None,
    norm_num_groups=8, use_scale_shift_norm=True, resblock_updown=True,
)  # fmt: skip


def diffusers_unet(cfg: UNetConfig):
    """The diffusers model for a config. The trap: diffusers' `attention_head_dim` is the NUMBER of heads
    in UNet2DConditionModel (CompVis num_heads) but the SIZE of a head in UNet2DModel (num_head_channels).
    use_scale_shift_norm is resnet_time_scale_shift="scale_shift"; resblock_updown is the Resnet*sampleBlock2D
    types (levels without attention) and down/upsample_type="resnet" (UNet2DModel's attention levels)."""
    levels = range(len(cfg.channel_mult))
    attn = [2**i in cfg.attention_resolutions for i in levels]
    common = dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, layers_per_block=cfg.num_res_blocks,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        sample_size=cfg.image_size, norm_num_groups=cfg.norm_num_groups, flip_sin_to_cos=True, freq_shift=0,
        resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
    )  # fmt: skip
    plain_down, plain_up = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")
        if cfg.resblock_updown
        else ("DownBlock2D", "UpBlock2D")
    )
    if cfg.context_dim is not None:
        assert not cfg.resblock_updown, "diffusers' CrossAttnDownBlock2D always downsamples with a conv"
        down = tuple("CrossAttnDownBlock2D" if a else plain_down for a in attn)
        up = tuple("CrossAttnUpBlock2D" if a else plain_up for a in reversed(attn))
        return UNet2DConditionModel(
            down_block_types=down, up_block_types=up, attention_head_dim=cfg.num_heads,
            cross_attention_dim=cfg.context_dim, transformer_layers_per_block=cfg.transformer_depth, **common,
        )  # fmt: skip
    down = tuple("AttnDownBlock2D" if a else plain_down for a in attn)
    up = tuple("AttnUpBlock2D" if a else plain_up for a in reversed(attn))
    resample = "resnet" if cfg.resblock_updown else "conv"
    return UNet2DModel(
        down_block_types=down, up_block_types=up, attention_head_dim=cfg.num_head_channels,
        downsample_type=resample, upsample_type=resample,
        attn_norm_num_groups=cfg.norm_num_groups,  # else no mid-block GroupNorm with scale_shift
        **common,
    )  # fmt: skip


def pair(cfg: UNetConfig, seed: int = 0, fast_layers: bool = False):
    ref = diffusers_unet(cfg).eval()
    randomize_(ref, seed)
    ours = UNet(cfg).eval()
    ours.load_state_dict(from_diffusers_names(ref.state_dict()), strict=True)
    return fast.enable(ours) if fast_layers else ours, ref


MAX_DIFF: dict[str, float] = {}  # name -> max |ours - diffusers|, printed at the end (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for name, diff in sorted(MAX_DIFF.items()):
        print(f"\nmax abs diff {name}: {diff:.2e}")


def check(ours, ref, x, t, context=None, name: str = ""):
    """ours(x, t, context) vs diffusers: bit-identical for the plain model, atol 1e-5 with fast layers."""
    with torch.no_grad():
        kwargs = {} if context is None else {"encoder_hidden_states": context}
        want = ref(x, t, **kwargs).sample
        got = ours(x, t, context)
    assert 0.3 < want.std() < 10, f"reference output std {want.std():.3g}: not of order 1"
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL if fast.is_enabled(ours) else 0.0)
    if name:
        key = f"{name} ({'fast' if fast.is_enabled(ours) else 'plain'})"
        MAX_DIFF[key] = max(MAX_DIFF.get(key, 0.0), (got - want).abs().max().item())
    return got


# (batch, h, w, t): t as an int, a 0-dim tensor, one per batch element; square and non-square.
CASES = [
    (1, 8, 8, 981),
    (2, 16, 8, torch.tensor([3, 500])),
    (3, 8, 12, torch.tensor(41)),
]


@pytest.mark.parametrize("fast_layers", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("cfg", [TINY_TEXT2IM, TINY_TEXT2IM_DEEP], ids=["text2im", "text2im_deep"])
@pytest.mark.parametrize("batch, h, w, t", CASES + [(2, 9, 7, torch.tensor([999, 0]))])
def test_cross_attention_unet_matches_diffusers(cfg, batch, h, w, t, fast_layers):
    ours, ref = pair(cfg, fast_layers=fast_layers)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=gen)
    context = torch.randn(batch, 7, cfg.context_dim, generator=gen)
    check(ours, ref, x, t, context)  # (2, 9, 7): odd sizes, diffusers then upsamples to the skip's size


@pytest.mark.parametrize("fast_layers", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("cfg", [TINY_CELEBAHQ, TINY_SUPERRES], ids=["celebahq", "superres"])
@pytest.mark.parametrize("batch, h, w, t", CASES)
def test_unconditional_and_concat_unet_matches_diffusers(cfg, batch, h, w, t, fast_layers):
    ours, ref = pair(cfg, fast_layers=fast_layers)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=torch.Generator().manual_seed(2))
    check(ours, ref, x, t)  # superres: x = cat(noisy latent, low-res image) on dim 1, 3 + 3 channels


def assert_converts_back(ref, cfg: UNetConfig):
    """The diffusers config reads back as the same UNetConfig (weights_tools.diffusers_format, which lists
    the attention_resolutions the levels reach, from level 0 up)."""
    got = diffusers_format.unet_config(dict(ref.config, _class_name=type(ref).__name__), "ref")
    reached = sorted(ds for ds in cfg.attention_resolutions if ds < 2 ** len(cfg.channel_mult))
    assert got == replace(cfg, attention_resolutions=tuple(reached))


@pytest.mark.parametrize("fast_layers", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("batch, h, w, t", CASES)
@pytest.mark.parametrize("cfg", [TINY_SCALE_SHIFT, TINY_UPDOWN], ids=["scale_shift", "resblock_updown"])
def test_zoo_resblock_options_match_diffusers(cfg, batch, h, w, t, fast_layers):
    ours, ref = pair(cfg, fast_layers=fast_layers)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=torch.Generator().manual_seed(4))
    name = "scale_shift" if cfg.use_scale_shift_norm else "resblock_updown"
    check(ours, ref, x, t, name=name)
    assert_converts_back(ref, cfg)


@pytest.mark.parametrize("fast_layers", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("batch, h, w, t", [(2, 9, 7, torch.tensor([999, 0])), (1, 8, 12, 500)])
def test_scale_shift_with_cross_attention_matches_diffusers_at_odd_sizes(batch, h, w, t, fast_layers):
    cfg = TINY_TEXT2IM_SCALE_SHIFT
    ours, ref = pair(cfg, fast_layers=fast_layers)
    gen = torch.Generator().manual_seed(5)
    x, context = torch.randn(batch, 4, h, w, generator=gen), torch.randn(batch, 7, 16, generator=gen)
    check(ours, ref, x, t, context, name="scale_shift, cross-attention")
    assert_converts_back(ref, cfg)


@pytest.mark.parametrize("fast_layers", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("batch, h, w, t", [(1, 16, 16, 981), (2, 32, 16, torch.tensor([3, 500]))])
def test_churches_like_unet_matches_diffusers(batch, h, w, t, fast_layers):
    """5 levels (ds up to 16), scale-shift and ResBlock resampling, self-attention at levels 0-3 + mid."""
    ours, ref = pair(TINY_CHURCHES, fast_layers=fast_layers)
    assert type(ours.down_blocks[0].downsamplers[0]).__name__ == "ResBlock"
    assert ours.down_blocks[0].resnets[0].time_emb_proj.out_features == 2 * 32  # [scale | shift]
    x = torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(6))
    check(ours, ref, x, t, name="churches-like (5 levels, both options)")
    assert_converts_back(ref, TINY_CHURCHES)


def test_resblock_updown_reaches_odd_skip_sizes():
    """No reference runs odd sizes with resblock_updown (the average pool rounds down, then their 2x
    upsampling misses the skip's size); ours upsamples to the skip's size, as Upsample does."""
    ours = UNet(TINY_CHURCHES).eval()
    with torch.no_grad():
        out = ours(torch.randn(1, 4, 37, 21), 10)
    assert out.shape == (1, 4, 37, 21) and torch.isfinite(out).all()


def test_attention_maps_only_when_asked():
    ours, ref = pair(TINY_TEXT2IM_DEEP)
    layers = ours.cross_attention_layers()
    names = [name for name, _ in layers]
    # forward order: down levels 0, 1 (2 attentions each), mid, up levels 1, 0 (3 each); 2 blocks in each
    assert len(names) == (2 + 2 + 1 + 3 + 3) * 2
    assert names[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert names[9] == "mid_block.attentions.0.transformer_blocks.1.attn2"
    assert names[-1] == "up_blocks.2.attentions.2.transformer_blocks.1.attn2"
    assert UNet(TINY_CELEBAHQ).cross_attention_layers() == []

    x, context = torch.randn(2, 4, 8, 12), torch.randn(2, 5, 24)
    plain = check(ours, ref, x, 10, context)
    assert all(m.attention_probs is None for _, m in layers)  # nothing stored unless asked

    name, layer = layers[4]  # down level 1 (4 x 6 positions), 4 heads
    assert name == "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    r, seen = ref.get_submodule(name), {}  # the same diffusers layer and its inputs, for its probabilities
    r.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs, x=args[0]), with_kwargs=True)
    layer.keep_attention = True
    kept = check(ours, ref, x, 10, context)
    assert torch.equal(kept, plain)  # looking at the maps changes no output, not even in the last bit

    probs = layer.attention_probs
    assert probs.shape == (2, 4, 4 * 6, 5)  # (B, heads, h*w, L)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 24), rtol=0, atol=1e-6)
    with torch.no_grad():
        q = r.head_to_batch_dim(r.to_q(seen["x"]))  # (B * heads, N, d)
        k = r.head_to_batch_dim(r.to_k(seen["encoder_hidden_states"]))  # (B * heads, L, d)
        want = r.get_attention_scores(q, k).unflatten(0, (2, 4))  # (B * heads, N, L) -> (B, heads, N, L)
    torch.testing.assert_close(probs, want, rtol=0, atol=1e-6)  # probabilities in [0, 1]
    assert all(m.attention_probs is None for n, m in layers if n != name)

    layer.keep_attention = False
    check(ours, ref, x, 10, context)
    assert layer.attention_probs is None  # switched off: the old map is dropped, not kept stale


# (preset, realconfigs dir, CompVis yaml with the same UNet)
PRESETS = [
    (TEXT2IM_256, "ldm-text2im-large-256", "compvis/configs/latent-diffusion/txt2img-1p4B-eval.yaml"),
    (CELEBAHQ_256, "ldm-celebahq-256", "compvis/models/ldm/celeba256/config.yaml"),
    (SUPERRES_4X, "ldm-super-resolution-4x-openimages", "compvis/models/ldm/bsr_sr/config.yaml"),
]


@pytest.mark.parametrize("preset, hub_dir, yaml_path", PRESETS, ids=["text2im", "celebahq", "superres"])
def test_presets_match_published_configs(preset, hub_dir, yaml_path):
    params = yaml.safe_load((REALCONFIGS / yaml_path).read_text())["model"]["params"]["unet_config"]["params"]
    from_yaml = UNetConfig(
        in_channels=params["in_channels"],
        out_channels=params["out_channels"],
        model_channels=params["model_channels"],
        channel_mult=params["channel_mult"],
        num_res_blocks=params["num_res_blocks"],
        attention_resolutions=params["attention_resolutions"],
        num_heads=None if "num_head_channels" in params else params["num_heads"],
        num_head_channels=params.get("num_head_channels"),
        context_dim=params.get("context_dim"),
        transformer_depth=params.get("transformer_depth", 1),
        image_size=params["image_size"],
    )
    assert preset == from_yaml

    # Full-size parameter shapes, on the meta device (no memory), equal the diffusers model of config.json.
    config = json.loads((REALCONFIGS / hub_dir / "unet" / "config.json").read_text())
    assert preset.image_size == config["sample_size"]
    cls = {"UNet2DConditionModel": UNet2DConditionModel, "UNet2DModel": UNet2DModel}[config["_class_name"]]
    with torch.device("meta"):
        ref = cls.from_config(config)
        ours = UNet(preset)
    want = {k: tuple(v.shape) for k, v in from_diffusers_names(ref.state_dict()).items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    only_ours, only_ref = sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys())
    assert not only_ours and not only_ref, (only_ours[:5], only_ref[:5])
    assert got == want
    # Shapes do not show the head count (the attention_head_dim trap): compare it per attention module.
    want_heads = {n: m.heads for n, m in ref.named_modules() if type(m).__name__ == "Attention"}
    got_heads = {n: m.heads for n, m in ours.named_modules() if isinstance(m, Attention)}
    assert got_heads == want_heads


def test_bad_inputs_give_clear_errors():
    text, uncond = UNet(TINY_TEXT2IM), UNet(TINY_CELEBAHQ)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 16)
    with pytest.raises(ValueError, match="pass context"):
        text(x, 1)
    with pytest.raises(ValueError, match="context must have shape"):
        text(x, 1, torch.randn(2, 7, 8))
    with pytest.raises(ValueError, match="no cross-attention"):
        uncond(torch.randn(2, 3, 8, 8), 1, ctx)
    with pytest.raises(ValueError, match="x must have shape"):
        uncond(x, 1)
    with pytest.raises(ValueError, match="t must be"):
        text(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        UNetConfig(num_head_channels=32)  # num_heads defaults to 8: both set
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNetConfig(model_channels=48)


def test_fast_layers_come_off_again_and_leave_autograd_alone():
    ours, ref = pair(TINY_TEXT2IM_DEEP)
    gen = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 16, 8, generator=gen), torch.randn(2, 7, 24, generator=gen)
    keys = list(ours.state_dict())
    check(fast.enable(ours), ref, x, 10, context)  # atol 1e-5
    assert list(ours.state_dict()) == keys
    check(fast.disable(ours), ref, x, 10, context)  # bit-identical again

    def loss_and_grads():  # autograd on, as in training: the fast layers run the plain kernels
        ours.zero_grad()
        loss = ours(x, 10, context).square().mean()
        loss.backward()
        return loss, [p.grad.clone() for p in ours.parameters()]

    loss, grads = loss_and_grads()
    fast.enable(ours)
    fast_loss, fast_grads = loss_and_grads()
    assert torch.equal(fast_loss, loss) and all(map(torch.equal, fast_grads, grads))
