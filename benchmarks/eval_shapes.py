"""Judge-based evaluation of a shapes text-to-image model (the embedded one by default).

Generates one image per prompt for seen prompts (shapes.random_prompts(split="train")) and held-out ones
(split="heldout": every prompt has a colour+shape pair never seen in training), with ldm_mini.txt2img at
the given sampler settings, and reports benchmarks/shapes_judge.py's verdicts: the fraction fully correct
and per attribute (count, colour, shape, binding, size, position), also by the number of shapes in the
prompt; then the same on three-shape prompts alone (the hardest scenes), a sweep over guidance scale and
steps (seen prompts), and the autoencoder's reconstruction PSNR on fresh images.

    python benchmarks/eval_shapes.py                      # prints the tables
    python benchmarks/eval_shapes.py --write              # also writes RESULTS.md's section, shapes_grid.png
    python benchmarks/eval_shapes.py --weights runs/x.safetensors --n 50 --no-sweep
"""

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ldm_mini  # noqa: E402
from benchmarks.shapes_judge import ATTRIBUTES, evaluate, format_table, judge, summarize  # noqa: E402
from ldm_mini import hub, loading, shapes  # noqa: E402
from ldm_mini.pipeline import txt2img  # noqa: E402

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- eval_shapes: begin -->", "<!-- eval_shapes: end -->"
SECTION = "## Embedded shapes model"


@torch.no_grad()
def generate(m, captions, steps, guidance, seed=0, batch=100) -> torch.Tensor:
    """One image per caption: (N, 3, 64, 64) in [0, 1]. Chunk k draws its noise from seed + k."""
    out = []
    for k in range(0, len(captions), batch):
        gen = torch.Generator().manual_seed(seed + k)
        out.append(txt2img(m, captions[k : k + batch], num_inference_steps=steps, guidance_scale=guidance,
                           height=64, width=64, generator=gen, output_type="pt", progress=False))  # fmt: skip
    return torch.cat(out)


