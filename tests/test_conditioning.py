"""The conditioning encoders of the class, semantic and layout models, and the one conditioning mechanism of
LatentDiffusion (model.CONDITIONING), against what the ORIGINAL CompVis code computed with the tiny random
models of tests/compvis_refs (README there).

Measured max |diff| (CPU, float32): cin256-v2 class context 0.0 (a table lookup), semantic_synthesis256
rescaled map <= 1e-6 (see the assert), layout tokens equal, layout context (LDMBert with the checkpoint's
cond_stage_model.transformer.* weights) <= 1e-6.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_AE as AE
from helpers import TINY_SCHEDULE as SCHEDULE
from helpers import tiny_model as tiny
from safetensors import safe_open
from safetensors.torch import load_file

from ldm_mini.autoencoder import build_autoencoder
from ldm_mini.bert import LDMBert, LDMBertConfig
from ldm_mini.conditioning import (
    ClassEmbedder,
    ClassEmbedderConfig,
    LayoutConfig,
    LayoutTokenizer,
    SpatialRescaler,
    SpatialRescalerConfig,
)
from ldm_mini.loading import load_file as load_model
from ldm_mini.loading import save
from ldm_mini.model import KINDS, LatentDiffusion
from weights_tools.compvis import bert_modules, translate

REFS = Path(__file__).parent / "compvis_refs"


def fixture(name: str):
    ckpt = torch.load(REFS / name / "model.ckpt", weights_only=True)["state_dict"]
    refs = load_file(REFS / name / "reference.safetensors")
    with safe_open(REFS / name / "reference.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["ldm_refs"])
    return ckpt, refs, meta


@pytest.mark.parametrize("name, uc", [("cin256-v2", 1000), ("cin256", None)])
def test_class_embedder_matches_compvis(name, uc):
    ckpt, refs, _ = fixture(name)
    weight = ckpt["cond_stage_model.embedding.weight"]
    cfg = ClassEmbedderConfig(n_classes=weight.shape[0], embed_dim=weight.shape[1], unconditional_class=uc)
    embedder = ClassEmbedder(cfg)
    embedder.load_state_dict({"embedding.weight": weight})
    pairs = [("class_labels", "context")]
    if uc is not None:
        pairs += [("edge_labels", "edge_context"), ("uc_labels", "uc_context")]
    for labels, context in pairs:
        if f"cond.{labels}" in refs:
            got = embedder(refs[f"cond.{labels}"])
            assert got.shape == refs[f"cond.{context}"].shape
            torch.testing.assert_close(got, refs[f"cond.{context}"], atol=0, rtol=0)


def test_spatial_rescaler_matches_compvis():
    ckpt, refs, _ = fixture("semantic_synthesis256")
    rescaler = SpatialRescaler(SpatialRescalerConfig())
    rescaler.load_state_dict({"channel_mapper.weight": ckpt["cond_stage_model.channel_mapper.weight"]})
    one_hot = torch.nn.functional.one_hot(refs["cond.segmentation_labels"], 182).permute(0, 3, 1, 2).float()
    got = rescaler(one_hot)
    assert got.shape == (2, 3, 8, 8)
    assert (got - refs["cond.c"]).abs().max() <= 1e-6


def test_layout_tokens_and_context_match_compvis():
    ckpt, refs, meta = fixture("layout2img-openimages256")
    layouts = [
        [(o["category_no"], tuple(o["bbox_x0_y0_w_h"]), o["is_group_of"]) for o in layout]
        for layout in meta["layouts"]
    ]
    # The original builder shuffled the objects (random.seed(0)); the reference's order is 5, 600, 17.
    layouts[0] = [layouts[0][0], layouts[0][2], layouts[0][1]]
    tokens = LayoutTokenizer(LayoutConfig())(layouts)
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 92)
    assert torch.equal(tokens, refs["cond.tokens"])

    prefix = "cond_stage_model."
    state = {k: v for k, v in ckpt.items() if k.startswith(prefix)}
    cfg = LDMBertConfig(vocab_size=8192, max_seq_len=92, n_embed=16, n_layer=2, ffn_dim=64)
    bert = LDMBert(cfg)
    bert.load_state_dict(translate(state, bert_modules(cfg), prefix, "", {}))
    got = bert(tokens)
    assert (got - refs["cond.context"]).abs().max() <= 1e-5


def test_layout_tokenizer_rejects_bad_layouts():
    tok = LayoutTokenizer(LayoutConfig())
    with pytest.raises(ValueError, match="not inside the image"):
        tok([[(3, (0.5, 0.5, 0.6, 0.2))]])
    with pytest.raises(ValueError, match="class 601"):
        tok([[(601, (0.1, 0.1, 0.2, 0.2))]])
    with pytest.raises(ValueError, match="at most 30 objects"):
        tok([[(1, (0.1, 0.1, 0.2, 0.2))] * 31])
    assert tok([[]])[0, :90].eq(8191).all()  # an empty layout: every slot "none", then the crop


# --- the one mechanism: tiny models of every kind (helpers.tiny_model) ------------------------------------


def cond_of(m: LatentDiffusion, b: int = 2):
    """What each kind's pipeline would feed predict_noise for a (b, 3, 8, 8) latent (32 px images)."""
    g = torch.Generator().manual_seed(1)
    if m.kind == "class":
        return m.encode_class(torch.tensor([3, 10][:b]))
    if m.kind == "layout":
        return m.encode_layout(m.layout_tokens([[(1, (0.1, 0.2, 0.3, 0.4))], []][:b]))
    if m.kind == "txt2img":
        return m.encode_text(torch.randint(0, 8192, (b, 92), generator=g))
    if m.kind == "semantic":
        return m.encode_segmentation(torch.randint(0, 5, (b, 32, 32), generator=g))
    if m.kind == "inpaint":
        image = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
        mask = torch.zeros(b, 1, 32, 32)
        mask[..., 8:24, 8:24] = 1
        return m.inpaint_condition(image, mask)
    if m.kind == "superres":
        return torch.rand(b, 3, 8, 8, generator=g) * 2 - 1
    return None


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_predicts_noise_and_round_trips_through_a_file(kind, tmp_path):
    m = tiny(kind)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cond = cond_of(m)
        eps = m.predict_noise(x, torch.tensor([10, 900]), cond)
        assert eps.shape == x.shape and torch.isfinite(eps).all()
        if m.conditioning == "concat":  # the same as calling the UNet on the concatenation
            assert torch.equal(eps, m.unet(torch.cat([x, cond], 1), torch.tensor([10, 900])))
        back = load_model(save(m, tmp_path / "m.safetensors"), fast=False)
        assert back.kind == kind and back.conditioning == m.conditioning
        assert torch.equal(back.predict_noise(x, torch.tensor([10, 900]), cond_of(back)), eps)
    if m.conditioning is None:
        with pytest.raises(ValueError, match="takes no cond"):
            m.predict_noise(x, 10, torch.zeros(2, 3, 8, 8))
    else:
        with pytest.raises(ValueError, match="needs cond"):
            m.predict_noise(x, 10)


