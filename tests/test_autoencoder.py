"""ldm_mini.autoencoder vs diffusers' AutoencoderKL / VQModel, bit for bit: tiny random weights, CPU."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as RefKL
from diffusers import VQModel as RefVQ
from helpers import randomize_

from ldm_mini.autoencoder import (
    KL_F8,
    VQ_F4,
    AutoencoderConfig,
    AutoencoderKL,
    VQModel,
    build_autoencoder,
)
from ldm_mini.loading import from_diffusers_names

ATOL = 0.0  # float32 on CPU: the same operations in the same order and layout as diffusers, bit for bit
REALCONFIGS = Path(__file__).parent / "realconfigs"

KL_TINY = [
    AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, norm_num_groups=8),
    AutoencoderConfig(
        ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=3, embed_dim=3, norm_num_groups=32
    ),
]
VQ_TINY = [
    AutoencoderConfig(
        kind="vq",
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=2,
        z_channels=3,
        embed_dim=3,
        n_embed=16,
        norm_num_groups=8,
    ),
    # z_channels != embed_dim (diffusers: latent_channels != vq_embed_dim), one res block
    AutoencoderConfig(
        kind="vq",
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        z_channels=4,
        embed_dim=3,
        n_embed=16,
        norm_num_groups=32,
    ),
]
SHAPES = [(1, 16, 16), (2, 24, 16), (1, 10, 14)]  # (batch, H, W): non-square, odd sizes after a downsample


def diffusers_kwargs(cfg: AutoencoderConfig) -> dict:
    """Our config as diffusers AutoencoderKL / VQModel constructor arguments."""
    n = len(cfg.ch_mult)
    kw = dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_num_groups,
    )
    if cfg.kind == "vq":
        kw.update(num_vq_embeddings=cfg.n_embed, vq_embed_dim=cfg.embed_dim)
    else:
        assert cfg.z_channels == cfg.embed_dim, "diffusers' AutoencoderKL has z_channels == embed_dim"
    return kw


def make_pair(cfg: AutoencoderConfig, seed: int = 0):
    ref_cls = RefVQ if cfg.kind == "vq" else RefKL
    ref = randomize_(ref_cls(**diffusers_kwargs(cfg)), seed).eval()
    ours = build_autoencoder(cfg).eval()
    ours.load_state_dict(from_diffusers_names(ref.state_dict()), strict=True)
    return ours, ref


def check(name: str, ours: torch.Tensor, ref: torch.Tensor, diffs: dict) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs diffusers {tuple(ref.shape)}"
    diffs[name] = (ours - ref).abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL, msg=lambda m: f"{name}: {m}")


def check_scale(name: str, t: torch.Tensor) -> None:
    """Values must be of order 1 for the comparisons to mean something."""
    s = t.float().std().item()
    assert 0.05 < s < 100, f"{name} has std {s}: weights too small or too large for a meaningful parity test"


@pytest.mark.parametrize("batch, h, w", SHAPES)
@pytest.mark.parametrize("cfg", KL_TINY, ids=["kl-2lvl-1rb-g8", "kl-3lvl-2rb-g32"])
def test_kl_matches_diffusers(cfg, batch, h, w):
    ours, ref = make_pair(cfg)
    img = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    diffs = {}
    with torch.no_grad():
        post, ref_post = ours.encode(img), ref.encode(img).latent_dist
        f = ours.downsample_factor
        assert post.mean.shape == (batch, cfg.embed_dim, h // f, w // f)
        for attr in ("mean", "logvar", "std", "var"):
            check_scale(attr, getattr(ref_post, attr))
            check(attr, getattr(post, attr), getattr(ref_post, attr), diffs)
        check("mode", post.mode(), ref_post.mode(), diffs)
        check("kl", post.kl(), ref_post.kl(), diffs)
        z = post.sample(torch.Generator().manual_seed(7))
        ref_z = ref_post.sample(generator=torch.Generator().manual_seed(7))
        check("sample", z, ref_z, diffs)
        assert (z - post.mean).abs().max() > 1e-3, "the sample should differ from the mean"

        z = torch.randn(batch, cfg.embed_dim, h // f, w // f, generator=torch.Generator().manual_seed(2))
        ref_img = ref.decode(z).sample
        check_scale("decode", ref_img)
        check("decode", ours.decode(z), ref_img, diffs)
        check("forward", ours(img), ref(img).sample, diffs)
        check(
            "forward(sample)",
            ours(img, sample_posterior=True, generator=torch.Generator().manual_seed(3)),
            ref(img, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample,
            diffs,
        )
    print("max abs diff", {k: f"{v:.1e}" for k, v in diffs.items()})


def test_kl_sample_generator_list():
    """A list of generators draws one batch element from each, as diffusers' randn_tensor does."""
    ours, ref = make_pair(KL_TINY[0])
    img = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
        torch.testing.assert_close(
            ours.encode(img).sample(gens()),
            ref.encode(img).latent_dist.sample(generator=gens()),
            rtol=0,
            atol=ATOL,
        )
        with pytest.raises(ValueError, match="one per batch element"):
            ours.encode(img).sample(gens()[:1] * 3)


