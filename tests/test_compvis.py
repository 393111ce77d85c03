"""Original CompVis checkpoints -> weights_tools.convert -> ldm_mini.load: the same outputs as diffusers.

No original code is vendored. Each test builds tiny diffusers models with random weights, writes them in the
ORIGINAL CompVis layout through a reverse mapping written here (diffusers -> CompVis), wraps them like a
Lightning .ckpt, writes a yaml shaped like the published ones, converts, and compares ldm_mini's outputs with
the diffusers models'. The reverse mapping is checked on its own: against diffusers' single-file conversion
(loaders/single_file_utils.py) where that applies, and against the original math written out as functions
(QKVAttentionLegacy for the fused qkv, x-transformers' forward for BERTEmbedder) where it does not.

Tolerance: float32 on CPU, outputs of order 1; atol=1e-5 is far above round-off of these tiny models and
far below any mapping mistake (a swapped head or q/k: ~1e-1).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import randomize_

from ldm_mini import load
from ldm_mini.loading import build_empty, read_metadata
from ldm_mini.unet import UNet
from weights_tools import compvis
from weights_tools.common import ConversionError
from weights_tools.convert import convert

ATOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]
REALCONFIGS = ROOT / "tests" / "realconfigs" / "compvis"
MAX_DIFF: dict[str, float] = {}  # printed at the end of the module (pytest -s): the numbers of the report


def close(name: str, ours, ref):
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)
    MAX_DIFF[name] = max(MAX_DIFF.get(name, 0.0), (ours - ref).abs().max().item())


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for name, diff in sorted(MAX_DIFF.items()):
        print(f"\nmax abs diff {name}: {diff:.2e}")


# --- the reverse mapping: diffusers keys -> CompVis keys -------------------------------------------------
RESNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]


def rename_start(rest: str, rows) -> str:
    for new, old in rows:
        if rest.startswith(new):
            return old + rest[len(new) :]
    raise KeyError(rest)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Three Linear (C, C) (or biases (C,)) -> the legacy Conv1d qkv (3C, C, 1): [q_h k_h v_h] per head."""
    per_head = torch.stack(
        [t.reshape(heads, -1, *t.shape[1:]) for t in (q, k, v)], dim=1
    )  # (heads, 3, d[, C])
    fused = per_head.reshape(-1, *q.shape[1:])
    return fused[..., None] if q.ndim == 2 else fused


def unet_to_compvis(ref) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel / UNet2DModel state -> openaimodel.UNetModel state."""
    sd, cfg = ref.state_dict(), ref.config
    n, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    attn_levels = {i for i, t in enumerate(cfg.down_block_types) if "Attn" in t}
    cross = cfg.get("cross_attention_dim") is not None and type(ref).__name__ == "UNet2DConditionModel"
    fixed = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    out = {}
    for key, value in sd.items():
        module = None
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            lvl, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            module = f"down_blocks.{lvl}.{kind}.{j}"
            block = f"input_blocks.{1 + lvl * (n + 1) + j}.{0 if kind == 'resnets' else 1}."
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            out[f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"] = value
            continue
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):  # resblock_updown
            out[f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.{rename_start(m[2], RESNET)}"] = value
            continue
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.*)", key):
            kind, rest = m[1], m[3]
            module = f"mid_block.{kind}.{m[2]}"
            block = f"middle_block.{ {'resnets.0': 0, 'attentions.0': 1, 'resnets.1': 2}[f'{kind}.{m[2]}'] }."
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            u, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            module = f"up_blocks.{u}.{kind}.{j}"
            block = f"output_blocks.{u * (n + 1) + j}.{0 if kind == 'resnets' else 1}."
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            u = int(m[1])
            slot = 2 if (levels - 1 - u) in attn_levels else 1
            out[f"output_blocks.{u * (n + 1) + n}.{slot}.conv.{m[2]}"] = value
            continue
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):  # resblock_updown: a ResBlock
            u = int(m[1])
            slot = 2 if (levels - 1 - u) in attn_levels else 1
            out[f"output_blocks.{u * (n + 1) + n}.{slot}.{rename_start(m[2], RESNET)}"] = value
            continue
        else:
            prefix = next(p for p in fixed if key.startswith(p))
            out[fixed[prefix] + key[len(prefix) :]] = value
            continue
        if kind == "resnets":
            out[block + rename_start(rest, RESNET)] = value
        elif cross:  # SpatialTransformer: the same names
            out[block + rest] = value
        elif rest.startswith("to_q."):  # legacy AttentionBlock: fused qkv Conv1d
            heads, leaf = ref.get_submodule(module).heads, rest[len("to_q.") :]
            qkv = [sd[f"{module}.{p}.{leaf}"] for p in ("to_q", "to_k", "to_v")]
            out[block + "qkv." + leaf] = fuse_qkv(*qkv, heads)
        elif rest.startswith(("to_k.", "to_v.")):
            continue
        elif rest.startswith("to_out.0."):
            out[block + "proj_out." + rest[len("to_out.0.") :]] = (
                value[..., None] if value.ndim == 2 else value
            )
        else:
            out[block + rename_start(rest, [("group_norm.", "norm.")])] = value
    return out


def autoencoder_to_compvis(ref) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL / VQModel state -> ldm.models.autoencoder state (decoder levels reversed;
    attention of Attn*EncoderBlock2D / Attn*DecoderBlock2D levels -> down.L.attn.j / up.L.attn.j)."""
    levels = len(ref.config.block_out_channels)
    attention = [
        ("group_norm.", "norm."),
        ("to_q.", "q."),
        ("to_k.", "k."),
        ("to_v.", "v."),
        ("to_out.0.", "proj_out."),
    ]
    out = {}
    for key, value in ref.state_dict().items():
        if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            lvl = int(m[3]) if m[1] == "encoder" else levels - 1 - int(m[3])
            new = f"{m[1]}.{m[2]}.{lvl}.block.{m[4]}.{m[5].replace('conv_shortcut.', 'nin_shortcut.')}"
        elif m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            lvl = int(m[3]) if m[1] == "encoder" else levels - 1 - int(m[3])
            new = f"{m[1]}.{m[2]}.{lvl}.attn.{m[4]}.{rename_start(m[5], attention)}"
            value = value[:, :, None, None] if value.ndim == 2 else value  # Linear -> 1x1 Conv2d
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut.', 'nin_shortcut.')}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            new = f"{m[1]}.mid.attn_1.{rename_start(m[2], attention)}"
            value = value[:, :, None, None] if value.ndim == 2 else value  # Linear -> 1x1 Conv2d
        else:
            new = key.replace("conv_norm_out.", "norm_out.")
        out[new] = value
    return out