@torch.no_grad()
def autoencoder_psnr(m, n=256, seed=12345) -> float:
    """PSNR (dB, images in [0, 1]) of D(E(x)) (posterior mean) on n fresh scenes of the training split."""
    images, _, _ = shapes.sample_batch(n, np.random.default_rng(seed))  # (n, 3, 64, 64) in [-1, 1]
    recon = m.autoencoder(images.to(m.dtype)).float().clamp(-1, 1)
    mse = ((recon - images) / 2).pow(2).mean().item()  # in [0, 1] units
    return 10 * np.log10(1 / mse)


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """(N, 3, 64, 64) in [0, 1] -> one PNG with a 2-pixel white gutter."""
    n, _, h, w = images.shape
    rows, g = -(-n // nrow), 2
    grid = np.full((rows * (h + g) + g, nrow * (w + g) + g, 3), 255, np.uint8)
    for i, im in enumerate((images * 255).round().byte().permute(0, 2, 3, 1).numpy()):
        r, c = divmod(i, nrow)
        grid[g + r * (h + g) : g + r * (h + g) + h, g + c * (w + g) : g + c * (w + g) + w] = im
    PIL.Image.fromarray(grid).save(path, optimize=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="an ldm_mini .safetensors file (default: the embedded)")
    ap.add_argument("--n", type=int, default=200, help="prompts per split (seen, held-out)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps (the default setting)")
    ap.add_argument("--guidance", type=float, default=2.0, help="guidance scale (the default setting)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sweep", dest="sweep", action="store_false")
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md and shapes_grid.png")
    args = ap.parse_args(argv)

    t0 = time.time()
    m = ldm_mini.load(args.weights, dtype="float32")
    path = hub.resolve(args.weights)
    source = loading.read_metadata(path)["source"]
    lines = [
        f"Model: `{path.name}` ({path.stat().st_size / 1e6:.1f} MB; {source})",
        f"Default settings: DDIM {args.steps} steps (timestep spacing {m.schedule.timestep_spacing!r}), "
        f"guidance scale {args.guidance}, eta 0, 64x64; seed {args.seed}; {args.n} prompts per split.",
        "",
    ]

    def judged(split, num_shapes_p=shapes.NUM_SHAPES_P, n=args.n):
        """Generate the split's first n prompts at the default settings: (specs, images, judge verdicts)."""
        prompts = shapes.random_prompts(n, split, args.seed, num_shapes_p)
        captions = [c for c, _ in prompts]
        images = generate(m, captions, args.steps, args.guidance, args.seed)
        verdicts = [judge(im, c, value_range=(0.0, 1.0)) for im, c in zip(images, captions, strict=True)]
        return [spec for _, spec in prompts], images, verdicts

    results, images, by_count = {}, {}, []
    for name, split in (("seen", "train"), ("held-out", "heldout")):
        specs, images[name], verdicts = judged(split)
        results[name] = summarize(verdicts)
        for k in (1, 2, 3):  # the same verdicts, by the number of shapes in the prompt
            mine = [v for v, spec in zip(verdicts, specs, strict=True) if len(spec.objects) == k]
            by_count.append(f"{name:<10}{k:>7}{len(mine):>6}{100 * summarize(mine)['correct']:>9.1f}%")
    lines += ["Judge verdicts, percent of prompts (`correct` = all attributes right):", "", "```",
              format_table(results, args.n), "```", "",
              "Fully correct, by the number of shapes in the prompt:", "", "```",
              f"{'split':<10}{'shapes':>7}{'n':>6}{'correct':>10}", *by_count, "```", ""]  # fmt: skip

    # The hardest scenes alone: three shapes, each colour bound to its shape and its place in the row.
    hard = {name: summarize(judged(split, (0.0, 0.0, 1.0), args.n // 2)[2])
            for name, split in (("seen", "train"), ("held-out", "heldout"))}  # fmt: skip
    lines += [f"Three-shape prompts only ({args.n // 2} per split), same settings:", "", "```",
              format_table(hard, args.n // 2), "```", ""]  # fmt: skip

    if args.sweep:
        captions = [c for c, _ in shapes.random_prompts(args.n, "train", seed=args.seed)]
        settings = [(args.steps, g) for g in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)]  # guidance sweep
        settings += [(s, args.guidance) for s in (5, 10, 50)]  # steps sweep
        keys = (*ATTRIBUTES, "correct")
        lines += ["Sweep on the seen prompts, percent judged right:", "", "```",
                  f"{'steps':>6}{'guidance':>10}" + "".join(f"{k:>10}" for k in keys)]  # fmt: skip
        for steps, g in sorted(set(settings)):
            if (steps, g) == (args.steps, args.guidance):
                r = results["seen"]
            else:
                r = evaluate(
                    list(generate(m, captions, steps, g, args.seed)), captions, value_range=(0.0, 1.0)
                )
            lines.append(f"{steps:>6}{g:>10.1f}" + "".join(f"{100 * r[k]:>9.1f}%" for k in keys))
            print(lines[-1], flush=True)
        lines += ["```", ""]

    lines.append(f"Autoencoder reconstruction PSNR on 256 fresh images: {autoencoder_psnr(m):.1f} dB.")
    lines.append(f"(Evaluation time: {(time.time() - t0) / 60:.1f} min on this machine's CPU.)")
    text = "\n".join(lines)
    print(text)
    if args.write:
        grid = torch.cat([images["seen"][:8], images["held-out"][:8]])
        save_grid(grid, HERE / "shapes_grid.png", nrow=8)
        caps = [c for c, _ in shapes.random_prompts(8, "train", seed=args.seed)]
        caps += [c for c, _ in shapes.random_prompts(8, "heldout", seed=args.seed)]
        listing = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(caps))
        text += (
            "\n\n![samples](shapes_grid.png)\n\nTop row: the first 8 seen prompts; bottom row: the first 8 "
            f"held-out prompts, left to right:\n\n{listing}"
        )
        write_section(HERE / "RESULTS.md", text)
        print(f"wrote {HERE / 'RESULTS.md'} and {HERE / 'shapes_grid.png'}")


def write_section(path: Path, text: str, begin=BEGIN, end=END, section=SECTION) -> None:
    """Put `text` between the begin/end markers of a section of RESULTS.md (created if missing); keep the
    rest. (Each benchmark script that writes RESULTS.md owns one pair of markers.)"""
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
    elif section in doc:
        doc = doc.replace(section, f"{section}\n\n{block}\n", 1)
    else:
        doc = doc.rstrip("\n") + f"\n\n{section}\n\n{block}\n"
    path.write_text(doc)


if __name__ == "__main__":
    main()
