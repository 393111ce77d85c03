"""Judge-based evaluation of the embedded VQ, super-resolution, unconditional, inpainting and semantic models.

shapes-vq        reconstructions of fresh scenes: PSNR, the judge's accuracy against their captions, and
                 the codebook's usage (perplexity: how many equally used codes the usage amounts to),
                 beside the KL autoencoder of the text model (shapes) on the same scenes
shapes-superres  unseen scenes (fresh ones, and ones with held-out colour+shape pairs), degraded
                 (shapes.degrade: blur, 4x down, noise) to 16x16 and brought back to 64x64 by the model and
                 by bicubic interpolation: PSNR against the ground truth and the judge's accuracy against
                 the captions, for both
shapes-uncond    samples judged without a caption (shapes_judge.judge_scene: 1-3 blobs, each a known
                 shape of a known size in a palette colour, no colour twice, no stray marks), and the
                 distribution of their shape counts, shapes and colours against the training data's
                 (total variation distance)
shapes-inpaint   unseen scenes (as for shapes-superres) under random masks that leave at least half of
                 every shape visible (judge_inpaint: the composite read against the caption, kept pixels
                 unchanged, the seam's gradient energy against the truth's)
shapes-semantic  the label maps of unseen scenes (judge_layout on each region's box)

python benchmarks/eval_tasks.py                        # prints the tables (n = 200 each)
python benchmarks/eval_tasks.py --write                # also writes RESULTS.md's two sections, grids
python benchmarks/eval_tasks.py --uncond runs/u.safetensors --only uncond --n 50
"""

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ldm_mini  # noqa: E402
from benchmarks.eval_shapes import write_section  # noqa: E402
from benchmarks.shapes_judge import SCENE_CHECKS, judge, judge_inpaint, judge_layout, judge_scene  # noqa: E402
from ldm_mini import shapes  # noqa: E402

