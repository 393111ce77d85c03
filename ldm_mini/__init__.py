"""ldm_mini: Latent Diffusion Models (Rombach et al., CVPR 2022), from scratch, one concept per file.

    m = ldm_mini.load()                                   # the embedded shapes model, or a converted file
    images = ldm_mini.txt2img(m, "a red circle above a blue square", generator=torch.manual_seed(0))

Modules: autoencoder (KL-f8, VQ-f4), unet (one UNet for all published models), bert (LDMBert),
tokenizer (WordPiece), schedule (betas, alpha-bar, q_sample), samplers (DDPM, DDIM, PLMS, LMS),
pipeline (txt2img, unconditional, superres), model (the LatentDiffusion container), loading (the file).
"""

from . import samplers, schedule
from .loading import load, save
from .model import LatentDiffusion
from .pipeline import superres, txt2img, unconditional

__all__ = ["LatentDiffusion", "load", "samplers", "save", "schedule", "superres", "txt2img", "unconditional"]
