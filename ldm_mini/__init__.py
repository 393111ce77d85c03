"""ldm_mini: Latent Diffusion Models (Rombach et al., CVPR 2022), from scratch, one concept per file.

    m = ldm_mini.load()                       # the embedded shapes model, a converted file, or a hub id
    images = ldm_mini.txt2img(m, "a red circle above a blue square", generator=torch.manual_seed(0))

Two layers, and every import points down (tests/test_layering.py):

  core     autoencoder (KL and VQ, every f and attention variant), unet (one UNet for all published
           models), bert (LDMBert), fast (the opt-in CPU kernels), tokenizer (WordPiece), schedule (betas,
           alpha-bar, q_sample, the timesteps and sigmas a sampler visits), samplers (DDPM, DDIM, PLMS,
           guidance, the registry), ksamplers (LMS, Euler, Heun, DPM-2, DPM-Solver++, UniPC: the ODE/SDE
           solvers in sigma), conditioning (the class, segmentation and layout encoders), model (the
           LatentDiffusion container), loading (the weight file), pipeline (one function per task), tiling
           (large images in bounded memory)
  tooling  hub (embedded names, files and hub ids -> a model), __main__ (the command line), verify (against
           diffusers), viz (notebook figures), shapes (the procedural world), train (the embedded model),
           exercises (the course kit's graders)

The converters (weights_tools/) sit between the two: they import the core, and the hub imports them.
"""

from . import samplers, schedule
from .hub import load, load_autoencoder
from .loading import save
from .model import LatentDiffusion
from .pipeline import (
    class_conditional,
    inpaint,
    layout_to_image,
    semantic_synthesis,
    superres,
    txt2img,
    unconditional,
)

__all__ = ["LatentDiffusion", "class_conditional", "inpaint", "layout_to_image", "load", "load_autoencoder",
           "samplers", "save", "schedule", "semantic_synthesis", "superres", "txt2img",
           "unconditional"]  # fmt: skip
