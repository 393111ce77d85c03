"""Convert an original CompVis/latent-diffusion checkpoint (.ckpt + its .yaml) to ldm_mini's one-file format.

Two kinds of checkpoint, told apart by the yaml's model.target: a LatentDiffusion model (convert_checkpoint)
or a first-stage autoencoder alone, ldm.models.autoencoder.AutoencoderKL / VQModel (convert_first_stage; the
zoo's models/first_stage_models: keys encoder.*, decoder.*, quant_conv.*, post_quant_conv.*, VQ quantize.*,
and the training loss.* (LPIPS, discriminator), dropped). The rest of this docstring is about the first.

A CompVis .ckpt is a PyTorch Lightning checkpoint {"state_dict": ..., "optimizer_states": [...], ...}; only
"state_dict" is read (weights_only, see common.py). It is the state of one
`ldm.models.diffusion.ddpm.LatentDiffusion`, whose attributes prefix the keys:

    model.diffusion_model.*  the UNet (openaimodel.UNetModel): input_blocks.N.M, middle_block.M, output_..
    model_ema.*              LitEma's shadow of the UNet, dots removed: model_ema.diffusion_modelout0weight
    first_stage_model.*      the autoencoder (AutoencoderKL / VQModelInterface): encoder.down.N.block.M, ...
    cond_stage_model.*       the text encoder (BERTEmbedder): transformer.*, lucidrains' x-transformers layout
    betas, alphas_cumprod..  the DDPM schedule as buffers: dropped (recomputed; checked against the yaml)
    scale_factor             only when trained with scale_by_std (lsun_churches): it wins over the yaml

The yaml says what the keys do not: every size, the schedule, the latent scale factor and how the UNet is
conditioned. ldm_mini's key names are diffusers' (ldm_mini/unet.py, autoencoder.py, bert.py); the tables below
map each CompVis module to its ldm_mini module (MODULE TABLES) and the names inside it (FRAGMENT TABLES),
with each reshape beside its row. Three reshapes exist: 1x1 Conv2d/Conv1d weights where ldm_mini has a
Linear, and the fused per-head qkv of the UNet's legacy AttentionBlock, split into to_q / to_k / to_v.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import torch
import yaml
from torch import Tensor

from ldm_mini.autoencoder import AutoencoderConfig, attention_levels
from ldm_mini.bert import LDMBertConfig
from ldm_mini.conditioning import ClassEmbedderConfig, LayoutConfig, SpatialRescalerConfig
from ldm_mini.loading import (
    build_empty,
    build_empty_autoencoder,
    config_from_values,
    make_autoencoder_metadata,
    make_metadata,
)
from ldm_mini.schedule import ScheduleConfig, make_alphas_cumprod
from ldm_mini.unet import UNetConfig

from .common import ConversionError, read_tensors

VOCAB = Path(__file__).with_name("bert-base-uncased-vocab.txt")  # what BERTEmbedder's BertTokenizerFast loads
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"


# --- fragment tables: names inside one module (CompVis fragment, ldm_mini fragment, reshape) -------------
def linear(t: Tensor, heads: int) -> Tensor:
    """1x1 Conv2d (out, in, 1, 1) or Conv1d (out, in, 1) weight -> Linear (out, in); biases pass."""
    return t.reshape(t.shape[:2]) if t.ndim > 2 else t


def split_qkv(t: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """The legacy AttentionBlock's fused Conv1d qkv (3C, C, 1) -> q, k, v (C, C) each; bias (3C,) -> 3 x (C,).

    QKVAttentionLegacy splits HEADS first: the 3C rows are [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], d = C/heads
    rows each (openaimodel.py). A plain chunk(3) would mix heads."""
    t = linear(t, heads)
    per_head = t.reshape(heads, 3, t.shape[0] // (3 * heads), *t.shape[1:])  # (heads, qkv, d[, C])
    return tuple(per_head[:, i].reshape(-1, *t.shape[1:]) for i in range(3))  # (heads*d[, C])


SAME = [("", "", None)]  # names inside are already ldm_mini's (a conv, a norm, a SpatialTransformer)
RESBLOCK = [  # UNet ResBlock: Sequential slots -> named layers; also those that resample (resblock_updown)
    ("in_layers.0.", "norm1.", None),  # GroupNorm (slot 1 is SiLU)
    ("in_layers.2.", "conv1.", None),  # 3x3 conv
    ("emb_layers.1.", "time_emb_proj.", None),  # Linear(time_dim, C_out), or 2 C_out = [scale | shift] whole
    ("out_layers.0.", "norm2.", None),
    ("out_layers.3.", "conv2.", None),  # slot 2 is Dropout
    ("skip_connection.", "conv_shortcut.", None),  # 1x1 conv, only where the width changes
]
LEGACY_ATTENTION = [  # UNet AttentionBlock (celebahq, superres)
    ("norm.", "group_norm.", None),
    ("qkv.", ("to_q.", "to_k.", "to_v."), split_qkv),  # fused, per-head order (split_qkv)
    ("proj_out.", "to_out.", linear),  # Conv1d (C, C, 1) -> Linear (C, C)
]
DOWNSAMPLE = [("op.", "conv.", None)]  # stride-2 3x3 conv


def spatial_transformer(depth: int) -> list:
    """SpatialTransformer (text2im): CompVis' names are diffusers', hence ldm_mini's but for the Sequential
    slots that ldm_mini names (ldm_mini.loading.DIFFUSERS_RENAMES)."""
    rows = []
    for i in range(depth):
        block = f"transformer_blocks.{i}."
        rows += [
            (block + "attn1.to_out.0.", block + "attn1.to_out.", None),  # to_out.1 is Dropout
            (block + "attn2.to_out.0.", block + "attn2.to_out.", None),
            (block + "ff.net.0.proj.", block + "ff.proj_in.", None),  # GEGLU's value + gate Linear
            (block + "ff.net.2.", block + "ff.proj_out.", None),  # net.1 is Dropout
        ]
    return rows + SAME  # norms, proj_in/proj_out, to_q/to_k/to_v keep their names


FIRST_STAGE_RESNET = [
    ("nin_shortcut.", "conv_shortcut.", None),  # 1x1 conv where the width changes
    ("", "", None),  # norm1, conv1, norm2, conv2 keep their names
]
FIRST_STAGE_ATTENTION = [  # the autoencoders' AttnBlock (mid.attn_1, in-level attn.i): one head, 1x1 Conv2d
    ("norm.", "group_norm.", None),
    ("q.", "to_q.", linear),  # (C, C, 1, 1) -> (C, C)
    ("k.", "to_k.", linear),
    ("v.", "to_v.", linear),
    ("proj_out.", "to_out.", linear),
]
BERT_ATTENTION = [  # x-transformers layer 2i: (norm, Attention, Residual)
    ("0.", "self_attn_layer_norm.", None),  # pre-norm LayerNorm
    ("1.to_q.", "self_attn.q_proj.", None),  # no bias
    ("1.to_k.", "self_attn.k_proj.", None),
    ("1.to_v.", "self_attn.v_proj.", None),
    ("1.to_out.", "self_attn.out_proj.", None),
]
BERT_FEEDFORWARD = [  # x-transformers layer 2i+1: (norm, FeedForward, Residual)
    ("0.", "final_layer_norm.", None),
    ("1.net.0.0.", "fc1.", None),  # net.0 = Sequential(Linear, GELU)
    ("1.net.2.", "fc2.", None),  # net.1 is Dropout
]
DROP = [("", None, None)]  # weights ldm_mini does not use


class Target(NamedTuple):
    prefix: str  # the ldm_mini module the CompVis module becomes, with its trailing dot
    table: list  # fragment table for the names inside it
    heads: int = 0  # attention heads, for split_qkv


# --- module tables: CompVis module path -> Target, derived from the yaml's sizes ---------------------
def unet_modules(cfg: UNetConfig) -> dict[str, Target]:
    """openaimodel.UNetModel numbers its blocks in one running index; ldm_mini (= diffusers) nests them by
    level. input_blocks.0 is conv_in; each level then has num_res_blocks blocks [ResBlock, attention?] and,
    except the last, a Downsample block. output_blocks run from the lowest resolution up, num_res_blocks + 1
    per level, the last of a level ending with an Upsample (slot 2 after an attention, else slot 1). With
    resblock_updown that Downsample / Upsample is a ResBlock(down=True / up=True): ResBlock names."""
    attention = LEGACY_ATTENTION if cfg.context_dim is None else spatial_transformer(cfg.transformer_depth)
    chs = [cfg.model_channels * m for m in cfg.channel_mult]
    n = cfg.num_res_blocks
    m = {
        "time_embed.0": Target("time_embedding.linear_1.", SAME),  # slot 1 is SiLU
        "time_embed.2": Target("time_embedding.linear_2.", SAME),
        "input_blocks.0.0": Target("conv_in.", SAME),
        "middle_block.0": Target("mid_block.resnets.0.", RESBLOCK),
        "middle_block.1": Target("mid_block.attentions.0.", attention, cfg.heads(chs[-1])),
        "middle_block.2": Target("mid_block.resnets.1.", RESBLOCK),
        "out.0": Target("conv_norm_out.", SAME),  # slot 1 is SiLU
        "out.2": Target("conv_out.", SAME),
    }
    i = 1
    for level, ch in enumerate(chs):
        attends = 2**level in cfg.attention_resolutions  # attention_resolutions are downsampling factors
        for j in range(n):
            m[f"input_blocks.{i}.0"] = Target(f"down_blocks.{level}.resnets.{j}.", RESBLOCK)
            if attends:
                m[f"input_blocks.{i}.1"] = Target(
                    f"down_blocks.{level}.attentions.{j}.", attention, cfg.heads(ch)
                )
            i += 1
        if level < len(chs) - 1:
            down = RESBLOCK if cfg.resblock_updown else DOWNSAMPLE
            m[f"input_blocks.{i}.0"] = Target(f"down_blocks.{level}.downsamplers.0.", down)
            i += 1
    o = 0
    for u, level in enumerate(reversed(range(len(chs)))):
        attends = 2**level in cfg.attention_resolutions
        for j in range(n + 1):
            m[f"output_blocks.{o}.0"] = Target(f"up_blocks.{u}.resnets.{j}.", RESBLOCK)
            if attends:
                m[f"output_blocks.{o}.1"] = Target(
                    f"up_blocks.{u}.attentions.{j}.", attention, cfg.heads(chs[level])
                )
            if level > 0 and j == n:  # Upsample: its conv keeps the name; or a ResBlock(up=True)
                up = RESBLOCK if cfg.resblock_updown else SAME
                m[f"output_blocks.{o}.{2 if attends else 1}"] = Target(f"up_blocks.{u}.upsamplers.0.", up)
            o += 1
    return m


def autoencoder_modules(cfg: AutoencoderConfig) -> dict[str, Target]:
    """diffusionmodules/model.py Encoder/Decoder. The decoder's `up` list is stored REVERSED: up.0 is the
    highest resolution, run last; ldm_mini's up_blocks.0 is the lowest, run first. In-level attention:
    down.{L}.attn.{j} / up.{L}.attn.{j} after block j, at the levels attention_levels(cfg) names."""
    levels, attends = len(cfg.ch_mult), attention_levels(cfg)
    m = {
        "quant_conv": Target("quant_conv.", SAME),
        "post_quant_conv": Target("post_quant_conv.", SAME),
        "loss": Target("", DROP),  # its training loss (LPIPS, discriminator), when the lossconfig kept one
    }
    if cfg.kind == "vq":
        m["quantize"] = Target("quantize.", SAME)  # quantize.embedding.weight: codebook (n_embed, embed_dim)
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = Target(f"{part}.conv_in.", SAME)
        m[f"{part}.mid.block_1"] = Target(f"{part}.mid_block.resnets.0.", FIRST_STAGE_RESNET)
        if cfg.mid_attention:  # attn_type "none": mid.attn_1 is an nn.Identity, no weights
            m[f"{part}.mid.attn_1"] = Target(f"{part}.mid_block.attentions.0.", FIRST_STAGE_ATTENTION)
        m[f"{part}.mid.block_2"] = Target(f"{part}.mid_block.resnets.1.", FIRST_STAGE_RESNET)
        m[f"{part}.norm_out"] = Target(f"{part}.conv_norm_out.", SAME)
        m[f"{part}.conv_out"] = Target(f"{part}.conv_out.", SAME)
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            m[f"encoder.down.{level}.block.{j}"] = Target(
                f"encoder.down_blocks.{level}.resnets.{j}.", FIRST_STAGE_RESNET
            )
            if attends[level]:
                m[f"encoder.down.{level}.attn.{j}"] = Target(
                    f"encoder.down_blocks.{level}.attentions.{j}.", FIRST_STAGE_ATTENTION
                )
        if level < levels - 1:
            m[f"encoder.down.{level}.downsample"] = Target(
                f"encoder.down_blocks.{level}.downsamplers.0.", SAME
            )
        u = levels - 1 - level  # the reversal
        for j in range(cfg.num_res_blocks + 1):
            m[f"decoder.up.{level}.block.{j}"] = Target(
                f"decoder.up_blocks.{u}.resnets.{j}.", FIRST_STAGE_RESNET
            )
            if attends[level]:
                m[f"decoder.up.{level}.attn.{j}"] = Target(
                    f"decoder.up_blocks.{u}.attentions.{j}.", FIRST_STAGE_ATTENTION
                )
        if level > 0:
            m[f"decoder.up.{level}.upsample"] = Target(f"decoder.up_blocks.{u}.upsamplers.0.", SAME)
    return m


def bert_modules(cfg: LDMBertConfig) -> dict[str, Target]:
    """BERTEmbedder.transformer = TransformerWrapper; its attn_layers alternate attention (2i) and
    feed-forward (2i+1) layers, which ldm_mini (= diffusers LDMBert) pairs into layers.i."""
    m = {
        "transformer.token_emb": Target("embed_tokens.", SAME),
        "transformer.pos_emb.emb": Target("embed_positions.", SAME),
        "transformer.norm": Target("layer_norm.", SAME),  # the final LayerNorm
        "transformer.to_logits": Target("", DROP),  # LM head, unused with return_embeddings=True
    }
    for i in range(cfg.n_layer):
        m[f"transformer.attn_layers.layers.{2 * i}"] = Target(f"layers.{i}.", BERT_ATTENTION)
        m[f"transformer.attn_layers.layers.{2 * i + 1}"] = Target(f"layers.{i}.", BERT_FEEDFORWARD)
    return m


def translate(
    state: dict[str, Tensor], modules: dict[str, Target], theirs: str, ours: str, sources: dict[str, str]
) -> dict[str, Tensor]:
    """Keys `theirs` + CompVis name -> `ours` + ldm_mini name, through the module and fragment tables.
    `sources` records ldm_mini key -> CompVis key, for error messages."""
    out = {}
    for key, value in state.items():
        name = key[len(theirs) :]
        parts = name.split(".")
        # the longest module path in the table that the key starts with
        module = next(
            (".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in modules),
            None,
        )
        target = modules.get(module)
        inner = name[len(module) + 1 :] if module else ""
        row = next((r for r in target.table if inner.startswith(r[0])), None) if target else None
        if row is None:
            raise ConversionError(
                f"{key}: the yaml's model has no such weight: is the yaml the one for this checkpoint?"
            )
        old, new, reshape = row
        if new is None:
            continue
        try:
            value = value if reshape is None else reshape(value, target.heads)
        except RuntimeError as e:
            raise ConversionError(
                f"{key}: shape {tuple(value.shape)} does not fit the yaml's model ({e})"
            ) from e
        news, values = (new, value) if isinstance(new, tuple) else ((new,), (value,))
        for n, v in zip(news, values, strict=True):
            new_key = ours + target.prefix + n + inner[len(old) :]
            out[new_key], sources[new_key] = v, key
    return out


# --- the yaml -----------------------------------------------------------------------------------------
UNET_PARAMS = set(  # UNetModel.__init__'s arguments; the ones not in UNSUPPORTED_UNET are read or inert
    "image_size in_channels model_channels out_channels num_res_blocks attention_resolutions dropout "
    "channel_mult conv_resample dims num_classes use_checkpoint use_fp16 num_heads num_head_channels "
    "num_heads_upsample "
    "use_scale_shift_norm resblock_updown use_new_attention_order use_spatial_transformer transformer_depth "
    "context_dim n_embed legacy".split()
)
UNSUPPORTED_UNET = {  # parameter: (the value ldm_mini implements, what the other value would need)
    "num_classes": (None, "a class-conditional UNet (label_emb)"),
    "use_new_attention_order": (False, "QKVAttention's qkv-first split"),
    "conv_resample": (True, "average-pool downsampling without convolutions"),
    "dims": (2, "1-D or 3-D convolutions"),
    "n_embed": (None, "a codebook-id predicting head"),
}
BERT_TARGETS = {  # x-transformers TransformerWrapper encoders; the yaml gives width, depth, vocab, length
    "ldm.modules.encoders.modules.BERTEmbedder": True,  # tokenises with bert-base-uncased (or use_tokenizer)
    "ldm.modules.encoders.modules.TransformerEmbedder": False,  # token ids only
}
XT_HEADS, XT_HEAD_DIM, XT_FF_MULT = 8, 64, 4  # x-transformers defaults; BERTEmbedder passes none of them
LDM = "ldm.models.diffusion.ddpm.LatentDiffusion"
FIRST_STAGES = {  # model.target of a first stage -> AutoencoderConfig.kind
    "ldm.models.autoencoder.AutoencoderKL": "kl",
    "ldm.models.autoencoder.VQModelInterface": "vq",
    "ldm.models.autoencoder.VQModel": "vq",
}
BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}  # CompVis -> ours
SCHEDULE_BUFFERS = set(  # DDPM.register_schedule's buffers (recomputed from the yaml), and a learned logvar
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
    "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance "
    "posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 lvlb_weights logvar".split()
)


def need(d: dict, key: str, where: str):
    if not isinstance(d, dict) or key not in d:
        raise ConversionError(f"{where}: missing `{key}`")
    return d[key]


def read_yaml(path: Path) -> dict:
    """The yaml's `model` section ({target, params}), whose target is LDM or one of FIRST_STAGES."""
    if not path.is_file():
        raise ConversionError(f"{path}: no such yaml file")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConversionError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    model = need(config, "model", str(path))
    if model.get("target") != LDM and model.get("target") not in FIRST_STAGES:
        raise ConversionError(
            f"{path}: model.target is {model.get('target')!r}: this converter reads latent diffusion models "
            f"({LDM}) and their first stages ({', '.join(FIRST_STAGES)})"
        )
    need(model, "params", f"{path}: model")
    return model