HERE = Path(__file__).resolve().parent
MARKERS = [  # (begin, end, section) of the two sections of RESULTS.md this script writes
    ("<!-- eval_tasks: begin -->", "<!-- eval_tasks: end -->",
     "## Embedded VQ, super-resolution and unconditional models"),
    ("<!-- eval_tasks inpaint semantic: begin -->", "<!-- eval_tasks inpaint semantic: end -->",
     "## Embedded inpainting and semantic-synthesis models"),
]  # fmt: skip


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (measured in [0, 1] units), over the whole batch."""
    mse = ((x.clamp(-1, 1) - ref) / 2).pow(2).mean().item()
    return 10 * np.log10(1 / mse)


def accuracy(images: torch.Tensor, captions: list[str]) -> float:
    """The fraction of images the judge reads as their caption says."""
    return float(np.mean([judge(im, c)["correct"] for im, c in zip(images, captions, strict=True)]))


def perplexity(indices: torch.Tensor, n_embed: int) -> tuple[float, int]:
    """(exp(entropy) of the code usage, the number of codes used at all)."""
    counts = torch.bincount(indices.flatten(), minlength=n_embed).float()
    p = counts[counts > 0] / counts.sum()
    return float(torch.exp(-(p * p.log()).sum())), int((counts > 0).sum())


@torch.no_grad()
def eval_vq(vq, kl, n: int, seed: int) -> dict:
    """Both autoencoders on the same n fresh scenes (train split: what they were trained on)."""
    images, captions, _ = shapes.sample_batch(n, np.random.default_rng([seed, 1]))
    z_q, indices = vq.quantize(vq.encode(images))
    out = {"vq": vq.decode(z_q, quantize=False), "kl": kl(images)}  # kl: the posterior mean, decoded
    rows = {name: {"psnr": psnr(x, images), "judge": accuracy(x, captions)} for name, x in out.items()}
    rows["vq"]["perplexity"], rows["vq"]["codes used"] = perplexity(indices, vq.config.n_embed)
    rows["ground truth"] = {"judge": accuracy(images, captions)}
    return rows


@torch.no_grad()
def eval_superres(m, n: int, seed: int, steps: int, split: str = "train") -> tuple[dict, torch.Tensor]:
    """Fresh scenes (split "train": never seen, drawn as the training scenes are; "heldout": each with a
    colour+shape pair never seen in training), degraded and restored."""
    images, captions, _ = shapes.sample_batch(n, np.random.default_rng([seed, 2]), split=split)
    low = shapes.degrade(images, torch.Generator().manual_seed(seed))  # (n, 3, 16, 16)
    sr = ldm_mini.superres(m, low, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                           output_type="pt", progress=False) * 2 - 1  # fmt: skip
    bicubic = F.interpolate(low, scale_factor=4, mode="bicubic").clamp(-1, 1)
    rows = {name: {"psnr": psnr(x, images), "judge": accuracy(x, captions)}
            for name, x in (("bicubic", bicubic), ("LDM", sr))}  # fmt: skip
    rows["ground truth"] = {"judge": accuracy(images, captions)}
    grid = torch.cat(
        [F.interpolate(low[:8], scale_factor=4, mode="nearest"), bicubic[:8], sr[:8], images[:8]]
    )
    return rows, grid


def scene_stats(images: torch.Tensor) -> tuple[dict, dict]:
    """judge_scene over a batch: (fraction passing each check and "valid", distributions of the valid ones:
    shape count, shapes, colours)."""
    verdicts = [judge_scene(im) for im in images]
    passed = {k: float(np.mean([v[k] for v in verdicts])) for k in (*SCENE_CHECKS, "valid")}
    valid = [v["blobs"] for v in verdicts if v["valid"]]
    dist = {
        "count": Counter(len(b) for b in valid),
        "shape": Counter(x.shape for b in valid for x in b),
        "colour": Counter(x.colour for b in valid for x in b),
    }
    return passed, dist


def total_variation(a: Counter, b: Counter) -> float:
    """Half the L1 distance of two normalised histograms: 0 = the same distribution, 1 = disjoint."""
    keys, na, nb = set(a) | set(b), sum(a.values()) or 1, sum(b.values()) or 1
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in keys)


@torch.no_grad()
def eval_uncond(m, n: int, seed: int, steps: int) -> tuple[dict, torch.Tensor]:
    images = ldm_mini.unconditional(m, n, num_inference_steps=steps, output_type="pt", progress=False,
                                    generator=torch.Generator().manual_seed(seed)) * 2 - 1  # fmt: skip
    truth, _, _ = shapes.sample_batch(n, np.random.default_rng([seed, 3]))  # the training distribution
    (passed, dist), (true_passed, true_dist) = scene_stats(images), scene_stats(truth)
    rows = {"samples": passed, "training data": true_passed}
    tv = {k: total_variation(dist[k], true_dist[k]) for k in dist}
    rows["samples"].update({f"TV {k}": v for k, v in tv.items()})
    rows["histograms"] = {
        k: (dict(sorted(dist[k].items())), dict(sorted(true_dist[k].items()))) for k in dist
    }
    return rows, images[:16]


INPAINT_CHECKS = ("scene", "kept", "seam", "correct")


def visible_fraction(scene: shapes.Scene, mask: torch.Tensor) -> float:
    """The smallest fraction of any shape's pixels (its label in shapes.segmentation) the mask leaves visible:
    1 = every shape untouched, 0 = a shape wholly hidden (no model can know it was there)."""
    labels, keep = shapes.segmentation(scene), mask[0] < 0.5  # (64, 64) each
    fractions = [float((keep & (labels == label)).sum() / (labels == label).sum().clamp(min=1))
                 for label in labels.unique() if label != 0]  # fmt: skip
    return min(fractions, default=1.0)


def fair_masks(scenes: list, generator: torch.Generator, min_visible: float = 0.5) -> torch.Tensor:
    """One mask per scene (shapes.random_masks, redrawn until it leaves >= min_visible of every shape in
    sight): the task the judge can score. A mask over part of a shape must be completed into that shape, one
    over background must stay background; a mask that hides a shape whole has no right answer."""
    masks = []
    for scene in scenes:
        while visible_fraction(scene, mask := shapes.random_masks(1, generator)[0]) < min_visible:
            pass
        masks.append(mask)
    return torch.stack(masks)  # (n, 1, 64, 64)


@torch.no_grad()
def eval_inpaint(m, n: int, seed: int, steps: int, split: str = "train") -> tuple[dict, torch.Tensor]:
    """Unseen scenes (split as eval_superres's) under fair_masks (rectangles and strokes that leave at least
    half of every shape visible), filled by the model and judged with judge_inpaint: overall, and apart for
    masks that cover part of a shape and masks over background only (which must stay background)."""
    images, captions, scenes = shapes.sample_batch(n, np.random.default_rng([seed, 4]), split=split)
    masks = fair_masks(scenes, torch.Generator().manual_seed(seed))
    out = ldm_mini.inpaint(m, images, masks, num_inference_steps=steps, output_type="pt", progress=False,
                           generator=torch.Generator().manual_seed(seed)) * 2 - 1  # fmt: skip
    verdicts = [
        judge_inpaint(o, im, mk, c) for o, im, mk, c in zip(out, images, masks, captions, strict=True)
    ]
    covers = [visible_fraction(s, mk) < 1.0 for s, mk in zip(scenes, masks, strict=True)]
    rows = {}
    for name, pick in (("all", [True] * n), ("mask over a shape", covers),
                       ("mask over background", [not c for c in covers])):  # fmt: skip
        vs = [v for v, p in zip(verdicts, pick, strict=True) if p]
        energy = [v["seam energy"] for v in vs]  # (composite's, truth's) each
        rows[name] = {"n": len(vs), **{k: float(np.mean([v[k] for v in vs])) for k in INPAINT_CHECKS},
                      "seam energy": float(np.mean([e[0] for e in energy])),
                      "truth's": float(np.mean([e[1] for e in energy]))}  # fmt: skip
    grid = torch.cat([(1 - masks[:8]) * images[:8], out[:8], images[:8]])
    return rows, grid


@torch.no_grad()
def eval_semantic(m, n: int, seed: int, steps: int, split: str = "train") -> tuple[dict, torch.Tensor]:
    """The label maps (shapes.segmentation) of unseen scenes (split as eval_superres's): every region holds a
    shape of its label and nothing else appears (judge_layout on the regions' boxes), overall and by the
    number of regions. A label is a (colour, shape) pair, so a held-out pair's label was never in a training
    map: its embedding is untrained and the "heldout" split measures that, not composition."""
    truth, _, scenes = shapes.sample_batch(n, np.random.default_rng([seed, 6]), split=split)
    labels = torch.stack([shapes.segmentation(s) for s in scenes])  # (n, 64, 64)
    gen = torch.Generator().manual_seed(seed)
    images = ldm_mini.semantic_synthesis(m, labels, num_inference_steps=steps, output_type="pt",
                                         progress=False, generator=gen)  # fmt: skip
    images = images * 2 - 1  # [0, 1] -> [-1, 1]
    layouts = [shapes.layout(s) for s in scenes]
    verdicts = [judge_layout(im, lay) for im, lay in zip(images, layouts, strict=True)]
    rows = {}
    for k in ("all", 1, 2, 3):
        vs = [v for v, lay in zip(verdicts, layouts, strict=True) if k == "all" or len(lay) == k]
        rows[f"{k} regions" if k != "all" else "all"] = {
            "n": len(vs), **{c: float(np.mean([v[c] for v in vs])) for c in ("count", "objects", "correct")}
        }  # fmt: skip
    return rows, torch.cat([images[:8], truth[:8]])


def table(rows: dict, columns: list[str]) -> str:
    def cell(v, column: str) -> str:  # fractions as percentages, dB and counts as they are, the rest decimals
        if v is None:
            return ""
        if isinstance(v, float) and (column.startswith("TV") or "energy" in column or column == "truth's"):
            return f"{v:.3f}" if column.startswith("TV") else f"{v:.4f}"
        if isinstance(v, float):
            return f"{100 * v:.1f}%" if v <= 1.0 else f"{v:.1f}"
        return str(v)

    head = "| | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns)
    body = [
        f"| {name} | " + " | ".join(cell(r.get(c), c) for c in columns) + " |" for name, r in rows.items()
    ]
    return "\n".join([head, *body])


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """(N, 3, 64, 64) in [-1, 1] -> one PNG with a 2-pixel white gutter."""
    n, _, h, w = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + 2), nrow * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()):
        r, c = divmod(i, nrow)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = im
    PIL.Image.fromarray(grid).save(path)


# --- one report per model: (its markdown, its figure or None) -------------------------------------------
def model_and_steps(spec: str, args):
    m = ldm_mini.load(spec)
    return m, args.steps or m.recommended.get("steps", 50)


def report_vq(args):
    rows = eval_vq(ldm_mini.load_autoencoder(args.vq), ldm_mini.load("shapes").autoencoder, args.n, args.seed)
    return (f"### shapes-vq: reconstructions of {args.n} fresh scenes\n\n"
            + table(rows, ["psnr", "judge", "perplexity", "codes used"])
            + "\n\n(psnr in dB; judge: the fraction read as the caption says; kl = the KL-f4 of the text "
            "model, for comparison)"), None  # fmt: skip


def report_superres(args):
    m, steps = model_and_steps(args.superres, args)
    rows, grid = eval_superres(m, args.n, args.seed, steps)
    held, _ = eval_superres(m, args.n, args.seed, steps, split="heldout")
    rows = {f"{k}, fresh scenes": v for k, v in rows.items()} | {
        f"{k}, held-out pairs": v for k, v in held.items()}  # fmt: skip
    return (f"### shapes-superres: {args.n} + {args.n} unseen scenes, 16x16 -> 64x64, DDIM {steps} steps\n\n"
            + table(rows, ["psnr", "judge"]) + "\n\n(fresh scenes: drawn as the training scenes are, none "
            "of them seen; held-out pairs: each scene has a colour+shape pair that no training scene has)"
            "\n\n![superres](tasks_superres.png)\n\nRows: the 16x16 input (nearest), bicubic, the LDM, the "
            "ground truth (fresh scenes)."), grid  # fmt: skip


def report_uncond(args):
    m, steps = model_and_steps(args.uncond, args)
    rows, samples = eval_uncond(m, args.n, args.seed, steps)
    lines = [f"- {k}: samples {a} vs training data {b}" for k, (a, b) in rows.pop("histograms").items()]
    return (f"### shapes-uncond: {args.n} samples, DDIM {steps} steps\n\n"
            + table(rows, [*SCENE_CHECKS, "valid", "TV count", "TV shape", "TV colour"])
            + "\n\n(the fraction passing each check of judge_scene; TV: total variation distance of the "
            "valid samples' histograms to the training data's, 0 = equal)\n\n" + "\n".join(lines)
            + "\n\n![samples](tasks_uncond.png)"), samples  # fmt: skip


def report_inpaint(args):
    m, steps = model_and_steps(args.inpaint, args)
    rows, grid = eval_inpaint(m, args.n, args.seed, steps)
    held, _ = eval_inpaint(m, args.n, args.seed, steps, split="heldout")
    rows = {f"{k}, fresh scenes": v for k, v in rows.items()} | {
        f"{k}, held-out pairs": v for k, v in held.items()}  # fmt: skip
    eta = m.recommended.get("eta", 0.0)  # the file's recommended eta (ldm_mini.inpaint reads it)
    return (f"### shapes-inpaint: {args.n} + {args.n} unseen scenes, random masks, DDIM {steps} steps, eta "
            f"{eta}\n\n"
            + table(rows, ["n", "scene", "kept", "seam", "correct", "seam energy", "truth's"])
            + "\n\n(fresh scenes and held-out pairs as for shapes-superres; the masks: shapes.random_masks, "
            "redrawn until at least half of every shape stays visible (fair_masks). judge_inpaint: scene = "
            "the composite read as the caption says; kept = unmasked pixels unchanged; seam = the gradient "
            "energy on the mask border at most 0.02 above the truth's; energies in [-1, 1] units)\n\n"
            "![inpaint](tasks_inpaint.png)\n\nRows: the masked input, the composite, the ground truth (fresh "
            "scenes)."), grid  # fmt: skip


def report_semantic(args):
    m, steps = model_and_steps(args.semantic, args)
    rows, grid = eval_semantic(m, args.n, args.seed, steps)
    held, _ = eval_semantic(m, args.n, args.seed, steps, split="heldout")
    rows = rows | {"all, held-out pairs": held["all"]}
    return (f"### shapes-semantic: the label maps of {args.n} + {args.n} unseen scenes, DDIM {steps} steps"
            "\n\n" + table(rows, ["n", "count", "objects", "correct"])
            + "\n\n(judge_layout on each region's box: every region holds a shape of its colour and shape, "
            "within 3 px, and nothing else appears. The rows by region count are the fresh scenes. A label "
            "is a (colour, shape) pair, so a held-out pair's label never occurs in a training map and its "
            "one-hot channel reaches the UNet through untrained weights: the held-out row shows that no "
            "composition can happen there, unlike the caption of a text-to-image model)\n\n"
            "![semantic](tasks_semantic.png)\n\nRows: samples, the scenes whose maps they were drawn from "
            "(fresh scenes)."), grid  # fmt: skip


REPORTS = {  # model -> (its report, the section of RESULTS.md it goes to: MARKERS[i])
    "vq": (report_vq, 0), "superres": (report_superres, 0), "uncond": (report_uncond, 0),
    "inpaint": (report_inpaint, 1), "semantic": (report_semantic, 1),
}  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in REPORTS:  # which file to judge: an embedded name (the default) or a path
        ap.add_argument(
            f"--{name}", default=f"shapes-{name}", help=f"the {name} model (default shapes-{name})"
        )
    ap.add_argument("--only", choices=tuple(REPORTS), action="append", help="judge only these models")
    ap.add_argument("--n", type=int, default=200, help="scenes / samples per model (default 200)")
    ap.add_argument("--steps", type=int, help="sampler steps (default: each file's recommended)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="write RESULTS.md's sections and the grids")
    args = ap.parse_args(argv)
    sections, start = ([], []), time.time()
    for name in args.only or REPORTS:
        report, section = REPORTS[name]
        text, grid = report(args)
        sections[section].append(text)
        if args.write and grid is not None:
            save_grid(grid, HERE / f"tasks_{name}.png", nrow=8)
    took = f"(`python benchmarks/eval_tasks.py`, {time.time() - start:.0f} s on a CPU)"
    for texts, (begin, end, section) in zip(sections, MARKERS, strict=True):
        if texts:
            text = "\n\n".join(texts) + "\n\n" + took
            print(text)
            if args.write:
                write_section(HERE / "RESULTS.md", text, begin, end, section)
                print(f"wrote {HERE / 'RESULTS.md'}: {section}")


if __name__ == "__main__":
    main()