def bert_to_compvis(ref) -> dict[str, torch.Tensor]:
    """diffusers LDMBertModel state -> BERTEmbedder state (x-transformers TransformerWrapper)."""
    fixed = [
        ("model.embed_tokens.", "transformer.token_emb."),
        ("model.embed_positions.", "transformer.pos_emb.emb."),
        ("model.layer_norm.", "transformer.norm."),
        ("to_logits.", "transformer.to_logits."),
    ]
    layer = [
        ("self_attn_layer_norm.", "{a}.0."),
        ("self_attn.q_proj.", "{a}.1.to_q."),
        ("self_attn.k_proj.", "{a}.1.to_k."),
        ("self_attn.v_proj.", "{a}.1.to_v."),
        ("self_attn.out_proj.", "{a}.1.to_out."),
        ("final_layer_norm.", "{f}.0."),
        ("fc1.", "{f}.1.net.0.0."),
        ("fc2.", "{f}.1.net.2."),
    ]
    out = {}
    for key, value in ref.state_dict().items():
        if m := re.match(r"model\.layers\.(\d+)\.(.*)", key):
            i = int(m[1])
            new = rename_start(m[2], layer).format(
                a=f"transformer.attn_layers.layers.{2 * i}", f=f"transformer.attn_layers.layers.{2 * i + 1}"
            )
        else:
            new = rename_start(key, fixed)
        out[new] = value
    return out


# --- tiny models: diffusers references and the yaml of the same architecture -----------------------------
def unet_yaml(**params) -> dict:
    return {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {"image_size": 8, **params},
    }


def first_stage_yaml(kind: str) -> dict:
    kl = kind == "kl"
    dd = {
        "double_z": kl,
        "z_channels": 4 if kl else 3,
        "resolution": 32,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    params = {"embed_dim": 4, "monitor": "val/rec_loss"} if kl else {"embed_dim": 3, "n_embed": 16}
    target = "ldm.models.autoencoder." + ("AutoencoderKL" if kl else "VQModelInterface")
    return {
        "target": target,
        "params": {**params, "ddconfig": dd, "lossconfig": {"target": "torch.nn.Identity"}},
    }


def ldm_yaml(unet: dict, first_stage: dict, cond, **params) -> dict:
    return {
        "model": {
            "base_learning_rate": 1e-6,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.0015,
                "linear_end": 0.0195,
                "timesteps": 1000,
                "first_stage_key": "image",
                "image_size": 8,
                **params,
                "unet_config": unet,
                "first_stage_config": first_stage,
                "cond_stage_config": cond,
            },
        }
    }


def diffusers_kl():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )


def diffusers_vq():
    from diffusers import VQModel

    return VQModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=3,
        num_vq_embeddings=16,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )


def diffusers_bert(vocab_size: int = 30522):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    # x-transformers' defaults: 8 heads of 64 channels, feed-forward 4 x n_embed
    return LDMBertModel(
        LDMBertConfig(
            vocab_size=vocab_size,
            max_position_embeddings=77,
            encoder_layers=2,
            encoder_ffn_dim=128,
            d_model=32,
            encoder_attention_heads=8,
            head_dim=64,
        )
    )


