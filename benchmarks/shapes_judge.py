"""An analytic judge for the shapes world: does an image show what its caption says?

1. Segment by colour: each pixel takes its nearest palette colour, if within `tolerance` (RGB distance);
   the light background and anti-aliased edges are farther than that from every palette colour.
2. Split each colour's pixels into 4-connected blobs; drop specks smaller than `min_area`. Grow each blob
   over its soft edge to the half-coverage outline (the pixels at least halfway from the background colour,
   a median, to the blob's colour), which is exactly how the dataset draws its shapes.
3. Describe each blob: its shape is the ideal shape (circle, square, triangle, cross, each drawn to fill the
   blob's bounding box) with the highest IoU against the blob; its size is the nearest of SIZES to its
   bounding-box extent; its position is its bounding-box centre.
4. Check against the caption (parsed back into a Spec): count, colour (multiset), shape (multiset), binding
   (multiset of colour+shape pairs), size (where the caption names one) and position (the caption's
   relation between the blobs matched to its objects). "correct" means all of them.

Library:  judge(image, caption) -> dict;  evaluate(images, captions) -> fractions (summarize(verdicts)).
Script:   python benchmarks/shapes_judge.py --ground-truth 200   (the judge on the dataset's own images;
          it must read them 100% correctly). Model evaluation will plug generated images into evaluate().
"""

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_mini.shapes import (  # noqa: E402
    IMAGE_SIZE,
    LAYOUT_CLASSES,
    PALETTE,
    SHAPES,
    SIZES,
    Spec,
    parse_caption,
    sample_batch,
    signed_distance,
)

__all__ = ["ATTRIBUTES", "SCENE_CHECKS", "Blob", "evaluate", "find_blobs", "judge", "judge_inpaint",
           "judge_layout", "judge_scene", "parse_caption", "seam_energy", "summarize"]  # fmt: skip

ATTRIBUTES = ("count", "colour", "shape", "binding", "size", "position")
_COLOURS = np.array(list(PALETTE.values()), np.float32)  # (K, 3)


@dataclass(frozen=True)
class Blob:
    colour: str
    shape: str
    size: str  # nearest SIZES key
    x: float  # bounding-box centre, pixels (pixel i spans [i, i + 1))
    y: float
    area: int
    iou: float  # with the chosen ideal shape
    extent: tuple[int, int] = (0, 0)  # bounding box (height, width), pixels