def is_first_stage(yaml_path: str | Path) -> bool:
    """Whether the yaml describes a first-stage autoencoder alone (else a LatentDiffusion model)."""
    return read_yaml(Path(yaml_path))["target"] in FIRST_STAGES


def unet_config(p: dict, where: str) -> UNetConfig:
    if unknown := sorted(set(p) - UNET_PARAMS):
        raise ConversionError(f"{where}: unknown UNetModel parameter(s) {unknown}")
    for key, (ours, needs) in UNSUPPORTED_UNET.items():
        if p.get(key, ours) != ours:
            raise ConversionError(
                f"{where}: {key}: {p[key]} is not supported: ldm_mini's UNet has no {needs}"
            )
    heads, head_channels = p.get("num_heads", -1), p.get("num_head_channels", -1)
    if p.get("num_heads_upsample", -1) not in (-1, heads):
        raise ConversionError(
            f"{where}: num_heads_upsample {p['num_heads_upsample']} != num_heads is not supported"
        )
    context = p.get("context_dim")
    if bool(p.get("use_spatial_transformer", False)) != (context is not None) or isinstance(context, list):
        raise ConversionError(f"{where}: use_spatial_transformer needs one int context_dim (and vice versa)")
    try:
        return config_from_values(
            UNetConfig,
            dict(
                in_channels=need(p, "in_channels", where),
                out_channels=need(p, "out_channels", where),
                model_channels=need(p, "model_channels", where),
                channel_mult=tuple(p.get("channel_mult", (1, 2, 4, 8))),  # UNetModel's default
                num_res_blocks=need(p, "num_res_blocks", where),
                attention_resolutions=tuple(need(p, "attention_resolutions", where)),
                # num_head_channels, when set, overrides num_heads (openaimodel.py)
                num_heads=heads if head_channels == -1 else None,
                num_head_channels=head_channels if head_channels != -1 else None,
                context_dim=context,
                transformer_depth=p.get("transformer_depth", 1),
                norm_num_groups=32,  # openaimodel's normalization() is GroupNorm32
                image_size=need(p, "image_size", where),  # the latent side it was trained at
                use_scale_shift_norm=p.get("use_scale_shift_norm", False),
                resblock_updown=p.get("resblock_updown", False),
            ),
            where,
        )
    except ValueError as e:  # a yaml value of the wrong type, or values that do not fit
        raise ConversionError(str(e)) from e