def diffusers_unet(kind: str):
    from diffusers import UNet2DConditionModel, UNet2DModel

    if kind == "txt2img":  # attention at ds 1 and 2, num_heads 2
        return UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2,
            attention_head_dim=2,
            cross_attention_dim=32,
            norm_num_groups=32,
        )
    if kind == "unconditional":  # celebahq-like: attention at ds 2, num_head_channels 8 (4 and 8 heads)
        return UNet2DModel(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            norm_num_groups=32,
        )
    # superres (bsr_sr-like): 6 = 3 + 3 input channels, attention at ds 4 only (ds 16 never reached), 2 heads
    return UNet2DModel(
        sample_size=8,
        in_channels=6,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        norm_num_groups=32,
    )


def tiny_yaml(kind: str, use_tokenizer: bool = True) -> dict:
    if kind == "txt2img":
        unet = unet_yaml(
            in_channels=4,
            out_channels=4,
            model_channels=32,
            attention_resolutions=[2, 1],
            num_res_blocks=1,
            channel_mult=[1, 2],
            num_heads=2,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=32,
            use_checkpoint=True,
            legacy=False,
        )
        bert = {"n_embed": 32, "n_layer": 2}
        if not use_tokenizer:
            bert.update(use_tokenizer=False, vocab_size=41)
        cond = {"target": "ldm.modules.encoders.modules.BERTEmbedder", "params": bert}
        return ldm_yaml(
            unet,
            first_stage_yaml("kl"),
            cond,
            linear_start=0.00085,
            linear_end=0.012,
            conditioning_key="crossattn",
            scale_factor=0.18215,
            use_ema=False,
            cond_stage_key="caption",
        )
    if kind == "unconditional":
        unet = unet_yaml(
            in_channels=3,
            out_channels=3,
            model_channels=32,
            attention_resolutions=[2],
            num_res_blocks=1,
            channel_mult=[1, 2],
            num_head_channels=8,
        )
        return ldm_yaml(unet, first_stage_yaml("vq"), "__is_unconditional__", concat_mode=False)
    unet = unet_yaml(
        in_channels=6,
        out_channels=3,
        model_channels=32,
        attention_resolutions=[16, 4],
        num_res_blocks=1,
        channel_mult=[1, 2, 2],
        num_heads=2,
    )
    return ldm_yaml(
        unet,
        first_stage_yaml("vq"),
        {"target": "torch.nn.Identity"},
        linear_end=0.0155,
        concat_mode=True,
        cond_stage_key="LR_image",
    )


def schedule_buffers(params: dict) -> dict[str, torch.Tensor]:
    """DDPM.register_schedule's buffers, computed like the original (float64, then float32)."""
    betas = (
        torch.linspace(params["linear_start"] ** 0.5, params["linear_end"] ** 0.5, 1000, dtype=torch.float64)
        ** 2
    )
    ac = torch.cumprod(1 - betas, 0)
    return {
        "betas": betas.float(),
        "alphas_cumprod": ac.float(),
        "sqrt_alphas_cumprod": ac.sqrt().float(),
        "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]]).float(),
    }


def lightning_ckpt(state: dict[str, torch.Tensor]) -> dict:
    return {
        "epoch": 3,
        "global_step": 1234,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-6}]}],
        "lr_schedulers": [],
    }


def tiny_checkpoint(folder: Path, kind: str, seed: int = 0, ema: bool = False, use_tokenizer: bool = True):
    """Write folder/{kind}.ckpt and .yaml; returns (ckpt, yaml, dict of the diffusers reference models)."""
    refs = {
        "unet": randomize_(diffusers_unet(kind), seed).eval(),
        "vae": randomize_(diffusers_kl() if kind == "txt2img" else diffusers_vq(), seed + 1).eval(),
    }
    config = tiny_yaml(kind, use_tokenizer)
    state = {"model.diffusion_model." + k: v for k, v in unet_to_compvis(refs["unet"]).items()}
    state.update({"first_stage_model." + k: v for k, v in autoencoder_to_compvis(refs["vae"]).items()})
    if kind == "txt2img":
        refs["bert"] = randomize_(diffusers_bert(30522 if use_tokenizer else 41), seed + 2).eval()
        state.update({"cond_stage_model." + k: v for k, v in bert_to_compvis(refs["bert"]).items()})
    state.update(schedule_buffers(config["model"]["params"]))
    if ema:  # the raw weights are another random draw; the EMA shadow is the reference model
        refs["raw_unet"] = randomize_(diffusers_unet(kind), seed + 7).eval()
        shadow = {k: state[k] for k in state if k.startswith("model.diffusion_model.")}
        for k, v in unet_to_compvis(refs["raw_unet"]).items():
            state["model.diffusion_model." + k] = v
        state.update({"model_ema." + k.removeprefix("model.").replace(".", ""): v for k, v in shadow.items()})
        state.update(
            {
                "model_ema.decay": torch.tensor(0.9999),
                "model_ema.num_updates": torch.tensor(5, dtype=torch.int),
            }
        )
    ckpt, yaml_path = folder / f"{kind}.ckpt", folder / f"{kind}.yaml"
    torch.save(lightning_ckpt(state), ckpt)
    yaml_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return ckpt, yaml_path, refs


