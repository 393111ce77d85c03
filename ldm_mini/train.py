"""Train the embedded "shapes" text-to-image LDM, in two stages as in the paper, on a CPU in under 90 min.

LDM   Rombach et al. 2022, arXiv:2112.10752. Stage 1 (Sec. 3.1): an autoencoder, x -> z = E(x) -> D(z).
      Stage 2 (Sec. 3.2-3.3): a diffusion model on z, eps-prediction L_LDM = E ||eps - eps_theta(z_t, t,
      tau_theta(y))||^2 (Eq. 2 with the conditioning of Eq. 3), the text encoder tau_theta trained jointly
      with the UNet (cond_stage_trainable: true in txt2img-1p4B-eval.yaml).
DDPM  Ho et al. 2020, arXiv:2006.11239: z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps (Eq. 4), t uniform.
CFG   Ho & Salimans 2022, arXiv:2207.12598: the caption is dropped to "" with probability 0.1 (Algorithm 1),
      so the one network learns eps(z_t, "") too, which classifier-free guidance needs.
minSNR Hang et al. 2023, arXiv:2303.09556: each sample's eps loss weighted by min(SNR_t, gamma) / SNR_t,
      gamma = 5 (the min-SNR-gamma weighting written for eps-prediction); it speeds up convergence.
EMA   the exported UNet and text encoder are an exponential moving average of the trained weights.

Stage 1 here uses an L1 reconstruction loss plus the KL term with LDM's tiny weight (1e-6 relative to the
summed L1, as CompVis LPIPSWithDiscriminator weighs it); the perceptual (LPIPS) and adversarial losses of the
paper are left out: flat shapes on a plain background have no texture for them to sharpen.
The data is the infinite procedural shapes world (shapes.py), "train" split only: the held-out colour+shape
pairs are never seen, in images or in captions.

    python -m ldm_mini.train autoencoder --out runs/shapes    # stage 1: 1800 steps, ~22 min
    python -m ldm_mini.train diffusion --out runs/shapes      # stage 2: 14000 steps, ~66 min
    python -m ldm_mini.train export runs/shapes ldm_mini/weights/shapes.safetensors --force

The other embedded models (benchmarks/RESULTS.md has their recipes and figures): a VQ-f4 stage 1, and the
unconditional and super-resolution stage 2 on it:

    python -m ldm_mini.train autoencoder --kind vq --out runs/shapes-vq --steps 4000 --restart-until 3000
    python -m ldm_mini.train export-autoencoder runs/shapes-vq ldm_mini/weights/shapes-vq.safetensors
    python -m ldm_mini.train diffusion --task unconditional --autoencoder runs/shapes-vq --out runs/uncond
    python -m ldm_mini.train diffusion --task superres --autoencoder runs/shapes-vq --out runs/superres
    python -m ldm_mini.train export runs/uncond ldm_mini/weights/shapes-uncond.safetensors

(Minutes measured for the shipped model on a 2-core CPU: stage 1 with one thread on a machine shared with
other jobs, stage 2 with torch's default two threads on a quiet one. Other parameters default to the
shipped model's.)

Each stage writes into --out: a checkpoint (<stage>.pt, every few minutes and at the end), a loss log
(<stage>_log.jsonl), sample grids (<stage>_<step>.png). Re-running with --resume continues a cut-off run
exactly where its checkpoint stopped: weights, optimizer, EMA, step, and the numpy + torch random states.

Several processes (DistributedDataParallel, one rank per process, gloo on CPUs, nccl on GPUs):

    torchrun --nproc_per_node=4 -m ldm_mini.train diffusion --out runs/shapes --device cuda --precision bf16

--batch stays the global batch. Every rank draws the whole batch, its scenes and every random number of the
step (timesteps, noise, caption dropout, masks) from the same generators a single process uses, and computes
the loss of its own equal slice; DDP averages the gradients (the mean of equal slices' means is the batch
mean), so the weights follow the single-process trajectory up to float rounding (the order of the sums
differs). Rank 0 alone writes the checkpoint, log and grids; a checkpoint resumes with any number of ranks.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import normalizers, pre_tokenizers
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed, hub, samplers, shapes
from .autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian, VQModel, build_autoencoder
from .bert import LDMBert, LDMBertConfig
from .conditioning import LayoutConfig, LayoutTokenizer, SpatialRescaler, SpatialRescalerConfig
from .loading import config_from_values, config_to_json, make_autoencoder_metadata, save, write_file
from .model import LatentDiffusion
from .schedule import ScheduleConfig, q_sample, snr
from .tokenizer import SPECIALS, Tokenizer
from .unet import UNet, UNetConfig

# --- the embedded model (~3M parameters: 12 MB in float32) -------------------------------------------------
AUTOENCODER = AutoencoderConfig(  # KL, f = 4: 64x64x3 image <-> 16x16x4 latent
    kind="kl", ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=4, embed_dim=4, norm_num_groups=8
)
UNET = UNetConfig(  # levels at 16x16 (32 ch), 8x8 (64), 4x4 (64); self + cross-attention at 8x8, 4x4, mid
    in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
    attention_resolutions=(2, 4), num_heads=None, num_head_channels=32, context_dim=128, norm_num_groups=16,
    image_size=16,
)  # fmt: skip
# The VQ sibling of AUTOENCODER (as the VQ-f4 of celebahq and bsr_sr: f = 4, 3 latent channels), for the
# unconditional and super-resolution models: 64x64x3 image <-> 16x16x3 latent, snapped to one of 512 codes.
AUTOENCODER_VQ = AutoencoderConfig(
    kind="vq", ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=3, embed_dim=3, n_embed=512,
    norm_num_groups=8,
)  # fmt: skip
AUTOENCODERS = {"kl": AUTOENCODER, "vq": AUTOENCODER_VQ}
TEXT_WIDTH, TEXT_LAYERS = 128, 2  # LDMBert: 2 layers of width 128 (4 heads of 32), vocab from the captions
# The UNets of the other tasks: UNET without its text context (self-attention only, as celebahq's), on the VQ
# latent; super-resolution concatenates the 16x16 low-res RGB image to z_t (as bsr_sr), hence 3 + 3 inputs.
UNETS = {
    "txt2img": UNET,
    "unconditional": dataclasses.replace(UNET, in_channels=3, out_channels=3, context_dim=None),
    "superres": dataclasses.replace(UNET, in_channels=6, out_channels=3, context_dim=None),
    # inpainting: z_t, the masked image's latent and the mask at the latent's size, 3 + 3 + 1 (inpainting_big)
    "inpaint": dataclasses.replace(UNET, in_channels=7, out_channels=3, context_dim=None),
    # layout-to-image: UNET's cross-attention reads a layout transformer (as layout2img-openimages256)
    "layout": dataclasses.replace(UNET, in_channels=3, out_channels=3),
    # semantic synthesis: the rescaled label map concatenated to z_t, 3 + 3 (as semantic_synthesis256)
    "semantic": dataclasses.replace(UNET, in_channels=6, out_channels=3, context_dim=None),
}
# The label maps of semantic synthesis (shapes.segmentation): background + 32 classes, one-hot, rescaled by
# SpatialRescaler (two bilinear halvings to the 16x16 latent, a 1x1 conv to 3 channels, trained with the UNet)
SEGMENTATION = SpatialRescalerConfig(in_channels=1 + len(shapes.LAYOUT_CLASSES), out_channels=3)
# The layout tokens (conditioning.LayoutTokenizer): 32 classes (colour x shape), box corners on a 32 x 32 grid
# (2 px), at most 3 objects: 3 * 3 + 2 = 11 tokens for a 2-layer LDMBert of TEXT_WIDTH, trained with the UNet
LAYOUT = LayoutConfig(n_tokens=1024, n_classes=len(shapes.LAYOUT_CLASSES), max_objects=3)
TASKS = tuple(UNETS)
# Training betas as every LDM (CompVis "linear" = scaled_linear 0.00085..0.012, T = 1000). Sampling: the
# "trailing" spacing starts at t = 999, the noisiest step, which few-step DDIM needs (Lin et al. 2024,
# arXiv:2305.08891, Sec. 3.3), and the last step lands on alpha-bar = 1 (set_alpha_to_one).
SCHEDULE = ScheduleConfig(timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True)
# Scenes of 1, 2, 3 shapes in training: more multi-shape scenes than the evaluation prompts hold (0.45, 0.45,
# 0.1), because binding each colour to its own shape and place in those is what the model is slowest to learn.
TRAIN_NUM_SHAPES_P = (0.3, 0.5, 0.2)
# What the command line samples each model with by default (measured: benchmarks/RESULTS.md)
RECOMMENDED = {"steps": 20, "guidance": 2.0}  # shapes (txt2img): the guidance sweep
RECOMMENDED_OF = {"txt2img": RECOMMENDED, "unconditional": {"steps": 50}, "superres": {"steps": 50},
                  "inpaint": {"steps": 100, "eta": 1.0}, "layout": {"steps": 50},
                  "semantic": {"steps": 50}}  # fmt: skip
GRID_PROMPTS = [
    "a red circle above a blue square",
    "a green triangle on the left",
    "a large yellow circle",
    "a small purple cross to the right of an orange square",
    "a black square below a red triangle",
    "a blue circle, a yellow cross and a green square from left to right",
    "a red cross",  # held out: never seen in training
    "a blue triangle at the bottom",  # held out
]


# --- small helpers ---------------------------------------------------------------------------------------
def train_tokenizer(num_captions: int = 5000, seed: int = 0) -> Tokenizer:
    """A BERT-style WordPiece vocabulary learnt from the caption language (Wu et al. 2016, Sec. 4.1).

    Specials first, as in bert-base-uncased's order ([PAD] = 0, [UNK], [CLS], [SEP], [MASK]), then the
    characters and merged pieces; with ~30 words in the grammar every word ends up a single piece."""
    backend = RustTokenizer(WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    rng = np.random.default_rng(seed)
    captions = [shapes.random_scene(rng).caption for _ in range(num_captions)]
    captions.append(" ".join(shapes.caption_vocabulary()))  # every word at least once
    backend.train_from_iterator(captions, WordPieceTrainer(vocab_size=200, special_tokens=list(SPECIALS)))
    # The trainer breaks ties between merges, and numbers pieces, in a hash order that changes from run to
    # run. Keep what is stable, sorted: the alphabet (c, ##c) and the whole words; drop the intermediate
    # merges ("##ang"), which no caption word needs once every word is a piece of its own.
    words = set(shapes.caption_vocabulary())
    pieces = sorted(t for t in backend.get_vocab() if len(t.removeprefix("##")) == 1 or t in words)
    tokenizer = Tokenizer.from_vocab("".join(t + "\n" for t in [*SPECIALS, *pieces]))
    if missing := [w for w in sorted(words) if tokenizer.pieces(w) != [w]]:
        raise RuntimeError(f"the WordPiece trainer did not learn the words {missing}: give it more captions")
    return tokenizer


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then a cosine decay to lr / 10 at the last step."""
    if step < warmup:
        return lr * min(1.0, (step + 1) / warmup)
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, loss: Tensor, max_grad_norm: float | None = None
) -> float:
    """One optimisation step on `loss` (computed by `model`): clear the old gradients, backpropagate, clip the
    gradient norm (when max_grad_norm is set), update. Returns the loss as a float, for the log."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    return loss.item()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    """ema <- d * ema + (1 - d) * model, with d warmed up as (1 + step) / (10 + step) (as CompVis LitEma)."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - d)


