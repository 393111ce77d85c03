"""One GPU check of ldm_mini against diffusers on full-size random weights: accuracy in float32, float16 and
bfloat16, speed and memory as ratios, and which attention kernel runs. On a CUDA machine, never in CI:

    python -m benchmarks.gpu_check                      # ~5 min on one H100-class GPU
    python -m benchmarks.gpu_check --only celebahq --reps 5

Models (bench_vs_diffusers builds them: the published configs of tests/realconfigs, random weights scaled by
1/sqrt(fan_in), ldm_mini holding diffusers' own tensors): text2im (LDMTextToImagePipeline: LDMBert, the
1.45B UNet, KL-f8), celebahq (LDMPipeline: unconditional UNet, VQ-f4), superres (LDMSuperResolutionPipeline:
128x128 -> 512x512). For each one:

    accuracy  one UNet step (bench_vs_diffusers' inputs) and one 20-step DDIM sample (eta 0, seed 0;
              text2im: guidance 6): ours vs diffusers in float32 with TF32 off; then ours and diffusers in
              float16 and bfloat16, each against its own float32 (images in [0, 1]). Any inf or NaN in
              LDMBert's context, the UNet's output or the decoded images is reported (float16 overflows
              show up there first).
    speed     a UNet step and a 20-step sample at batch 1 and 8 in float16, median of --reps after a warm-up,
              a device sync before each clock read: ours / diffusers.
    memory    torch.cuda.max_memory_allocated during the batch-8 float16 sample, above the memory held
              before the call (the weights of both implementations stay resident): ours / diffusers.
    sdpa      the scaled_dot_product_attention kernels torch.profiler records in one float16 UNet step.

Goals, printed as PASS / MISS: float16 images within 1e-2 of float32; speed and memory <= 1.0x diffusers.
Writes --json (default benchmarks/gpu_check.json) and a table into benchmarks/RESULTS.md between its markers.
(ldm_mini.fast's layers are CPU-only, so both sides run plain torch layers here.)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_vs_diffusers as bench  # noqa: E402
from benchmarks.eval_shapes import write_section  # noqa: E402

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- gpu_check: begin -->", "<!-- gpu_check: end -->"
SECTION = "## GPU check: accuracy, speed and memory on CUDA"
MODELS = ("text2im", "celebahq", "superres")
HALVES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
PROMPT = "A painting of a squirrel eating a burger"
STEPS, GUIDANCE = 20, 6.0
GOAL_HALF_IMAGE = 1e-2  # float16 images (in [0, 1]) vs float32


# --- both implementations of one published model, on the same tensors -------------------------------------
def build(name: str):
    """(diffusers pipeline, ldm_mini LatentDiffusion, UNet-step inputs) on CPU, float32, same weights."""
    from diffusers import AutoencoderKL as RefKL
    from diffusers import DDIMScheduler, LDMPipeline, LDMSuperResolutionPipeline, LDMTextToImagePipeline
    from diffusers import VQModel as RefVQ

    from ldm_mini.autoencoder import KL_F8, VQ_F4, AutoencoderKL, VQModel
    from ldm_mini.model import LatentDiffusion
    from weights_tools.diffusers_format import scale_factor_of, schedule_config

    ref_unet, unet, inputs, _ = bench.unet_case(name)
    folder = {"text2im": "ldm-text2im-large-256", "celebahq": "ldm-celebahq-256",
              "superres": "ldm-super-resolution-4x-openimages"}[name]  # fmt: skip
    vq_cfg = bench.config(f"{folder}/vqvae/config.json")
    if name == "celebahq":  # trained with 1.0: LDMPipeline divides by the VQModel default 0.18215 otherwise
        vq_cfg = {**vq_cfg, "scaling_factor": 1.0}
    ref_ae = bench.build_ref(RefKL if name == "text2im" else RefVQ, vq_cfg, 13)
    ae = bench.ours_like(ref_ae, lambda: AutoencoderKL(KL_F8) if name == "text2im" else VQModel(VQ_F4))
    scheduler_cfg = bench.config(f"{folder}/scheduler/scheduler_config.json")
    scheduler = DDIMScheduler.from_config(scheduler_cfg)
    kind = {"text2im": "txt2img", "celebahq": "unconditional", "superres": "superres"}[name]
    parts = dict(schedule=schedule_config(scheduler_cfg, folder), scale_factor=scale_factor_of(vq_cfg, kind))
    if name != "text2im":
        cls = LDMPipeline if name == "celebahq" else LDMSuperResolutionPipeline
        return (
            cls(vqvae=ref_ae, unet=ref_unet, scheduler=scheduler),
            LatentDiffusion(kind, unet, ae, **parts),
            inputs,
        )
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    from ldm_mini.bert import LDMBert
    from ldm_mini.bert import LDMBertConfig as OurBertConfig
    from ldm_mini.tokenizer import Tokenizer

    bert_cfg = bench.config(f"{folder}/bert/config.json")
    ref_bert = bench.build_ref(lambda c: LDMBertModel(LDMBertConfig(**c)), bert_cfg, 12)
    bert = bench.ours_like(ref_bert, lambda: LDMBert(OurBertConfig()), strip="model.")
    vocab = bench.REAL / folder / "tokenizer" / "vocab.txt"
    tokenizer = BertTokenizer(str(vocab))
    pipe = LDMTextToImagePipeline(
        vqvae=ref_ae, bert=ref_bert, tokenizer=tokenizer, unet=ref_unet, scheduler=scheduler
    )
    m = LatentDiffusion(kind, unet, ae, text_encoder=bert, tokenizer=Tokenizer.from_vocab(vocab), **parts)
    return pipe, m, inputs


def in_dtype(pipe, m, dtype: torch.dtype, device: torch.device):
    """Copies of both in `dtype` on `device` (the float32 originals stay as they are)."""
    from ldm_mini.model import LatentDiffusion

    parts = dict(pipe.components)  # a new pipeline around copies of the modules (tokenizer, scheduler shared)
    for key in parts.keys() & {"unet", "vqvae", "bert"}:
        parts[key] = copy.deepcopy(parts[key]).to(device, dtype)
    half = type(pipe)(**parts)
    text = bench.cast(m.text_encoder, dtype, device) if m.text_encoder is not None else None
    unet, ae = bench.cast(m.unet, dtype, device), bench.cast(m.autoencoder, dtype, device)
    ours = LatentDiffusion(
        m.kind, unet, ae, m.schedule, m.scale_factor, text_encoder=text, tokenizer=m.tokenizer
    )
    return half, ours.to(device)


def batch_of(inputs, n: int, device: torch.device, dtype: torch.dtype):
    """The UNet-step inputs at batch n: the first row repeated, floats in `dtype`."""
    rows = [x[:1].repeat(n, *[1] * (x.ndim - 1)) for x in inputs]
    return [x.to(device, dtype) if x.is_floating_point() else x.to(device) for x in rows]


def low_res(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 128, 128, generator=torch.Generator().manual_seed(2)) * 2 - 1  # [-1, 1]


def sample_pair(name: str, pipe, m, n: int):
    """(diffusers call, ldm_mini call) of a 20-step DDIM sample of n images, seed 0, images in [0, 1]."""
    import ldm_mini

    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=STEPS, eta=0.0, output_type="pt")  # (B, 3, H, W): "np" refuses bfloat16
    ours = dict(kw, progress=False)
    if name == "text2im":
        prompts, kw["guidance_scale"], ours["guidance_scale"] = [PROMPT] * n, GUIDANCE, GUIDANCE
        return (lambda: pipe(prompts, generator=seed0(), **kw).images,
                lambda: ldm_mini.txt2img(m, prompts, generator=seed0(), **ours))  # fmt: skip
    if name == "celebahq":
        return (lambda: unconditional_pipe(pipe, batch_size=n, generator=seed0(), **kw),
                lambda: ldm_mini.unconditional(m, n, generator=seed0(), **ours))  # fmt: skip
    image = low_res(n)
    return (lambda: pipe(image.to(pipe.device, pipe.unet.dtype), generator=seed0(), **kw).images,
            lambda: ldm_mini.superres(m, image.to(m.device, m.dtype), generator=seed0(), **ours))  # fmt: skip


def unconditional_pipe(pipe, **kw):
    """LDMPipeline's images. A float32-only pipeline (deprecated in diffusers): it draws x_T in float32
    whatever the UNet's dtype, which a float16 UNet refuses, and makes numpy arrays, which bfloat16 is not.
    So x_T is drawn in the UNet's dtype and the decoder's output made float32."""
    module = sys.modules[type(pipe).__module__]
    draw = module.randn_tensor
    module.randn_tensor = lambda *a, **k: draw(*a, **{**k, "dtype": pipe.unet.dtype})
    hook = pipe.vqvae.decoder.register_forward_hook(lambda _module, _inputs, out: out.float())
    try:
        return pipe(**{**kw, "output_type": "np"}).images  # (B, H, W, 3): it has no "pt"
    finally:
        module.randn_tensor = draw
        hook.remove()


def seed0() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def unet_pair(pipe, m, inputs):
    return lambda: pipe.unet(*inputs).sample, lambda: m.unet(*inputs)


def image(fn) -> torch.Tensor:
    """fn()'s images as a float32 CPU tensor (B, 3, H, W) in [0, 1]; NaN where ldm_mini refused to make
    images of a non-finite sample."""
    try:
        x = torch.as_tensor(fn())
        return (x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x).float().cpu()  # numpy's (B, H, W, 3)
    except RuntimeError as e:
        if "NaN" not in str(e):
            raise
        return torch.tensor(float("nan"))


def finite(x) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x).float()).all())


def context_finite(m, name: str) -> bool | None:
    """Whether LDMBert's context of the prompt and of "" (guidance) is finite; None: no text encoder."""
    if name != "text2im":
        return None
    with torch.no_grad():
        return finite(m.encode_text(m.tokenize([PROMPT, ""])))