@pytest.mark.parametrize("batch, h, w", SHAPES)
@pytest.mark.parametrize("cfg", VQ_TINY, ids=["vq-2rb-g8", "vq-1rb-g32-z4e3"])
def test_vq_matches_diffusers(cfg, batch, h, w):
    ours, ref = make_pair(cfg)
    img = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    diffs = {}
    with torch.no_grad():
        f = ours.downsample_factor
        lat, ref_lat = ours.encode(img), ref.encode(img).latents
        assert lat.shape == (batch, cfg.embed_dim, h // f, w // f)
        check_scale("h", ref_lat)
        check("h", lat, ref_lat, diffs)

        # Quantise the same latent with both (so near-ties cannot make a spurious index mismatch)
        z_q, idx = ours.quantize(ref_lat)
        ref_z_q, _, (_, _, ref_idx) = ref.quantize(ref_lat)
        assert idx.shape == (batch, h // f, w // f) and idx.dtype == torch.long
        assert torch.equal(idx.flatten(), ref_idx.flatten()), "codebook indices differ"
        assert idx.unique().numel() > 1, "all latents snapped to one code: the test would be too weak"
        check("z_q", z_q, ref_z_q, diffs)
        assert torch.equal(ours.quantize(lat)[1], idx), "indices from our own h differ"

        ref_img = ref.decode(ref_lat).sample  # diffusers quantises unless force_not_quantize
        check_scale("decode", ref_img)
        check("decode", ours.decode(ref_lat), ref_img, diffs)
        check(
            "decode(quantize=False)",
            ours.decode(ref_lat, quantize=False),
            ref.decode(ref_lat, force_not_quantize=True).sample,
            diffs,
        )
        codes = ref.quantize.get_codebook_entry(idx.flatten(), (batch, h // f, w // f, cfg.embed_dim))
        check(
            "decode_indices",
            ours.decode_indices(idx),
            ref.decode(codes, force_not_quantize=True).sample,
            diffs,
        )
        check("forward", ours(img), ref(img).sample, diffs)
    print("max abs diff", {k: f"{v:.1e}" for k, v in diffs.items()})


def test_properties_and_builder():
    kl, vq = build_autoencoder(KL_TINY[1]), build_autoencoder(VQ_TINY[1])
    assert isinstance(kl, AutoencoderKL) and isinstance(vq, VQModel)
    assert (kl.downsample_factor, kl.latent_channels) == (4, 3)
    assert (vq.downsample_factor, vq.latent_channels) == (2, 3)


@pytest.mark.parametrize(
    "cfg, model, path",
    [
        (KL_F8, RefKL, "ldm-text2im-large-256/vqvae/config.json"),
        (VQ_F4, RefVQ, "ldm-celebahq-256/vqvae/config.json"),
        (VQ_F4, RefVQ, "ldm-super-resolution-4x-openimages/vqvae/config.json"),
    ],
    ids=["KL_F8-text2im", "VQ_F4-celebahq", "VQ_F4-superres"],
)
def test_presets_fit_published_configs(cfg, model, path):
    """The presets build models whose keys and shapes equal diffusers' models from the published configs."""
    config = json.loads((REALCONFIGS / path).read_text())
    with torch.device("meta"):  # shapes only: no memory, no init time
        ref, ours = model.from_config(config), build_autoencoder(cfg)
    want = {k: tuple(v.shape) for k, v in from_diffusers_names(ref.state_dict()).items()}
    have = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert have == want
    assert ours.downsample_factor == (8 if cfg.kind == "kl" else 4)
    assert ours.latent_channels == (4 if cfg.kind == "kl" else 3)


def test_misshaped_config_fails_strict_loading():
    cfg = KL_TINY[0]
    ref_sd = from_diffusers_names(RefKL(**diffusers_kwargs(cfg)).state_dict())
    wider = build_autoencoder(replace(cfg, ch=64))
    with pytest.raises(RuntimeError, match=r"size mismatch for encoder\.conv_in\.weight"):
        wider.load_state_dict(ref_sd, strict=True)
    deeper = build_autoencoder(replace(cfg, num_res_blocks=2))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*encoder\.down_blocks\.0\.resnets\.1\."):
        deeper.load_state_dict(ref_sd, strict=True)
    vq = build_autoencoder(VQ_TINY[0])  # a KL checkpoint into a VQ model
    with pytest.raises(RuntimeError, match=r"quantize\.embedding\.weight"):
        vq.load_state_dict(ref_sd, strict=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="vae"), "kind must be 'kl' or 'vq'"),
        (dict(kind="vq", n_embed=0), "set n_embed > 0"),
        (dict(kind="kl", n_embed=16), "set n_embed=0"),
        (dict(ch=48, norm_num_groups=32), "divisible by norm_num_groups=32"),
        (dict(ch_mult=()), "at least one level"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_autoencoder(AutoencoderConfig(**{"ch": 32, "norm_num_groups": 8, **kwargs}))


def test_wrong_class_for_kind():
    with pytest.raises(ValueError, match="use build_autoencoder"):
        VQModel(KL_TINY[0])
    with pytest.raises(ValueError, match="use build_autoencoder"):
        AutoencoderKL(VQ_TINY[0])
