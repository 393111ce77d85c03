"""Convert a diffusers Latent Diffusion pipeline folder into ldm_mini's one-file format.

A folder as saved by `pipeline.save_pretrained()` of any diffusers version, or downloaded from the
hub (CompVis/ldm-text2im-large-256, ldm-celebahq-256, ldm-super-resolution-4x-openimages):

    model_index.json                 _class_name says the pipeline: which model kind this is
    unet/config.json + weights       UNet2DConditionModel (text) or UNet2DModel
    vqvae/config.json + weights      AutoencoderKL or VQModel
    bert/config.json + weights       LDMBertModel (text only)
    tokenizer/vocab.txt              bert-base-uncased WordPiece (or tokenizer.json)
    scheduler/scheduler_config.json  training betas and the DDIM timestep convention

Weights may be .safetensors or .bin, full or fp16 variants, single or sharded. ldm_mini's key names
are the modern diffusers names but for a few fragments (ldm_mini.loading.DIFFUSERS_RENAMES: to_out.0 ->
to_out, ff.net.0.proj -> ff.proj_in, ff.net.2 -> ff.proj_out), so the weights need only the two tables
below and that one; the configs need translating from diffusers' argument names to the CompVis-style
fields of ldm_mini's dataclasses.
"""

from __future__ import annotations

from pathlib import Path

from ldm_mini.autoencoder import AutoencoderConfig
from ldm_mini.bert import LDMBertConfig
from ldm_mini.loading import config_from_values, from_diffusers_names, make_metadata, rename
from ldm_mini.schedule import ScheduleConfig
from ldm_mini.tokenizer import Tokenizer
from ldm_mini.unet import UNetConfig

from .common import ConversionError, read_json, read_tensors

PIPELINES = {
    "LDMTextToImagePipeline": "txt2img",
    "LDMPipeline": "unconditional",
    "LDMSuperResolutionPipeline": "superres",
}

# diffusers < 0.14 named the attention of UNet2DModel's AttnDownBlock2D and of the autoencoders' mid
# block like the original AttentionBlock; diffusers itself renames them at load time.
LEGACY_ATTENTION = [
    (".query.", ".to_q."),
    (".key.", ".to_k."),
    (".value.", ".to_v."),
    (".proj_attn.", ".to_out.0."),
]
LDMBERT = [
    ("to_logits.", None),  # LDMBertModel's unused language-model head: the pipeline never calls it
    ("model.", ""),  # LDMBertModel wraps its encoder as .model
]
DIFFUSERS_VQ_DEFAULT_SCALE = 0.18215  # what current diffusers writes into every VQModel config

WEIGHT_NAMES = (
    "diffusion_pytorch_model",
    "model",
    "pytorch_model",
)  # diffusers, transformers, old transformers


# --- weights ----------------------------------------------------------------------------------------
def find_weights(folder: Path) -> list[Path]:
    """The weight files of one component: full precision before fp16 variants, safetensors before .bin;
    a sharded checkpoint is listed through its index."""
    for variant in ("", ".fp16"):
        for suffix in (".safetensors", ".bin"):
            for name in WEIGHT_NAMES:
                single = folder / f"{name}{variant}{suffix}"
                if single.is_file():
                    return [single]
                index = folder / f"{name}{variant}{suffix}.index.json"
                if index.is_file():
                    shards = sorted(set(read_json(index).get("weight_map", {}).values()))
                    return [folder / s for s in shards]
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise ConversionError(
        f"{folder}: no weight file (e.g. diffusion_pytorch_model.safetensors); found {found}"
    )


def read_component(folder: Path, table: list[tuple[str, str]]) -> dict:
    """One component's weights: `table` gives the modern diffusers names, DIFFUSERS_RENAMES ldm_mini's."""
    state = {}
    for path in find_weights(folder):
        state.update(read_tensors(path))
    return from_diffusers_names(rename(state, table))


