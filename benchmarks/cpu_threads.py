"""How many CPU threads torch should use: wall-clock time per workload at 1..N threads, on a quiet machine and
with other processes competing for the cores.

    python -m benchmarks.cpu_threads                   # all workloads, quiet and loaded, 5 rounds
    python -m benchmarks.cpu_threads --only sample --busy 1 --reps 3

Workloads (what the notebooks and the command line do):
  sample     ldm_mini.txt2img on the embedded shapes model: 4 images, 20 DDIM steps, guidance 2 (a notebook
             cell, or `ldm-mini txt2img -n 4`)
  train      one training step of notebook 09's stage 2 (the shapes UNet and LDMBert, forward and backward,
             batch 16 latents of 4x16x16)
  full-size  one call of the full-size celebahq-256 UNet (274 M parameters, random weights, 3x64x64 latent):
             what a released model costs per sampling step on a CPU
Conditions: "quiet" (nothing else running, as far as this script knows: check `uptime`) and "loaded" (--busy
processes spinning in pure Python beside it, as another job or a second notebook would). The thread counts
take turns round by round, so a slower phase of the machine falls on all of them alike; the median is printed,
and the ratio to one thread. Wall-clock time: with several threads, CPU time says nothing about waiting.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

import torch

import ldm_mini
from ldm_mini import train
from ldm_mini.unet import CELEBAHQ_256, UNet

WORKLOADS = ("sample", "train", "full-size")


def spin() -> None:  # a competing process: one core busy in pure Python
    while True:
        pass


def workload(name: str):
    """A call() that runs the workload once (its models built here, outside the timing)."""
    g = torch.Generator().manual_seed(0)
    if name == "sample":
        m = ldm_mini.load()
        prompts = [
            "a red circle above a blue square",
            "a large yellow circle",
            "a green cross",
            "a black square",
        ]
        settings = dict(num_inference_steps=20, guidance_scale=2.0, progress=False, output_type="pt")
        return lambda: ldm_mini.txt2img(m, prompts, generator=torch.Generator().manual_seed(0), **settings)
    if name == "train":
        m = ldm_mini.load()
        m.unet.requires_grad_(True)
        m.text_encoder.requires_grad_(True)
        ids = m.tokenize(["a red circle above a blue square"] * 16)
        z0 = torch.randn(16, 4, 16, 16, generator=g)
        t = torch.randint(0, 1000, (16,), generator=g)
        eps = torch.randn(16, 4, 16, 16, generator=g)

        def step():
            m.unet.zero_grad(set_to_none=True)
            m.text_encoder.zero_grad(set_to_none=True)
            loss = train.eps_loss(m, z0, t, eps, m.encode_text(ids))
            loss.backward()

        return step
    if name == "full-size":
        unet = UNet(CELEBAHQ_256).eval().requires_grad_(False)
        x, t = torch.randn(1, 3, 64, 64, generator=g), torch.tensor([500])
        return lambda: unet(x, t)
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")


def measure(call, threads: list[int], reps: int) -> dict[int, float]:
    """Median wall seconds of call() per thread count, the counts taking turns (one warm-up call each)."""
    times: dict[int, list[float]] = {n: [] for n in threads}
    for n in threads:
        torch.set_num_threads(n)
        call()
    for r in range(reps):
        for n in threads[r % len(threads) :] + threads[: r % len(threads)]:  # rotate who goes first
            torch.set_num_threads(n)
            start = time.perf_counter()
            call()
            times[n].append(time.perf_counter() - start)
    return {n: statistics.median(v) for n, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_threads", description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--threads", nargs="+", type=int, default=None, help="default: 1 .. os.cpu_count()")
    ap.add_argument("--busy", type=int, default=1, help="competing processes for the 'loaded' condition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--conditions", nargs="+", choices=("quiet", "loaded"), default=["quiet", "loaded"])
    args = ap.parse_args(argv)
    threads = args.threads or list(range(1, (os.cpu_count() or 1) + 1))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    print(f"{'workload':10} {'condition':10} " + " ".join(f"{f'{n} thr (s)':>11}" for n in threads)
          + "   ratio to 1 thread")  # fmt: skip
    for name in args.only:
        call = workload(name)
        for condition in args.conditions:
            spinners = []
            if condition == "loaded":
                spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
                for p in spinners:
                    p.start()
            try:
                seconds = measure(call, threads, args.reps)
            finally:
                for p in spinners:
                    p.terminate()
            label = condition if condition == "quiet" else f"{args.busy} busy"
            ratios = " ".join(f"{seconds[n] / seconds[threads[0]]:.2f}" for n in threads)
            row = " ".join(f"{seconds[n]:11.3f}" for n in threads)
            print(f"{name:10} {label:10} {row}   {ratios}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
