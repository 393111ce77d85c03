"""ldm_mini.autoencoder vs diffusers' AutoencoderKL / VQModel, bit for bit: tiny random weights, CPU; and the
CompVis zoo's nine first stages against what the ORIGINAL code computed with them (tests/compvis_refs).

Every variant is checked against diffusers at atol 0 (max |diff| 0.0): one mid attention, none
(mid_attention=False = diffusers mid_block_add_attention=False) and in-level attention (attn_resolutions =
diffusers AttnDownEncoderBlock2D / AttnUpDecoderBlock2D levels).
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL as RefKL
from diffusers import VQModel as RefVQ
from helpers import randomize_
from safetensors.torch import load_file

from ldm_mini import autoencoder
from ldm_mini.autoencoder import (
    KL_F8,
    VQ_F4,
    AutoencoderConfig,
    AutoencoderKL,
    VQModel,
    attention_levels,
    build_autoencoder,
)
from ldm_mini.loading import config_from_json, config_to_json, from_diffusers_names

ATOL = 0.0  # float32 on CPU: the same operations in the same order and layout as diffusers, bit for bit
REALCONFIGS = Path(__file__).parent / "realconfigs"

KL_TINY = [
    AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, norm_num_groups=8),
    AutoencoderConfig(
        ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=3, embed_dim=3, norm_num_groups=32
    ),
    # no attention at all (CompVis attn_type "none")
    AutoencoderConfig(
        ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, norm_num_groups=8,
        mid_attention=False,
    ),
    # in-level attention as kl-f32: the two lowest levels (sides 32 / 2^1, 32 / 2^2) of three
    AutoencoderConfig(
        ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=3, embed_dim=3, norm_num_groups=32,
        resolution=32, attn_resolutions=(16, 8),
    ),
]  # fmt: skip
KL_IDS = ["kl-2lvl-1rb-g8", "kl-3lvl-2rb-g32", "kl-no-attention", "kl-attn-levels-1-2"]
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
    # vq-f4-noattn: no mid attention
    AutoencoderConfig(
        kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=2, z_channels=3, embed_dim=3, n_embed=16,
        norm_num_groups=8, mid_attention=False,
    ),
    # in-level attention at the first level (as if the model had been trained at 16 px), one res block
    AutoencoderConfig(
        kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, embed_dim=3, n_embed=16,
        norm_num_groups=8, resolution=16, attn_resolutions=(16,),
    ),
]  # fmt: skip
VQ_IDS = ["vq-2rb-g8", "vq-1rb-g32-z4e3", "vq-no-attention", "vq-attn-level-0"]
SHAPES = [(1, 16, 16), (2, 24, 16), (1, 10, 14)]  # (batch, H, W): non-square, odd sizes after a downsample


def diffusers_kwargs(cfg: AutoencoderConfig) -> dict:
    """Our config as diffusers AutoencoderKL / VQModel constructor arguments."""
    attends = attention_levels(cfg)
    kw = dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attends),
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in attends[::-1]),
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_attention,
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


def check(name: str, ours: torch.Tensor, ref: torch.Tensor, diffs: dict, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    diffs[name] = (ours - ref).abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def check_scale(name: str, t: torch.Tensor) -> None:
    """Values must be of order 1 for the comparisons to mean something."""
    s = t.float().std().item()
    assert 0.05 < s < 100, f"{name} has std {s}: weights too small or too large for a meaningful parity test"


@pytest.mark.parametrize("batch, h, w", SHAPES)
@pytest.mark.parametrize("cfg", KL_TINY, ids=KL_IDS)
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


def test_kl_sample_with_given_noise_is_the_draw_of_that_noise():
    """sample(noise=eps) is the sample whose draw was eps (train.py gives each rank its rows of one draw)."""
    ours, _ = make_pair(KL_TINY[0])
    img = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        posterior = ours.encode(img)
        eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5))
        drawn = posterior.sample(torch.Generator().manual_seed(5))
        assert torch.equal(posterior.sample(noise=eps), drawn)
        with pytest.raises(ValueError, match="the posterior's shape"):
            posterior.sample(noise=eps[:1])


@pytest.mark.parametrize("batch, h, w", SHAPES)
@pytest.mark.parametrize("cfg", VQ_TINY, ids=VQ_IDS)
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
        (dict(ch_mult=(1, 1), attn_resolutions=(32,)), r"among the level sides .* \[256, 128\]"),
        (dict(resolution=0), "resolution is the training image side"),
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


def test_attention_placement_and_keys():
    """Attention follows every ResnetBlock of the levels whose training side (resolution / 2^level) is
    listed: num_res_blocks per encoder level, num_res_blocks + 1 per decoder level (up_blocks.0 is the
    lowest resolution)."""
    cfg = AutoencoderConfig(ch=32, ch_mult=(1, 1, 1, 2), attn_resolutions=(32,))  # as vq-f8: level 3 of 4
    assert attention_levels(cfg) == [False, False, False, True]
    with torch.device("meta"):
        keys = build_autoencoder(cfg).state_dict().keys()
    blocks = sorted(k.removesuffix(".to_q.weight") for k in keys if k.endswith(".to_q.weight"))
    encoder = [f"encoder.down_blocks.3.attentions.{j}" for j in range(2)] + ["encoder.mid_block.attentions.0"]
    decoder = ["decoder.mid_block.attentions.0"] + [f"decoder.up_blocks.0.attentions.{j}" for j in range(3)]
    assert blocks == decoder + encoder
    with torch.device("meta"):
        none = build_autoencoder(replace(KL_TINY[0], mid_attention=False)).state_dict().keys()
    assert not any(".attentions." in k for k in none)


def test_configs_without_the_attention_fields_load_as_before():
    """Weight files store the config as JSON; files written before these fields existed lack them."""
    old = json.loads(config_to_json(VQ_F4))
    for field in ("resolution", "attn_resolutions", "mid_attention"):
        del old[field]
    cfg = config_from_json(AutoencoderConfig, json.dumps(old))
    assert cfg == VQ_F4 and (cfg.resolution, cfg.attn_resolutions, cfg.mid_attention) == (256, (), True)


# --- the CompVis zoo's first stages against the ORIGINAL code (tests/compvis_refs, its README 3.10) --------
# Each folder: the released yaml with sizes shrunk, a tiny random model.ckpt and reference.safetensors, the
# outputs of CompVis/latent-diffusion's own AutoencoderKL / VQModel (float32, CPU, 1 thread).
#
# Measured max |diff| (float32, 1 thread), ldm_mini as it is (diffusers' numerics):
#   encode (moments, mean, std, sample; VQ h, quant)  kl-f4 5.7e-6 (sample, |ref| <= 17.6), kl-f8 9.8e-7,
#       kl-f16 8.9e-7, kl-f32 1.7e-6, vq-f4 1.7e-6, vq-f4-noattn 1.7e-6, vq-f8 2.1e-6, vq-f8-n256 1.7e-6,
#       vq-f16 6.3e-7; VQ indices equal
#   decode (from the reference's own latent, VQ: quant and h)  kl-f4 6.9e-7, kl-f8 1.1e-6, kl-f16 3.4e-6,
#       kl-f32 3.5e-6, vq-f4 1.4e-6, vq-f4-noattn 7.2e-7, vq-f8 1.3e-6, vq-f8-n256 1.4e-6, vq-f16 3.6e-6
#   VQ reconstruction model(image) (the quantiser snaps away the encoder's rounding)  <= 2.8e-6
# The KL reconstruction decode(encode(x)) chains the two and is checked with the original's formulas only:
# kl-f16's decoder amplifies the encoder's 8e-7 rounding difference ~20x, to 1.6e-5 (kl-f4/f8/f32: 2.8e-6,
# 2.3e-6, 4.4e-6). That is the tiny random network, not an error: the same model in float64 is 1.8e-5 from
# the original's float32 output, which itself is that far from the exact value.
# Where the differences come from, found by swapping formulas: ldm_mini computes SiLU as F.silu and the
# attention as diffusers does (GroupNorm on (B, C, h*w), Linear, scaled_dot_product_attention); the original
# writes x * sigmoid(x) and bmm(q, k) * C^-0.5, softmax, bmm with 1x1 convs. With those two (compvis_math
# below) every output, reconstructions included, equals the original's: max |diff| 0.0 for all nine.
REFS = Path(__file__).parent / "compvis_refs"
FIRST_STAGES = ["kl-f4", "kl-f8", "kl-f16", "kl-f32",
                "vq-f4", "vq-f4-noattn", "vq-f8", "vq-f8-n256", "vq-f16"]  # fmt: skip
REF_ATOL = 1e-5


def compvis_first_stage(name: str) -> tuple[AutoencoderKL | VQModel, dict[str, torch.Tensor]]:
    """The tiny first stage of tests/compvis_refs/<name> through the converter's tables (loss.* dropped),
    strictly loaded; and its reference tensors."""
    from weights_tools import compvis

    folder = REFS / name
    cfg = compvis.autoencoder_config(yaml.safe_load((folder / "config.yaml").read_text())["model"], name)
    state = torch.load(folder / "model.ckpt", weights_only=True)["state_dict"]  # deflated zip: no mmap
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    model = build_autoencoder(cfg).eval()
    model.load_state_dict(compvis.translate(state, compvis.autoencoder_modules(cfg), "", "", {}), strict=True)
    return model, load_file(folder / "reference.safetensors")


@torch.no_grad()
def first_stage_outputs(model: AutoencoderKL | VQModel, refs: dict) -> dict[str, tuple[torch.Tensor, str]]:
    """name -> (ldm_mini's output, the reference tensor it must equal), for the calls of reference.json.
    Decodes start from the reference's own latent (each call checked alone); `reconstruction` chains them."""
    img = refs["image"]
    if model.config.kind == "kl":
        post = model.encode(img)
        return {
            "moments": (model.quant_conv(model.encoder(img)), "moments"),
            "posterior_mean": (post.mean, "posterior_mean"),
            "posterior_std": (post.std, "posterior_std"),
            "posterior_sample": (post.mean + post.std * refs["sample_noise"], "posterior_sample"),
            "decode": (model.decode(refs["posterior_mean"]), "decoded_mode"),
            "reconstruction": (model(img), "decoded_mode"),
        }
    h = model.encode(img)
    quant, indices = model.quantize(h)
    return {
        "h": (h, "h"),
        "quant": (quant, "quant"),
        "indices": (indices.flatten(), "indices"),  # (B*h*w,) row-major, as VectorQuantizer2's
        "decode": (model.decode(refs["quant"], quantize=False), "decoded_quant"),  # VQModel.decode(quant)
        "decode(quantize=False)": (model.decode(refs["h"], quantize=False), "decoded_noquant"),
        "reconstruction": (model(img), "decoded_quant"),
    }


def compvis_math(monkeypatch) -> None:
    """The original's own formulas (diffusionmodules/model.py) in place of ldm_mini's: `nonlinearity` is
    x * sigmoid(x), and AttnBlock runs its 1x1 convs on the 4-D map and two bmm's around a softmax."""

    def attn_block(self, x):
        b, c, h, w = x.shape
        y = self.group_norm(x)
        q, k, v = (F.conv2d(y, p.weight[:, :, None, None], p.bias) for p in (self.to_q, self.to_k, self.to_v))
        w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * int(c) ** (-0.5)
        w_ = torch.softmax(w_, dim=2)  # (B, hw of q, hw of k)
        y = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + F.conv2d(y, self.to_out.weight[:, :, None, None], self.to_out.bias)

    monkeypatch.setattr(autoencoder.SelfAttention, "forward", attn_block)
    monkeypatch.setattr(torch.nn.functional, "silu", lambda x, inplace=False: x * torch.sigmoid(x))


def check_against_the_original(model: AutoencoderKL | VQModel, refs: dict, monkeypatch) -> dict[str, float]:
    """Every output of first_stage_outputs at REF_ATOL (but the KL reconstruction, see above FIRST_STAGES),
    then all of them with the original's formulas; -> max |diff| per output."""
    diffs = {}
    for key, (ours, ref) in first_stage_outputs(model, refs).items():
        if key == "indices":
            assert torch.equal(ours, refs[ref]), "codebook indices differ"
        elif not (key == "reconstruction" and model.config.kind == "kl"):
            check(key, ours, refs[ref], diffs, atol=REF_ATOL)
    with monkeypatch.context() as patched:
        compvis_math(patched)
        for key, (ours, ref) in first_stage_outputs(model, refs).items():
            check(f"{key} (original's formulas)", ours.float(), refs[ref].float(), diffs, atol=REF_ATOL)
    return diffs


@pytest.mark.parametrize("name", FIRST_STAGES)
def test_compvis_first_stage_matches_the_original(name, monkeypatch):
    model, refs = compvis_first_stage(name)
    cfg = model.config
    assert cfg.mid_attention == (name != "vq-f4-noattn")
    assert bool(cfg.attn_resolutions) == (name in ("kl-f16", "kl-f32", "vq-f8", "vq-f8-n256", "vq-f16"))
    diffs = check_against_the_original(model, refs, monkeypatch)
    print(name, "max abs diff", {k: f"{v:.1e}" for k, v in diffs.items()})
