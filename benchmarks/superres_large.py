"""4x super-resolution of a 512x512 image (2048x2048 output) on a CPU in bounded memory: time, peak memory.

    python -m benchmarks.superres_large                      # 512 -> 2048, 2 DDIM steps, float32
    python -m benchmarks.superres_large --size 128 --check   # also compare tiled with untiled where both fit

The full-size ldm-super-resolution-4x model (UNet 113M + VQ-f4 55M parameters, random weights from the
published configs). The UNet runs untiled by default: at a 512x512 latent its largest activation is
160 x 512 x 512 floats (168 MB) and its attention runs at 64x64 = 4096 tokens, so it fits easily; --unet-tile
tiles it too. The decoder is tiled (ldm_mini/tiling.py): untiled, its mid-block attention over 512 x 512 =
262144 tokens alone would cost 4 * 262144^2 * 512 = 1.4e14 FLOP, and its last level holds 128-256 channels
at 2048x2048 (2-4 GB per activation). Only --steps sampler steps run (the pipeline's default is 100); the
time of a full run is extrapolated from the measured time per step.
diffusers' LDMSuperResolutionPipeline has no tiling; --diffusers-unet times one of its UNet steps on the same
weights for the ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time

import torch

import ldm_mini
from ldm_mini import fast
from ldm_mini.autoencoder import VQ_F4, VQModel
from ldm_mini.loading import to_diffusers_names
from ldm_mini.model import LatentDiffusion
from ldm_mini.schedule import ScheduleConfig
from ldm_mini.tiling import TiledModel
from ldm_mini.unet import SUPERRES_4X, UNet

from .bench_vs_diffusers import randomize_

SCHEDULE = ScheduleConfig(beta_start=0.0015, beta_end=0.0155)  # ldm-super-resolution-4x scheduler config


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build(device: torch.device, dtype: torch.dtype) -> LatentDiffusion:
    """The full-size super-resolution LDM with random weights (no init cost: meta, then filled)."""
    with torch.device("meta"):
        unet, vq = UNet(SUPERRES_4X), VQModel(VQ_F4)
    unet, vq = randomize_(unet.to_empty(device="cpu"), 11), randomize_(vq.to_empty(device="cpu"), 13)
    m = LatentDiffusion("superres", unet, vq, SCHEDULE, 1.0).to(device, dtype)
    if fast.default_on(device):  # as ldm_mini.load does
        fast.enable(m)
    return m.eval().requires_grad_(False)


def test_image(size: int) -> torch.Tensor:
    """A smooth synthetic low-res image (1, 3, size, size) in [-1, 1]: rings and gradients."""
    u = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(u, u, indexing="ij")
    r = (x**2 + y**2).sqrt()
    return torch.stack([torch.sin(12 * r), x, y * torch.cos(6 * x)])[None].clamp(-1, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.superres_large", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--size", type=int, default=512, help="low-res input side in pixels (output: 4x)")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps actually run (time is extrapolated)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decode-tile", type=int, default=128, help="decoder tile, latent pixels")
    parser.add_argument("--decode-overlap", type=int, default=None, help="default: tile / 4")
    parser.add_argument(
        "--unet-tile", type=int, default=None, help="UNet tile, latent pixels (default: untiled)"
    )
    parser.add_argument("--unet-overlap", type=int, default=None, help="default: tile / 4")
    parser.add_argument("--check", action="store_true", help="also decode untiled and report the difference")
    parser.add_argument("--diffusers-unet", action="store_true", help="time one diffusers UNet step too")
    parser.add_argument("--workdir", default=None, help="unused; accepted for bench_vs_diffusers")
    args = parser.parse_args(argv)
    if args.size < 8 or args.steps < 1:
        parser.error(f"--size must be at least 8 and --steps at least 1, got {args.size} and {args.steps}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    m = build(device, dtype)
    low = test_image(args.size).to(device, dtype)
    tiled = TiledModel(m, args.decode_tile, args.unet_tile, args.decode_overlap, args.unet_overlap)
    print(f"superres {args.size}x{args.size} -> {4 * args.size}x{4 * args.size}, {args.dtype} on {device}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; decoder tile "
          f"{tiled.decode_tile}/{tiled.decode_overlap}, UNet tile {tiled.unet_tile}", flush=True)  # fmt: skip

    step_times, last = [], [time.perf_counter()]

    def on_step(info):  # called after each sampler step
        sync()
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = ldm_mini.superres(tiled, low, num_inference_steps=args.steps, generator=g, output_type="latent",
                              progress=False, callback=on_step)  # fmt: skip
        rss_unet = peak_rss_gb()
        t0 = time.perf_counter()
        image = tiled.decode(z)  # (1, 3, 4 * size, 4 * size) in [-1, 1]
        sync()
        t_decode = time.perf_counter() - t0
    peak = peak_rss_gb() if device.type == "cpu" else torch.cuda.max_memory_allocated() / 2**30
    step = min(step_times)
    finite = bool(torch.isfinite(image).all())
    print(f"| input | output | UNet step s | 100 steps (extrapolated) min | tiled decode s | peak memory GB "
          f"(after sampling) | finite |\n|---|---|---|---|---|---|---|\n"
          f"| {args.size}x{args.size} | {tuple(image.shape[-2:])} | {step:.1f} | {100 * step / 60:.0f} | "
          f"{t_decode:.0f} | {peak:.2f} ({rss_unet:.2f}) | {finite} |", flush=True)  # fmt: skip
    tokens = args.size**2
    print(
        f"(untiled decoder: its mid-block attention alone is 4 * {tokens}^2 * 512 = "
        f"{4 * tokens**2 * 512 / 1e12:.0f} TFLOP)"
    )

    if args.check:  # the untiled decode, where it fits: how far is the tiled one?
        with torch.no_grad():
            t0 = time.perf_counter()
            full = m.decode(z)
            t_full = time.perf_counter() - t0
            d = (tiled.decode(z) - full).float().abs()
        print(
            f"untiled decode {t_full:.0f} s; tiled - untiled: mean {d.mean():.4f}, max {d.max():.4f} "
            f"(|image| mean {full.float().abs().mean():.3f}); peak memory now {peak_rss_gb():.2f} GB"
        )

    if args.diffusers_unet:
        from diffusers import UNet2DModel

        from .bench_vs_diffusers import config

        ref = UNet2DModel.from_config(config("ldm-super-resolution-4x-openimages/unet/config.json"))
        ref.load_state_dict(to_diffusers_names(m.unet.state_dict()), strict=True, assign=True)
        ref = ref.to(device, dtype).eval()
        x = torch.cat([torch.randn_like(low), low], dim=1)
        times = {}
        with torch.no_grad():
            for name, fn in (("diffusers", lambda: ref(x, 500).sample), ("ours", lambda: m.unet(x, 500))):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name] = time.perf_counter() - t0
        print(
            f"UNet step at {args.size}x{args.size}: diffusers {times['diffusers']:.1f} s, "
            f"ours {times['ours']:.1f} s, ratio {times['ours'] / times['diffusers']:.2f}; "
            f"peak memory now {peak_rss_gb():.2f} GB"
        )
    return 0 if finite and math.isfinite(step) else 1


if __name__ == "__main__":
    sys.exit(main())
