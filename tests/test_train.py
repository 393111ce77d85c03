"""ldm_mini/train.py: a few steps of each stage reduce the loss, and a cut-off run resumes exactly.

Tiny batches of the real (small) shapes-model configs, on the CPU: the whole file runs in ~15 s."""

import numpy as np
import pytest
import torch

from ldm_mini import shapes, train
from ldm_mini.autoencoder import AutoencoderKL


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