def as_rgb_uint8(image, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """One image, uint8 or float (numpy or torch; (64, 64, 3) or (3, 64, 64)) -> uint8 (64, 64, 3).

    Float images are read as lying in `value_range`: (-1, 1), the model's and ShapesDataset's convention."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if a.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(
            f"judge takes one RGB image of shape (64, 64, 3) or (3, 64, 64), got {a.shape}; "
            "pass a batch one image at a time, resized to 64x64"
        )
    if a.dtype == np.uint8:
        return a
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"image dtype must be uint8 or float, got {a.dtype}")
    lo, hi = value_range
    return np.rint(np.clip((a.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask: every pixel repeatedly takes its neighbours' smallest label."""
    big = mask.size
    label = np.where(mask, np.arange(big).reshape(mask.shape), big)
    while True:
        p = np.pad(label, 1, constant_values=big)
        new = np.minimum.reduce([label, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, big)
        if np.array_equal(new, label):
            return [label == v for v in np.unique(label[mask])]
        label = new


def _describe(mask: np.ndarray, colour: str) -> Blob:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[y0:y1, x0:x1]  # (h, w)
    h, w = crop.shape
    gy, gx = (np.arange(h) + 0.5) / h - 0.5, (np.arange(w) + 0.5) / w - 0.5  # offsets in box fractions
    ious = {}
    for s in SHAPES:  # each ideal shape, drawn to fill the blob's bounding box
        t = signed_distance(s, gx[None, :], gy[:, None], 1.0) < 0  # (h, w) bool
        ious[s] = float((crop & t).sum() / (crop | t).sum())
    shape = max(ious, key=ious.get)
    size = min(SIZES, key=lambda k: abs(SIZES[k] - max(h, w)))
    return Blob(colour, shape, size, (x0 + x1) / 2, (y0 + y1) / 2, int(mask.sum()), ious[shape], (h, w))


def _grow(core: np.ndarray, alpha: np.ndarray, free: np.ndarray, steps: int = 3) -> np.ndarray:
    """The blob at half coverage: pixels within `steps` of its core that are at least halfway from the
    background to its colour (alpha > 0.5) and claimed by no other colour. Strict colour matching alone
    erodes soft edges, and with them thin parts such as a triangle's tip."""
    near = core
    for _ in range(steps):  # dilate by one pixel (4-neighbours)
        p = np.pad(near, 1)
        near = near | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return core | (near & free & (alpha > 0.5))


def find_blobs(image, *, value_range=(-1.0, 1.0), tolerance: float = 70.0, min_area: int = 20) -> list[Blob]:
    rgb = as_rgb_uint8(image, value_range).astype(np.float32)
    dist = np.linalg.norm(rgb[:, :, None, :] - _COLOURS, axis=-1)  # (64, 64, K)
    nearest = np.where(dist.min(-1) < tolerance, dist.argmin(-1), -1)  # -1: background
    bg = np.median(rgb[nearest < 0], axis=0) if (nearest < 0).any() else np.full(3, 255.0, np.float32)
    blobs = []
    for k, colour in enumerate(PALETTE):
        mask = nearest == k
        if mask.sum() < min_area:
            continue
        d = _COLOURS[k] - bg
        alpha = (rgb - bg) @ d / (d @ d)  # (64, 64): 0 on the background, 1 on the pure colour
        for core in _components(mask):
            if core.sum() >= min_area:
                blobs.append(_describe(_grow(core, alpha, free=mask | (nearest < 0)), colour))
    return blobs


def _match(spec: Spec, blobs: list[Blob]) -> list[Blob | None]:
    """The blob for each caption object: same colour and shape first, then same colour, then same shape."""
    matched: list[Blob | None] = [None] * len(spec.objects)
    free = list(blobs)
    for same in (lambda o, b: (o.colour, o.shape) == (b.colour, b.shape), lambda o, b: o.colour == b.colour,
                 lambda o, b: o.shape == b.shape):  # fmt: skip
        for i, o in enumerate(spec.objects):
            hit = next((b for b in free if same(o, b)), None) if matched[i] is None else None
            if hit is not None:
                matched[i] = hit
                free.remove(hit)
    return matched


def _position_ok(where: str | None, bs: list[Blob]) -> bool:
    """The caption's position words hold for the matched blobs (margins in fractions of the image)."""
    n = IMAGE_SIZE
    x, y = [b.x for b in bs], [b.y for b in bs]
    if len(bs) == 1:
        checks = {None: True, "on the left": x[0] < 0.4 * n, "on the right": x[0] > 0.6 * n,
                  "at the top": y[0] < 0.4 * n, "at the bottom": y[0] > 0.6 * n}  # fmt: skip
    elif len(bs) == 2:  # clearly apart along the named axis: by >= 15% of the image
        m = 0.15 * n
        checks = {"above": y[0] < y[1] - m, "below": y[0] > y[1] + m,
                  "to the left of": x[0] < x[1] - m, "to the right of": x[0] > x[1] + m}  # fmt: skip
    else:
        m = 0.1 * n
        checks = {"from left to right": x[0] < x[1] - m and x[1] < x[2] - m,
                  "from top to bottom": y[0] < y[1] - m and y[1] < y[2] - m}  # fmt: skip
    if where not in checks:
        raise ValueError(f"{where!r} is no position for {len(bs)} objects; build specs with parse_caption")
    return bool(checks[where])


def judge(image, caption: str | Spec, **find_kwargs) -> dict:
    """Per-attribute verdicts (bools, see ATTRIBUTES), "correct" (all of them), and the "blobs" found."""
    spec = caption if isinstance(caption, Spec) else parse_caption(caption)
    blobs = find_blobs(image, **find_kwargs)
    objs = spec.objects
    matched = _match(spec, blobs)
    found = all(b is not None for b in matched)
    out = {
        "count": len(blobs) == len(objs),
        "colour": Counter(b.colour for b in blobs) == Counter(o.colour for o in objs),
        "shape": Counter(b.shape for b in blobs) == Counter(o.shape for o in objs),
        "binding": Counter((b.colour, b.shape) for b in blobs) == Counter((o.colour, o.shape) for o in objs),
        "size": all(b is not None and b.size == o.size for o, b in zip(objs, matched, strict=True) if o.size),
        "position": found and _position_ok(spec.where, matched),
    }
    out["correct"] = all(out.values())
    out["blobs"] = blobs
    return out


SCENE_CHECKS = ("count", "shapes", "sizes", "colours", "clean")


def judge_scene(image, *, min_iou: float = 0.8, size_slack: float = 3.0, max_stray: int = 8,
                **find_kwargs) -> dict:  # fmt: skip
    """Without a caption: could this image be a scene of the shapes world? For unconditional samples.

    count    1 to 3 blobs (the dataset's scenes)
    shapes   every blob is its ideal shape: IoU >= min_iou (the dataset's own: >= 0.9)
    sizes    every blob's bounding-box extent is within size_slack pixels of one of SIZES
    colours  no colour twice (the dataset's scenes use distinct colours)
    clean    no stray marks: at most max_stray pixels that are far from the background (more than a
             third of the way to the nearest palette colour) and more than one pixel from every blob
    "valid" = all of them; "blobs" as judge()."""
    blobs = find_blobs(image, **find_kwargs)
    rgb = as_rgb_uint8(image, find_kwargs.get("value_range", (-1.0, 1.0))).astype(np.float32)
    dist = np.linalg.norm(rgb[:, :, None, :] - _COLOURS, axis=-1)  # (64, 64, K)
    bg = np.median(rgb.reshape(-1, 3), axis=0)  # shapes cover less than half of every scene
    to_bg = np.linalg.norm(rgb - bg, axis=-1)
    # "marked": at least a third of the way from the background to its nearest palette colour c (for x on
    # the segment bg -> c at a fraction a: |x - bg| > |x - c| / 2 exactly when a > 1/3)
    marked = to_bg > 0.5 * dist.min(-1)  # (64, 64)
    covered = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] + 0.5
    for b in blobs:  # each blob's box, grown by 1.5 px: its anti-aliased rim
        half = SIZES[b.size] / 2 + size_slack + 1.5
        covered |= (np.abs(xx - b.x) <= half) & (np.abs(yy - b.y) <= half)
    extents = [max(b.extent) for b in blobs]
    out = {
        "count": 1 <= len(blobs) <= 3,
        "shapes": all(b.iou >= min_iou for b in blobs),
        "sizes": all(min(abs(e - v) for v in SIZES.values()) <= size_slack for e in extents),
        "colours": len({b.colour for b in blobs}) == len(blobs),
        "clean": int((marked & ~covered).sum()) <= max_stray,
    }
    out["valid"] = all(out.values())
    out["blobs"] = blobs
    return out


def seam_energy(image, mask) -> float:
    """The mean squared gradient (finite differences, images in [-1, 1]) over the mask's border: the pixels
    within one pixel of its edge, on either side. A visible seam is a jump there that the scene lacks."""
    x = torch.as_tensor(image, dtype=torch.float32).reshape(3, IMAGE_SIZE, IMAGE_SIZE)
    m = torch.as_tensor(mask, dtype=torch.float32).reshape(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    grown = torch.nn.functional.max_pool2d(m, 3, stride=1, padding=1)
    shrunk = -torch.nn.functional.max_pool2d(-m, 3, stride=1, padding=1)
    border = (grown - shrunk)[0, 0, :-1, :-1] > 0  # (63, 63): where a difference below crosses the edge
    dx, dy = x[:, :-1, 1:] - x[:, :-1, :-1], x[:, 1:, :-1] - x[:, :-1, :-1]  # (3, 63, 63) each
    energy = (dx**2 + dy**2).sum(0)  # (63, 63)
    return float(energy[border].mean()) if border.any() else 0.0


def judge_inpaint(composite, truth, mask, caption: str | Spec, *, max_seam: float = 0.02,
                  **find_kwargs) -> dict:  # fmt: skip
    """An inpainted scene (composite, truth: (3, 64, 64) in [-1, 1]; mask (1, 64, 64), 1 = filled):

    scene    the composite reads as the scene's caption says (judge): a mask over part of a shape was
             completed into that shape of that colour, a mask over empty space stayed background
    kept     the unmasked pixels are the truth's (within one uint8 level)
    seam     invisible: the gradient energy on the mask's border exceeds the truth's there by <= max_seam
    "correct" = all three; also the two "seam energy" values (composite, truth)."""
    composite, truth = (torch.as_tensor(a, dtype=torch.float32) for a in (composite, truth))
    keep = torch.as_tensor(mask, dtype=torch.float32) < 0.5  # (1, 64, 64)
    energy = (seam_energy(composite, mask), seam_energy(truth, mask))
    out = {
        "scene": judge(composite, caption, **find_kwargs)["correct"],
        "kept": bool(((composite - truth).abs() * keep).max() <= 2 / 255),
        "seam": energy[0] - energy[1] <= max_seam,
    }
    out["correct"] = all(out.values())
    out["seam energy"] = energy
    return out


def judge_layout(image, layout: list, *, slack: float = 3.0, **find_kwargs) -> dict:
    """A sample of a layout (shapes.layout's format: (class, (x0, y0, w, h)), classes shapes.LAYOUT_CLASSES,
    boxes relative to the image): every box holds a shape of its label and nothing else appears.

    count    as many blobs as objects
    objects  each object has its own blob of its colour and shape, whose centre is within `slack` pixels
             of the box's centre and whose extent is within `slack` pixels of the box's side
    "correct" = both; "blobs" as judge()."""
    blobs = find_blobs(image, **find_kwargs)
    free, matched = list(blobs), 0
    for label, (x0, y0, w, h) in layout:
        colour, shape = LAYOUT_CLASSES[label]
        cx, cy, side = (x0 + w / 2) * IMAGE_SIZE, (y0 + h / 2) * IMAGE_SIZE, max(w, h) * IMAGE_SIZE
        hit = next((b for b in free if (b.colour, b.shape) == (colour, shape) and abs(b.x - cx) <= slack
                    and abs(b.y - cy) <= slack and abs(max(b.extent) - side) <= slack), None)  # fmt: skip
        if hit is not None:
            free.remove(hit)
            matched += 1
    out = {"count": len(blobs) == len(layout), "objects": matched == len(layout)}
    out["correct"] = all(out.values())
    out["blobs"] = blobs
    return out


def evaluate(images, captions, **find_kwargs) -> dict[str, float]:
    """Fraction of images judged right, per attribute and fully ("correct")."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions; give one caption per image")
    return summarize([judge(im, c, **find_kwargs) for im, c in zip(images, captions, strict=True)])


def summarize(verdicts: list[dict]) -> dict[str, float]:
    """judge() verdicts -> the fraction right, per attribute and fully ("correct")."""
    return {k: float(np.mean([v[k] for v in verdicts])) for k in (*ATTRIBUTES, "correct")}


def format_table(results: dict[str, dict[str, float]], n: int) -> str:
    w = max(10, *(len(name) + 1 for name in results))  # the first column fits the longest row name
    head = f"{'split':<{w}}{'n':>6}" + "".join(f"{k:>10}" for k in (*ATTRIBUTES, "correct"))
    rows = [f"{name:<{w}}{n:>6}" + "".join(f"{100 * r[k]:>9.1f}%" for k in (*ATTRIBUTES, "correct"))
            for name, r in results.items()]  # fmt: skip
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ground-truth", type=int, metavar="N", required=True,
                    help="judge N of the dataset's own images per split (seen, held-out)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=70.0, help="RGB distance to a palette colour")
    args = ap.parse_args(argv)
    results = {}
    for name, split in (("seen", "train"), ("held-out", "heldout")):
        images, captions, _ = sample_batch(args.ground_truth, args.seed, split)
        results[name] = evaluate(images, captions, tolerance=args.tolerance)
    print(f"shapes judge on ground-truth images (seed {args.seed}), percent judged right:")
    print(format_table(results, args.ground_truth))


if __name__ == "__main__":
    main()