def autoencoder_config(stage: dict, where: str) -> AutoencoderConfig:
    kind = FIRST_STAGES.get(stage.get("target"))
    if kind is None:
        raise ConversionError(
            f"{where}: first stage {stage.get('target')!r} is not supported "
            f"(ldm_mini converts {', '.join(FIRST_STAGES)})"
        )
    p = need(stage, "params", where)
    dd = need(p, "ddconfig", f"{where}.params")
    attn_type = dd.get("attn_type", "vanilla")
    if attn_type not in ("vanilla", "none") or dd.get("use_linear_attn"):
        raise ConversionError(
            f"{where}: attn_type {attn_type!r} (use_linear_attn {dd.get('use_linear_attn', False)}) is not "
            "supported: ldm_mini's autoencoder has the 'vanilla' AttnBlock or none ('none')"
        )
    # attn_type "none": make_attn returns nn.Identity for the mid AND the in-level blocks, so no attention
    attn_resolutions = () if attn_type == "none" else tuple(dd.get("attn_resolutions") or ())
    if bool(dd.get("double_z", True)) != (kind == "kl") or p.get("remap") or dd.get("tanh_out"):
        raise ConversionError(
            f"{where}: double_z must be {kind == 'kl'} for {kind}, with no remap / tanh_out"
        )
    try:
        return config_from_values(
            AutoencoderConfig,
            dict(
                kind=kind,
                in_channels=need(dd, "in_channels", where),
                out_channels=need(dd, "out_ch", where),
                ch=need(dd, "ch", where),
                ch_mult=tuple(dd.get("ch_mult", (1, 2, 4, 8))),
                num_res_blocks=need(dd, "num_res_blocks", where),
                z_channels=need(dd, "z_channels", where),
                embed_dim=need(p, "embed_dim", where),
                n_embed=need(p, "n_embed", where) if kind == "vq" else 0,
                norm_num_groups=32,  # Normalize() in diffusionmodules/model.py
                resolution=need(dd, "resolution", where),
                attn_resolutions=attn_resolutions,
                mid_attention=attn_type == "vanilla",
            ),
            where,
        )
    except ValueError as e:  # a yaml value of the wrong type, or values that do not fit
        raise ConversionError(str(e)) from e


