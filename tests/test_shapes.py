"""The shapes world (ldm_mini/shapes.py) and its analytic judge (benchmarks/shapes_judge.py).

The judge reading the dataset's own images correctly tests both: the captions are true of what is drawn,
and the judge sees it. Wrong captions (a colour, a shape, a relation, a size, a count changed) must fail."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from benchmarks import shapes_judge
from benchmarks.shapes_judge import judge
from ldm_mini import shapes as shapes_module
from ldm_mini.shapes import (
    HELDOUT_PAIRS,
    IMAGE_SIZE,
    PALETTE,
    SHAPES,
    SIZES,
    ShapesDataset,
    Spec,
    caption_vocabulary,
    is_heldout,
    make_caption,
    parse_caption,
    random_prompts,
    random_scene,
    render,
    sample_batch,
)

FLIP = {"above": "below", "to the left of": "to the right of", "on the left": "on the right",
        "at the top": "at the bottom"}  # fmt: skip
FLIP.update({v: k for k, v in FLIP.items()})


def scenes(n: int, split: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [random_scene(rng, split) for _ in range(n)]


def test_dataset_is_deterministic_per_seed_and_index():
    a, b, other = ShapesDataset(seed=3), ShapesDataset(seed=3), ShapesDataset(seed=4)
    for i in (0, 5, 99_999):
        (xa, ca), (xb, cb) = a[i], b[i]
        assert ca == cb and torch.equal(xa, xb)
    assert torch.equal(a[7][0], a[7][0])  # same item twice, in any order
    assert [a[i][1] for i in range(8)] != [other[i][1] for i in range(8)]
    assert not all(torch.equal(a[i][0], other[i][0]) for i in range(8))
    assert [a[i][1] for i in range(8)] != [ShapesDataset(seed=3, split="heldout")[i][1] for i in range(8)]
    with pytest.raises(IndexError, match="outside"):
        a[len(a)]


def test_sample_batch_format_and_seed():
    x, captions, scene_list = sample_batch(16, 1)
    assert x.shape == (16, 3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32 and x.is_contiguous()
    assert x.min() >= -1 and x.max() <= 1
    assert captions == [s.caption for s in scene_list] and all(isinstance(c, str) for c in captions)
    x2, captions2, _ = sample_batch(16, np.random.default_rng(1))
    assert captions2 == captions and torch.equal(x2, x)
    item, caption = ShapesDataset(seed=0)[0]
    assert item.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and isinstance(caption, str)


def test_number_of_shapes_mix():
    """num_shapes_p sets the mix of 1, 2, 3 shapes (training asks for more multi-shape scenes)."""
    counts = np.bincount([len(s.spec.objects) for s in scenes(2000, "train")], minlength=4)[1:] / 2000
    np.testing.assert_allclose(counts, (0.45, 0.45, 0.10), atol=0.04)  # NUM_SHAPES_P, the default
    _, _, only_three = sample_batch(50, 0, num_shapes_p=(0.0, 0.0, 1.0))
    assert {len(s.spec.objects) for s in only_three} == {3}
    assert {len(spec.objects) for _, spec in random_prompts(20, "heldout", num_shapes_p=(1, 0, 0))} == {1}
    for bad in ((0.5, 0.5), (0.5, 0.6, -0.1), (0.2, 0.2, 0.2)):
        with pytest.raises(ValueError, match="num_shapes_p"):
            random_scene(np.random.default_rng(0), num_shapes_p=bad)


def test_splits_and_held_out_pairs():
    train = scenes(3000, "train", seed=1)
    assert not any((d.colour, d.shape) in HELDOUT_PAIRS for s in train for d in s.shapes)
    assert not any(is_heldout(s.spec) for s in train)
    held = scenes(500, "heldout", seed=1)
    assert all(any((d.colour, d.shape) in HELDOUT_PAIRS for d in s.shapes) for s in held)
    counts = np.bincount([len(s.shapes) for s in train], minlength=4)[1:]
    assert counts[0] > counts[2] and counts[1] > counts[2] > 0  # one and two shapes dominate
    assert all(not is_heldout(spec) for _, spec in random_prompts(200, "train", seed=2))
    assert all(is_heldout(spec) for _, spec in random_prompts(200, "heldout", seed=2))
    assert random_prompts(20, "heldout", seed=2) == random_prompts(20, "heldout", seed=2)
    with pytest.raises(ValueError, match="split must be one of"):
        random_prompts(1, "test")


def test_layout_is_unambiguous():
    """Shapes lie inside the image, >= 2 px apart, with distinct colours; every caption parses back."""
    for s in scenes(3000, "heldout", seed=3):
        boxes = [(d.x - SIZES[d.size] / 2, d.x + SIZES[d.size] / 2, d.y - SIZES[d.size] / 2,
                  d.y + SIZES[d.size] / 2) for d in s.shapes]  # fmt: skip
        assert all(
            b[0] >= 1 and b[1] <= IMAGE_SIZE - 1 and b[2] >= 1 and b[3] <= IMAGE_SIZE - 1 for b in boxes
        )
        for i, p in enumerate(boxes):
            for q in boxes[i + 1 :]:
                assert max(q[0] - p[1], p[0] - q[1], q[2] - p[3], p[2] - q[3]) >= 2
        assert len({d.colour for d in s.shapes}) == len(s.shapes)
        assert parse_caption(s.caption) == s.spec


def test_captions_round_trip_and_vocabulary():
    vocab = set(caption_vocabulary())
    for s in scenes(2000, "train", seed=4) + scenes(500, "heldout", seed=4):
        caption = s.caption
        assert make_caption(parse_caption(caption)) == caption
        assert set(caption.replace(",", " ,").split()) <= vocab
    assert make_caption(Spec((parse_caption("a orange cross").objects[0],))) == "an orange cross"
    assert parse_caption("  A Red  circle ,a blue square and a black cross from left to right. ") == (
        parse_caption("a red circle, a blue square and a black cross from left to right")
    )
    for bad in ("a pink circle", "a red circle next to a blue square", "two red circles", ""):
        with pytest.raises(ValueError, match="not in the shapes grammar"):
            parse_caption(bad)


def test_judge_reads_ground_truth_images():
    n_ok, n = 0, 0
    for split, count in (("train", 300), ("heldout", 100)):
        x, captions, _ = sample_batch(count, 5, split)
        for image, caption in zip(x, captions, strict=True):
            n_ok, n = n_ok + judge(image, caption)["correct"], n + 1
    assert n_ok == n, f"judge read {n_ok}/{n} ground-truth images correctly; it must read all of them"
    s = scenes(1, "train", seed=6)[0]
    u8 = render(s)  # (64, 64, 3) uint8, as a PNG file would hold it
    assert (
        judge(u8, s.caption)["correct"]
        and judge(u8.astype(np.float32) / 255, s.caption, value_range=(0, 1))["correct"]
    )
    with pytest.raises(ValueError, match="one RGB image"):
        judge(torch.zeros(2, 3, 64, 64), s.caption)


def wrong_captions(scene):
    """(caption, attribute that must fail) for each way of getting `scene` wrong."""
    spec, objs, o, drawn = scene.spec, list(scene.spec.objects), scene.spec.objects[0], scene.shapes[0]
    unused = next(c for c in PALETTE if c not in {d.colour for d in scene.shapes})
    yield Spec((replace(o, colour=unused), *objs[1:]), spec.where), "colour"
    yield Spec((replace(o, shape=next(s for s in SHAPES if s != o.shape)), *objs[1:]), spec.where), "shape"
    yield (
        Spec((replace(o, size="large" if drawn.size == "small" else "small"), *objs[1:]), spec.where),
        "size",
    )
    if spec.where in FLIP:
        yield Spec(spec.objects, FLIP[spec.where]), "position"
    if len(objs) == 3:
        yield Spec(spec.objects[::-1], spec.where), "position"
    if len(objs) == 2 and objs[0].shape != objs[1].shape:  # swap the colours: each colour and shape present
        a, b = objs
        yield Spec((replace(a, colour=b.colour), replace(b, colour=a.colour)), spec.where), "binding"
    if len(objs) == 2:
        yield Spec((o,), None), "count"


def test_judge_rejects_wrong_captions():
    checked = set()
    for s in scenes(60, "train", seed=7) + scenes(20, "heldout", seed=7):
        image = render(s)
        for wrong, attribute in wrong_captions(s):
            verdict = judge(image, make_caption(wrong))
            assert not verdict["correct"] and not verdict[attribute], (s.caption, make_caption(wrong))
            if attribute == "binding":  # right colours and shapes, wrongly paired
                assert verdict["colour"] and verdict["shape"]
            checked.add(attribute)
    assert checked == {"colour", "shape", "size", "position", "binding", "count"}


def test_judge_script_runs(capsys):
    shapes_judge.main(["--ground-truth", "5"])
    out = capsys.readouterr().out
    assert "correct" in out and out.count("100.0%") == 14  # 7 columns x 2 splits


def test_judge_scene_accepts_every_ground_truth_scene_and_rejects_broken_ones():
    """The caption-free judge of unconditional samples: valid on the dataset's own scenes (1, 2 and 3 shapes),
    invalid on noise, a blank canvas, a stray mark, a shape of no known size, a colour used twice."""
    images, _, scenes = sample_batch(120, np.random.default_rng(11))
    for image, scene in zip(images, scenes, strict=True):
        verdict = shapes_judge.judge_scene(image)
        assert verdict["valid"], scene.caption
        assert len(verdict["blobs"]) == len(scene.spec.objects)
    one = images[:1].clone()
    red = torch.tensor(PALETTE["red"], dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    broken = {
        "count": torch.full_like(one, 0.8),  # a blank light canvas: no shape at all
        "clean": one.clone(),
        "sizes": one.clone(),
        "colours": one.clone(),
    }
    broken["clean"][0, :, 1:5, 1:5] = red  # a 4x4 mark in a corner: below min_area, yet no background
    broken["sizes"][0, :, 40:44, 2:40] = red  # a 38 x 4 bar: a blob of no size in SIZES
    broken["colours"][0, :, 2:16, 2:16] = red  # two red squares (the scene may already have a red shape)
    broken["colours"][0, :, 48:62, 48:62] = red
    for check, image in broken.items():
        verdict = shapes_judge.judge_scene(image[0])
        assert not verdict["valid"] and not verdict[check], check
    noisy = (images[:8] + 0.3 * torch.randn(images[:8].shape, generator=g)).clamp(-1, 1)
    assert not any(shapes_judge.judge_scene(im)["valid"] for im in noisy)


def test_judge_inpaint_on_ground_truth_and_broken_fills():
    """The truth itself is a correct inpainting of any mask; a fill that moves a shape's pixels, one a shade
    off (a visible seam), or a composite that changes a kept pixel is not."""
    images, captions, _ = sample_batch(40, np.random.default_rng(12))
    masks = shapes_module.random_masks(40, torch.Generator().manual_seed(1))
    for image, mask, caption in zip(images, masks, captions, strict=True):
        verdict = shapes_judge.judge_inpaint(image, image, mask, caption)
        assert verdict["correct"] and verdict["seam energy"][0] == verdict["seam energy"][1], caption
    image, caption = images[0], captions[0]
    blob = shapes_judge.judge(image, caption)["blobs"][0]
    mask = torch.zeros(1, 64, 64)  # the left half of the first shape's box
    y, x, half = int(blob.y), int(blob.x), SIZES[blob.size] // 2 + 2
    mask[:, y - half : y + half, x - half : x] = 1
    background = torch.full_like(image, 0.8)
    erased = (1 - mask) * image + mask * background  # the half shape filled with background
    assert not shapes_judge.judge_inpaint(erased, image, mask, caption)["scene"]
    shade = (1 - mask) * image + mask * (image + 0.3).clamp(-1, 1)  # right content, wrong brightness
    verdict = shapes_judge.judge_inpaint(shade, image, mask, caption)
    assert not verdict["seam"] and not verdict["correct"]
    moved = image.clone()
    moved[:, 0, 0] = -1.0  # a kept pixel changed
    assert not shapes_judge.judge_inpaint(moved, image, mask, caption)["kept"]


def test_judge_layout_on_ground_truth_and_moved_or_wrong_shapes():
    images, _, scenes = sample_batch(60, np.random.default_rng(13))
    for image, scene in zip(images, scenes, strict=True):
        assert shapes_judge.judge_layout(image, shapes_module.layout(scene))["correct"], scene.caption
    image, scene = images[0], scenes[0]
    objects = shapes_module.layout(scene)
    label, (x0, y0, w, h) = objects[0]
    shifted = x0 + 0.2 if x0 + 0.2 <= 1 - w else x0 - 0.2  # the box 13 px to one side, inside the image
    assert not shapes_judge.judge_layout(image, [(label, (shifted, y0, w, h)), *objects[1:]])["correct"]
    colour, shape = shapes_module.LAYOUT_CLASSES[label]
    other = shapes_module.LAYOUT_CLASSES.index((colour, next(s for s in SHAPES if s != shape)))
    assert not shapes_judge.judge_layout(image, [(other, (x0, y0, w, h)), *objects[1:]])["correct"]
    assert not shapes_judge.judge_layout(image, objects[1:])["correct"]  # a shape the layout lacks