# --- the reverse mapping, checked independently ---------------------------------------------------------
LEGACY_ATTENTION_MODULES = re.compile(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.")


@pytest.mark.parametrize("kind", ["txt2img", "unconditional", "superres"])
def test_reverse_unet_mapping_agrees_with_diffusers_single_file(kind):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ref = randomize_(diffusers_unet(kind), 0)
    ckpt = {"model.diffusion_model." + k: v for k, v in unet_to_compvis(ref).items()}
    back = convert_ldm_unet_checkpoint(ckpt, dict(ref.config))
    want = ref.state_dict()
    if kind != "txt2img":  # diffusers' single-file path keeps legacy qkv fused: checked in the next test
        want = {k: v for k, v in want.items() if not LEGACY_ATTENTION_MODULES.match(k)}
        back = {k: v for k, v in back.items() if not LEGACY_ATTENTION_MODULES.match(k)}
    assert back.keys() == want.keys()
    assert all(torch.equal(back[k], want[k]) for k in want)


def legacy_attention_block(x, sd: dict, prefix: str, heads: int):
    """openaimodel.AttentionBlock with QKVAttentionLegacy, from the fused CompVis weights, written out."""
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)  # (B, C, T)
    qkv = F.conv1d(
        F.group_norm(x, 32, sd[prefix + "norm.weight"], sd[prefix + "norm.bias"], eps=1e-5),
        sd[prefix + "qkv.weight"],
        sd[prefix + "qkv.bias"],
    )  # (B, 3C, T)
    q, k, v = qkv.reshape(b * heads, 3 * c // heads, -1).split(c // heads, dim=1)  # heads split first
    scale = (c // heads) ** -0.25
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    h = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    h = F.conv1d(h, sd[prefix + "proj_out.weight"], sd[prefix + "proj_out.bias"])
    return (x + h).reshape(b, c, *spatial)


@torch.no_grad()
def test_reverse_legacy_attention_is_the_original_qkv_layout():
    ref = randomize_(diffusers_unet("unconditional"), 0).eval()
    sd = unet_to_compvis(ref)
    x = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(0))
    for ours, theirs in [
        ("mid_block.attentions.0", "middle_block.1."),
        ("down_blocks.1.attentions.0", "input_blocks.3.1."),
        ("up_blocks.0.attentions.1", "output_blocks.1.1."),
    ]:
        module = ref.get_submodule(ours)
        assert module.heads == 8
        close(
            "reverse mapping: legacy qkv attention",
            legacy_attention_block(x, sd, theirs, module.heads),
            module(x),
        )


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_reverse_autoencoder_mapping_agrees_with_diffusers_single_file(kind):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ref = randomize_(diffusers_kl() if kind == "kl" else diffusers_vq(), 0)
    ckpt = {"first_stage_model." + k: v for k, v in autoencoder_to_compvis(ref).items()}
    back = convert_ldm_vae_checkpoint(ckpt, dict(ref.config))
    want = ref.state_dict()
    # diffusers' KL-oriented path has no row for the VQ codebook; it is the same name in both layouts
    assert want.keys() - back.keys() == ({"quantize.embedding.weight"} if kind == "vq" else set())
    assert all(torch.equal(back[k], want[k]) for k in back)


def x_transformer(ids, sd: dict, n_layer: int, heads: int = 8):
    """BERTEmbedder's TransformerWrapper(return_embeddings=True) from CompVis weights, written out."""
    x = sd["transformer.token_emb.weight"][ids] + sd["transformer.pos_emb.emb.weight"][: ids.shape[1]]
    dim = x.shape[-1]
    for i in range(n_layer):
        a, f = f"transformer.attn_layers.layers.{2 * i}.", f"transformer.attn_layers.layers.{2 * i + 1}."
        h = F.layer_norm(x, (dim,), sd[a + "0.weight"], sd[a + "0.bias"])
        q, k, v = (
            F.linear(h, sd[a + f"1.to_{n}.weight"]).unflatten(-1, (heads, -1)).transpose(1, 2) for n in "qkv"
        )
        attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        x = x + F.linear(
            (attn @ v).transpose(1, 2).flatten(2), sd[a + "1.to_out.weight"], sd[a + "1.to_out.bias"]
        )
        h = F.layer_norm(x, (dim,), sd[f + "0.weight"], sd[f + "0.bias"])
        h = F.gelu(F.linear(h, sd[f + "1.net.0.0.weight"], sd[f + "1.net.0.0.bias"]))
        x = x + F.linear(h, sd[f + "1.net.2.weight"], sd[f + "1.net.2.bias"])
    return F.layer_norm(x, (dim,), sd["transformer.norm.weight"], sd["transformer.norm.bias"])


@torch.no_grad()
def test_reverse_bert_mapping_is_the_x_transformers_layout():
    ref = randomize_(diffusers_bert(41), 0).eval()
    ids = torch.randint(0, 41, (2, 77), generator=torch.Generator().manual_seed(0))
    close("reverse mapping: x-transformers BERT", x_transformer(ids, bert_to_compvis(ref), 2), ref(ids)[0])


# --- conversion end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def txt2img(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compvis_txt2img")
    ckpt, yaml_path, refs = tiny_checkpoint(tmp, "txt2img")
    return refs, convert(ckpt, tmp / "txt2img.safetensors", config=yaml_path), ckpt, yaml_path


@torch.no_grad()
def test_txt2img_matches_diffusers(txt2img):
    from transformers import BertTokenizer

    refs, path, _, _ = txt2img
    m = load(path)
    assert m.kind == "txt2img" and m.scale_factor == pytest.approx(0.18215)
    assert m.schedule.beta_schedule == "scaled_linear" and m.schedule.steps_offset == 1
    assert not m.schedule.set_alpha_to_one and m.schedule.beta_start == 0.00085
    prompts = ["a painting of a squirrel eating a burger", "Zebras, très CHIC!"]
    tokenizer = BertTokenizer(str(compvis.VOCAB))
    ref_ids = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    ids = m.tokenize(prompts)
    assert torch.equal(ids, ref_ids)
    context = m.encode_text(ids)
    close("txt2img: LDMBert", context, refs["bert"](ids)[0])
    x, t = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1)), torch.tensor([981, 1])
    close("txt2img: UNet eps", m.predict_noise(x, t, context), refs["unet"](x, t, context).sample)
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    close(
        "txt2img: KL encoder mean", m.autoencoder.encode(img).mean, refs["vae"].encode(img).latent_dist.mean
    )
    close("txt2img: KL decode", m.decode(x), refs["vae"].decode(x / 0.18215).sample)


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compvis_uncond")
    ckpt, yaml_path, refs = tiny_checkpoint(tmp, "unconditional", ema=True)
    return refs, convert(ckpt, tmp / "celebahq.safetensors", config=yaml_path), ckpt, yaml_path, tmp