# --- configs ----------------------------------------------------------------------------------------
def channel_mult(block_out_channels: list[int], where: str) -> tuple[int, tuple[int, ...]]:
    base = block_out_channels[0]
    if any(c % base for c in block_out_channels):
        raise ConversionError(
            f"{where}: block_out_channels {block_out_channels} are not multiples of the first"
        )
    return base, tuple(c // base for c in block_out_channels)


def require(config: dict, where: str, **expected) -> None:
    """ldm_mini implements the published architecture; refuse configs that change it elsewhere."""
    for key, value in expected.items():
        if key in config and config[key] not in (value, None):
            raise ConversionError(
                f"{where}: {key}={config[key]!r} is not supported (ldm_mini implements {value!r})"
            )


# The UNet block types ldm_mini reads -> how each resamples between two levels: "conv" (a stride-2 conv; an
# upsample + conv) or "resnet" (a ResnetBlock2D that average-pools / upsamples: CompVis resblock_updown);
# None: UNet2DModel's attention blocks take the model's downsample_type / upsample_type.
DOWN_BLOCKS = {"DownBlock2D": "conv", "CrossAttnDownBlock2D": "conv", "ResnetDownsampleBlock2D": "resnet",
               "AttnDownBlock2D": None}  # fmt: skip
UP_BLOCKS = {"UpBlock2D": "conv", "CrossAttnUpBlock2D": "conv", "ResnetUpsampleBlock2D": "resnet",
             "AttnUpBlock2D": None}  # fmt: skip


def resblock_updown(c: dict, where: str) -> bool:
    """Whether the UNet resamples with ResnetBlock2Ds (all levels) or with convs (all levels); a mix has no
    CompVis counterpart. The last block of each list does not resample."""
    kinds = set()
    for types, table, key in (
        (c["down_block_types"], DOWN_BLOCKS, "downsample_type"),
        (c["up_block_types"], UP_BLOCKS, "upsample_type"),
    ):
        if unknown := sorted(set(types) - set(table)):
            raise ConversionError(
                f"{where}: block type(s) {unknown} are not supported (ldm_mini: {list(table)})"
            )
        for name in types[:-1]:
            kind = table[name] or c.get(key) or "conv"
            if kind not in ("conv", "resnet"):
                raise ConversionError(f"{where}: {key}={kind!r} is not supported (conv or resnet)")
            kinds.add(kind)
    if len(kinds) > 1:
        raise ConversionError(
            f"{where}: {c['down_block_types']} / {c['up_block_types']} mix conv and resnet resampling "
            "between levels: not supported (ldm_mini resamples one way at every level)"
        )
    return kinds == {"resnet"}


def unet_config(c: dict, where: str) -> UNetConfig:
    require(
        c,
        where,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
        center_input_sample=False,
        time_embedding_type="positional",
        norm_eps=1e-5,
        use_linear_projection=False,
        class_embed_type=None,
        upcast_attention=False,
        only_cross_attention=False,
        mid_block_scale_factor=1,
        downsample_padding=1,
        add_attention=True,
        encoder_hid_dim=None,
        addition_embed_type=None,
        resnet_skip_time_act=False,
        resnet_out_scale_factor=1.0,
    )
    shift = c.get("resnet_time_scale_shift") or "default"
    if shift not in ("default", "scale_shift"):
        raise ConversionError(f"{where}: resnet_time_scale_shift={shift!r} is not supported")
    groups, cross = c.get("norm_num_groups", 32), c["_class_name"] == "UNet2DConditionModel"
    # UNet2DModel's mid-block attention has a GroupNorm of attn_norm_num_groups groups; left None, diffusers
    # gives it norm_num_groups, but NO GroupNorm at all with scale_shift (CompVis always has one)
    mid_groups = c.get("attn_norm_num_groups") or (groups if shift == "default" else None)
    if not cross and mid_groups != groups:
        raise ConversionError(
            f"{where}: attn_norm_num_groups={c.get('attn_norm_num_groups')} with resnet_time_scale_shift="
            f"{shift!r} is not supported (ldm_mini's attention GroupNorm has norm_num_groups={groups} groups)"
        )
    base, mult = channel_mult(c["block_out_channels"], where)
    down = c["down_block_types"]
    attention_levels = [i for i, name in enumerate(down) if "Attn" in name]
    heads = c.get("attention_head_dim", 8)  # the default of both classes
    if isinstance(heads, list):
        if len(set(heads)) != 1:
            raise ConversionError(f"{where}: per-level attention_head_dim {heads} is not supported")
        heads = heads[0]
    # The trap: diffusers' `attention_head_dim` is the NUMBER of heads in UNet2DConditionModel (a legacy
    # misnomer, num_attention_heads defaults to it) but the SIZE of a head in UNet2DModel (where None
    # means one head as wide as the block).
    if cross:
        num_heads, head_channels = (c.get("num_attention_heads") or heads), None
    else:
        num_heads, head_channels = (1, None) if heads is None else (None, heads)
    depth = c.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        raise ConversionError(f"{where}: per-level transformer_layers_per_block {depth} is not supported")
    return config_from_values(
        UNetConfig,
        dict(
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            model_channels=base,
            channel_mult=mult,
            num_res_blocks=c["layers_per_block"],
            attention_resolutions=tuple(2**i for i in attention_levels),
            num_heads=num_heads,
            num_head_channels=head_channels,
            context_dim=(c.get("cross_attention_dim") or 1280)
            if cross
            else None,  # absent in the 2022 config
            transformer_depth=depth,
            norm_num_groups=groups,
            image_size=c.get("sample_size", 32),
            use_scale_shift_norm=shift == "scale_shift",
            resblock_updown=resblock_updown(c, where),
        ),
        where,
    )


def autoencoder_config(c: dict, where: str) -> AutoencoderConfig:
    require(
        c,
        where,
        act_fn="silu",
        norm_type="group",
        mid_block_add_attention=True,
        use_quant_conv=True,
        use_post_quant_conv=True,
        shift_factor=None,
    )
    base, mult = channel_mult(c["block_out_channels"], where)
    vq = c["_class_name"] == "VQModel"
    latent = c["latent_channels"]
    return config_from_values(
        AutoencoderConfig,
        dict(
            kind="vq" if vq else "kl",
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            ch=base,
            ch_mult=mult,
            num_res_blocks=c["layers_per_block"],
            z_channels=latent,
            embed_dim=(c.get("vq_embed_dim") or latent) if vq else latent,
            n_embed=c["num_vq_embeddings"] if vq else 0,
            norm_num_groups=c.get("norm_num_groups", 32),
        ),
        where,
    )


def scale_factor_of(c: dict, kind: str) -> float:
    """KL: the config's scaling_factor (0.18215 for KL-f8, also diffusers' default when absent).
    VQ: 1.0, what the CompVis VQ-f4 models were trained with. diffusers' VQModel defaults to 0.18215 and
    its LDMPipeline divides by it (diffusers issue 6725), so a 0.18215 in a VQ config is that default
    (newer diffusers write every default into config.json), not a trained value; super-resolution never
    scales at all."""
    if c["_class_name"] != "VQModel":
        return float(c.get("scaling_factor") or 0.18215)
    value = c.get("scaling_factor")
    if kind == "superres" or value is None or abs(value - DIFFUSERS_VQ_DEFAULT_SCALE) < 1e-12:
        return 1.0
    return float(value)


def bert_config(c: dict, where: str) -> LDMBertConfig:
    require(c, where, activation_function="gelu", scale_embedding=False)
    return config_from_values(
        LDMBertConfig,
        dict(
            vocab_size=c["vocab_size"],
            max_seq_len=c["max_position_embeddings"],
            n_embed=c["d_model"],
            n_layer=c["encoder_layers"],
            n_heads=c["encoder_attention_heads"],
            head_dim=c["head_dim"],
            ffn_dim=c["encoder_ffn_dim"],
        ),
        where,
    )


BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}