def save_grid(images: Tensor, path: Path, nrow: int) -> None:
    """(N, 3, H, W) in [-1, 1] -> one PNG, nrow images per row."""
    n, _, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(3, rows * h, nrow * w)
    for i, im in enumerate(images.detach().float().cpu().clamp(-1, 1)):
        r, c = divmod(i, nrow)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    array = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()  # (rows*H, nrow*W, 3)
    PIL.Image.fromarray(array).save(path)


class Run:
    """One stage's folder: checkpoint, JSONL loss log and PNG grids, all under --out."""

    def __init__(self, out: str | os.PathLike, stage: str):
        self.dir, self.stage = Path(out), stage
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.dir / f"{stage}.pt"

    def log(self, record: dict) -> None:
        with open(self.dir / f"{self.stage}_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, state: dict) -> None:
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt)  # a run killed while saving keeps its previous checkpoint

    def load(self) -> dict:
        if not self.ckpt.exists():
            raise FileNotFoundError(f"--resume: no checkpoint {self.ckpt}; run without --resume to start")
        return torch.load(self.ckpt, map_location="cpu", weights_only=True)


def rng_state(rng: np.random.Generator, gen: torch.Generator) -> dict:
    return {"numpy": json.dumps(rng.bit_generator.state), "torch": gen.get_state()}