def bert_config(p: dict, tokenizes: bool, where: str) -> tuple[LDMBertConfig, bool]:
    """-> (config, whether it tokenises text itself). TransformerWrapper(num_tokens=vocab_size, max_seq_len,
    attn_layers=Encoder(dim=n_embed, depth=n_layer)) with x-transformers' defaults for the rest."""
    known = {
        "n_embed",
        "n_layer",
        "vocab_size",
        "max_seq_len",
        "use_tokenizer",
        "embedding_dropout",
        "device",
    }
    if unknown := sorted(set(p) - known):
        raise ConversionError(f"{where}: unknown parameter(s) {unknown}")
    tokenizes = tokenizes and p.get("use_tokenizer", True)
    n_embed, vocab, length = need(p, "n_embed", where), p.get("vocab_size", 30522), p.get("max_seq_len", 77)
    if tokenizes and (vocab < 30522 or length != 77):
        raise ConversionError(
            f"{where}: with the bert-base-uncased tokenizer, vocab_size must be >= 30522 and "
            f"max_seq_len 77 (got {vocab}, {length}); set use_tokenizer: false to feed token ids"
        )
    values = dict(vocab_size=vocab, max_seq_len=length, n_embed=n_embed, n_layer=need(p, "n_layer", where),
                  n_heads=XT_HEADS, head_dim=XT_HEAD_DIM)  # fmt: skip
    try:
        cfg = config_from_values(LDMBertConfig, {**values, "ffn_dim": XT_FF_MULT * n_embed}, where)
    except (TypeError, ValueError) as e:  # TypeError: a non-number n_embed times 4
        raise ConversionError(f"{where}: {e}" if isinstance(e, TypeError) else str(e)) from e
    return cfg, tokenizes


