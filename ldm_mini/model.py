"""The Latent Diffusion model as one object: first stage, denoiser, conditioning, schedule.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models", arXiv:2112.10752)
train a diffusion model not on pixels x but on the latent z = E(x) of a pretrained autoencoder
(Sec. 3.1), and condition it through the UNet's input (concatenation) or its cross-attention layers
(Sec. 3.3; the conditional loss Eq. 3). This container holds the three trained networks of one published
model:

    autoencoder   E and D: image (B, 3, H, W) <-> latent (B, c, H/f, W/f), f = 4 (VQ) or 8 (KL)
    unet          eps_theta(z_t, t, y): the noise predicted in latent space (LDM Eq. 2)
    tau_theta     the conditioning encoder of its kind (Sec. 3.3, table CONDITIONING below): LDMBert for
                  text (bert.py), a class embedding, a segmentation rescaler, a layout transformer
                  (conditioning.py), the first stage itself (inpainting) or nothing

and the few numbers that tie them together: the noise schedule alpha-bar_t and the latent scale
factor, plus what the weights' source says about using them: the image size the model was trained at
(`default_size`) and the sampler settings it is meant to be sampled with (`recommended`). Samplers
(samplers.py) and pipelines (pipeline.py) only talk to the methods below.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoencoder import AutoencoderKL, VQModel
from .bert import LDMBert
from .conditioning import ClassEmbedder, LayoutTokenizer, SpatialRescaler
from .schedule import ScheduleConfig, make_alphas_cumprod
from .tokenizer import Tokenizer
from .unet import UNet

# How each kind of model is conditioned (LDM Sec. 3.3): its encoder tau_theta (the attribute that holds it;
# None: no weights of its own) and where tau_theta(y) enters the UNet: "crossattn" as the context (B, L, D) of
# its cross-attention layers, "concat" concatenated to z_t on the channel axis (B, c + c_y, h, w), None: not.
CONDITIONING = {
    "txt2img": ("text_encoder", "crossattn"),  # LDMBert(prompt tokens) (B, 77, D)
    "layout": ("text_encoder", "crossattn"),  # LDMBert(layout tokens) (B, 92, D): the same network
    "class": ("class_embedder", "crossattn"),  # one token per label (B, 1, D)
    "semantic": ("segmentation_encoder", "concat"),  # the rescaled one-hot map (B, 3, h, w)
    "inpaint": (None, "concat"),  # the first stage's latent of the masked image + the mask (B, c + 1, h, w)
    "superres": (None, "concat"),  # the low-res image itself, in [-1, 1] (B, 3, h, w)
    "unconditional": (None, None),
}
KINDS = tuple(CONDITIONING)
# What predict_noise's cond is, per kind, for error messages.
COND_HELP = {
    "txt2img": "the context m.encode_text(m.tokenize(prompts))",
    "layout": "the context m.encode_layout(m.layout_tokens(layouts))",
    "class": "the context m.encode_class(labels)",
    "semantic": "the map m.encode_segmentation(segmentation)",
    "inpaint": "the tensor m.inpaint_condition(image, mask)",
    "superres": "the low-res image in [-1, 1], with x's height and width",
}
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
        class_embedder: ClassEmbedder | None = None,
        segmentation_encoder: SpatialRescaler | None = None,
        layout_tokenizer: LayoutTokenizer | None = None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown model kind {kind!r}: expected one of {KINDS}")
        encoders = {"text_encoder": text_encoder, "class_embedder": class_embedder,
                    "segmentation_encoder": segmentation_encoder}  # fmt: skip
        wanted = CONDITIONING[kind][0]
        for name, encoder in encoders.items():
            if (name == wanted) != (encoder is not None):
                raise ValueError(f"a {kind!r} model {'needs' if name == wanted else 'has no'} {name}")
        if (kind == "layout") != (layout_tokenizer is not None):
            raise ValueError(f"a {kind!r} model {'needs' if kind == 'layout' else 'has no'} layout_tokenizer")
        self.kind = kind
        self.conditioning = CONDITIONING[kind][1]  # "crossattn" | "concat" | None
        self.unet = unet
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer  # None for a text encoder fed with token ids directly
        self.class_embedder = class_embedder
        self.segmentation_encoder = segmentation_encoder
        self.layout_tokenizer = layout_tokenizer  # boxes -> token ids for text_encoder; no weights
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
            raise ValueError(f"encode_text() needs a txt2img or layout model; this one is {self.kind!r}")
        return self.text_encoder(ids.to(self.device))

    def encode_class(self, labels: Tensor | list[int]) -> Tensor:
        """tau_theta(y) of class labels: (B,) int64 -> context (B, 1, D). The unconditional label of
        guidance is m.class_embedder.config.unconditional_class (1000 for cin256-v2)."""
        if self.class_embedder is None:
            raise ValueError(f"encode_class() needs a class-conditional model; this one is {self.kind!r}")
        labels = torch.as_tensor(labels)  # checked where it is, then moved: a meta-device model checks too
        n = self.class_embedder.config.n_classes
        if labels.ndim != 1 or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"class labels must be a (B,) integer tensor, got {tuple(labels.shape)} {labels.dtype}"
            )
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < n):
            bad = labels[(labels < 0) | (labels >= n)][0].item()
            raise ValueError(f"class label {bad} is out of range: this model has classes 0 .. {n - 1}")
        return self.class_embedder(labels.long().to(self.device))

    def encode_segmentation(self, segmentation: Tensor) -> Tensor:
        """tau_theta(y) of a segmentation: a label map (B, H, W) int64, or its one-hot (B, C, H, W) float ->
        the map (B, 3, H/4, W/4) that is concatenated to z_t. H and W: the image's size."""
        if self.segmentation_encoder is None:
            raise ValueError(f"encode_segmentation() needs a semantic model; this one is {self.kind!r}")
        cfg = self.segmentation_encoder.config
        seg = torch.as_tensor(segmentation)  # checked where it is, then moved (as encode_class)
        if seg.ndim == 3 and not seg.is_floating_point():
            if seg.numel() and not (0 <= int(seg.min()) and int(seg.max()) < cfg.in_channels):
                raise ValueError(
                    f"the label map holds labels {int(seg.min())} .. {int(seg.max())}: this model knows "
                    f"{cfg.in_channels} classes, 0 .. {cfg.in_channels - 1}"
                )
            seg = F.one_hot(seg.long(), cfg.in_channels).permute(0, 3, 1, 2)  # (B, H, W) -> (B, C, H, W)
        elif seg.ndim != 4 or seg.shape[1] != cfg.in_channels:
            raise ValueError(
                f"a segmentation must be a label map (B, H, W) of integers or a one-hot "
                f"(B, {cfg.in_channels}, H, W) for this model's {cfg.in_channels} classes, got "
                f"{tuple(seg.shape)} {seg.dtype}"
            )
        if seg.shape[-1] % cfg.factor or seg.shape[-2] % cfg.factor:
            raise ValueError(f"a segmentation's height and width must be multiples of {cfg.factor}, got "
                             f"{tuple(seg.shape[-2:])}")  # fmt: skip
        return self.segmentation_encoder(seg.to(self.device, self.dtype))

    def layout_tokens(self, layouts: list) -> Tensor:
        """Layouts (one list of (class, (x0, y0, w, h)[, is_group_of]) per image, coordinates in [0, 1]) ->
        token ids (B, 92) on the model's device (conditioning.LayoutTokenizer says how)."""
        if self.layout_tokenizer is None:
            raise ValueError(f"layout_tokens() needs a layout model; this one is {self.kind!r}")
        return self.layout_tokenizer(layouts).to(self.device)

    def encode_layout(self, tokens: Tensor) -> Tensor:
        """tau_theta(y) of a layout: token ids (B, 92) from layout_tokens() -> context (B, 92, D)."""
        if self.kind != "layout":
            raise ValueError(f"encode_layout() needs a layout model; this one is {self.kind!r}")
        return self.text_encoder(tokens.to(self.device))

    def inpaint_condition(self, image: Tensor, mask: Tensor) -> Tensor:
        """The inpainting model's concat input, as CompVis scripts/inpaint.py builds it.

        image (B, 3, H, W) in [-1, 1]; mask (B, 1, H, W), 1 = the pixels to fill, 0 = keep. The masked image
        (the pixels to fill set to -1, black) goes through the first stage's encoder (VQ: the latent before
        quantisation; KL: the posterior's mean; no scale factor: CompVis' cond_stage_model.encode), and the
        mask, as -1/+1, is resized to the latent (nearest): (B, c + 1, H/f, W/f).
        """
        if self.kind != "inpaint":
            raise ValueError(f"inpaint_condition() needs an inpaint model; this one is {self.kind!r}")
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"the image must be (B, 3, H, W) in [-1, 1], got {tuple(image.shape)}")
        if mask.shape != (image.shape[0], 1, *image.shape[2:]):
            raise ValueError(
                f"the mask must be (B, 1, H, W) = {(image.shape[0], 1, *image.shape[2:])} to match the "
                f"image, got {tuple(mask.shape)}"
            )
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("the mask must be binary, 1 = fill and 0 = keep (threshold a soft mask at 0.5)")
        image, mask = image.to(self.device, self.dtype), mask.to(self.device, self.dtype)  # checked: moved
        masked = (1 - mask) * (image + 1) - 1  # inpaint.py: ((1 - m) * (x + 1) / 2) * 2 - 1
        if isinstance(self.autoencoder, VQModel):
            latent = self.autoencoder.encode(masked)  # (B, c, h, w), not quantised
        else:
            latent = self.autoencoder.encode(masked).mode()
        small = F.interpolate(mask * 2 - 1, size=latent.shape[-2:], mode="nearest")  # (B, 1, h, w) in {-1, 1}
        return torch.cat([latent, small], dim=1)  # (B, c + 1, h, w)

    # --- denoiser ---------------------------------------------------------------------------------
    def predict_noise(self, x: Tensor, t: Tensor | int, cond: Tensor | None = None) -> Tensor:
        """eps_theta(z_t, t, tau_theta(y)) (LDM Eq. 3; Eq. 2 unconditional). x: (B, c, h, w); t: (B,) or a
        scalar timestep. cond is what the UNet consumes besides z_t (CONDITIONING): the cross-attention
        context (B, L, D), or the tensor concatenated after x on dim 1 (B, c_y, h, w); None if unconditional.
        """
        if self.conditioning is None:
            if cond is not None:
                raise ValueError("an unconditional model takes no cond")
            return self.unet(x, t)
        if cond is None:
            raise ValueError(f"this {self.kind} model needs cond: {COND_HELP[self.kind]}")
        if self.conditioning == "crossattn":
            return self.unet(x, t, cond)
        if cond.ndim != 4 or cond.shape[0] != x.shape[0] or cond.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"this {self.kind} model's cond is {COND_HELP[self.kind]}: (B, C, h, w) with x's B, h and w "
                f"{tuple(x.shape)}, got {tuple(cond.shape)}"
            )
        return self.unet(torch.cat([x, cond.to(x.dtype)], dim=1), t)  # (B, c + c_y, h, w)

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
