"""A procedural, captioned "shapes world": the training data of the tiny text-to-image LDM in the repo.

Each 64x64 RGB image holds one to three coloured shapes on a light background, with an English caption that
says what is where. The caption grammar is small and regular (three sentence forms):

    one shape     "a [small|large] COLOUR SHAPE [on the left|on the right|at the top|at the bottom]"
    two shapes    "a [small] COLOUR SHAPE (above|below|to the left of|to the right of) a [small] COLOUR SHAPE"
    three shapes  "a COLOUR SHAPE, a COLOUR SHAPE and a COLOUR SHAPE (from left to right|from top to bottom)"

("an" before a vowel: "an orange cross"). caption_vocabulary() lists its 28 words and the comma.

Conventions (so that every caption is true of its image and a judge can check it unambiguously):
- Positions sit on a coarse grid (+-2 px jitter): a single shape at the centre or halfway to one edge; a pair
  on one axis, 32 px apart; a row of three small shapes, 21 px apart. The caption names no position for a
  centred single shape. A relation is only ever used along the axis the shapes are separated on.
- Sizes are bounding-box edges: small 14, medium 20, large 26 px. Captions name "small" and "large"; medium,
  the default, is unnamed. Pairs use small or medium; rows of three always small (and unnamed).
- The colours in one scene are distinct, so shapes never merge when segmented by colour.
- Held-out pairs (HELDOUT_PAIRS, one per shape) never appear in split="train"; every split="heldout" scene
  contains at least one. They measure whether a model composes a colour and a shape it never saw together.

Everything is deterministic from a seed: `ShapesDataset(seed)[i]` depends only on (seed, split, i), and
`sample_batch(n, rng)` on the numpy Generator's state. Drawing is numpy only: each shape is a signed distance
function, anti-aliased over one pixel: only edge pixels blend with the background, so the colours stay
exactly segmentable (benchmarks/shapes_judge.py reads 100% of the dataset's images correctly).
"""

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 64
PALETTE = {  # saturated, >= 95 apart in RGB, and >= 190 from every background (channels 212..252)
    "red": (215, 25, 35),
    "orange": (250, 120, 0),
    "yellow": (240, 215, 0),
    "green": (20, 150, 40),
    "blue": (25, 65, 225),
    "purple": (135, 40, 185),
    "black": (30, 30, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 14, "medium": 20, "large": 26}  # bounding-box edge in pixels; "medium" is never named
HELDOUT_PAIRS = frozenset({("red", "cross"), ("green", "circle"), ("blue", "triangle"), ("yellow", "square")})
SPLITS = ("train", "heldout")

# Where things go: (x, y) centres in pixels, keyed by the words of the caption.
POSITIONS = {None: (32, 32), "on the left": (16, 32), "on the right": (48, 32), "at the top": (32, 16),
             "at the bottom": (32, 48)}  # fmt: skip
RELATIONS = {  # first object, second object
    "above": ((32, 16), (32, 48)),
    "below": ((32, 48), (32, 16)),
    "to the left of": ((16, 32), (48, 32)),
    "to the right of": ((48, 32), (16, 32)),
}
ROWS = {  # three objects, in caption order
    "from left to right": ((11, 32), (32, 32), (53, 32)),
    "from top to bottom": ((32, 11), (32, 32), (32, 53)),
}
JITTER = 2  # px, added to every centre
NUM_SHAPES_P = (0.45, 0.45, 0.10)  # probability of 1, 2, 3 shapes in a scene (training may ask for another)


@dataclass(frozen=True)
class Obj:
    """One shape as a caption names it."""

    colour: str
    shape: str
    size: str | None = None  # "small" | "large" when the caption names it, else None


@dataclass(frozen=True)
class Spec:
    """What a caption says: the objects in caption order and where they are."""

    objects: tuple[Obj, ...]
    where: str | None = None  # 1 object: a POSITIONS key; 2: a RELATIONS key; 3: a ROWS key


@dataclass(frozen=True)
class Drawn:
    """One shape as drawn: centre (x, y) in pixels, size a SIZES key."""

    colour: str
    shape: str
    size: str
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    spec: Spec
    shapes: tuple[Drawn, ...]  # in the order of spec.objects
    background: tuple[float, float, float]  # RGB at the image centre
    shading: tuple[float, float]  # change of the background across the image, in x and in y (0, 0: plain)

    @property
    def caption(self) -> str:
        return make_caption(self.spec)


# ----------------------------------------------------------------------------------------------- captions
def make_caption(spec: Spec) -> str:
    words = [" ".join([*([o.size] if o.size else []), o.colour, o.shape]) for o in spec.objects]
    words = [("an " if w[0] in "aeiou" else "a ") + w for w in words]  # "an orange circle"
    if len(words) == 1:
        return words[0] + (f" {spec.where}" if spec.where else "")
    if len(words) == 2:
        return f"{words[0]} {spec.where} {words[1]}"
    return f"{words[0]}, {words[1]} and {words[2]} {spec.where}"


_OBJ = rf"an? (?:(small|large) )?({'|'.join(PALETTE)}) ({'|'.join(SHAPES)})"  # groups: size, colour, shape
_FORMS = (  # (regex, number of objects), one per sentence form
    (re.compile(rf"{_OBJ}(?: ({'|'.join(k for k in POSITIONS if k)}))?"), 1),
    (re.compile(rf"{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}"), 2),
    (re.compile(rf"{_OBJ}, {_OBJ} and {_OBJ} ({'|'.join(ROWS)})"), 3),
)


def parse_caption(caption: str) -> Spec:
    """The inverse of make_caption: caption -> Spec. Case, spaces and a final full stop are forgiven."""
    text = re.sub(r"\s*,\s*", ", ", " ".join(caption.lower().split())).rstrip(".")
    for form, n in _FORMS:
        m = form.fullmatch(text)
        if m is None:
            continue
        g = m.groups()  # n * (size, colour, shape), with the where-phrase after object 1 for pairs
        if n == 2:
            g = (*g[:3], *g[4:], g[3])
        objects = tuple(Obj(colour=g[3 * i + 1], shape=g[3 * i + 2], size=g[3 * i]) for i in range(n))
        return Spec(objects, g[3 * n])
    raise ValueError(
        f"caption {caption!r} is not in the shapes grammar. Use one of: 'a [small|large] COLOUR SHAPE "
        "[on the left|...]', 'a COLOUR SHAPE above|below|to the left of|to the right of a COLOUR SHAPE', "
        f"'a COLOUR SHAPE, a COLOUR SHAPE and a COLOUR SHAPE from left to right|from top to bottom'; colours "
        f"{list(PALETTE)}, shapes {list(SHAPES)}."
    )


def caption_vocabulary() -> list[str]:
    """Every word (and the comma) the grammar can produce, sorted."""
    phrases = ["a", "an", "and", ",", "small", "large", *PALETTE, *SHAPES]
    phrases += [*filter(None, POSITIONS), *RELATIONS, *ROWS]
    return sorted({w for p in phrases for w in p.split()})


def is_heldout(spec: Spec) -> bool:
    return any((o.colour, o.shape) in HELDOUT_PAIRS for o in spec.objects)


# ------------------------------------------------------------------------------------------------- scenes
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _random_pairs(rng: np.random.Generator, n: int, split: str) -> list[tuple[str, str]]:
    """n (colour, shape) pairs with distinct colours: train avoids HELDOUT_PAIRS, heldout has >= 1 of them."""
    held = sorted(HELDOUT_PAIRS)
    seen = [(c, s) for c in PALETTE for s in SHAPES if (c, s) not in HELDOUT_PAIRS]
    other = seen + held if split == "heldout" else seen  # heldout: the slots but one may hold any pair
    held_slot = int(rng.integers(n)) if split == "heldout" else -1  # this slot gets a held-out pair
    pairs = []
    for i in range(n):
        pool = held if i == held_slot else other
        pool = [p for p in pool if p[0] not in {c for c, _ in pairs}]
        pairs.append(pool[rng.integers(len(pool))])
    return pairs


def random_scene(
    rng: np.random.Generator, split: str = "train", num_shapes_p: tuple[float, ...] = NUM_SHAPES_P
) -> Scene:
    """One scene; num_shapes_p: the probabilities of 1, 2 and 3 shapes."""
    _check_split(split)
    if len(num_shapes_p) != 3 or min(num_shapes_p) < 0 or abs(sum(num_shapes_p) - 1) > 1e-6:
        raise ValueError(f"num_shapes_p: 3 probabilities (1, 2, 3 shapes) summing to 1, got {num_shapes_p}")
    n = int(rng.choice(3, p=num_shapes_p)) + 1
    pairs = _random_pairs(rng, n, split)
    if n == 1:
        sizes = [("small", "medium", "large")[rng.integers(3)]]
        where = tuple(POSITIONS)[rng.integers(len(POSITIONS))]
        centres = [POSITIONS[where]]
    elif n == 2:
        sizes = [("small", "medium")[i] for i in rng.integers(2, size=2)]
        where = tuple(RELATIONS)[rng.integers(len(RELATIONS))]
        centres = RELATIONS[where]
    else:
        sizes = ["small"] * 3
        where = tuple(ROWS)[rng.integers(len(ROWS))]
        centres = ROWS[where]
    jitter = rng.integers(-JITTER, JITTER + 1, size=(n, 2))
    named = [s if s != "medium" and n < 3 else None for s in sizes]  # rows are always small: unnamed
    spec = Spec(tuple(Obj(c, s, z) for (c, s), z in zip(pairs, named, strict=True)), where)
    drawn = tuple(
        Drawn(c, s, z, float(x + dx), float(y + dy))
        for (c, s), z, (x, y), (dx, dy) in zip(pairs, sizes, centres, jitter, strict=True)
    )
    background = rng.uniform(222, 242) + rng.uniform(-6, 6, size=3)  # a light grey, faintly tinted
    shading = rng.uniform(-8, 8, size=2) if rng.random() < 0.5 else np.zeros(2)  # plain or a faint gradient
    return Scene(spec, drawn, tuple(background.tolist()), tuple(shading.tolist()))


def random_prompts(
    n: int, split: str = "train", seed: int = 0, num_shapes_p: tuple[float, ...] = NUM_SHAPES_P
) -> list[tuple[str, Spec]]:
    """n evaluation prompts (caption, spec), drawn like the dataset's scenes (heldout: >= 1 held-out pair)."""
    _check_split(split)
    rng = np.random.default_rng([seed, SPLITS.index(split), 1])  # a stream apart from ShapesDataset's
    return [(s.caption, s.spec) for s in (random_scene(rng, split, num_shapes_p) for _ in range(n))]


# ---------------------------------------------------------------------------------------------- rendering
_YS, _XS = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5  # pixel centres, (64, 64) each


def signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Distance in pixels to the outline of `shape` (negative inside); dx, dy are offsets from its centre.

    Each shape fills a size x size box; the triangle points up, the cross's arms are size/3 wide. Exact
    inside and along edges; outside corners an underestimate, which one-pixel anti-aliasing does not mind."""
    h, ax, ay = size / 2, np.abs(dx), np.abs(dy)
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - h
    if shape == "square":
        return np.maximum(ax, ay) - h
    if shape == "cross":  # union of two bars = min of their distances
        a = size / 6
        return np.minimum(np.maximum(ax - h, ay - a), np.maximum(ax - a, ay - h))
    if shape == "triangle":  # apex (0, -h), base corners (+-h, h): intersection of three half-planes
        return np.maximum(dy - h, (2 * ax - (dy + h)) / np.sqrt(5))
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


def render(scene: Scene) -> np.ndarray:
    """Scene -> uint8 RGB image (64, 64, 3)."""
    gx, gy = scene.shading
    shade = gx * (_XS / IMAGE_SIZE - 0.5) + gy * (_YS / IMAGE_SIZE - 0.5)  # (64, 64)
    img = np.asarray(scene.background, np.float32) + shade[..., None]  # (64, 64, 3)
    for d in scene.shapes:
        cover = np.clip(0.5 - signed_distance(d.shape, _XS - d.x, _YS - d.y, SIZES[d.size]), 0, 1)
        img += cover[..., None] * (np.asarray(PALETTE[d.colour], np.float32) - img)  # alpha blend
    return np.rint(np.clip(img, 0, 255)).astype(np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, 64, 64, 3) -> float32 (B, 3, 64, 64) in [-1, 1], the model's convention."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1)


def sample_batch(
    n: int,
    rng: np.random.Generator | int,
    split: str = "train",
    num_shapes_p: tuple[float, ...] = NUM_SHAPES_P,
) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """n fresh scenes: (images (n, 3, 64, 64) float in [-1, 1], captions, scenes). rng: Generator or seed."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    scenes = [random_scene(rng, split, num_shapes_p) for _ in range(n)]
    images = to_tensor(np.stack([render(s) for s in scenes]))
    return images, [s.caption for s in scenes], scenes


class ShapesDataset(torch.utils.data.Dataset):
    """Item i -> (image (3, 64, 64) float in [-1, 1], caption); deterministic per (seed, split, i)."""

    def __init__(self, length: int = 100_000, seed: int = 0, split: str = "train"):
        _check_split(split)
        self.length, self.seed, self.split = length, seed, split

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is outside this ShapesDataset of length {self.length}")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), 0, index])  # one stream per item
        return random_scene(rng, self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene = self.scene(index)
        return to_tensor(render(scene)[None])[0], scene.caption


def degrade(images: torch.Tensor, generator: torch.Generator, factor: int = 4, max_noise: float = 0.05):
    """The low-resolution input of super-resolution: blur, downsample, add noise (a light version of the
    degradations bsr_sr was trained on). images (B, 3, H, W) in [-1, 1] -> (B, 3, H/factor, W/factor).

    Blur: a Gaussian of sigma 0.5 * factor (what an anti-aliasing filter before downsampling by `factor`
    needs), then the mean of each factor x factor patch, then per-image Gaussian noise of a random std in
    [0, max_noise] (one draw from `generator` per image, then the noise)."""
    b, c, h, w = images.shape
    sigma = 0.5 * factor
    x = torch.arange(-factor, factor + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()  # (2f + 1,), separable
    blurred = F.pad(images, [factor] * 4, mode="replicate")
    blurred = F.conv2d(blurred, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # along width
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # along height
    low = F.avg_pool2d(blurred, factor)  # (B, 3, H/f, W/f)
    std = torch.rand(b, 1, 1, 1, generator=generator) * max_noise
    return (low + std * torch.randn(low.shape, generator=generator)).clamp(-1, 1)


def random_masks(n: int, generator: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Inpainting masks (n, 1, size, size), 1 = the pixels to fill: half rectangles, half free-form strokes
    (the two mask families LDM's inpainting model was trained on, Sec. 4.5 / Suvorov et al. 2021, LaMa).

    A rectangle has sides of 1/4 to 3/4 of the image anywhere inside it; a stroke is a random walk of 4 to 8
    segments of a thick brush (radius 3 to 6 px). Each mask covers 5% to 60% of the image."""
    masks = torch.zeros(n, 1, size, size)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    for i in range(n):
        while True:
            mask = torch.zeros(size, size, dtype=torch.bool)
            if torch.rand((), generator=generator) < 0.5:
                h, w = int(uniform(size / 4, 3 * size / 4)), int(uniform(size / 4, 3 * size / 4))
                y, x = int(uniform(0, size - h)), int(uniform(0, size - w))
                mask[y : y + h, x : x + w] = True
            else:
                x, y, radius = uniform(0, size), uniform(0, size), uniform(3, 6)
                for _ in range(int(uniform(4, 9))):
                    angle, length = uniform(0, 2 * math.pi), uniform(8, 24)
                    x1 = min(max(x + length * math.cos(angle), 0), size)
                    y1 = min(max(y + length * math.sin(angle), 0), size)
                    for a in torch.linspace(0, 1, 16).tolist():  # discs along the segment: a thick line
                        cx, cy = x + a * (x1 - x), y + a * (y1 - y)
                        mask |= (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
                    x, y = x1, y1
            if 0.05 <= mask.float().mean() <= 0.6:
                masks[i, 0] = mask.float()
                break
    return masks


# --- layouts: the boxes and labels of a scene (the input of a layout-to-image model) -----------------------
LAYOUT_CLASSES = tuple((c, s) for c in PALETTE for s in SHAPES)  # class id -> (colour, shape): 32 classes


def layout(scene: Scene) -> list[tuple[int, tuple[float, float, float, float]]]:
    """A scene's objects as a layout, conditioning.LayoutTokenizer's format: (class, (x0, y0, w, h)) each,
    class = LAYOUT_CLASSES.index((colour, shape)), the box = the shape's bounding box relative to the image,
    (0, 0) at the top left."""
    objects = []
    for d in scene.shapes:
        side = SIZES[d.size] / IMAGE_SIZE
        x0 = min(max(d.x / IMAGE_SIZE - side / 2, 0.0), 1.0 - side)
        y0 = min(max(d.y / IMAGE_SIZE - side / 2, 0.0), 1.0 - side)
        objects.append((LAYOUT_CLASSES.index((d.colour, d.shape)), (x0, y0, side, side)))
    return objects


def segmentation(scene: Scene) -> torch.Tensor:
    """A scene's label map (64, 64) int64: 0 = background, 1 + LAYOUT_CLASSES.index((colour, shape)) where a
    shape covers at least half of the pixel (its anti-aliased outline at half coverage, as render draws it and
    the judge reads it); a later shape covers an earlier one, as in render."""
    labels = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.int64)
    for d in scene.shapes:
        inside = signed_distance(d.shape, _XS - d.x, _YS - d.y, SIZES[d.size]) < 0
        labels[inside] = 1 + LAYOUT_CLASSES.index((d.colour, d.shape))
    return torch.from_numpy(labels)