def sdpa_kernels(fn) -> list[str]:
    """The scaled_dot_product_attention implementations (flash, efficient, cudnn, math) one call runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.no_grad():
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    return sorted(n.removeprefix("aten::_scaled_dot_product_") for n in names if "scaled_dot_product_" in n
                  and "backward" not in n and n != "aten::scaled_dot_product_attention")  # fmt: skip


def peak_above(fn, device: torch.device) -> float:
    """GiB that torch.cuda.max_memory_allocated rises above what was allocated before the call."""
    bench.sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    bench.sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


# --- the check of one model ---------------------------------------------------------------------------------
@torch.no_grad()
def check(name: str, args, device: torch.device) -> dict:
    t0 = time.perf_counter()
    pipe, m, inputs = build(name)
    pipe, m = pipe.to(device), m.to(device)
    out: dict = {}
    # float32, TF32 off: ours vs diffusers, the step and the sample
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    x32 = batch_of(inputs, len(inputs[0]), device, torch.float32)
    ref_step, our_step = (f() for f in unet_pair(pipe, m, x32))
    ref_image, our_image = (image(f) for f in sample_pair(name, pipe, m, 1))
    out["float32"] = {"unet_maxdiff_vs_diffusers": bench.maxdiff(our_step, ref_step),
                      "image_maxdiff_vs_diffusers": bench.maxdiff(our_image, ref_image),
                      "finite": finite(our_step) and finite(our_image)}  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults
    # float16 and bfloat16: each implementation against its own float32 result; timing and memory in float16
    for half_name, dtype in HALVES.items():
        ref_h, ours_h = in_dtype(pipe, m, dtype, device)
        xh = batch_of(inputs, len(inputs[0]), device, dtype)
        ref_hs, our_hs = (f() for f in unet_pair(ref_h, ours_h, xh))
        ref_hi, our_hi = (image(f) for f in sample_pair(name, ref_h, ours_h, 1))
        row = {
            "unet_maxdiff_vs_float32": bench.maxdiff(our_hs, our_step),
            "diffusers_unet_maxdiff_vs_float32": bench.maxdiff(ref_hs, ref_step),
            "image_maxdiff_vs_float32": bench.maxdiff(our_hi, our_image),
            "diffusers_image_maxdiff_vs_float32": bench.maxdiff(ref_hi, ref_image),
            "unet_finite": finite(our_hs),
            "image_finite": finite(our_hi),
            "context_finite": context_finite(ours_h, name),
        }
        if half_name == "float16":
            row.update(speed(name, ref_h, ours_h, inputs, args, device))
            row["sdpa_ours"] = sdpa_kernels(lambda o=ours_h, x=xh: o.unet(*x))
            row["sdpa_diffusers"] = sdpa_kernels(lambda r=ref_h, x=xh: r.unet(*x).sample)
        out[half_name] = row
        del ref_h, ours_h
        torch.cuda.empty_cache()
    out["seconds"] = time.perf_counter() - t0
    del pipe, m
    torch.cuda.empty_cache()
    return out


def speed(name: str, ref, ours, inputs, args, device: torch.device) -> dict:
    """float16 ratios ours / diffusers: a UNet step and a 20-step sample at batch 1 and 8; sample memory."""
    row = {}
    for n in (1, 8):
        x = batch_of(inputs, n, device, torch.float16)
        ref_step, our_step = unet_pair(ref, ours, x)
        row[f"unet_b{n}_diffusers_s"] = bench.timeit(ref_step, device, args.reps)
        row[f"unet_b{n}_ratio"] = bench.timeit(our_step, device, args.reps) / row[f"unet_b{n}_diffusers_s"]
        ref_sample, our_sample = sample_pair(name, ref, ours, n)
        row[f"image_b{n}_diffusers_s"] = bench.timeit(ref_sample, device, args.reps) / n
        our_s = bench.timeit(our_sample, device, args.reps) / n
        row[f"image_b{n}_ratio"] = our_s / row[f"image_b{n}_diffusers_s"]
        if n == 8:
            row["memory_b8_diffusers_gb"] = peak_above(ref_sample, device)
            row["memory_b8_ratio"] = peak_above(our_sample, device) / row["memory_b8_diffusers_gb"]
    return row


# --- report -----------------------------------------------------------------------------------------------
def goal(ok: bool) -> str:
    return "PASS" if ok else "**MISS**"


def table(results: dict, about: str) -> str:
    lines = [about, "",
             "| model | f32 UNet vs diffusers | f32 image vs diffusers | f16 UNet vs f32 | f16 image vs f32 "
             "| bf16 UNet vs f32 | bf16 image vs f32 | inf/NaN in f16 | UNet step b1 / b8 | image b1 / b8 "
             "| memory b8 | SDPA kernel (ours / diffusers) |",
             "|---|" + "---|" * 11]  # fmt: skip
    for name, r in results.items():
        f32, f16, bf16 = r["float32"], r["float16"], r["bfloat16"]
        bad = [k for k in ("unet_finite", "image_finite", "context_finite") if f16[k] is False]
        lines.append(
            f"| {name} | {f32['unet_maxdiff_vs_diffusers']:.1e} | {f32['image_maxdiff_vs_diffusers']:.1e} | "
            f"{f16['unet_maxdiff_vs_float32']:.1e} | {f16['image_maxdiff_vs_float32']:.1e} "
            f"{goal(f16['image_maxdiff_vs_float32'] <= GOAL_HALF_IMAGE)} | "
            f"{bf16['unet_maxdiff_vs_float32']:.1e} | {bf16['image_maxdiff_vs_float32']:.1e} | "
            f"{', '.join(bad) or 'none'} | "
            f"{f16['unet_b1_ratio']:.2f} / {f16['unet_b8_ratio']:.2f} "
            f"{goal(max(f16['unet_b1_ratio'], f16['unet_b8_ratio']) <= 1.0)} | "
            f"{f16['image_b1_ratio']:.2f} / {f16['image_b8_ratio']:.2f} "
            f"{goal(max(f16['image_b1_ratio'], f16['image_b8_ratio']) <= 1.0)} | "
            f"{f16['memory_b8_ratio']:.2f} {goal(f16['memory_b8_ratio'] <= 1.0)} | "
            f"{', '.join(f16['sdpa_ours']) or '-'} / {', '.join(f16['sdpa_diffusers']) or '-'} |"
        )
    lines += ["", "Ratios are ours / diffusers in float16; differences are max abs (float32: TF32 off), "
              f"images in [0, 1]. Goals: float16 images within {GOAL_HALF_IMAGE:g} of float32, speed and "
              "memory <= 1.0x diffusers. Produced by `python -m benchmarks.gpu_check`."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--only", nargs="+", choices=MODELS, default=list(MODELS), help="models to check")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--json", type=Path, default=HERE / "gpu_check.json", help="every figure, as JSON")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="the Markdown to update")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch: this check runs on a GPU only (the CPU figures: "
                     "python -m benchmarks.bench_vs_diffusers)")  # fmt: skip
    device = torch.device("cuda")
    about = f"Machine: {bench.machine(device)}."
    print(about, flush=True)
    results = {}
    for name in args.only:
        results[name] = check(name, args, device)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    text = table(results, about)
    print("\n" + text)
    args.json.write_text(json.dumps({"machine": about, "results": results}, indent=1))
    write_section(args.results, text, BEGIN, END, SECTION)
    print(f"\nwrote {args.json} and the GPU section of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