def schedule_config(c: dict, where: str) -> ScheduleConfig:
    if c.get("trained_betas") is not None:
        raise ConversionError(f"{where}: trained_betas are not supported")
    if c.get("prediction_type", "epsilon") != "epsilon":
        raise ConversionError(
            f"{where}: prediction_type {c['prediction_type']!r} (ldm_mini predicts epsilon)"
        )
    if c.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise ConversionError(f"{where}: unknown beta_schedule {c['beta_schedule']!r}")
    return config_from_values(
        ScheduleConfig,
        dict(
            # the first schedulers (diffusers 0.0.x) called it `timesteps`
            num_train_timesteps=c.get("num_train_timesteps") or c.get("timesteps") or 1000,
            beta_start=float(c.get("beta_start", 0.0001)),
            beta_end=float(c.get("beta_end", 0.02)),
            beta_schedule=BETA_SCHEDULES[c.get("beta_schedule", "linear")],
            steps_offset=int(c.get("steps_offset", 0)),
            set_alpha_to_one=bool(c.get("set_alpha_to_one", True)),
            timestep_spacing=c.get("timestep_spacing", "leading"),
            clip_sample=bool(c.get("clip_sample", True)),
        ),
        where,
    )


def tokenizer_vocab(folder: Path) -> str:
    """bert-base-uncased's vocab.txt (the slow BertTokenizer's file) or a fast tokenizer.json."""
    config = folder / "tokenizer_config.json"
    if config.is_file() and read_json(config).get("do_lower_case") is False:
        raise ConversionError(f"{config}: a cased tokenizer is not supported (LDM uses bert-base-uncased)")
    if (folder / "vocab.txt").is_file():
        return (folder / "vocab.txt").read_text(encoding="utf-8")
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(folder / "tokenizer.json").vocab_text
    raise ConversionError(f"{folder}: no vocab.txt or tokenizer.json")


