"""ldm_mini/train.py: a few steps of each stage reduce the loss, and a cut-off run resumes exactly.

Tiny batches of the real (small) shapes-model configs, on the CPU: the whole file runs in ~15 s."""

import numpy as np
import pytest
import torch

from ldm_mini import shapes, train
from ldm_mini.autoencoder import AutoencoderKL, VQModel


def fixed_loss(loss_fn, seed=0):
    """The loss of a fixed batch with fixed noise (the generator is reset for every call)."""
    return loss_fn(torch.Generator().manual_seed(seed))


def test_autoencoder_steps_reduce_loss():
    torch.manual_seed(0)
    ae = AutoencoderKL(train.AUTOENCODER)
    images, _, _ = shapes.sample_batch(4, 0)
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3)

    def loss_fn(gen):
        return train.autoencoder_loss(ae, images, gen, kl_weight=1e-6)[0]

    before = fixed_loss(loss_fn).item()
    for i in range(15):
        loss = fixed_loss(loss_fn, seed=i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss(loss_fn).item()
    assert after < 0.7 * before, (before, after)


def test_diffusion_steps_reduce_loss():
    torch.manual_seed(0)
    ae = AutoencoderKL(train.AUTOENCODER).eval().requires_grad_(False)
    m = train.build_model(ae, train.train_tokenizer(num_captions=500), scale_factor=1.0)
    images, captions, _ = shapes.sample_batch(4, 0)
    params = [*m.unet.parameters(), *m.text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def loss_fn(gen):
        return train.diffusion_loss(m, images, captions, gen)

    before = fixed_loss(loss_fn).item()
    for _ in range(15):
        loss = fixed_loss(loss_fn)  # the same t and noise each step: a loss the steps can only lower
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss(loss_fn).item()
    assert after < 0.7 * before, (before, after)


def run_stage(out, stage, *extra):
    common = ["--out", str(out), "--batch", "2", "--steps", "4", "--warmup", "2", "--no-progress"]
    common += ["--grid-every", "3", "--log-every", "1"]
    if stage == "diffusion":
        common += ["--scale-images", "8"]
    train.main([stage, *common, *extra])
    return torch.load(out / f"{stage}.pt", weights_only=True)


def assert_same_state(a, b, path=""):
    """Two checkpoints are identical, tensor for tensor (bitwise), apart from the wall-clock time."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k not in ("elapsed", "args"):
                assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_resume_restores_the_exact_state(tmp_path):
    """A run cut off after 2 of 4 steps and resumed ends exactly where an uninterrupted run does: weights,
    optimizer moments, EMA, step and random states. Both stages (the second on the first's autoencoder)."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    for stage in ("autoencoder", "diffusion"):
        full = run_stage(straight, stage)
        half = run_stage(cut, stage, "--stop-at", "2")
        assert half["step"] == 2
        resumed = run_stage(cut, stage, "--resume")
        assert resumed["step"] == full["step"] == 4
        assert_same_state(resumed, full)
    log = (cut / "diffusion_log.jsonl").read_text().splitlines()
    assert len(log) == 1 + 4  # the scale factor, then one line per step (the resumed run appends)
    assert sorted(p.name for p in cut.glob("*.png")) == [
        "autoencoder_000003.png", "autoencoder_000004.png", "diffusion_000003.png", "diffusion_000004.png"
    ]  # fmt: skip


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.main(["autoencoder", "--out", str(tmp_path), "--resume", "--no-progress"])


def test_tokenizer_is_deterministic_and_knows_every_word():
    a, b = train.train_tokenizer(num_captions=500), train.train_tokenizer(num_captions=500)
    assert a.vocab_text == b.vocab_text
    assert a.vocab_text.split("\n")[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = shapes.caption_vocabulary()
    assert all(a.pieces(w) == [w] for w in words)
    ids = a(["a red circle above a blue square", ""])
    assert ids.shape == (2, 77) and ids[1, :2].tolist() == [2, 3] and not ids[1, 2:].any()


def test_lr_schedule():
    assert train.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert train.lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert train.lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
    assert np.isclose(train.lr_at(55, 100, 1.0, 10), 0.55)


# --- the VQ autoencoder and the unconditional / super-resolution models (shapes-vq, -uncond, -superres)
def test_vq_autoencoder_steps_reduce_loss_and_train_the_codebook():
    torch.manual_seed(0)
    ae = VQModel(train.AUTOENCODER_VQ)
    images, _, _ = shapes.sample_batch(4, 0)
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3)
    codebook = ae.quantize.embedding.weight.detach().clone()
    before = train.vq_loss(ae, images)[0].item()
    for _ in range(15):
        train.train_step(ae, opt, train.vq_loss(ae, images)[0])
    loss, recon, indices, parts = train.vq_loss(ae, images)
    assert loss.item() < 0.7 * before, (before, loss.item())
    assert recon.shape == images.shape and indices.shape == (4, 16, 16)
    assert not torch.equal(ae.quantize.embedding.weight, codebook)  # the codebook term moves the codes
    assert parts["codebook"] == pytest.approx(parts["commit"])  # the same distance, two stop-gradients


def test_dead_codes_restart_on_encoder_outputs_and_perplexity_counts_used_codes():
    ae = VQModel(train.AUTOENCODER_VQ)
    z_e = torch.randn(2, 3, 16, 16)
    counts = torch.zeros(train.AUTOENCODER_VQ.n_embed, dtype=torch.long)
    counts[:10] = 5
    kept = ae.quantize.embedding.weight[:10].detach().clone()
    assert train.restart_dead_codes(ae, z_e, counts, torch.Generator().manual_seed(0)) == 502
    assert torch.equal(ae.quantize.embedding.weight[:10], kept)  # used codes stay
    pool = z_e.permute(0, 2, 3, 1).reshape(-1, 3)
    restarted = ae.quantize.embedding.weight[10:]
    assert ((restarted[:, None] - pool[None]).abs().sum(-1).min(dim=1).values == 0).all()  # encoder outputs
    assert train.perplexity(counts) == pytest.approx(10.0)  # 10 codes used equally
    assert train.perplexity(torch.tensor([1, 0, 0, 0])) == pytest.approx(1.0)


@pytest.mark.parametrize("task", ["unconditional", "superres", "inpaint", "layout", "semantic"])
def test_task_steps_reduce_loss(task):
    torch.manual_seed(0)
    ae = VQModel(train.AUTOENCODER_VQ).eval().requires_grad_(False)
    m = train.build_task_model(task, ae, scale_factor=1.0)
    assert m.kind == task and (m.text_encoder is None) == (task != "layout")
    images, _, scenes = shapes.sample_batch(4, 0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)  # (the autoencoder has no gradients)

    def loss(g):
        return train.task_loss(m, images, scenes, g)

    before = fixed_loss(loss).item()
    for _ in range(15):
        train.train_step(m, opt, fixed_loss(loss))
    after = fixed_loss(loss).item()
    assert after < 0.7 * before, (before, after)


def test_degrade_blurs_downsamples_and_noises_deterministically():
    images, _, _ = shapes.sample_batch(3, 0)
    low = shapes.degrade(images, torch.Generator().manual_seed(1))
    assert low.shape == (3, 3, 16, 16) and low.min() >= -1 and low.max() <= 1
    assert torch.equal(low, shapes.degrade(images, torch.Generator().manual_seed(1)))
    clean = shapes.degrade(images, torch.Generator().manual_seed(1), max_noise=0.0)
    flat = -torch.ones(1, 3, 64, 64) * 0.5  # a flat image stays flat (the blur sums to one)
    assert torch.allclose(shapes.degrade(flat, torch.Generator(), max_noise=0.0), flat[..., :16, :16])
    assert 0 < (low - clean).abs().max() <= 0.25  # noise of std <= 0.05
    # the mean of each 4x4 patch of the blurred image: close to the plain patch mean of the image
    assert (clean - torch.nn.functional.avg_pool2d(images, 4)).abs().mean() < 0.1


def test_task_runs_resume_exactly_and_export_a_model_of_their_kind(tmp_path):
    """A VQ stage 1, then an unconditional and a superres stage 2 on it (--autoencoder): cut off and resumed
    = uninterrupted; export writes a file that ldm_mini.load reads as that kind, with its recommended
    steps."""
    import ldm_mini

    vq = tmp_path / "vq"
    run_stage(vq, "autoencoder", "--kind", "vq", "--restart-every", "2")
    train.main(["export-autoencoder", str(vq), str(tmp_path / "vq.safetensors")])
    ae = ldm_mini.load_autoencoder(tmp_path / "vq.safetensors")
    assert isinstance(ae, VQModel) and ae.config == train.AUTOENCODER_VQ
    assert all(torch.equal(v, train.load_autoencoder(vq).state_dict()[k]) for k, v in ae.state_dict().items())
    for task in ("unconditional", "superres", "inpaint", "layout", "semantic"):
        straight, cut = tmp_path / f"{task}-straight", tmp_path / f"{task}-cut"
        extra = ["--task", task, "--autoencoder", str(vq)]
        full = run_stage(straight, "diffusion", *extra)
        run_stage(cut, "diffusion", *extra, "--stop-at", "2")
        assert_same_state(run_stage(cut, "diffusion", *extra, "--resume"), full)
        train.main(["export", str(cut), str(tmp_path / f"{task}.safetensors")])
        m = ldm_mini.load(tmp_path / f"{task}.safetensors")
        assert m.kind == task and m.recommended == train.RECOMMENDED_OF[task]
        assert isinstance(m.autoencoder, VQModel)
    with pytest.raises(ValueError, match="another task"):
        run_stage(tmp_path / "superres-cut", "diffusion", "--task", "unconditional", "--autoencoder", str(vq),
                  "--resume")  # fmt: skip


def test_random_masks_are_rectangles_and_strokes_of_bounded_area():
    masks = shapes.random_masks(64, torch.Generator().manual_seed(0))
    assert masks.shape == (64, 1, 64, 64) and set(masks.unique().tolist()) <= {0.0, 1.0}
    area = masks.mean(dim=(1, 2, 3))
    assert (area >= 0.05).all() and (area <= 0.6).all()
    rows, cols = masks.amax(dim=3), masks.amax(dim=2)  # (64, 1, 64): the rows / columns a mask touches
    boxes = (rows.sum(-1) * cols.sum(-1)).flatten()  # the area of each mask's bounding box, pixels
    rectangles = (masks.sum(dim=(1, 2, 3)) == boxes).float().mean()
    assert 0.3 < rectangles < 0.7  # about half fill their bounding box exactly: the rectangles
    assert torch.equal(masks, shapes.random_masks(64, torch.Generator().manual_seed(0)))


def test_scene_layouts_are_the_shapes_boxes_and_labels():
    _, _, scenes = shapes.sample_batch(50, np.random.default_rng(3))
    for scene in scenes:
        objects = shapes.layout(scene)
        assert len(objects) == len(scene.shapes)
        for (label, (x0, y0, w, h)), d in zip(objects, scene.shapes, strict=True):
            assert shapes.LAYOUT_CLASSES[label] == (d.colour, d.shape)
            assert w == h == shapes.SIZES[d.size] / 64
            assert abs(x0 + w / 2 - d.x / 64) < 1e-9 or x0 in (0.0, 1.0 - w)  # centred, or pushed inside
            assert abs(y0 + h / 2 - d.y / 64) < 1e-9 or y0 in (0.0, 1.0 - h)
    tokens = train.LayoutTokenizer(train.LAYOUT)([shapes.layout(s) for s in scenes])
    assert tokens.shape == (50, 11) and int(tokens.max()) < train.LAYOUT.n_tokens


def test_segmentations_label_each_shape_where_it_covers_half_a_pixel():
    images, _, scenes = shapes.sample_batch(30, np.random.default_rng(4))
    for image, scene in zip(images, scenes, strict=True):
        labels = shapes.segmentation(scene)
        assert labels.shape == (64, 64) and labels.dtype == torch.int64
        assert sorted(labels.unique().tolist()[1:]) == sorted(
            1 + shapes.LAYOUT_CLASSES.index((d.colour, d.shape)) for d in scene.shapes
        )
        for d in scene.shapes:  # the labelled pixels have the shape's colour (up to anti-aliasing)
            inside = labels == 1 + shapes.LAYOUT_CLASSES.index((d.colour, d.shape))
            colour = torch.tensor(shapes.PALETTE[d.colour], dtype=torch.float32) / 127.5 - 1
            assert (image[:, inside].T - colour).abs().mean() < 0.1
    m = train.build_task_model("semantic", VQModel(train.AUTOENCODER_VQ), 1.0)
    assert m.encode_segmentation(torch.stack([shapes.segmentation(s) for s in scenes[:2]])).shape == (
        2,
        3,
        16,
        16,
    )


def test_init_starts_a_task_unet_from_another_tasks_model(tmp_path):
    """--init shapes-uncond on --autoencoder shapes-vq (both embedded): the inpainting UNet's extra input
    channels start at zero, so before any step it predicts the unconditional model's noise whatever the
    condition; a model on another latent space is refused."""
    import ldm_mini

    uncond, vq = ldm_mini.load("shapes-uncond"), train.load_autoencoder("shapes-vq")
    assert train.fingerprint(vq) == train.fingerprint(uncond.autoencoder)
    m = train.build_task_model("inpaint", vq, 1.0)
    train.init_from(m, "shapes-uncond")
    assert m.scale_factor == uncond.scale_factor
    gen = torch.Generator().manual_seed(0)
    z, cond, t = torch.randn(2, 3, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen), 500
    with torch.no_grad():
        # equal up to the conv's summation order over 7 input channels instead of 3 (zeros add nothing)
        torch.testing.assert_close(m.predict_noise(z, t, cond), uncond.predict_noise(z, t), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="its autoencoder is not --autoencoder's"):
        train.init_from(m, "shapes")  # the text model: KL-f4, another latent space
    state = run_stage(tmp_path / "run", "diffusion", "--task", "inpaint", "--autoencoder", "shapes-vq",
                      "--init", "shapes-uncond", "--steps", "2")  # fmt: skip
    assert state["scale_factor"] == uncond.scale_factor and state["autoencoder"] == train.fingerprint(vq)
    first = state["model"]["unet.conv_in.weight"]  # (C0, 3 + 3 + 1, 3, 3) after 2 small steps
    assert (first[:, :3] - uncond.unet.conv_in.weight).abs().max() < 0.05 and first[:, 3:].abs().max() < 0.05