def set_rng_state(rng: np.random.Generator, gen: torch.Generator, state: dict) -> None:
    rng.bit_generator.state = json.loads(state["numpy"])
    gen.set_state(state["torch"])


def fingerprint(module: nn.Module) -> float:
    """A number that changes when the weights do (to refuse resuming on another autoencoder)."""
    return float(sum(p.detach().cpu().double().sum() for p in module.state_dict().values()))


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def load_autoencoder(out: str | os.PathLike) -> AutoencoderKL | VQModel:
    """The stage-1 autoencoder, frozen: a run folder's final weights, or else an embedded name ("shapes-vq")
    or an autoencoder .safetensors file (ldm_mini.load_autoencoder: a stage 2 on a shipped stage 1)."""
    if not Path(out).is_dir():
        return hub.load_autoencoder(out).requires_grad_(False)
    state = Run(out, "autoencoder").load()
    ae = build_autoencoder(config_from_values(AutoencoderConfig, state["config"], f"{out}/autoencoder.pt"))
    ae.load_state_dict(state["model"], strict=True)
    return ae.eval().requires_grad_(False)


# --- several processes (torchrun), devices, precision ------------------------------------------------------
def init_distributed(device: str = "cpu") -> tuple[int, int, torch.device]:
    """Join torchrun's process group when started by torchrun (distributed.py) -> (rank, world_size, this
    rank's device). Without it: rank 0 of 1, no process group. CUDA ranks take the GPU of their LOCAL_RANK."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here; train on the CPU with --device cpu")
    where = distributed.device_for_rank(torch.device(device))
    distributed.init(where)
    return *distributed.rank_and_world(), where


def batch_part(batch: int, rank: int, world: int) -> slice:
    """The rows of the global batch that `rank` computes the loss of: equal slices, so that DDP's average of
    the ranks' mean losses is the mean over the whole batch."""
    if batch % world:
        raise ValueError(f"--batch {batch} is the global batch, split equally over {world} ranks: "
                         f"make it a multiple of {world}")  # fmt: skip
    size = batch // world
    return slice(rank * size, (rank + 1) * size)


class Objective(nn.Module):
    """A loss function run as the forward of the modules it trains. DistributedDataParallel averages the
    gradients of what its own forward computed, but a loss here is a function of several modules (UNet and
    LDMBert) rather than one module's forward: DDP(Objective(trained))(diffusion_loss, m, ...) is one."""

    def __init__(self, trained: nn.Module):
        super().__init__()
        self.trained = trained

    def forward(self, loss_fn, *args):
        return loss_fn(*args)


def data_parallel(trained: nn.Module, world: int):
    """(loss_fn, *args) -> loss_fn(*args): through DDP with several ranks (the backward pass then averages the
    gradients of `trained` over them), directly in a single process (no process group, nothing changes)."""
    if world == 1:
        return lambda loss_fn, *args: loss_fn(*args)
    return nn.parallel.DistributedDataParallel(Objective(trained))


def autocast(precision: str, device: torch.device):
    """--precision bf16: the forward passes under torch.autocast (convolutions and matmuls in bfloat16; norms,
    softmax and the losses in float32); weights, gradients and AdamW stay float32. fp32: a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# --- stage 1: the autoencoder ----------------------------------------------------------------------------
def posterior_sample(posterior: DiagonalGaussian, gen: torch.Generator, batch: int, part: slice) -> Tensor:
    """A reparameterised sample of the posterior of a part of a batch of `batch` images: the noise is drawn
    for the whole batch (what a single process draws, from the same generator state), then sliced."""
    eps = torch.randn((batch, *posterior.mean.shape[1:]), generator=gen)[part]  # (B, 4, 16, 16) -> (b, ...)
    return posterior.sample(noise=eps)


def autoencoder_loss(ae: AutoencoderKL, images: Tensor, gen: torch.Generator, kl_weight: float,
                     part: slice = slice(None)):  # fmt: skip
    """L1 reconstruction of a posterior sample + kl_weight * KL, both summed per image (CompVis' scale), on
    the rows `part` of the batch (a rank's slice; all of them by default)."""
    x = images[part].to(device_of(ae))  # (b, 3, 64, 64)
    posterior = ae.encode(x)  # N(mean, var) over (b, 4, 16, 16)
    recon = ae.decode(posterior_sample(posterior, gen, len(images), part))  # (b, 3, 64, 64)
    l1 = (recon - x).abs().sum(dim=[1, 2, 3]).mean()
    kl = posterior.kl().mean()
    return l1 + kl_weight * kl, recon, {"l1": l1.item() / x[0].numel(), "kl": kl.item()}


def vq_loss(ae: VQModel, images: Tensor, beta: float = 0.25):
    """VQ-VAE's loss (van den Oord et al. 2017, Eq. 3) with an L1 reconstruction: |x - D(z_q)| + ||sg[z_e] -
    e||^2 + beta ||z_e - sg[e]||^2, means per value as CompVis VQModel weighs them (codebook weight 1, beta
    0.25). The first term trains encoder and decoder (through the straight-through z_q), the second moves
    each used code e towards the encoder outputs z_e assigned to it, the third keeps z_e near its code.
    Also returns the code indices, for the code restarts and the codebook's perplexity."""
    z_e = ae.encode(images)  # (B, 3, 16, 16), before quantisation
    z_q, indices = ae.quantize(z_e)  # straight-through: value e, gradient to z_e
    codes = ae.quantize.embedding(indices).permute(0, 3, 1, 2)  # (B, 3, 16, 16): e itself, for its gradient
    recon = ae.decode(z_q, quantize=False)
    l1 = (recon - images).abs().mean()
    codebook, commitment = F.mse_loss(codes, z_e.detach()), F.mse_loss(z_e, codes.detach())
    loss = l1 + codebook + beta * commitment
    return loss, recon, indices, {"l1": l1.item(), "codebook": codebook.item(), "commit": commitment.item()}


@torch.no_grad()
def restart_dead_codes(ae: VQModel, z_e: Tensor, counts: Tensor, gen: torch.Generator) -> int:
    """Codes no latent chose since the last restart (counts == 0) jump to random encoder outputs of the
    current batch (the "codebook reset" of Dhariwal et al. 2020, Jukebox, Sec. 3.1): an unused code gets no
    gradient from the codebook term and would stay dead. Returns how many were restarted."""
    dead = (counts == 0).nonzero().flatten()
    if len(dead):
        pool = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])  # (B*h*w, 3)
        pick = torch.randint(0, len(pool), (len(dead),), generator=gen)
        ae.quantize.embedding.weight[dead] = pool[pick]
    return len(dead)