# --- the folder -------------------------------------------------------------------------------------
def convert_folder(folder: str | Path) -> tuple[dict, dict[str, str]]:
    """Read a diffusers pipeline folder -> (ldm_mini tensors, ldm_mini metadata)."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise ConversionError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    index_json = read_json(index)
    pipeline = index_json.get("_class_name")
    if pipeline not in PIPELINES:
        raise ConversionError(f"{index}: pipeline {pipeline!r} is not one of {', '.join(PIPELINES)}")
    kind = PIPELINES[pipeline]

    def component(name: str) -> Path:
        path = folder / name
        if not path.is_dir():
            raise ConversionError(f"{folder}: the {pipeline} component {name}/ is missing")
        return path

    def config(name: str, file: str = "config.json") -> dict:
        return read_json(component(name) / file)

    unet_c, vae_c = config("unet"), config("vqvae")
    for name, c, classes in (
        ("unet", unet_c, ("UNet2DConditionModel", "UNet2DModel")),
        ("vqvae", vae_c, ("AutoencoderKL", "VQModel")),
    ):
        if c.get("_class_name") not in classes:
            raise ConversionError(
                f"{folder / name}/config.json: class {c.get('_class_name')!r}, expected {classes}"
            )
    tensors = {}
    tensors.update({f"unet.{k}": v for k, v in read_component(component("unet"), LEGACY_ATTENTION).items()})
    tensors.update(
        {f"autoencoder.{k}": v for k, v in read_component(component("vqvae"), LEGACY_ATTENTION).items()}
    )
    text_config, vocab = None, None
    if kind == "txt2img":
        text_config = bert_config(config("bert"), str(folder / "bert"))
        tensors.update(
            {f"text_encoder.{k}": v for k, v in read_component(component("bert"), LDMBERT).items()}
        )
        vocab = tokenizer_vocab(component("tokenizer"))
    meta = make_metadata(
        kind=kind,
        unet=unet_config(unet_c, str(folder / "unet")),
        autoencoder=autoencoder_config(vae_c, str(folder / "vqvae")),
        schedule=schedule_config(config("scheduler", "scheduler_config.json"), str(folder / "scheduler")),
        scale_factor=scale_factor_of(vae_c, kind),
        text_encoder=text_config,
        vocab=vocab,
        source=f"{pipeline} folder {folder.resolve().name}, diffusers {index_json.get('_diffusers_version')}",
    )
    return tensors, meta