def number(value, where: str) -> float:
    """A yaml number (yaml reads 1e-4 without a dot as a string) or a one-line ConversionError."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConversionError(f"{where}: {value!r} is not a number") from None


def schedule_config(p: dict, where: str) -> ScheduleConfig:
    """DDPM.register_schedule's arguments -> ScheduleConfig, with the CompVis DDIM sampler's conventions
    (timesteps range(0, T, T // S) + 1 and alphas_cumprod[0] after the last step)."""
    name = p.get("beta_schedule", "linear")
    if name not in BETA_SCHEDULES or p.get("given_betas") is not None or p.get("cosine_s", 8e-3) != 8e-3:
        raise ConversionError(
            f"{where}: beta_schedule {name!r} (given_betas / cosine_s) is not supported: "
            f"use one of {sorted(BETA_SCHEDULES)}"
        )
    if p.get("parameterization", "eps") != "eps":
        raise ConversionError(f"{where}: parameterization {p['parameterization']!r}: ldm_mini predicts eps")
    values = dict(
        num_train_timesteps=p.get("timesteps", 1000),
        beta_start=number(p.get("linear_start", 1e-4), f"{where}.linear_start"),  # DDPM's defaults
        beta_end=number(p.get("linear_end", 2e-2), f"{where}.linear_end"),
        beta_schedule=BETA_SCHEDULES[name],  # the naming trap: CompVis "linear" is linear in sqrt(beta)
        steps_offset=1,
        set_alpha_to_one=False,
        timestep_spacing="leading",
        clip_sample=False,  # LatentDiffusion sets clip_denoised = False
    )
    try:
        return config_from_values(ScheduleConfig, values, where)
    except ValueError as e:
        raise ConversionError(str(e)) from e


CLASS_EMBEDDER = "ldm.modules.encoders.modules.ClassEmbedder"
SPATIAL_RESCALER = "ldm.modules.encoders.modules.SpatialRescaler"


def conditioning(p: dict, where: str) -> tuple[str, dict | None]:
    """LatentDiffusion.__init__'s rule -> (ldm_mini kind, the cond stage's yaml or None)."""
    cond = p.get("cond_stage_config")
    if cond == "__is_unconditional__":
        return "unconditional", None
    key = p.get("conditioning_key") or ("concat" if p.get("concat_mode", True) else "crossattn")
    target = cond.get("target") if isinstance(cond, dict) else cond
    if key == "crossattn" and target in BERT_TARGETS:
        # the same transformer reads prompt tokens (txt2img) or layout tokens (layout2img-openimages256)
        return ("layout" if p.get("cond_stage_key") == "coordinates_bbox" else "txt2img"), cond
    if key == "crossattn" and target == CLASS_EMBEDDER:
        return "class", cond
    if key == "concat" and target == SPATIAL_RESCALER:
        return "semantic", cond
    if key == "concat" and target == "__is_first_stage__":
        return "inpaint", None  # the cond stage is the first stage itself: no weights of its own
    if key == "concat" and target == "torch.nn.Identity":
        return "superres", None  # the cond stage passes the low-res image through
    raise ConversionError(
        f"{where}: conditioning_key {key!r} with cond_stage_config {target!r} is not supported: ldm_mini "
        "converts crossattn + BERTEmbedder (txt2img, layout) or ClassEmbedder (class), concat + "
        "SpatialRescaler (semantic), __is_first_stage__ (inpaint) or torch.nn.Identity (superres), and "
        "unconditional models"
    )


# scripts/latent_imagenet_diffusion.ipynb: DDIM S=20, unconditional_guidance_scale 3.0, eta 0.0
RECOMMENDED = {"class": {"steps": 20, "guidance": 3.0, "eta": 0.0, "sampler": "ddim"}}


def encoder_configs(kind: str, cond: dict | None, context_dim: int | None, where: str) -> tuple[dict, int]:
    """The conditioning encoder's config(s) for make_metadata, and how many channels it concatenates to z_t
    (0 for cross-attention)."""
    params = (cond or {}).get("params") or {}
    where = f"{where}.cond_stage_config.params"
    try:
        if kind == "class":
            n = params.get("n_classes", 1000)  # ClassEmbedder's default: the 1000 ImageNet classes
            # cin256-v2 has one row more than ImageNet's classes: the "no class" label of its guidance
            cfg = ClassEmbedderConfig(n, need(params, "embed_dim", where), 1000 if n == 1001 else None)
            if cfg.embed_dim != context_dim:
                raise ConversionError(
                    f"{where}: embed_dim {cfg.embed_dim} != the UNet's context_dim {context_dim}"
                )
            return {"class_embedder": cfg}, 0
        if kind == "semantic":
            if params.get("out_channels") is None:
                raise ConversionError(f"{where}: a SpatialRescaler without out_channels is not supported")
            known = {"n_stages", "method", "multiplier", "in_channels", "out_channels", "bias"}
            if unknown := sorted(set(params) - known):
                raise ConversionError(f"{where}: unknown SpatialRescaler parameter(s) {unknown}")
            values = {"n_stages": 1, "method": "bilinear", "multiplier": 0.5, "in_channels": 3} | params
            cfg = config_from_values(SpatialRescalerConfig, values, where)
            return {"segmentation_encoder": cfg}, cfg.out_channels
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None
    return {}, 0


def packaged_vocab() -> str:
    data = VOCAB.read_bytes()
    if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
        raise ConversionError(
            f"{VOCAB}: sha256 is not bert-base-uncased's ({VOCAB_SHA256[:12]}...): reinstall"
        )
    return data.decode("utf-8")


# --- the checkpoint -----------------------------------------------------------------------------------
def state_dict_of(ckpt: Path, first_stage: bool = False) -> dict[str, Tensor]:
    """The checkpoint's state_dict, of a LatentDiffusion model or (first_stage) an autoencoder alone; a
    checkpoint of the other kind is a one-line error that says which yaml it needs."""
    obj = read_tensors(ckpt)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ConversionError(f"{ckpt}: not a checkpoint (a {type(obj).__name__}, not a dict of weights)")
    keys = {str(k) for k in state}
    is_ldm = any(k.startswith("model.diffusion_model.") for k in keys)
    is_stage = "encoder.conv_in.weight" in keys
    if first_stage and not is_stage:
        hint = "a LatentDiffusion checkpoint: pass its yaml" if is_ldm else f"first keys {sorted(keys)[:3]}"
        raise ConversionError(
            f"{ckpt}: no encoder.conv_in.weight, so not a CompVis first-stage checkpoint ({hint})"
        )
    if not first_stage and not is_ldm:
        hint = (
            "a first-stage autoencoder checkpoint: pass its yaml, models/first_stage_models/*/config.yaml"
            if is_stage
            else f"a diffusers .bin? convert its pipeline folder instead; first keys {sorted(keys)[:3]}"
        )
        raise ConversionError(
            f"{ckpt}: no model.diffusion_model.* weights, so not a CompVis LatentDiffusion checkpoint "
            f"({hint})"
        )
    return state


def pick_ema(state: dict[str, Tensor], ema: bool | None, use_ema: bool, name: str) -> bool:
    """Replace the UNet's weights by their LitEma shadows (model_ema.<name without dots>) when asked, or by
    default when the checkpoint has them and the yaml's use_ema (default true) lets the original build its
    LitEma and sample in ema_scope(). Returns whether it did."""
    shadows = {k for k in state if k.startswith("model_ema.")} - {"model_ema.decay", "model_ema.num_updates"}
    if ema is None:
        ema = bool(shadows) and use_ema
    if ema and not shadows:
        raise ConversionError(
            f"{name}: --ema: the checkpoint has no model_ema.* weights; convert without --ema"
        )
    unet = [k for k in state if k.startswith("model.diffusion_model.")]
    if ema:
        for key in unet:
            shadow = "model_ema." + key.removeprefix("model.").replace(".", "")
            if shadow not in shadows:
                raise ConversionError(f"{name}: {shadow} (the EMA of {key}) is missing; use --no-ema")
            state[key] = state[shadow]
            shadows.discard(shadow)
        if shadows:
            raise ConversionError(f"{name}: {sorted(shadows)[0]}: an EMA weight of no UNet weight")
    for key in [k for k in state if k.startswith("model_ema.")]:
        del state[key]
    return ema


PARTS = [  # CompVis LatentDiffusion attribute -> ldm_mini LatentDiffusion attribute
    ("model.diffusion_model.", "unet."),
    ("first_stage_model.", "autoencoder."),
]
COND_STAGE = {  # CompVis cond_stage_model, by kind -> the ldm_mini attribute (model.CONDITIONING)
    "txt2img": "text_encoder.",
    "layout": "text_encoder.",
    "class": "class_embedder.",
    "semantic": "segmentation_encoder.",
}


def model_configs(yaml_path: Path) -> dict:
    """The yaml -> make_metadata's arguments (kind, unet, autoencoder, schedule, scale_factor, text_encoder,
    vocab), and use_ema. Everything is checked here, before any weight is read."""
    model = read_yaml(yaml_path)
    if model["target"] != LDM:
        raise ConversionError(
            f"{yaml_path}: model.target is {model['target']!r}, a first-stage autoencoder alone, not a "
            "LatentDiffusion model: convert it with convert_first_stage"
        )
    try:
        return _model_configs(model["params"], f"{yaml_path}: model.params")
    except TypeError as e:  # a yaml value of the wrong type that no check above named
        raise ConversionError(f"{yaml_path}: a value of the wrong type in the yaml ({e})") from None


def _model_configs(p: dict, where: str) -> tuple[dict, bool]:
    kind, cond = conditioning(p, where)
    unet = unet_config(
        need(need(p, "unet_config", where), "params", f"{where}.unet_config"), f"{where}.unet_config.params"
    )
    autoencoder = autoencoder_config(need(p, "first_stage_config", where), f"{where}.first_stage_config")
    text_encoder, vocab = None, None
    encoders, extra = encoder_configs(kind, cond, unet.context_dim, where)
    if kind in ("txt2img", "layout"):
        text_encoder, tokenizes = bert_config(
            cond.get("params") or {}, BERT_TARGETS[cond["target"]], f"{where}.cond_stage_config.params"
        )
        vocab = packaged_vocab() if tokenizes else None
        if kind == "layout":  # its tokens: 3 per object and 2 for the crop; see conditioning.LayoutConfig
            encoders["layout"] = LayoutConfig(
                text_encoder.vocab_size, max_objects=(text_encoder.max_seq_len - 2) // 3
            )
        if unet.context_dim != text_encoder.n_embed:
            raise ConversionError(
                f"{where}: the UNet's context_dim {unet.context_dim} != the text encoder's "
                f"n_embed {text_encoder.n_embed}"
            )
    # what is concatenated to z_t: the low-res RGB image (superres), the masked image's latent and the mask
    # (inpaint), the rescaled segmentation (semantic, from encoder_configs)
    extra += {"superres": 3, "inpaint": autoencoder.embed_dim + 1}.get(kind, 0)
    if unet.in_channels != autoencoder.embed_dim + extra:
        raise ConversionError(
            f"{where}: unet in_channels {unet.in_channels} != {autoencoder.embed_dim} latent "
            f"channels (first stage embed_dim) + {extra} for a {kind} model"
        )
    return dict(
        kind=kind,
        unet=unet,
        autoencoder=autoencoder,
        schedule=schedule_config(p, where),
        scale_factor=number(p.get("scale_factor", 1.0), f"{where}.scale_factor"),
        text_encoder=text_encoder,
        vocab=vocab,
        **encoders,
        # the settings of the repo's own sampling code where diffusers has no pipeline for the kind
        recommended=RECOMMENDED.get(kind)
        if kind != "class" or encoders["class_embedder"].unconditional_class
        else None,
    ), bool(p.get("use_ema", True))


def convert_state_dict(
    state: dict[str, Tensor], configs: dict, use_ema: bool, ema: bool | None, name: str, source: str = ""
):
    """A LatentDiffusion state_dict + model_configs() -> (ldm_mini tensors, ldm_mini metadata). `name` (the
    checkpoint) starts error messages. Works on meta tensors too (the tests' full-size key check)."""
    state = dict(state)
    used_ema = pick_ema(state, ema, use_ema, name)
    configs = dict(configs)
    if "scale_factor" in state and state["scale_factor"].device.type != "meta":  # (meta: the key check)
        configs["scale_factor"] = float(state["scale_factor"])  # scale_by_std: 1 / std of the first latents
    if "alphas_cumprod" in state:
        schedule = configs["schedule"]
        ours, theirs = make_alphas_cumprod(schedule), state["alphas_cumprod"].float()
        values_differ = theirs.device.type != "meta" and (ours - theirs).abs().max() > 1e-4  # meta: shapes
        if ours.shape != theirs.shape or values_differ:
            raise ConversionError(
                f"{name}: its alphas_cumprod buffer is not the yaml's schedule ({schedule.beta_schedule} "
                f"{schedule.beta_start} -> {schedule.beta_end}, T={schedule.num_train_timesteps}): "
                "is the yaml the one for this checkpoint?"
            )
    text = configs["text_encoder"]
    modules = {
        "unet.": unet_modules(configs["unet"]),
        "autoencoder.": autoencoder_modules(configs["autoencoder"]),
        "text_encoder.": bert_modules(text) if text else {},
        "class_embedder.": {"embedding": Target("embedding.", SAME)},
        "segmentation_encoder.": {"channel_mapper": Target("channel_mapper.", SAME)},
    }
    kind = configs["kind"]
    if kind == "inpaint":  # cond_stage_model IS first_stage_model: the same tensors, saved twice
        for key in [k for k in state if k.startswith("cond_stage_model.")]:
            twin = state.get("first_stage_model." + key.removeprefix("cond_stage_model."))
            if (
                twin is None
                or twin.shape != state[key].shape
                or (twin.device.type != "meta" and not torch.equal(twin, state[key]))
            ):
                raise ConversionError(
                    f"{name}: {key} is not the first stage's tensor, as an inpainting model's is"
                )
            del state[key]
    parts = PARTS + ([("cond_stage_model.", COND_STAGE[kind])] if kind in COND_STAGE else [])
    tensors, sources = {}, {}
    for theirs, ours in parts:
        part = {k: v for k, v in state.items() if k.startswith(theirs)}
        try:
            tensors.update(translate(part, modules[ours], theirs, ours, sources))
        except ConversionError as e:
            raise ConversionError(f"{name}: {e}") from None
    known = tuple(theirs for theirs, _ in parts)
    if other := sorted(
        k for k in state if not k.startswith(known) and k not in SCHEDULE_BUFFERS | {"scale_factor"}
    ):
        raise ConversionError(f"{name}: {other[0]}: not a weight of a LatentDiffusion model")
    meta = make_metadata(
        **configs, source=f"CompVis {source or name} ({'EMA' if used_ema else 'raw'} UNet weights)"
    )
    check_shapes(tensors, build_empty(meta), sources, name)
    return tensors, meta


def convert_checkpoint(ckpt: str | Path, yaml_path: str | Path, ema: bool | None = None):
    """A CompVis LatentDiffusion .ckpt and its .yaml -> (ldm_mini tensors, ldm_mini metadata).

    ema: None = the EMA weights when the checkpoint has them (unless the yaml says use_ema: false);
    True = the EMA weights, which must be there; False = the raw weights."""
    ckpt, yaml_path = Path(ckpt), Path(yaml_path)
    configs, use_ema = model_configs(yaml_path)  # first: a wrong yaml fails before gigabytes are read
    source = f"checkpoint {ckpt.name} with {yaml_path.name}"
    return convert_state_dict(state_dict_of(ckpt), configs, use_ema, ema, str(ckpt), source)


def first_stage_config(yaml_path: str | Path) -> AutoencoderConfig:
    """The yaml of a first stage alone (model.target AutoencoderKL / VQModel) -> its AutoencoderConfig."""
    yaml_path = Path(yaml_path)
    model = read_yaml(yaml_path)
    if model["target"] not in FIRST_STAGES:
        raise ConversionError(
            f"{yaml_path}: model.target is {model['target']!r}, not a first-stage autoencoder: convert it "
            "with convert_checkpoint"
        )
    try:
        return autoencoder_config(model, f"{yaml_path}: model")
    except TypeError as e:  # a yaml value of the wrong type that no check named
        raise ConversionError(f"{yaml_path}: a value of the wrong type in the yaml ({e})") from None


def convert_first_stage_state_dict(
    state: dict[str, Tensor], cfg: AutoencoderConfig, name: str, source: str = ""
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A first stage's state_dict (AutoencoderKL / VQModel of ldm.models.autoencoder) -> (ldm_mini tensors,
    metadata of kind "autoencoder"). The same tables as an LDM's first_stage_model.*, without the prefix;
    loss.* is dropped. Works on meta tensors too (the tests' full-size key check)."""
    sources: dict[str, str] = {}
    try:
        tensors = translate(state, autoencoder_modules(cfg), "", "", sources)
    except ConversionError as e:
        raise ConversionError(f"{name}: {e}") from None
    meta = make_autoencoder_metadata(cfg, source=f"CompVis {source or name}")
    check_shapes(tensors, build_empty_autoencoder(meta), sources, name)
    return tensors, meta


def convert_first_stage(ckpt: str | Path, yaml_path: str | Path):
    """A CompVis first-stage .ckpt (models/first_stage_models/*/model.ckpt) and its .yaml -> (ldm_mini
    tensors, ldm_mini metadata of kind "autoencoder", which ldm_mini.load_autoencoder reads)."""
    ckpt, yaml_path = Path(ckpt), Path(yaml_path)
    cfg = first_stage_config(yaml_path)  # first: a wrong yaml fails before the weights are read
    source = f"checkpoint {ckpt.name} with {yaml_path.name}"
    return convert_first_stage_state_dict(state_dict_of(ckpt, first_stage=True), cfg, str(ckpt), source)


def check_shapes(tensors: dict[str, Tensor], model: torch.nn.Module, sources: dict[str, str], name: str):
    """Every weight the yaml's model (built on the meta device) needs, each with its shape; errors name the
    CompVis key."""
    want = model.state_dict()
    if missing := sorted(want.keys() - tensors.keys()):
        raise ConversionError(
            f"{name}: {len(missing)} weight(s) of the yaml's model are missing, e.g. {missing[0]}: "
            "is the yaml the one for this checkpoint?"
        )
    if extra := sorted(tensors.keys() - want.keys()):
        raise ConversionError(
            f"{name}: {sources[extra[0]]}: the yaml's model has no such weight ({extra[0]})"
        )
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(want[key].shape):
            raise ConversionError(
                f"{name}: {sources[key]} has shape {tuple(value.shape)} but the yaml's model "
                f"needs {tuple(want[key].shape)} ({key}): is the yaml the one for this checkpoint?"
            )