@torch.no_grad()
def test_unconditional_uses_ema_weights_by_default(unconditional):
    refs, path, _, _, _ = unconditional
    m = load(path)
    assert m.kind == "unconditional" and m.scale_factor == 1.0 and m.text_encoder is None
    assert "EMA" in read_metadata(path)["source"]
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([999, 10])
    close("unconditional: UNet eps (EMA)", m.predict_noise(x, t), refs["unet"](x, t).sample)
    img = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    close("unconditional: VQ encoder", m.autoencoder.encode(img), refs["vae"].encode(img).latents)
    close("unconditional: VQ decode", m.decode(x), refs["vae"].decode(x).sample)


@torch.no_grad()
def test_no_ema_keeps_raw_weights_and_ema_needs_shadows(unconditional, txt2img):
    refs, _, ckpt, yaml_path, tmp = unconditional
    raw = load(convert(ckpt, tmp / "raw.safetensors", config=yaml_path, ema=False))
    x, t = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    close("unconditional: UNet eps (--no-ema)", raw.predict_noise(x, t), refs["raw_unet"](x, t).sample)
    # yaml use_ema: false: the original builds no LitEma and ignores the shadows; --ema still takes them
    config = yaml.safe_load(yaml_path.read_text())
    config["model"]["params"]["use_ema"] = False
    (tmp / "no_ema.yaml").write_text(yaml.safe_dump(config))
    default = load(convert(ckpt, tmp / "default.safetensors", config=tmp / "no_ema.yaml"))
    assert all(torch.equal(v, raw.state_dict()[k]) for k, v in default.state_dict().items())
    forced = load(convert(ckpt, tmp / "forced.safetensors", config=tmp / "no_ema.yaml", ema=True))
    close("unconditional: UNet eps (EMA)", forced.predict_noise(x, t), refs["unet"](x, t).sample)
    _, _, ckpt2, yaml2 = txt2img
    with pytest.raises(ConversionError, match="--ema: the checkpoint has no model_ema"):
        convert(ckpt2, tmp / "ema.safetensors", config=yaml2, ema=True)


