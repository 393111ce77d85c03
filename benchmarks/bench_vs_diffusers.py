"""ldm_mini vs diffusers 0.42.1 on the same full-size random weights: time, memory and load time, as ratios.

    python -m benchmarks.bench_vs_diffusers                        # every section, float32 + bfloat16, CPU
    python -m benchmarks.bench_vs_diffusers --only unet bert       # some sections
    python -m benchmarks.bench_vs_diffusers --device cuda --half float16
    python -m benchmarks.bench_vs_diffusers --only unet --no-fast   # ldm_mini's plain layers

Sections (--only picks; each one runs alone):
    peak      a large torch.mm: the machine's measured matmul peak, float32 and the half dtype (GFLOP/s)
    unet      one UNet step: text2im (batch 2, 32x32 latent, 77 tokens), celebahq (64x64), super-res (128x128)
    bert      LDMBert on 2 prompts of 77 tokens
    decoder   KL-f8 decode to 256x256, VQ-f4 decode to 512x512
    load      ldm_mini.load(converted file) vs LDMTextToImagePipeline.from_pretrained(folder), fresh processes
    memory    peak memory of a 5-step txt2img call (load + sample + decode), fresh processes
    superres  the 512x512 -> 2048x2048 super-resolution of benchmarks/superres_large.py, fresh process

Method (nanoGPT bench.py style): both implementations hold the SAME tensors (ours gets diffusers' state_dict
with assign=True, renamed by loading.from_diffusers_names), ours with ldm_mini.fast's layers where
ldm_mini.load enables them (--no-fast: the plain layers, bit-identical to diffusers); random weights drawn
from the published configs (tests/realconfigs) scaled by 1/sqrt(fan_in) so activations stay of order 1 and
differences mean something. The call that gives the output is the warm-up, then --reps timed calls (the
median; a single one when a call takes over 5 s), a device sync before each clock read. Every row states
max |ours - diffusers| so that a speed-up never hides a different result; the half-precision rows state
max |ours half - ours float32| instead. FLOPs are counted by torch's FlopCounterMode on the meta device
(convolutions, matmuls and attention; elementwise work is not counted).
Peak memory is the peak resident set size (CPU) or torch.cuda.max_memory_allocated (CUDA) of a fresh process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "realconfigs"
SECTIONS = ("peak", "unet", "bert", "decoder", "load", "memory", "superres")
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPT = "A painting of a squirrel eating a burger"


# --- measuring --------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, reps: int, warmup=None) -> float:
    """Median seconds of `reps` calls after one warm-up (`warmup` or fn); a single call if it takes > 5 s."""
    (warmup or fn)()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if times[-1] > 5.0:
            break
    return statistics.median(times)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def machine(device: torch.device) -> str:
    cpu = platform.processor() or "cpu"
    if Path("/proc/cpuinfo").exists():
        info = Path("/proc/cpuinfo").read_text()
        names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
        cpu += ", avx512_bf16" if "avx512_bf16" in flags else ", no avx512_bf16"
    text = (
        f"{cpu}; {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; torch {torch.__version__}"
    )
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    import diffusers

    return text + f"; diffusers {diffusers.__version__}; load average {os.getloadavg()[0]:.1f}"


# --- building both implementations on the same weights ------------------------------------------------------
def config(path: str) -> dict:
    return json.loads((REAL / path).read_text())


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter in place: matrices/kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm scales
    1 + N(0, 0.1^2), other vectors N(0, 0.1^2). Works on a model made with to_empty() (no init cost)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.Embedding):
                p.normal_(0.0, 1.0, generator=g)
            elif p.ndim == 1:
                p.normal_(1.0 if name == "weight" else 0.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
    return model


def build_ref(cls, cfg: dict, seed: int):
    """A diffusers model of a published config with random weights, built without its (slow) init."""
    with torch.device("meta"):
        model = cls.from_config(cfg) if hasattr(cls, "from_config") else cls(cfg)
    return randomize_(model.to_empty(device="cpu"), seed).eval().requires_grad_(False)


def ours_like(ref: torch.nn.Module, make, strip: str = "") -> torch.nn.Module:
    """ldm_mini's model holding the reference's own tensors (no copy), under ldm_mini's key names."""
    from ldm_mini.loading import from_diffusers_names

    with torch.device("meta"):
        ours = make()
    state = {k.removeprefix(strip): v for k, v in ref.state_dict().items() if k.startswith(strip)}
    if strip:  # LDMBertModel: drop the unused language-model head (to_logits)
        state = {k: v for k, v in state.items() if not k.startswith("to_logits")}
    ours.load_state_dict(from_diffusers_names(state), strict=True, assign=True)
    return ours.eval().requires_grad_(False)