def perplexity(counts: Tensor) -> float:
    """exp(entropy) of the code usage: the number of equally used codes it amounts to (<= n_embed)."""
    p = counts.float() / counts.sum()
    return math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())


def train_autoencoder(args) -> Path:
    rank, world, device = init_distributed(args.device)
    part = batch_part(args.batch, rank, world)  # this rank's rows of every global batch
    run = Run(args.out, "autoencoder")
    torch.manual_seed(args.seed)  # the initial weights (the same on every rank)
    config = AUTOENCODERS[args.kind]
    ae = build_autoencoder(config).to(device)
    opt = torch.optim.AdamW(ae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng, gen = np.random.default_rng([args.seed, 1]), torch.Generator().manual_seed(args.seed)
    step, elapsed = 0, 0.0
    if args.resume:
        state = run.load()
        ae.load_state_dict(state["model"], strict=True)
        opt.load_state_dict(state["opt"])
        set_rng_state(rng, gen, state["rng"])
        step, elapsed = state["step"], state["elapsed"]
    fixed, _, _ = shapes.sample_batch(8, np.random.default_rng([args.seed, 2]))  # for the grids
    vq = isinstance(ae, VQModel)
    counts = torch.zeros(config.n_embed, dtype=torch.long)  # VQ: how often each code was chosen lately
    if args.resume and vq:
        counts = state["counts"]
    loss_of = data_parallel(ae, world)  # (after the resume: DDP starts every rank from rank 0's weights)

    def checkpoint():
        run.save({"model": ae.state_dict(), "opt": opt.state_dict(), "rng": rng_state(rng, gen),
                  "step": step, "elapsed": elapsed, "config": dataclasses.asdict(config),
                  "counts": counts, "args": vars(args)})  # fmt: skip

    start, last_ckpt = time.time() - elapsed, time.time()
    bar = tqdm(total=args.steps, initial=step, desc="autoencoder", disable=not args.progress or rank > 0)
    while step < min(args.steps, args.stop_at or args.steps):
        images, _, _ = shapes.sample_batch(args.batch, rng)  # (B, 3, 64, 64) in [-1, 1]: the global batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        with autocast(args.precision, device):
            if vq:
                loss, _, indices, parts = loss_of(vq_loss, ae, images[part].to(device))
                # the codes chosen in the whole batch, on every rank: all ranks restart the same codes
                counts += distributed.sum_over_ranks(
                    torch.bincount(indices.flatten(), minlength=config.n_embed)
                ).cpu()
            else:
                loss, _, parts = loss_of(autoencoder_loss, ae, images, gen, args.kl_weight, part)
        train_step(ae, opt, loss)
        step += 1
        parts = distributed.mean_over_ranks({"loss": loss.item(), **parts}, device)
        if vq and step % args.restart_every == 0:
            parts["perplexity"] = perplexity(counts)
            if step <= args.restart_until:  # then the codebook settles
                # every rank encodes the whole global batch and draws the same codes from the same `gen`;
                # rank 0's codebook is then broadcast, which makes the ranks' copies equal bit for bit
                z_e = ae.encode(images.to(device)).detach()  # (B, 3, 16, 16)
                parts["restarted"] = restart_dead_codes(ae, z_e, counts, gen)
                distributed.broadcast(ae.quantize.embedding.weight.data, src=0)
            counts.zero_()
        elapsed = time.time() - start
        bar.update(1)
        bar.set_postfix(l1=f"{parts['l1']:.4f}")
        if rank > 0:  # rank 0 alone writes the log, the grids and the checkpoint
            continue
        if step % args.log_every == 0 or step == args.steps or "restarted" in parts:
            lr = opt.param_groups[0]["lr"]
            run.log({"step": step, **parts, "lr": lr, "time": elapsed})
        if step % args.grid_every == 0 or step == args.steps:
            with torch.no_grad():
                recon = ae(fixed.to(device))
            save_grid(torch.cat([fixed, recon.cpu()]), run.dir / f"autoencoder_{step:06d}.png", nrow=8)
        if time.time() - last_ckpt > 60 * args.ckpt_minutes or step in (args.steps, args.stop_at):
            checkpoint()
            last_ckpt = time.time()
    bar.close()
    return run.ckpt


# --- stage 2: the diffusion model ------------------------------------------------------------------------
def scale_factor(z: Tensor) -> float:
    """LDM's scale_by_std: 1 / std of all the values of the latents z: scale_factor * z has unit variance."""
    return 1.0 / z.flatten().std().item()


def first_stage_latent(ae: AutoencoderKL | VQModel, images: Tensor, gen: torch.Generator,
                       part: slice = slice(None)) -> Tensor:  # fmt: skip
    """E(x), unscaled, of the rows `part` of the batch: a KL posterior sample, or the VQ latent before
    quantisation (what the LDM VQ models are trained on: the quantiser belongs to the decoder, Sec. 3.1)."""
    latent = ae.encode(images[part].to(device_of(ae)))
    return latent if isinstance(ae, VQModel) else posterior_sample(latent, gen, len(images), part)


@torch.no_grad()
def latent_scale(ae: AutoencoderKL | VQModel, n: int, seed: int) -> float:
    """The scale factor of the latents of n fresh images."""
    images, _, _ = shapes.sample_batch(n, np.random.default_rng([seed, 3]))
    return scale_factor(first_stage_latent(ae, images, torch.Generator().manual_seed(seed)))


def eps_loss(m: LatentDiffusion, z0: Tensor, t: Tensor, noise: Tensor, context: Tensor | None,
             snr_gamma: float | None = 5.0) -> Tensor:  # fmt: skip
    """The eps-prediction loss of latents z0 (B, c, h, w) at timesteps t (B,) with noise eps: the mean of
    ||eps - eps_theta(z_t, t, context)||^2 (LDM Eq. 2-3, DDPM Eq. 14), each sample's weighted by
    min(SNR_t, snr_gamma) / SNR_t (min-SNR for eps-prediction; snr_gamma=None: unweighted)."""
    z_t = q_sample(z0, t, noise, m.alphas_cumprod)  # DDPM Eq. 4
    eps = m.predict_noise(z_t, t, context)  # (B, c, h, w)
    per_sample = F.mse_loss(eps, noise, reduction="none").mean(dim=[1, 2, 3])  # (B,)
    if snr_gamma is None:
        return per_sample.mean()
    s = snr(m.alphas_cumprod)[t]  # (B,)
    return (s.clamp(max=snr_gamma) / s * per_sample).mean()


def diffusion_loss(m: LatentDiffusion, images: Tensor, captions: list[str], gen: torch.Generator,
                   part: slice = slice(None)):  # fmt: skip
    """min-SNR-5-weighted eps-prediction loss on one batch of images; the autoencoder is frozen. Only the
    rows `part` are computed (a rank's slice), but every random number is drawn for the whole batch, so each
    row gets the t and noise it gets in a single process."""
    with torch.no_grad():  # (b, 4, 16, 16), ~unit variance
        z0 = first_stage_latent(m.autoencoder, images, gen, part) * m.scale_factor
    t = torch.randint(0, m.alphas_cumprod.shape[0], (len(images),), generator=gen)[part]  # (B,) -> (b,)
    noise = torch.randn((len(images), *z0.shape[1:]), generator=gen)[part]  # (B, 4, 16, 16) -> (b, ...)
    context = m.encode_text(m.tokenize(captions[part]))  # (b, 77, 128), gradients flow into LDMBert
    return eps_loss(m, z0, t.to(m.device), noise.to(m.device), context, snr_gamma=5.0)


def task_condition(m: LatentDiffusion, images: Tensor, scenes: list, gen: torch.Generator,
                   part: slice = slice(None)) -> Tensor | None:  # fmt: skip
    """What the UNet of a task is given besides z_t in training: nothing (unconditional); the degraded 16x16
    image (superres, shapes.degrade, as bsr_sr); the masked image's latent and the mask of a random
    rectangle or stroke (inpaint, shapes.random_masks, as inpainting_big: m.inpaint_condition); the layout
    transformer's context of the scenes' boxes (layout, shapes.layout, as layout2img-openimages256); the
    rescaled label map (semantic, shapes.segmentation, as semantic_synthesis256). Of the rows `part` (the
    random degradations and masks drawn for the whole batch, as for diffusion_loss's noise)."""
    if m.kind == "layout":
        return m.encode_layout(m.layout_tokens([shapes.layout(s) for s in scenes[part]]))  # (b, 11, 128)
    if m.kind == "semantic":  # (b, 3, 16, 16)
        return m.encode_segmentation(torch.stack([shapes.segmentation(s) for s in scenes[part]]))
    if m.kind == "superres":
        return shapes.degrade(images, gen)[part].to(m.device)  # (b, 3, 16, 16) in [-1, 1]
    if m.kind == "inpaint":  # (b, 3 + 1, 16, 16)
        return m.inpaint_condition(images[part], shapes.random_masks(len(images), gen)[part])
    return None


def task_loss(m: LatentDiffusion, images: Tensor, scenes: list, gen: torch.Generator,
              part: slice = slice(None)):  # fmt: skip
    """The min-SNR-5 eps loss of the unconditional, super-resolution, inpainting and layout models: the
    task's condition (task_condition) concatenated to z_t or, for layouts, the cross-attention context
    (layout and semantic: computed with gradients, their encoders train with the UNet). Of the rows `part`,
    every random number drawn for the whole batch (as diffusion_loss)."""
    with torch.no_grad():
        z0 = first_stage_latent(m.autoencoder, images, gen, part) * m.scale_factor  # (b, 3, 16, 16)
    learnt = m.kind in ("layout", "semantic")  # their encoders train with the UNet (cond_stage_trainable)
    with torch.set_grad_enabled(learnt):
        cond = task_condition(m, images, scenes, gen, part)
    t = torch.randint(0, m.alphas_cumprod.shape[0], (len(images),), generator=gen)[part]  # (B,) -> (b,)
    noise = torch.randn((len(images), *z0.shape[1:]), generator=gen)[part]  # (B, 3, 16, 16) -> (b, ...)
    return eps_loss(m, z0, t.to(m.device), noise.to(m.device), cond, snr_gamma=5.0)


def build_task_model(task: str, ae, scale_factor: float, tokenizer: Tokenizer | None = None):
    """The LatentDiffusion of a task: txt2img (build_model), unconditional or superres (UNETS[task])."""
    if task == "txt2img":
        return build_model(ae, tokenizer, scale_factor)
    if task == "layout":
        text = LDMBertConfig(vocab_size=LAYOUT.n_tokens, max_seq_len=LAYOUT.length, n_embed=TEXT_WIDTH,
                             n_layer=TEXT_LAYERS, n_heads=4, head_dim=TEXT_WIDTH // 4,
                             ffn_dim=4 * TEXT_WIDTH)  # fmt: skip
        return LatentDiffusion("layout", UNet(UNETS[task]), ae, SCHEDULE, scale_factor, LDMBert(text),
                               layout_tokenizer=LayoutTokenizer(LAYOUT))  # fmt: skip
    if task == "semantic":
        return LatentDiffusion("semantic", UNet(UNETS[task]), ae, SCHEDULE, scale_factor,
                               segmentation_encoder=SpatialRescaler(SEGMENTATION))  # fmt: skip
    return LatentDiffusion(task, UNet(UNETS[task]), ae, SCHEDULE, scale_factor)


def init_from(m: LatentDiffusion, weights: str | os.PathLike) -> None:
    """Start m's UNet from another trained model's on the same autoencoder (--init): the recipe of Stable
    Diffusion's inpainting model, a text-to-image UNet whose first conv gains zero-initialised input channels
    for the extra condition. Here the unconditional UNet (z_t) becomes the inpainting UNet (z_t + masked
    latent + mask): conv_in's weights for z_t are copied, the new channels start at zero, so at step 0 the
    model is exactly the unconditional one, and training only has to learn to read the condition."""
    source = hub.load(weights)
    if fingerprint(source.autoencoder) != fingerprint(m.autoencoder):
        raise ValueError(f"--init {weights}: its autoencoder is not --autoencoder's; a UNet only carries "
                         "over to the latent space it was trained in")  # fmt: skip
    state, own = source.unet.state_dict(), m.unet.state_dict()
    if state.keys() != own.keys():
        raise ValueError(f"--init {weights}: its UNet has other layers than the {m.kind} UNet (a context, "
                         "another depth?); only the input channels may differ")  # fmt: skip
    w, extra = state["conv_in.weight"], own["conv_in.weight"].shape[1] - state["conv_in.weight"].shape[1]
    if extra < 0:
        raise ValueError(f"--init {weights}: its UNet takes more input channels ({w.shape[1]}) than this one")
    # (C0, c_in of the source, 3, 3) -> (C0, c_in + extra, 3, 3): z_t's channels come first in the concat
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], extra, *w.shape[2:])], dim=1)
    bad = [k for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"--init {weights}: other shapes in {bad[:3]}; only the input channels may differ")
    m.unet.load_state_dict(state, strict=True)
    m.scale_factor = source.scale_factor  # the latent scale the UNet learnt with


