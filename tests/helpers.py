"""Tiny diffusers pipelines with random weights, saved as folders: the reference side of the parity tests.

Every weight is re-drawn (diffusers zero-initialises the last conv of each block, which would hide
mistakes), scaled by 1/sqrt(fan_in) so activations stay of order 1 and atol=1e-5 means something.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm_mini.autoencoder import AutoencoderConfig, build_autoencoder
from ldm_mini.bert import LDMBert, LDMBertConfig
from ldm_mini.conditioning import (
    ClassEmbedder,
    ClassEmbedderConfig,
    LayoutTokenizer,
    SpatialRescaler,
    SpatialRescalerConfig,
)
from ldm_mini.model import LatentDiffusion
from ldm_mini.schedule import ScheduleConfig
from ldm_mini.unet import UNet, UNetConfig

# a small WordPiece vocabulary: specials, then words and ## pieces (ids in file order)
WORDS = [
    "[PAD]",
    "[unused0]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "an",
    "the",
    "of",
    "and",
    "photo",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "above",
    "below",
    "left",
    "right",
    "on",
    "painting",
    "cat",
    "dog",
    "squirrel",
    "eating",
    "burger",
    "in",
    "style",
    "##s",
    "##ing",
    "##er",
    "big",
    "small",
    ",",
    ".",
    "!",
    "un",
    "##known",
]


def write_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return path


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter: embeddings ~ N(0, 1), norm scales near 1, biases small, conv/linear
    weights ~ N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    for _, m in sorted(module.named_modules()):
        for name, p in m.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g)
            if isinstance(m, torch.nn.Embedding):  # token/position embeddings and VQ codebooks
                p.copy_(noise)
            elif isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm) and name == "weight":
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return module


def tiny_scheduler(**overrides):
    from diffusers import DDIMScheduler

    kwargs = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return DDIMScheduler(**{**kwargs, **overrides})


def tiny_txt2img(tmp: Path, seed: int = 0):
    """LDMTextToImagePipeline: KL autoencoder (f4), cross-attention UNet, LDMBert, WordPiece tokenizer."""
    from diffusers import AutoencoderKL, LDMTextToImagePipeline, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8,
    )
    bert = LDMBertModel(
        LDMBertConfig(
            vocab_size=len(WORDS),
            max_position_embeddings=77,
            encoder_layers=2,
            encoder_ffn_dim=64,
            d_model=32,
            encoder_attention_heads=2,
            head_dim=16,
        )
    )
    tokenizer = BertTokenizer(str(write_vocab(tmp / "_vocab")))
    for i, m in enumerate((unet, vae, bert)):
        randomize_(m, seed + i).eval()
    return LDMTextToImagePipeline(
        vqvae=vae, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=tiny_scheduler()
    )


def tiny_vq(seed: int):
    from diffusers import VQModel

    vq = VQModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=3,
        num_vq_embeddings=32,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        scaling_factor=1.0,
    )
    return randomize_(vq, seed).eval()


def tiny_unet2d(in_channels: int, seed: int):
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return randomize_(unet, seed).eval()


def tiny_unconditional(seed: int = 0):
    """LDMPipeline: VQ autoencoder (f2), UNet2DModel with legacy self-attention (celebahq-like)."""
    from diffusers import LDMPipeline

    return LDMPipeline(vqvae=tiny_vq(seed + 1), unet=tiny_unet2d(3, seed), scheduler=tiny_scheduler())


def tiny_superres(seed: int = 0):
    """LDMSuperResolutionPipeline: the low-res image is concatenated to the latent (6 input channels)."""
    from diffusers import LDMSuperResolutionPipeline

    return LDMSuperResolutionPipeline(
        vqvae=tiny_vq(seed + 1),
        unet=tiny_unet2d(6, seed),
        scheduler=tiny_scheduler(set_alpha_to_one=True, steps_offset=0),
    )


def save_pipeline(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder)
    return folder


LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def resave_legacy(folder: Path) -> None:
    """Rewrite unet/ and vqvae/ as an early diffusers release saved them: .bin files with the old
    attention names (query/key/value/proj_attn) of UNet2DModel and the autoencoders' mid block."""
    for component in ("unet", "vqvae"):
        path = folder / component / "diffusion_pytorch_model.safetensors"
        state = load_file(str(path))
        renamed = {}
        for key, value in state.items():
            if ".transformer_blocks." not in key:  # cross-attention blocks always had to_q/to_k/...
                key = re.sub(
                    r"\.attentions\.(\d+)\.(to_q|to_k|to_v|to_out\.0)\.",
                    lambda m: f".attentions.{m.group(1)}.{LEGACY[m.group(2)]}.",
                    key,
                )
            renamed[key] = value
        path.unlink()
        torch.save(renamed, folder / component / "diffusion_pytorch_model.bin")
    bert = folder / "bert" / "model.safetensors"
    if bert.exists():
        torch.save(load_file(str(bert)), folder / "bert" / "pytorch_model.bin")
        bert.unlink()


def fp16_variant(folder: Path) -> None:
    """Keep only fp16 variant files (diffusion_pytorch_model.fp16.safetensors), as a `variant="fp16"` save."""
    for path in list(folder.glob("*/*.safetensors")):
        state = {k: v.half() for k, v in load_file(str(path)).items()}
        save_file(state, str(path.with_name(path.stem + ".fp16.safetensors")))
        path.unlink()


# --- tiny ldm_mini models of every kind (model.KINDS), built directly -------------------------------------

TINY_AE = AutoencoderConfig(kind="vq", ch=64, ch_mult=(1, 1, 1), z_channels=3, embed_dim=3, n_embed=16)
TINY_SCHEDULE = ScheduleConfig()


def tiny_model(kind: str):
    """A tiny random ldm_mini LatentDiffusion of any kind: VQ f4 (32 px images, 8x8 latents), 2 UNet levels,
    the kind's own conditioning encoder (11 classes with "no class" 10; 5 segmentation classes; layouts)."""
    torch.manual_seed(0)
    crossattn = {"txt2img", "layout", "class"}
    extra = {"semantic": 3, "inpaint": 4, "superres": 3}.get(kind, 0)
    unet = UNet(UNetConfig(in_channels=3 + extra, out_channels=3, model_channels=64, channel_mult=(1, 1),
                           num_res_blocks=1, attention_resolutions=(2,), num_heads=2,
                           context_dim=16 if kind in crossattn else None, image_size=8))  # fmt: skip
    encoders = {}
    if kind in ("txt2img", "layout"):
        encoders["text_encoder"] = LDMBert(
            LDMBertConfig(vocab_size=8192, max_seq_len=92, n_embed=16, n_layer=1, ffn_dim=32)
        )
    if kind == "layout":
        encoders["layout_tokenizer"] = LayoutTokenizer()
    if kind == "class":
        encoders["class_embedder"] = ClassEmbedder(ClassEmbedderConfig(n_classes=11, embed_dim=16,
                                                                       unconditional_class=10))  # fmt: skip
    if kind == "semantic":
        encoders["segmentation_encoder"] = SpatialRescaler(SpatialRescalerConfig(in_channels=5))
    return LatentDiffusion(kind, unet, build_autoencoder(TINY_AE), TINY_SCHEDULE, 1.0, **encoders).eval()
