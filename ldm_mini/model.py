"""The Latent Diffusion model as one object: first stage, denoiser, conditioning, schedule.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models", arXiv:2112.10752)
train a diffusion model not on pixels x but on the latent z = E(x) of a pretrained autoencoder
(Sec. 3.1), and condition it through the UNet's input (concatenation) or its cross-attention layers
(Sec. 3.3; the conditional loss Eq. 3). This container holds the three trained networks of one published
model:

    autoencoder   E and D: image (B, 3, H, W) <-> latent (B, c, H/f, W/f), f = 4 (VQ) or 8 (KL)
    unet          eps_theta(z_t, t, y): the noise predicted in latent space (LDM Eq. 2)
    text_encoder  tau_theta(y): LDMBert, prompt -> (B, 77, D) context (text-to-image only)

and the few numbers that tie them together: the noise schedule alpha-bar_t and the latent scale
factor, plus what the weights' source says about using them: the image size the model was trained at
(`default_size`) and the sampler settings it is meant to be sampled with (`recommended`). Samplers
(samplers.py) and pipelines (pipeline.py) only talk to the methods below.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from .autoencoder import AutoencoderKL, VQModel
from .bert import LDMBert
from .schedule import ScheduleConfig, make_alphas_cumprod
from .tokenizer import Tokenizer
from .unet import UNet

KINDS = ("txt2img", "unconditional", "superres")
# The settings a weight file may recommend (its "recommended" metadata), with their types. The keys are the
# command line's names: steps = num_inference_steps, guidance = guidance_scale.
RECOMMENDABLE = {"steps": int, "guidance": float, "eta": float, "sampler": str}


def check_recommended(recommended: dict) -> dict:
    """Raise a ValueError naming the field unless every recommended setting is known and of its type."""
    if not isinstance(recommended, dict):
        raise ValueError(f"the recommended settings must be a JSON object, got {type(recommended).__name__}")
    for key, value in recommended.items():
        want = RECOMMENDABLE.get(key)
        if want is None:
            raise ValueError(
                f"unknown recommended setting {key!r}: the known ones are {sorted(RECOMMENDABLE)}"
            )
        ok = isinstance(value, want) or (want is float and isinstance(value, int))
        if not ok or isinstance(value, bool):
            raise ValueError(f"the recommended {key!r} must be a {want.__name__}, got {value!r}")
    return dict(recommended)


class LatentDiffusion(nn.Module):
    """A published (or embedded) LDM: `kind` says how the UNet is conditioned.

    txt2img        cross-attention on LDMBert's encoding of a prompt (ldm-text2im-large-256)
    unconditional  no conditioning (ldm-celebahq-256)
    superres       the low-resolution image, in [-1, 1], concatenated to z_t on the channel axis
                   (ldm-super-resolution-4x-openimages)
    """

    def __init__(
        self,
        kind: str,
        unet: UNet,
        autoencoder: AutoencoderKL | VQModel,
        schedule: ScheduleConfig,
        scale_factor: float,
        text_encoder: LDMBert | None = None,
        tokenizer: Tokenizer | None = None,
        recommended: dict | None = None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown model kind {kind!r}: expected one of {KINDS}")
        if (kind == "txt2img") != (text_encoder is not None):
            raise ValueError(f"a {kind!r} model {'needs' if kind == 'txt2img' else 'has no'} text encoder")
        self.kind = kind
        self.unet = unet
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer  # None for a text encoder fed with token ids directly
        self.schedule = schedule
        # LDM Sec. 4.3.2 / Appendix: the KL latent is rescaled to roughly unit variance before diffusion
        # (z = 0.18215 * E(x) for KL-f8). The VQ-f4 models of the paper use 1.0, i.e. no rescaling.
        self.scale_factor = float(scale_factor)
        if not math.isfinite(self.scale_factor) or self.scale_factor <= 0:
            raise ValueError(
                f"the latent scale factor must be a positive finite number, got {scale_factor!r}"
            )
        # e.g. {"steps": 20, "guidance": 2.0}: what the pipelines and the command line use when a setting is
        # not given (see RECOMMENDABLE); {} for the published models, which use diffusers' defaults.
        self.recommended = check_recommended(recommended or {})
        # alpha-bar_t of DDPM Eq. 4, computed in float32 exactly as diffusers does; not saved in the file
        # (it follows from `schedule`), but moved with .to(device).
        self.register_buffer("alphas_cumprod", make_alphas_cumprod(schedule), persistent=False)

    # --- sizes ------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    @property
    def default_size(self) -> int:
        """The side, in pixels, of the images the model was trained to make: the UNet's latent size times the
        autoencoder factor (diffusers: unet.config.sample_size * vae_scale_factor). 256 for the published
        models, 64 for the embedded shapes model; a super-resolution model's output for a low-res input of
        the latent size."""
        return self.unet.config.image_size * self.downsample_factor

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    # --- conditioning -----------------------------------------------------------------------------
    def tokenize(self, prompts: str | list[str]) -> Tensor:
        """Prompts -> token ids (B, 77) on the model's device: [CLS] pieces [SEP] [PAD]..."""
        if self.kind != "txt2img":
            raise ValueError(f"tokenize() needs a txt2img model; this one is {self.kind!r}")
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer (its BERTEmbedder was trained with use_tokenizer: false): "
                "pass token ids to encode_text() directly"
            )
        if unknown := self.tokenizer.unknown_words(prompts):
            warnings.warn(
                f"this model's vocabulary has no {', '.join(map(repr, unknown))}: such words become [UNK] "
                f"or letter pieces, which the model never saw. Its {self.tokenizer.vocab_size} tokens are "
                "listed by `ldm-mini info WEIGHTS --vocab` (in Python: m.tokenizer.vocab_text)",
                UserWarning,
                stacklevel=2,
            )
        room = self.tokenizer.max_length - 2  # [CLS] and [SEP] take two of the 77 places
        for prompt in [prompts] if isinstance(prompts, str) else prompts:
            if (n := len(self.tokenizer.pieces(prompt))) > room:
                warnings.warn(
                    f"the prompt {prompt[:40]!r}... is {n} tokens long: only its first {room} are read "
                    f"(the text encoder has {self.tokenizer.max_length} positions)",
                    UserWarning,
                    stacklevel=2,
                )
        return self.tokenizer(prompts).to(self.device)

    def encode_text(self, ids: Tensor) -> Tensor:
        """tau_theta(y): token ids (B, L) -> context (B, L, D) for the UNet's cross-attention."""
        if self.text_encoder is None:
            raise ValueError(f"encode_text() needs a txt2img model; this one is {self.kind!r}")
        return self.text_encoder(ids.to(self.device))

    # --- denoiser ---------------------------------------------------------------------------------
    def predict_noise(self, x: Tensor, t: Tensor | int, cond: Tensor | None = None) -> Tensor:
        """eps_theta(z_t, t, y) (LDM Eq. 2). x: (B, c, h, w); t: (B,) or a scalar timestep.

        cond is the text context (B, L, D) for txt2img, the low-resolution image (B, 3, h, w) in [-1, 1]
        for superres (concatenated after x on dim 1, LDM Sec. 3.3), and None for unconditional models.
        """
        if self.kind == "txt2img":
            if cond is None:
                raise ValueError("a txt2img model needs cond: the context from encode_text(tokenize(...))")
            return self.unet(x, t, cond)
        if self.kind == "superres":
            if cond is None or cond.shape[-2:] != x.shape[-2:]:
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(
                    f"superres needs cond: the low-res image with x's size {tuple(x.shape)}: {got}"
                )
            return self.unet(torch.cat([x, cond.to(x.dtype)], dim=1), t)  # (B, c + 3, h, w)
        if cond is not None:
            raise ValueError("an unconditional model takes no cond")
        return self.unet(x, t)

    # --- first stage ------------------------------------------------------------------------------
    def encode(self, image: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Image in [-1, 1] (B, 3, H, W) -> the diffusion model's latent z = scale_factor * E(x).

        KL: a draw from the posterior (its mean when sample=False); VQ: the pre-quantisation latent,
        as the LDM VQ models are trained on (quantisation happens in the decoder, Sec. 3.1).
        """
        if isinstance(self.autoencoder, VQModel):
            h = self.autoencoder.encode(image)
        else:
            posterior = self.autoencoder.encode(image)
            h = posterior.sample(generator) if sample else posterior.mode()
        return h * self.scale_factor

    def decode(self, z: Tensor, quantize: bool = True) -> Tensor:
        """Latent -> image in [-1, 1] (not clamped): D(z / scale_factor). A VQ model quantises first
        unless quantize=False."""
        z = z / self.scale_factor
        if isinstance(self.autoencoder, VQModel):
            return self.autoencoder.decode(z, quantize=quantize)
        return self.autoencoder.decode(z)