def test_segmentation_one_hot_and_label_map_agree_and_bad_maps_are_refused():
    m = tiny("semantic")
    labels = torch.randint(0, 5, (1, 32, 32), generator=torch.Generator().manual_seed(3))
    one_hot = torch.nn.functional.one_hot(labels, 5).permute(0, 3, 1, 2).float()
    assert torch.equal(m.encode_segmentation(labels), m.encode_segmentation(one_hot))
    with pytest.raises(ValueError, match="5 classes"):
        m.encode_segmentation(torch.full((1, 32, 32), 5))
    with pytest.raises(ValueError, match=r"one-hot \(B, 5, H, W\)"):
        m.encode_segmentation(torch.zeros(1, 6, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        m.encode_segmentation(torch.zeros(1, 30, 32, dtype=torch.int64))


def test_class_labels_out_of_range_are_refused():
    m = tiny("class")
    with pytest.raises(ValueError, match="class label 11 is out of range"):
        m.encode_class(torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="integer tensor"):
        m.encode_class(torch.tensor([0.5]))


def test_inpaint_condition_is_the_masked_latent_and_the_mask():
    m = tiny("inpaint")
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1  # fill the right half
    c = m.inpaint_condition(image, mask)
    masked = torch.where(mask.bool(), -1.0, image)  # the pixels to fill become -1 (black)
    torch.testing.assert_close(c[:, :3], m.autoencoder.encode(masked), atol=1e-6, rtol=0)
    assert torch.equal(c[:, 3:], torch.nn.functional.interpolate(mask * 2 - 1, size=(8, 8)))
    with pytest.raises(ValueError, match="binary"):
        m.inpaint_condition(image, mask * 0.5)
    with pytest.raises(ValueError, match="to match the image"):
        m.inpaint_condition(image, mask[..., :16])


def test_an_encoder_of_another_kind_is_refused():
    with pytest.raises(ValueError, match="'class' model needs class_embedder"):
        LatentDiffusion("class", tiny("unconditional").unet, build_autoencoder(AE), SCHEDULE, 1.0)
    with pytest.raises(ValueError, match="encode_class\\(\\) needs a class-conditional model"):
        tiny("semantic").encode_class(torch.tensor([1]))