@torch.no_grad()
def test_superres_via_cli(tmp_path):
    ckpt, yaml_path, refs = tiny_checkpoint(tmp_path, "superres")
    out = tmp_path / "sr.safetensors"
    run = subprocess.run(
        [sys.executable, "-m", "weights_tools.convert", str(ckpt), str(out), "--config", str(yaml_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout
    m = load(out)
    assert m.kind == "superres" and m.scale_factor == 1.0 and m.schedule.beta_end == 0.0155
    x, low = (
        torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
        torch.rand(2, 3, 8, 8) * 2 - 1,
    )
    t = torch.tensor([999, 0])
    close(
        "superres: UNet eps (concat)",
        m.predict_noise(x, t, low),
        refs["unet"](torch.cat([x, low], 1), t).sample,
    )
    close("superres: VQ decode", m.decode(x), refs["vae"].decode(x).sample)


@torch.no_grad()
def test_bert_without_tokenizer(tmp_path):
    ckpt, yaml_path, refs = tiny_checkpoint(tmp_path, "txt2img", use_tokenizer=False)
    m = load(convert(ckpt, tmp_path / "ids.safetensors", config=yaml_path))
    assert m.tokenizer is None and "tokenizer_vocab" not in read_metadata(tmp_path / "ids.safetensors")
    with pytest.raises(ValueError, match="this model has no tokenizer"):
        m.tokenize(["a cat"])
    ids = torch.randint(0, 41, (1, 77), generator=torch.Generator().manual_seed(0))
    close("txt2img (use_tokenizer: false): LDMBert", m.encode_text(ids), refs["bert"](ids)[0])


# --- every published yaml at full size, on the meta device ----------------------------------------------
PUBLISHED = sorted(str(p.relative_to(REALCONFIGS)) for p in REALCONFIGS.rglob("*.yaml"))
COVERED = {  # yaml -> kind
    "configs/latent-diffusion/txt2img-1p4B-eval.yaml": "txt2img",
    "configs/latent-diffusion/celebahq-ldm-vq-4.yaml": "unconditional",
    "models/ldm/celeba256/config.yaml": "unconditional",
    "models/ldm/bsr_sr/config.yaml": "superres",
    "models/ldm/text2img256/config.yaml": "txt2img",
    # same model: section as celebahq (unconditional VQ-f4 LDMs)
    "configs/latent-diffusion/ffhq-ldm-vq-4.yaml": "unconditional",
    "configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml": "unconditional",
    "models/ldm/ffhq256/config.yaml": "unconditional",
    "models/ldm/lsun_beds256/config.yaml": "unconditional",
    # crossattn + BERTEmbedder(use_tokenizer: false) on layout tokens (cond_stage_key coordinates_bbox)
    "models/ldm/layout2img-openimages256/config.yaml": "layout",
    "configs/latent-diffusion/cin256-v2.yaml": "class",
    "models/ldm/semantic_synthesis256/config.yaml": "semantic",
    "models/ldm/semantic_synthesis512/config.yaml": "semantic",
    # scale-shift norm, ResBlock up/down-sampling, 5 levels, KL-f8 with the scale factor as a buffer
    "configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml": "unconditional",
    "models/ldm/lsun_churches256/config.yaml": "unconditional",
    # VQ-f8 with in-level attention (attn_resolutions [32]); ClassEmbedder of 1000 classes, no "no class" row
    "models/ldm/cin256/config.yaml": "class",
    "configs/latent-diffusion/cin-ldm-vq-f8.yaml": "class",
    # VQ-f4 without attention (attn_type none); cond_stage_model = first_stage_model (saved twice)
    "models/ldm/inpainting_big/config.yaml": "inpaint",
}
FIRST_STAGE_YAMLS = {  # first stages alone (convert_first_stage; tests/test_compvis_first_stages.py) -> kind
    **{f"models/first_stage_models/{n}/config.yaml": n[:2] for n in
       ("kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8", "vq-f8-n256", "vq-f16")},
    # the training configs of kl-f4, kl-f8, kl-f16, kl-f32
    **{f"configs/autoencoder/autoencoder_kl_{size}.yaml": "kl"
       for size in ("64x64x3", "32x32x4", "16x16x16", "8x8x64")},
}  # fmt: skip


def test_every_published_yaml_is_listed():
    assert sorted(COVERED.keys() | FIRST_STAGE_YAMLS.keys()) == PUBLISHED


def diffusers_unet_from_yaml(params: dict, p: dict):
    """The diffusers UNet of a yaml, by diffusers' own yaml reader where it has one (cross-attention)."""
    from diffusers import UNet2DConditionModel, UNet2DModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    if p.get("use_spatial_transformer"):
        cfg = create_unet_diffusers_config_from_ldm({"model": {"params": params}}, {}, image_size=256)
        if p.get("num_head_channels", -1) != -1:  # a head width: heads per level
            cfg["attention_head_dim"] = [
                p["model_channels"] * m // p["num_head_channels"] for m in p["channel_mult"]
            ]
        return UNet2DConditionModel(**cfg)
    chs = [p["model_channels"] * m for m in p["channel_mult"]]
    attn = [2**i in p["attention_resolutions"] for i in range(len(chs))]
    updown = p.get("resblock_updown", False)  # lsun_churches256: ResnetBlock2Ds resample
    down, up = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown else ("DownBlock2D", "UpBlock2D")
    )
    return UNet2DModel(
        in_channels=p["in_channels"],
        out_channels=p["out_channels"],
        block_out_channels=chs,
        layers_per_block=p["num_res_blocks"],
        attention_head_dim=p.get("num_head_channels") or None,
        down_block_types=["AttnDownBlock2D" if a else down for a in attn],
        up_block_types=["AttnUpBlock2D" if a else up for a in reversed(attn)],
        downsample_type="resnet" if updown else "conv",
        upsample_type="resnet" if updown else "conv",
        resnet_time_scale_shift="scale_shift" if p.get("use_scale_shift_norm") else "default",
        attn_norm_num_groups=32,  # else diffusers' scale_shift mid block has no attention GroupNorm
    )


def full_size_state(params: dict, unet_only: bool = False) -> dict[str, torch.Tensor]:
    """The CompVis state_dict of a published yaml, on the meta device: diffusers models built from the yaml,
    through the reverse mapping above."""
    from diffusers import AutoencoderKL, VQModel
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    with torch.device("meta"):
        unet = diffusers_unet_from_yaml(params, params["unet_config"]["params"])
        state = {"model.diffusion_model." + k: v for k, v in unet_to_compvis(unet).items()}
        if unet_only:
            return state
        stage = params["first_stage_config"]["params"]
        cfg = create_vae_diffusers_config_from_ldm({"model": {"params": params}}, {}, image_size=256)
        cfg.pop("scaling_factor")
        dd = stage["ddconfig"]  # diffusers' yaml reader ignores the in-level and the absent attention
        levels = [dd["resolution"] // 2**i in dd["attn_resolutions"] for i in range(len(dd["ch_mult"]))]
        cfg["down_block_types"] = [("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D") for a in levels]
        cfg["up_block_types"] = [("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D") for a in levels[::-1]]
        cfg["mid_block_add_attention"] = dd.get("attn_type", "vanilla") != "none"
        vae = (
            VQModel(**cfg, num_vq_embeddings=stage["n_embed"], vq_embed_dim=stage["embed_dim"])
            if "n_embed" in stage
            else AutoencoderKL(**cfg)
        )
        state.update({"first_stage_model." + k: v for k, v in autoencoder_to_compvis(vae).items()})
        cond = params["cond_stage_config"]
        if cond == "__is_first_stage__":  # inpainting: the same module under both names
            state.update({"cond_stage_model." + k[len("first_stage_model.") :]: v
                          for k, v in state.items() if k.startswith("first_stage_model.")})  # fmt: skip
        elif isinstance(cond, dict) and cond["target"].endswith("BERTEmbedder"):
            from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
                LDMBertConfig,
                LDMBertModel,
            )

            n, cp = cond["params"]["n_embed"], cond["params"]
            bert = LDMBertModel(
                LDMBertConfig(
                    d_model=n,
                    encoder_layers=cp["n_layer"],
                    encoder_ffn_dim=4 * n,
                    vocab_size=cp.get("vocab_size", 30522),  # BERTEmbedder's defaults
                    max_position_embeddings=cp.get("max_seq_len", 77),
                )
            )
            state.update({"cond_stage_model." + k: v for k, v in bert_to_compvis(bert).items()})
        elif isinstance(cond, dict) and cond["target"].endswith("ClassEmbedder"):
            cp = cond["params"]
            state["cond_stage_model.embedding.weight"] = torch.empty(
                cp.get("n_classes", 1000), cp["embed_dim"]
            )
        elif isinstance(cond, dict) and cond["target"].endswith("SpatialRescaler"):
            cp = cond["params"]
            state["cond_stage_model.channel_mapper.weight"] = torch.empty(
                cp["out_channels"], cp["in_channels"], 1, 1
            )
    return state


@pytest.mark.parametrize("name", sorted(COVERED))
def test_full_size_published_config_maps_every_key(name):
    yaml_path = REALCONFIGS / name
    params = yaml.safe_load(yaml_path.read_text())["model"]["params"]
    state = full_size_state(params)
    configs, use_ema = compvis.model_configs(yaml_path)
    assert configs["kind"] == COVERED[name]
    tensors, meta = compvis.convert_state_dict(state, configs, use_ema, ema=None, name=name)  # checks shapes
    want = build_empty(meta).state_dict()
    assert tensors.keys() == want.keys()
    assert all(tuple(tensors[k].shape) == tuple(want[k].shape) for k in want)
    dropped = [k for k in state if k.endswith(("to_logits.weight", "to_logits.bias"))]
    dropped += [k for k in state if k.startswith("cond_stage_model.") and COVERED[name] == "inpaint"]
    legacy_qkv = sum(k.endswith(".qkv.weight") for k in state)
    assert (
        len(tensors) == len(state) - len(dropped) + 4 * legacy_qkv
    )  # each fused qkv pair -> 3 weights, 3 biases


@pytest.mark.parametrize("name", sorted(FIRST_STAGE_YAMLS))
def test_first_stage_yamls_are_read_as_first_stages(name):
    assert compvis.is_first_stage(REALCONFIGS / name)
    assert compvis.first_stage_config(REALCONFIGS / name).kind == FIRST_STAGE_YAMLS[name]
    with pytest.raises(ConversionError, match="a first-stage autoencoder alone, not a LatentDiffusion model"):
        compvis.model_configs(REALCONFIGS / name)


def test_published_yamls_give_the_preset_configs():
    """The three published models' yaml files read into exactly the UNet presets (sizes, heads, trained latent
    size), their schedules, and the scale factors the paper uses."""
    from ldm_mini.unet import CELEBAHQ_256, SUPERRES_4X, TEXT2IM_256
    from weights_tools.compvis import model_configs

    root = Path(__file__).parent / "realconfigs" / "compvis"
    cases = [
        ("configs/latent-diffusion/txt2img-1p4B-eval.yaml", TEXT2IM_256, 0.18215, (0.00085, 0.012)),
        ("models/ldm/celeba256/config.yaml", CELEBAHQ_256, 1.0, (0.0015, 0.0195)),
        ("models/ldm/bsr_sr/config.yaml", SUPERRES_4X, 1.0, (0.0015, 0.0155)),
    ]
    for path, preset, scale, betas in cases:
        configs, _ = model_configs(root / path)
        assert configs["unet"] == preset, path
        assert configs["scale_factor"] == scale
        s = configs["schedule"]
        assert (s.beta_start, s.beta_end, s.beta_schedule) == (*betas, "scaled_linear")
        assert (s.steps_offset, s.set_alpha_to_one) == (1, False)  # the CompVis DDIM convention


# --- the zoo's UNets against the ORIGINAL code (tests/compvis_refs, README sections 3.3, 3.6) --------------
REFS = ROOT / "tests" / "compvis_refs"
ZOO_UNETS = {  # compvis_refs folder -> (released yaml, what apply_model concatenates to z_t)
    "lsun_churches256": ("models/ldm/lsun_churches256/config.yaml", None),  # scale-shift, updown, 5 levels
    "inpainting_big": ("models/ldm/inpainting_big/config.yaml", "eps.cond"),  # updown; masked latent + mask
}
UNET_PREFIX = "model.diffusion_model."


def zoo_unet_config(yaml_path: Path):
    params = yaml.safe_load(yaml_path.read_text())["model"]["params"]["unet_config"]["params"]
    return compvis.unet_config(params, str(yaml_path))


@pytest.mark.parametrize("name", sorted(ZOO_UNETS))
@torch.no_grad()
def test_zoo_unet_matches_the_original(name):
    """The tiny model.ckpt's UNet through unet_modules / translate, strictly into UNet: eps of the original
    apply_model, raw weights (eps.raw_t500) and the EMA shadows (eps.t500, eps.t_mixed; compvis.pick_ema)."""
    from safetensors.torch import load_file

    folder, (_, concat) = REFS / name, ZOO_UNETS[name]
    cfg = zoo_unet_config(folder / "config.yaml")
    ckpt = torch.load(folder / "model.ckpt", weights_only=True)["state_dict"]  # deflated zip: no mmap
    refs = load_file(folder / "reference.safetensors")
    x = refs["eps.x"] if concat is None else torch.cat([refs["eps.x"], refs[concat]], dim=1)  # (B, in, h, w)
    unet = UNet(cfg).eval()
    for weights, t, want in [("raw", 500, "eps.raw_t500"), ("EMA", 500, "eps.t500"),
                             ("EMA", refs["eps.t_mixed_t"], "eps.t_mixed")]:  # fmt: skip
        state = dict(ckpt)
        compvis.pick_ema(state, weights == "EMA", True, name)
        part = {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
        unet.load_state_dict(
            compvis.translate(part, compvis.unet_modules(cfg), UNET_PREFIX, "", {}), strict=True
        )
        close(f"{name}: UNet eps vs the original ({weights})", unet(x, t), refs[want])


@pytest.mark.parametrize("name", sorted(ZOO_UNETS))
def test_zoo_unet_full_size_keys_are_the_originals(name):
    """UNet(unet_config(released yaml)) on the meta device has exactly the keys and shapes of the original's
    full-size state_dict (full_size_keys.json.gz), mapped through unet_modules."""
    import gzip
    import json

    keys = json.loads(gzip.decompress((REFS / name / "full_size_keys.json.gz").read_bytes()))["keys"]
    cfg = zoo_unet_config(REALCONFIGS / ZOO_UNETS[name][0])
    with torch.device("meta"):
        state = {k: torch.empty(shape) for k, shape, _ in keys if k.startswith(UNET_PREFIX)}
        want = {k: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()}
    legacy_qkv = sum(k.endswith(".qkv.weight") for k in state)
    got = compvis.translate(state, compvis.unet_modules(cfg), UNET_PREFIX, "", {})
    assert len(got) == len(state) + 4 * legacy_qkv  # each fused qkv weight and bias -> 3
    assert {k: tuple(v.shape) for k, v in got.items()} == want