def speed_layers(model: torch.nn.Module, device: torch.device, args) -> torch.nn.Module:
    """ldm_mini.fast's layers where ldm_mini.load would swap them in, unless --no-fast."""
    from ldm_mini import fast

    return fast.enable(model) if fast.default_on(device) and not args.no_fast else model


def unet_case(name: str):
    """(diffusers UNet, ldm_mini UNet, call_ref(x), call_ours(x), inputs) of one published model."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    from ldm_mini.unet import CELEBAHQ_256, SUPERRES_4X, TEXT2IM_256, UNet

    g = torch.Generator().manual_seed(1)
    if name == "text2im":
        ref = build_ref(UNet2DConditionModel, config("ldm-text2im-large-256/unet/config.json"), 10)
        ours = ours_like(ref, lambda: UNet(TEXT2IM_256))
        x, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 1280, generator=g)
        return ref, ours, (x, torch.tensor([500, 500]), ctx), "batch 2, 4x32x32, context 77x1280"
    path, preset, shape = {
        "celebahq": ("ldm-celebahq-256", CELEBAHQ_256, (1, 3, 64, 64)),
        "superres": ("ldm-super-resolution-4x-openimages", SUPERRES_4X, (1, 6, 128, 128)),
    }[name]
    ref = build_ref(UNet2DModel, config(f"{path}/unet/config.json"), 11)
    ours = ours_like(ref, lambda: UNet(preset))
    return (
        ref,
        ours,
        (torch.randn(*shape, generator=g), torch.tensor([500] * shape[0])),
        "x".join(map(str, shape)),
    )


def flops_of(make, inputs) -> float:
    """FLOPs of one call, counted on the meta device (no compute, no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = make()
    meta_inputs = [x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*meta_inputs)
    return counter.get_total_flops()


def cast(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A copy of an ldm_mini model in `dtype` on `device`; the float32 original (diffusers' tensors) stays."""
    with torch.device("meta"):
        copy_ = type(model)(model.config)  # every ldm_mini model is built from its config alone
    state = {k: v.to(device, dtype) for k, v in model.state_dict().items()}
    copy_.load_state_dict(state, strict=True, assign=True)
    return copy_.eval()


# --- sections --------------------------------------------------------------------------------------------
def section_peak(args, device, out):
    n = 4096 if device.type == "cpu" else 8192
    rows = {}
    for dtype in (torch.float32, HALF[args.half]):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        s = timeit(lambda a=a, b=b: a @ b, device, args.reps)
        rows[str(dtype).removeprefix("torch.")] = 2 * n**3 / s / 1e9
    out["peak_gflops"] = rows
    print(f"\nmatmul peak ({n}x{n} torch.mm): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rows.items()))


def compare(label, run_ref, run_ours, run_half, device, args, flops=None, out=None, peak=None):
    """Time diffusers float32, ours float32 and ours in half precision on one input; print one table row."""
    nothing = lambda: None  # noqa: E731  (the calls that give the outputs are the warm-up calls)
    want = run_ref()
    t_ref = timeit(run_ref, device, args.reps, warmup=nothing)
    got = run_ours()
    t_ours = timeit(run_ours, device, args.reps, warmup=nothing)
    half = run_half() if run_half else None
    t_half = timeit(run_half, device, args.reps, warmup=nothing) if run_half else float("nan")
    row = {
        "diffusers_s": t_ref,
        "ours_s": t_ours,
        "ratio": t_ours / t_ref,
        "maxdiff": maxdiff(got, want),
        "half_s": t_half,
        "half_ratio_to_diffusers_f32": t_half / t_ref,
        "half_maxdiff_to_f32": maxdiff(half, got) if half is not None else float("nan"),
        "output_scale": got.float().abs().mean().item(),
    }
    rate = ""
    if flops:
        row.update(gflop=flops / 1e9, ours_gflops=flops / t_ours / 1e9, diffusers_gflops=flops / t_ref / 1e9)
        rate = f" | {flops / 1e9:.0f} | {flops / t_ref / 1e9:.0f} | {flops / t_ours / 1e9:.0f}"
        if peak:
            row["ours_fraction_of_peak"] = flops / t_ours / 1e9 / peak
            rate += f" ({100 * row['ours_fraction_of_peak']:.0f}% of peak)"
    out[label] = row
    print(
        f"| {label} | {t_ref:.3f} | {t_ours:.3f} | **{row['ratio']:.2f}** | {row['maxdiff']:.1e} | "
        f"{t_half:.3f} | **{row['half_ratio_to_diffusers_f32']:.2f}** | "
        f"{row['half_maxdiff_to_f32']:.1e}{rate} |",
        flush=True,
    )


def table_header(extra: str = ""):
    print(
        f"\n| component | diffusers f32 s | ours f32 s | ratio | max abs diff | ours {HALF_NAME} s | "
        f"ratio to diffusers f32 | {HALF_NAME} vs f32 max abs diff{extra} |"
    )
    print("|" + "---|" * (8 + extra.count("|")))


def section_unet(args, device, out):
    table_header(" | GFLOP | diffusers GFLOP/s | ours GFLOP/s")
    for name in ("text2im", "celebahq", "superres"):
        unet_row(name, args, device, out)


def unet_row(name, args, device, out):
    from ldm_mini.unet import CELEBAHQ_256, SUPERRES_4X, TEXT2IM_256, UNet

    preset = {"text2im": TEXT2IM_256, "celebahq": CELEBAHQ_256, "superres": SUPERRES_4X}[name]
    ref, ours, inputs, what = unet_case(name)
    flops = flops_of(lambda: UNet(preset), inputs)
    ref, ours = ref.to(device), ours.to(device)
    inputs = [x.to(device) for x in inputs]
    half = speed_layers(cast(ours, HALF[args.half], device), device, args)
    ours = speed_layers(ours, device, args)
    half_inputs = [x.to(HALF[args.half]) if x.is_floating_point() else x for x in inputs]
    peak = out.get("peak_gflops", {}).get("float32")
    with torch.no_grad():
        compare(f"UNet {name} ({what})", lambda: ref(*inputs).sample, lambda: ours(*inputs),
                lambda: half(*half_inputs), device, args, flops, out, peak)  # fmt: skip


def section_bert(args, device, out):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    from ldm_mini.bert import LDMBert
    from ldm_mini.bert import LDMBertConfig as OurConfig

    bert_config = config("ldm-text2im-large-256/bert/config.json")
    ref = build_ref(lambda c: LDMBertModel(LDMBertConfig(**c)), bert_config, 12)
    ours = ours_like(ref, lambda: LDMBert(OurConfig()), strip="model.")
    ref, ours = ref.to(device), ours.to(device)
    half = speed_layers(cast(ours, HALF[args.half], device), device, args)
    ours = speed_layers(ours, device, args)
    ids = torch.randint(0, 30522, (2, 77), generator=torch.Generator().manual_seed(2)).to(device)
    table_header()
    with torch.no_grad():
        compare("LDMBert (2 x 77 tokens)", lambda: ref(ids).last_hidden_state, lambda: ours(ids),
                lambda: half(ids), device, args, out=out)  # fmt: skip


def section_decoder(args, device, out):
    table_header()
    decoder_row("kl", args, device, out)
    decoder_row("vq", args, device, out)


def decoder_row(kind, args, device, out):
    from diffusers import AutoencoderKL as RefKL
    from diffusers import VQModel as RefVQ

    from ldm_mini.autoencoder import KL_F8, VQ_F4, AutoencoderKL, VQModel

    label, cls, path, make, shape = {
        "kl": ("KL-f8 decode 4x32x32 -> 256x256", RefKL, "ldm-text2im-large-256",
               lambda: AutoencoderKL(KL_F8), (1, 4, 32, 32)),
        "vq": ("VQ-f4 decode 3x128x128 -> 512x512", RefVQ, "ldm-super-resolution-4x-openimages",
               lambda: VQModel(VQ_F4), (1, 3, 128, 128)),
    }[kind]  # fmt: skip
    ref = build_ref(cls, config(f"{path}/vqvae/config.json"), 13).to(device)
    ours = ours_like(ref, make).to(device)
    half = cast(ours, HALF[args.half], device)
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        compare(label, lambda: ref.decode(z).sample, lambda: ours.decode(z),
                lambda: half.decode(z.to(HALF[args.half])), device, args, out=out)  # fmt: skip


# --- load and memory: fresh processes on files written once -------------------------------------------------
def write_text2im_files(workdir: Path) -> tuple[Path, Path]:
    """The text2im model as a diffusers folder (save_pretrained, safetensors) and as an ldm_mini file."""
    folder, file = workdir / "ldm-text2im-random", workdir / "text2im-random.safetensors"
    if (folder / "model_index.json").exists() and file.exists():
        return folder, file
    from diffusers import AutoencoderKL, DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    from weights_tools.convert import convert

    t0 = time.perf_counter()
    base = "ldm-text2im-large-256"
    pipe = LDMTextToImagePipeline(
        vqvae=build_ref(AutoencoderKL, config(f"{base}/vqvae/config.json"), 13),
        bert=build_ref(lambda c: LDMBertModel(LDMBertConfig(**c)), config(f"{base}/bert/config.json"), 12),
        tokenizer=BertTokenizer(str(REAL / base / "tokenizer" / "vocab.txt")),
        unet=build_ref(UNet2DConditionModel, config(f"{base}/unet/config.json"), 10),
        scheduler=DDIMScheduler.from_config(config(f"{base}/scheduler/scheduler_config.json")),
    )
    pipe.save_pretrained(folder)
    del pipe
    convert(folder, file, force=True)
    print(f"(wrote {folder} and {file} in {time.perf_counter() - t0:.0f} s)", flush=True)
    return folder, file


def child(argv: list[str]) -> None:
    """Runs in a fresh process: load (+ optionally a 5-step call); prints one JSON line."""
    impl, what, path, device, dtype = argv
    device, dtype = torch.device(device), {"float32": torch.float32, **HALF}[dtype]
    t0 = time.perf_counter()
    if impl == "ours":
        import ldm_mini

        model = ldm_mini.load(path, device=device, dtype=dtype)
        params = list(model.parameters())
    else:
        from diffusers import LDMTextToImagePipeline

        model = LDMTextToImagePipeline.from_pretrained(path, torch_dtype=dtype).to(device)
        params = [p for name in ("unet", "vqvae", "bert") for p in getattr(model, name).parameters()]
    sync(device)
    result = {"load_s": time.perf_counter() - t0}
    with torch.no_grad():
        t0 = time.perf_counter()
        total = sum(p.float().sum().item() for p in params)  # reads every weight: mmap'd pages come in now
        result["touch_s"] = time.perf_counter() - t0
    if what == "call":
        t0 = time.perf_counter()
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            kw = dict(num_inference_steps=5, guidance_scale=6.0, eta=0.0, generator=g, output_type="np")
            if impl == "ours":
                import ldm_mini

                image = ldm_mini.txt2img(model, PROMPT, progress=False, **kw)
            else:
                model.set_progress_bar_config(disable=True)
                image = model(PROMPT, **kw).images
        sync(device)
        result["call_s"] = time.perf_counter() - t0
        torch.save(torch.as_tensor(image), Path(path).parent / f"image-{impl}-{argv[4]}.pt")
    result["peak_gb"] = peak_rss_gb() if device.type == "cpu" else torch.cuda.max_memory_allocated() / 2**30
    result["checksum"] = total
    print(json.dumps(result))


def run_child(*argv: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_vs_diffusers", "--child", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def section_load(args, device, out):
    folder, file = write_text2im_files(args.workdir)
    runs = {"ours": [], "diffusers": []}
    for _ in range(2):  # alternate, so that both read the files from the page cache equally often
        runs["ours"].append(run_child("ours", "load", str(file), device.type, "float32"))
        runs["diffusers"].append(run_child("diffusers", "load", str(folder), device.type, "float32"))
    best = {k: min(v, key=lambda r: r["load_s"]) for k, v in runs.items()}
    o, d = best["ours"], best["diffusers"]
    out["load"] = best
    print("\n| text2im load (fresh process, best of 2) | diffusers from_pretrained | ldm_mini.load | ratio |")
    print("|---|---|---|---|")
    print(f"| load s | {d['load_s']:.2f} | {o['load_s']:.2f} | **{o['load_s'] / d['load_s']:.2f}** |")
    both_o, both_d = o["load_s"] + o["touch_s"], d["load_s"] + d["touch_s"]
    print(f"| load + every weight read once s | {both_d:.2f} | {both_o:.2f} | **{both_o / both_d:.2f}** |")


def section_memory(args, device, out):
    folder, file = write_text2im_files(args.workdir)
    d = run_child("diffusers", "call", str(folder), device.type, "float32")
    o = run_child("ours", "call", str(file), device.type, "float32")
    h = run_child("ours", "call", str(file), device.type, args.half)
    images = {k: torch.load(args.workdir / f"image-{k}.pt") for k in ("diffusers-float32", "ours-float32")}
    half_image = torch.load(args.workdir / f"image-ours-{args.half}.pt")
    diff = maxdiff(images["ours-float32"], images["diffusers-float32"])
    half_diff = maxdiff(half_image, images["ours-float32"])
    out["memory"] = {
        "diffusers": d,
        "ours": o,
        "ours_half": h,
        "image_maxdiff": diff,
        "half_image_maxdiff": half_diff,
    }
    unit = "peak RSS GB" if device.type == "cpu" else "peak CUDA memory GB"
    print(f"\n| txt2img 256x256, 5 DDIM steps, guidance 6 (fresh process) | diffusers f32 | ours f32 | ratio "
          f"| ours {HALF_NAME} |")  # fmt: skip
    print("|---|---|---|---|---|")
    print(f"| {unit} | {d['peak_gb']:.2f} | {o['peak_gb']:.2f} | **{o['peak_gb'] / d['peak_gb']:.2f}** | "
          f"{h['peak_gb']:.2f} |")  # fmt: skip
    ratio = o["call_s"] / d["call_s"]
    print(
        f"| call s (after load) | {d['call_s']:.1f} | {o['call_s']:.1f} | **{ratio:.2f}** | "
        f"{h['call_s']:.1f} |"
    )
    print(
        f"| image max abs diff (in [0, 1]) | - | {diff:.1e} vs diffusers | - | {half_diff:.1e} vs ours f32 |"
    )


def section_superres(args, device, out):
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.superres_large",
        "--device",
        device.type,
        "--workdir",
        str(args.workdir),
    ]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_vs_diffusers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--half", choices=tuple(HALF), default=None,
                        help="beside float32 (default: bfloat16 on CPU, float16 on CUDA)")  # fmt: skip
    parser.add_argument("--reps", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ldm_mini_bench",
                        help="where load/memory write the text2im files (kept for the next run)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    parser.add_argument("--no-fast", action="store_true", help="unet, bert: ldm_mini's plain layers")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch; use --device cpu")
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    args.half = args.half or ("bfloat16" if device.type == "cpu" else "float16")
    global HALF_NAME
    HALF_NAME = args.half
    args.workdir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    print(f"machine: {machine(device)}", flush=True)
    out: dict = {"machine": machine(device)}
    for name in SECTIONS:
        if name in args.only:
            globals()[f"section_{name}"](args, device, out)
    print(f"\n(total {time.perf_counter() - t0:.0f} s; load average at the end {os.getloadavg()[0]:.1f})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


HALF_NAME = "bfloat16"

if __name__ == "__main__":
    sys.exit(main())