def build_model(ae: AutoencoderKL, tokenizer: Tokenizer, scale_factor: float) -> LatentDiffusion:
    text = LDMBertConfig(vocab_size=tokenizer.vocab_size, n_embed=TEXT_WIDTH, n_layer=TEXT_LAYERS, n_heads=4,
                         head_dim=TEXT_WIDTH // 4, ffn_dim=4 * TEXT_WIDTH)  # fmt: skip
    return LatentDiffusion("txt2img", UNet(UNET), ae, SCHEDULE, scale_factor, LDMBert(text), tokenizer)


@torch.no_grad()
def sample_grid(m: LatentDiffusion, path: Path, seed: int, steps: int = 20, scale: float = 4.0) -> None:
    """The GRID_PROMPTS, two seeds each, DDIM with guidance: one PNG, a prompt per column."""
    prompts = GRID_PROMPTS * 2
    cond, uncond = m.encode_text(m.tokenize(prompts)), m.encode_text(m.tokenize([""] * len(prompts)))
    shape = (len(prompts), m.latent_channels, 16, 16)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(m.device)
    z0 = samplers.ddim(m, x_T, steps, cond=cond, uncond=uncond, guidance_scale=scale, progress=False)
    save_grid(m.decode(z0), path, nrow=len(GRID_PROMPTS))


@torch.no_grad()
def task_grid(m: LatentDiffusion, path: Path, seed: int, steps: int = 20) -> None:
    """unconditional: 16 samples; superres: 8 held-out scenes as rows of bicubic, LDM and ground truth;
    inpaint: rows of the masked input, the composite and the ground truth; layout: samples of the held-out
    scenes' layouts above the scenes."""
    if m.kind == "unconditional":
        x_T = torch.randn((16, m.latent_channels, 16, 16), generator=torch.Generator().manual_seed(seed))
        x_T = x_T.to(m.device)
        save_grid(m.decode(samplers.ddim(m, x_T, steps, progress=False)), path, nrow=8)
        return
    images, _, scenes = shapes.sample_batch(8, np.random.default_rng([seed, 5]), split="heldout")
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((8, m.latent_channels, 16, 16), generator=gen).to(m.device)
    if m.kind == "superres":
        low = shapes.degrade(images, gen)
        sr = m.decode(samplers.ddim(m, x_T, steps, cond=low.to(m.device), progress=False)).cpu()
        save_grid(torch.cat([F.interpolate(low, scale_factor=4, mode="bicubic"), sr, images]), path, nrow=8)
        return
    if m.kind in ("layout", "semantic"):
        cond = task_condition(m, images, scenes, gen)
        samples = m.decode(samplers.ddim(m, x_T, steps, cond=cond, progress=False)).cpu()
        save_grid(torch.cat([samples, images]), path, nrow=8)
        return
    masks = shapes.random_masks(8, gen)
    filled = m.decode(samplers.ddim(m, x_T, steps, cond=m.inpaint_condition(images, masks), progress=False))
    filled = filled.cpu()
    composite = (1 - masks) * images + masks * filled.clamp(-1, 1)
    save_grid(torch.cat([(1 - masks) * images, composite, images]), path, nrow=8)


def train_diffusion(args) -> Path:
    rank, world, device = init_distributed(args.device)
    part = batch_part(args.batch, rank, world)  # this rank's rows of every global batch
    run = Run(args.out, "diffusion")
    ae = load_autoencoder(args.autoencoder or args.out).to(device)  # frozen: no DDP needed
    torch.manual_seed(args.seed)  # the initial weights (the same on every rank)
    text = args.task == "txt2img"  # captions: a tokenizer, caption dropout, guidance grids
    tokenizer = train_tokenizer(seed=args.seed) if text else None
    # the latent scale: every rank encodes the same images, so every rank computes the same scale (--init and
    # --resume bring the scale their UNet was trained with instead)
    scale = 1.0 if args.init or args.resume else latent_scale(ae, args.scale_images, args.seed)
    m = build_task_model(args.task, ae, scale, tokenizer)
    if args.init and not args.resume:
        init_from(m, args.init)
    m.to(device)
    # what trains: the UNet and the task's encoder, where it has one (LDMBert, the segmentation rescaler)
    encoders = {
        k: getattr(m, k) for k in ("text_encoder", "segmentation_encoder") if getattr(m, k) is not None
    }
    trained = nn.ModuleDict({"unet": m.unet, **encoders})
    ema = copy.deepcopy(trained).requires_grad_(False)
    opt = torch.optim.AdamW(trained.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng, gen = np.random.default_rng([args.seed, 4]), torch.Generator().manual_seed(args.seed)
    step, elapsed = 0, 0.0
    if args.resume:
        state = run.load()
        vocab = tokenizer.vocab_text if text else None
        if state["vocab"] != vocab or state["autoencoder"] != fingerprint(ae) or state["task"] != args.task:
            raise ValueError(
                "--resume: the checkpoint was trained for another task, autoencoder or vocabulary"
            )
        trained.load_state_dict(state["model"], strict=True)
        ema.load_state_dict(state["ema"], strict=True)
        opt.load_state_dict(state["opt"])
        set_rng_state(rng, gen, state["rng"])
        step, elapsed, m.scale_factor = state["step"], state["elapsed"], state["scale_factor"]
    elif rank == 0:
        run.log({"scale_factor": m.scale_factor})
    loss_of = data_parallel(trained, world)  # (after the resume: DDP starts every rank from rank 0's weights)

    def checkpoint():
        run.save(
            {
                "model": trained.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "rng": rng_state(rng, gen),
                "step": step,
                "elapsed": elapsed,
                "scale_factor": m.scale_factor,
                "task": args.task,
                "vocab": tokenizer.vocab_text if text else None,
                "unet_config": config_to_json(UNETS[args.task]),
                "text_encoder_config": config_to_json(m.text_encoder.config)
                if "text_encoder" in encoders
                else None,
                "args": vars(args),
                "autoencoder": fingerprint(ae),
                "autoencoder_config": dataclasses.asdict(ae.config),
                "autoencoder_state": ae.state_dict(),
            }
        )  # fmt: skip (export needs no other folder)

    def ema_model() -> LatentDiffusion:  # with m's autoencoder, tokenizers and schedule
        parts = {k: ema[k] if k in ema else None for k in ("text_encoder", "segmentation_encoder")}
        return LatentDiffusion(args.task, ema["unet"], ae, SCHEDULE, m.scale_factor, tokenizer=tokenizer,
                               layout_tokenizer=m.layout_tokenizer, **parts)  # fmt: skip

    start, last_ckpt = time.time() - elapsed, time.time()
    bar = tqdm(total=args.steps, initial=step, desc="diffusion", disable=not args.progress or rank > 0)
    while step < min(args.steps, args.stop_at or args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        # the global batch and its caption dropout, the same on every rank; each computes the loss of `part`
        with autocast(args.precision, device):
            if text:
                images, captions, _ = shapes.sample_batch(args.batch, rng, num_shapes_p=TRAIN_NUM_SHAPES_P)
                drop = (
                    rng.random(len(captions)) < args.uncond_prob
                )  # caption dropout, for classifier-free guidance
                captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
                loss = loss_of(diffusion_loss, m, images, captions, gen, part)
            else:  # the dataset's own mix of 1, 2, 3 shapes: what an unconditional model should reproduce
                images, _, scenes = shapes.sample_batch(args.batch, rng)
                loss = loss_of(task_loss, m, images, scenes, gen, part)
        train_step(trained, opt, loss, max_grad_norm=1.0)  # (DDP: the gradients are the ranks' mean)
        ema_update(ema, trained, step, args.ema_decay)  # equal weights on every rank: equal EMAs
        step += 1
        elapsed = time.time() - start
        shown = distributed.mean_over_ranks({"loss": loss.item()}, device)["loss"]  # the whole batch's loss
        bar.update(1)
        bar.set_postfix(loss=f"{shown:.4f}")
        if rank > 0:  # rank 0 alone writes the log, the grids and the checkpoint
            continue
        if step % args.log_every == 0 or step == args.steps:
            run.log({"step": step, "loss": shown, "lr": opt.param_groups[0]["lr"], "time": elapsed})
        if step % args.grid_every == 0 or step == args.steps:
            grid = sample_grid if text else task_grid
            grid(ema_model().eval(), run.dir / f"diffusion_{step:06d}.png", args.seed)
        if time.time() - last_ckpt > 60 * args.ckpt_minutes or step in (args.steps, args.stop_at):
            checkpoint()
            last_ckpt = time.time()
    bar.close()
    return run.ckpt


# --- export ----------------------------------------------------------------------------------------------
def export(out: str | os.PathLike, path: str | os.PathLike, dtype: str = "float32", force: bool = False):
    """The run's final EMA weights + autoencoder -> one ldm_mini .safetensors file (loading.save's format)."""
    state = Run(out, "diffusion").load()
    task = state.get("task", "txt2img")  # (checkpoints from before the other tasks are txt2img)
    if "autoencoder_state" in state:
        ae = build_autoencoder(config_from_values(AutoencoderConfig, state["autoencoder_config"], str(out)))
        ae.load_state_dict(state["autoencoder_state"], strict=True)
    else:
        ae = load_autoencoder(out)
    tokenizer = Tokenizer.from_vocab(state["vocab"]) if state["vocab"] else None
    with torch.device("meta"):  # shapes only: the weights come from the checkpoint
        m = build_task_model(task, ae, state["scale_factor"], tokenizer)
    m.autoencoder = ae.eval()
    m.unet.load_state_dict({k[5:]: v for k, v in state["ema"].items() if k.startswith("unet.")}, assign=True)
    for name in ("text_encoder", "segmentation_encoder"):  # the trained encoder, if the task has one
        if getattr(m, name) is not None:
            prefix = name + "."
            getattr(m, name).load_state_dict(
                {k[len(prefix) :]: v for k, v in state["ema"].items() if k.startswith(prefix)}, assign=True
            )
    source = (f"ldm_mini.train shapes world: {state['step']} diffusion steps, EMA weights, "
              f"{state['elapsed'] / 60:.1f} min of diffusion training")  # fmt: skip
    dtype = {"float32": None, "float16": torch.float16}[dtype]
    return save(m, path, force=force, dtype=dtype, source=source, recommended=RECOMMENDED_OF[task])


def export_autoencoder(out: str | os.PathLike, path: str | os.PathLike, force: bool = False) -> Path:
    """The run's stage-1 autoencoder alone -> an ldm_mini file of kind "autoencoder" (read by
    ldm_mini.load_autoencoder, as a converted CompVis first stage is)."""
    state = Run(out, "autoencoder").load()
    ae = load_autoencoder(out)
    source = (f"ldm_mini.train shapes world: {state['step']} autoencoder steps, "
              f"{state['elapsed'] / 60:.1f} min of training")  # fmt: skip
    tensors = {k: v.detach().contiguous() for k, v in ae.state_dict().items()}
    return write_file(path, tensors, make_autoencoder_metadata(ae.config, source=source), force=force)


# --- command line ----------------------------------------------------------------------------------------
def arguments(stage: str, out: str | os.PathLike, **overrides) -> argparse.Namespace:
    """The command line's settings of a stage, its defaults with `overrides` (Python names: grid_every=100),
    for calling train_autoencoder / train_diffusion from a script or a notebook:
    train_autoencoder(arguments("autoencoder", "runs/mine", steps=300))."""
    if stage not in ("autoencoder", "diffusion"):
        raise ValueError(f"stage must be 'autoencoder' or 'diffusion', got {stage!r}")
    args = parser().parse_args([stage, "--out", str(out)])
    if unknown := sorted(set(overrides) - set(vars(args)) - {"stage"}):
        raise ValueError(f"stage {stage!r} has no setting(s) {unknown}; its settings: {sorted(vars(args))}")
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ldm_mini.train", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="stage", required=True)
    for stage, steps, batch, lr in (("autoencoder", 1800, 16, 2e-3), ("diffusion", 14000, 32, 7e-4)):
        p = sub.add_parser(stage, help=f"stage {1 if stage == 'autoencoder' else 2}")
        p.add_argument("--out", required=True, help="run folder (checkpoints, logs, grids)")
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch", type=int, default=batch)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--warmup", type=int, default=100)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
        p.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) after this step")
        p.add_argument("--log-every", type=int, default=10)
        p.add_argument("--grid-every", type=int, default=250 if stage == "autoencoder" else 500)
        p.add_argument("--ckpt-minutes", type=float, default=3.0)
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        p.add_argument("--no-progress", dest="progress", action="store_false")
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="cuda: under torchrun, each rank on the GPU of its LOCAL_RANK")  # fmt: skip
        p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                       help="bf16: forward passes under autocast(bfloat16), weights float32")  # fmt: skip
        if stage == "autoencoder":
            p.add_argument("--kind", choices=tuple(AUTOENCODERS), default="kl", help="KL-f4 or VQ-f4")
            p.add_argument("--kl-weight", type=float, default=1e-6)
            p.add_argument("--restart-every", type=int, default=100, help="VQ: restart unused codes")
            p.add_argument("--restart-until", type=int, default=1200, help="VQ: last step of the restarts")
        else:
            p.add_argument("--task", choices=TASKS, default="txt2img")
            p.add_argument("--autoencoder", help="the stage-1 model: a run folder, an embedded name or an "
                           "autoencoder file (default: --out)")  # fmt: skip
            p.add_argument("--init", help="start the UNet from this trained model (a name or a file) on the "
                           "same autoencoder; new input channels start at zero")  # fmt: skip
            p.add_argument("--uncond-prob", type=float, default=0.1, help="caption dropout to ''")
            p.add_argument("--ema-decay", type=float, default=0.999)
            p.add_argument("--scale-images", type=int, default=512, help="images for the latent scale")
    p = sub.add_parser("export-autoencoder", help="write the stage-1 autoencoder alone as one file")
    p.add_argument("run", help="run folder with autoencoder.pt")
    p.add_argument("path", help="the .safetensors file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p = sub.add_parser("export", help="write the final EMA model as one .safetensors file")
    p.add_argument("run", help="run folder with autoencoder.pt and diffusion.pt")
    p.add_argument("path", help="the .safetensors file to write")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.stage == "export":
        print(f"wrote {export(args.run, args.path, args.dtype, args.force)}")
        return
    if args.stage == "export-autoencoder":
        print(f"wrote {export_autoencoder(args.run, args.path, args.force)}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.batch < 1:
        raise SystemExit(f"--steps and --batch must be >= 1, got {args.steps} and {args.batch}")
    ckpt = (train_autoencoder if args.stage == "autoencoder" else train_diffusion)(args)
    if distributed.is_main():
        print(f"{args.stage}: checkpoint {ckpt}, log and grids in {args.out}")
    # Every rank waits until rank 0 has written the last checkpoint, then all leave the group together: a rank
    # that tore down its gloo group while the other still used it aborted once in CI ("terminate called
    # without an active exception"; torch's docs ask for destroy_process_group once no rank communicates).
    distributed.barrier()
    distributed.close()


if __name__ == "__main__":
    main()
