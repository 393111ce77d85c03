"""The CompVis model zoo against the ORIGINAL code (tests/compvis_refs, README there): each tiny random model
in the released checkpoint layout converts with weights_tools (as a user converts a real one), and ldm_mini's
conditioning and eps_theta match what CompVis/latent-diffusion computed with it; each RELEASED yaml builds
exactly the keys and shapes of the released checkpoint's state_dict (full_size_keys.json.gz, from the original
code on the meta device).

Measured max |diff| (CPU, float32; cin256 and inpainting_big with 1 thread as the suite runs, the others with
2; eps at t = 0 / 1 / 500 / 999 / mixed, raw = --no-ema at 500):
    cin256-v2                 context 0 (a table lookup, also the "no class" 1000); eps 7.7e-7 / 7.2e-7 /
                              1.6e-6 / 3.9e-6 / 4.6e-6, unconditional branch 1.5e-6
    semantic_synthesis256     rescaled map 3.7e-9; eps 4.8e-7 / 4.8e-7 / 1.7e-6 / 4.1e-6 / 3.4e-6, raw 1.5e-6
    layout2img-openimages256  tokens equal; context 1.1e-6; eps 1.2e-6 / 1.1e-6 / 2.1e-6 / 2.7e-6 / 2.5e-6,
                              raw 1.8e-6
    lsun_churches256          scale_factor buffer 1.662177 read; eps 1.3e-6 / 1.1e-6 / 3.1e-6 / 6.0e-6,
                              raw 2.1e-6
    cin256                    context 0; eps 9.5e-7 / 7.2e-7 / 7.2e-7 / 1.1e-6 / 8.9e-7, raw 7.6e-7; VQ-f8
                              with in-level attention: z 1.1e-6, decoded 3.3e-6, unquantised 2.1e-6
    inpainting_big            eps 8.3e-7 / 6.0e-7 / 7.2e-7 / 2.0e-6 / 8.3e-7, raw 1.1e-6; VQ-f4 without
                              attention: z 1.2e-6, decoded 8.3e-7; inpaint.py: mask binarisation equal, masked
                              latent 3.8e-6 (|c| <= 4.0; 2.3e-5 with two threads: the conv's reduction order),
                              composite 1.8e-7, the script's truncated PNG equal
    celeba256                 eps 6.0e-7 / 6.0e-7 / 6.0e-7 / 7.2e-7 / 7.2e-7 (ffhq256 5.4e-7 / - / - / 7.2e-7,
                              lsun_beds256 7.2e-7 / - / - / 5.4e-7: the same model but for data:)
    text2img-large            tokens equal, context 0; eps 1.2e-6 / 1.3e-6 / 1.3e-6 / 1.3e-6 / 1.2e-6; uc 1e-6
    bsr_sr                    eps 5.7e-7 / 6.6e-7 / 6.6e-7 / 4.8e-7 / 4.8e-7
All within atol 1e-5 (the original itself moves by up to 1e-6 between thread counts; these eps are O(1)).
5-step DDIM samples (|z| 38-78 with random weights), max |diff| / max |z|: cin256-v2 eta 0 3.8e-5 / 59,
guided (3.0) 8.4e-5 / 61, eta 1 5.0e-5 / 66; semantic eta 0 3.3e-5 / 56, eta 1 5.3e-5 / 63; layout eta 0
2.7e-5 / 66, eta 1 4.6e-5 / 78; churches eta 0 5.0e-5 / 38, eta 1 5.0e-5 / 41; cin256 eta 0 2.7e-5 / 51,
eta 1 3.1e-5 / 57; inpainting (scripts/inpaint.py) 2.8e-5 / 95; celeba eta 0 3.8e-5 / 83, eta 1 4.6e-5 / 92;
ffhq eta 1 3.4e-5 / 63; beds eta 1 4.6e-5 / 85; text2img eta 0 1.1e-5 / 18, eta 1 1.3e-5 / 20, guided (5.0)
3.1e-5 / 20; bsr_sr eta 0 3.8e-5 / 45, eta 1 3.1e-5 / 45 (all <= 1.6e-6 relative);
VQ decodes of the original's samples 4.2e-7 (semantic), 6.0e-7 (layout).
"""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from ldm_mini.loading import build_empty, write_file
from ldm_mini.loading import load_file as load_model
from weights_tools import compvis

REFS = Path(__file__).parent / "compvis_refs"
RELEASED = Path(__file__).parent / "realconfigs" / "compvis"
# every LDM of the zoo (test_compvis.py also checks celeba256, bsr_sr and text2img-large against diffusers)
CONVERTED = {"cin256-v2": "class", "cin256": "class", "semantic_synthesis256": "semantic",
             "layout2img-openimages256": "layout", "lsun_churches256": "unconditional",
             "inpainting_big": "inpaint", "celeba256": "unconditional", "ffhq256": "unconditional",
             "lsun_beds256": "unconditional", "text2img-large": "txt2img", "bsr_sr": "superres"}  # fmt: skip


def references(name: str):
    refs = load_file(REFS / name / "reference.safetensors")
    with safe_open(REFS / name / "reference.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["ldm_refs"])
    return refs, meta


@pytest.fixture(scope="module", params=sorted(CONVERTED))
def zoo(request, tmp_path_factory):
    """(name, EMA model, raw model): converted through the same path as the command line."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    # the fixture's zip entries are deflated; the converter's reader maps files, so give it a plain copy
    torch.save(torch.load(REFS / name / "model.ckpt", weights_only=True), tmp / "model.ckpt")
    models = []
    for ema in (None, False):
        tensors, meta = compvis.convert_checkpoint(tmp / "model.ckpt", REFS / name / "config.yaml", ema=ema)
        path = write_file(tmp / f"{ema}.safetensors", tensors, meta)
        models.append(load_model(path, fast=False).eval())
    return name, *models


def condition(m, name: str, refs: dict, meta: dict) -> torch.Tensor:
    """The UNet's cond as ldm_mini builds it from the reference's own inputs, checked on the way."""
    if name.startswith("cin256"):
        for labels, context in [("class_labels", "context"), ("edge_labels", "edge_context")]:
            assert torch.equal(m.encode_class(refs[f"cond.{labels}"]), refs[f"cond.{context}"])
        # cin256-v2 learned a "no class" row (1001 classes) for guidance; the older cin256 has none
        assert m.class_embedder.config.unconditional_class == (1000 if name == "cin256-v2" else None)
        return m.encode_class(refs["cond.class_labels"])
    if m.kind == "unconditional":
        return None
    if name == "inpainting_big":  # built from an image the reference did not keep; test_inpaint_* builds one
        return refs["eps.cond"]
    if name == "bsr_sr":  # the low-res image itself (cond_stage torch.nn.Identity)
        return refs["cond.c"]
    if name == "text2img-large":  # the bert-base-uncased tokenizer, then LDMBert
        tokens = m.tokenize(meta["prompts"])
        assert torch.equal(tokens, refs["cond.tokens"])
        context = m.encode_text(tokens)
        assert (context - refs["cond.context"]).abs().max() <= 1e-5
        return context
    if name == "semantic_synthesis256":
        c = m.encode_segmentation(refs["cond.segmentation_labels"])
        assert (c - refs["cond.c"]).abs().max() <= 1e-5
        return c
    layouts = [[(o["category_no"], tuple(o["bbox_x0_y0_w_h"]), o["is_group_of"]) for o in lay]
               for lay in meta["layouts"]]  # fmt: skip
    layouts[0] = [layouts[0][i] for i in (0, 2, 1)]  # the order the original's random.shuffle gave
    tokens = m.layout_tokens(layouts)
    assert torch.equal(tokens, refs["cond.tokens"])
    context = m.encode_layout(tokens)
    assert (context - refs["cond.context"]).abs().max() <= 1e-5
    return context


@torch.no_grad()
def test_conditioning_and_eps_match_the_original(zoo):
    name, m, raw = zoo
    assert m.kind == CONVERTED[name]
    refs, meta = references(name)
    cond = condition(m, name, refs, meta)
    x = refs["eps.x"]
    for t in [t for t in (0, 1, 500, 999) if f"eps.t{t}" in refs]:  # (ffhq256, lsun_beds256: 0 and 999)
        assert (m.predict_noise(x, t, cond) - refs[f"eps.t{t}"]).abs().max() <= 1e-5, t
    if "eps.t_mixed" in refs:
        assert (m.predict_noise(x, refs["eps.t_mixed_t"], cond) - refs["eps.t_mixed"]).abs().max() <= 1e-5
    if "eps.uc_t500" in refs:  # the unconditional branch of guidance: the "no class" label 1000, or ""
        if m.kind == "class":
            uc = m.encode_class(torch.full((2,), m.class_embedder.config.unconditional_class))
        else:
            uc = m.encode_text(m.tokenize(["", ""]))
        assert (uc - refs["cond.uc_context"]).abs().max() <= 1e-5
        assert (m.predict_noise(x, 500, uc) - refs["eps.uc_t500"]).abs().max() <= 1e-5
    if "eps.raw_t500" in refs:  # --no-ema: the raw UNet weights
        assert (raw.predict_noise(x, 500, cond) - refs["eps.raw_t500"]).abs().max() <= 1e-5
        assert (m.predict_noise(x, 500, cond) - refs["eps.raw_t500"]).abs().max() > 1e-2  # EMA differs


@torch.no_grad()
def test_first_stage_matches_the_original(zoo):
    """The LDM's first stage: encode_first_stage (VQ: the latent before quantisation; KL: the mode, times
    the scale factor), decode_first_stage with and without the VQ's quantisation."""
    name, m, _ = zoo
    refs, _ = references(name)
    if "first_stage.image" not in refs:
        pytest.skip("no first-stage references for this model")
    z = m.encode(refs["first_stage.image"], sample=False)
    assert (z - refs["first_stage.z"]).abs().max() <= 1e-5
    assert (m.decode(refs["first_stage.z"]) - refs["first_stage.decoded"]).abs().max() <= 1e-5
    if "first_stage.decoded_noquant" in refs:
        noquant = m.decode(refs["first_stage.z"], quantize=False)
        assert (noquant - refs["first_stage.decoded_noquant"]).abs().max() <= 1e-5


def full_size(name: str):
    """(the original's full-size state_dict on the meta device, model_configs(released yaml), use_ema)."""
    yaml_path = RELEASED / json.loads((REFS / name / "reference.json").read_text())["released_yaml"]
    keys = json.load(gzip.open(REFS / name / "full_size_keys.json.gz"))["keys"]
    dtypes = {"float32": torch.float32, "int32": torch.int32, "int64": torch.int64}
    with torch.device("meta"):
        state = {k: torch.empty(shape, dtype=dtypes[dtype]) for k, shape, dtype in keys}
    return state, *compvis.model_configs(yaml_path)


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_the_released_yaml_builds_the_released_checkpoints_keys(name):
    """At full size on the meta device: the released yaml's model takes exactly the state_dict the original
    code builds from it (keys, shapes), through the converter's own tables and checks."""
    state, configs, use_ema = full_size(name)
    assert configs["kind"] == CONVERTED[name]
    tensors, meta = compvis.convert_state_dict(state, configs, use_ema, ema=None, name=name)  # checks shapes
    want = build_empty(meta).state_dict()
    assert tensors.keys() == want.keys()
    assert all(tuple(tensors[k].shape) == tuple(want[k].shape) for k in want)
    yaml_path = RELEASED / json.loads((REFS / name / "reference.json").read_text())["released_yaml"]
    params = yaml.safe_load(yaml_path.read_text())["model"]["params"]
    assert ("model_ema.decay" in state) == params.get("use_ema", True)


def pipeline_call(m, name: str, refs: dict, meta: dict):
    """The ldm_mini pipeline of a zoo model on the reference's first input, as call(**settings)."""
    import ldm_mini

    kind, size = m.kind, m.downsample_factor * refs["ddim.eta1.x_T"].shape[-1]
    if kind == "class":
        return lambda **kw: ldm_mini.class_conditional(m, [int(refs["cond.class_labels"][0])], height=size,
                                                       width=size, **kw)  # fmt: skip
    if kind == "txt2img":  # scripts/txt2img.py: guidance with the empty prompt
        return lambda **kw: ldm_mini.txt2img(m, meta["prompts"][0], height=size, width=size, **kw)
    if kind == "semantic":
        return lambda **kw: ldm_mini.semantic_synthesis(m, refs["cond.segmentation_labels"][:1], **kw)
    if kind == "layout":
        return lambda **kw: ldm_mini.layout_to_image(m, refs["cond.tokens"][:1], **kw)
    if kind == "superres":
        return lambda **kw: ldm_mini.superres(m, refs["cond.c"][:1], **kw)
    return lambda **kw: ldm_mini.unconditional(m, 1, height=size, width=size, **kw)  # sample_diffusion.py


@torch.no_grad()
def test_pipelines_sample_as_the_original_ddim(zoo):
    """Each zoo model's pipeline from the reference's own input = the original DDIMSampler.sample: 5 steps
    from the recorded x_T at eta 0, at eta 1 with the recorded step noise, and guided (cin256-v2 at 3.0 with
    the "no class" label 1000, as the cin notebook; text2img-large at 5.0 with "", as scripts/txt2img.py).
    Random-weight samples grow large (|z| ~ 40-95: README section 2), so compared relative to their size;
    where the reference decoded the sample, the VQ decode (quantised first) too. inpainting_big: below."""
    name, m, _ = zoo
    if name == "inpainting_big":
        pytest.skip("scripts/inpaint.py's path: test_inpaint_is_scripts_inpaint_py")

    refs, meta = references(name)
    call = pipeline_call(m, name, refs, meta)
    runs = [(run, eta, 1.0) for run, eta in (("eta0", 0.0), ("eta1", 1.0)) if f"ddim.{run}.x_T" in refs]
    if "ddim.cfg_eta0.x_T" in refs:
        runs.append(("cfg_eta0", 0.0, meta["guidance_scale"]))
    for run, eta, scale in runs:
        guided = {"guidance_scale": scale} if m.kind in ("class", "txt2img") else {}
        z = call(num_inference_steps=5, eta=eta, latents=refs[f"ddim.{run}.x_T"], progress=False,
                 noise=refs.get(f"ddim.{run}.noise"), output_type="latent", **guided)  # fmt: skip
        ref = refs[f"ddim.{run}.samples"]
        assert (z - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item()), run
        if f"ddim.{run}.decoded" in refs:
            assert (m.decode(ref) - refs[f"ddim.{run}.decoded"]).abs().max() <= 1e-5


def test_class_models_settings_and_guidance():
    """cin256-v2 converts with the cin notebook's settings (20 DDIM steps, guidance 3.0 with the "no class"
    label); the older cin256 has no such label, so it has no recommended settings and refuses guidance."""
    import ldm_mini

    for name, recommended in [("cin256-v2", {"steps": 20, "guidance": 3.0, "eta": 0.0, "sampler": "ddim"}),
                              ("cin256", {})]:  # fmt: skip
        _, meta = compvis.convert_state_dict(*full_size(name), ema=None, name=name)
        m = build_empty(meta)
        assert m.recommended == recommended
        if not recommended:
            with pytest.raises(ValueError, match="no unconditional label"):
                ldm_mini.class_conditional(m, [1], guidance_scale=3.0, progress=False)


@pytest.mark.parametrize("zoo", ["inpainting_big"], indirect=True)
@torch.no_grad()
def test_inpaint_is_scripts_inpaint_py(zoo):
    """ldm_mini.inpaint on the script's PNGs (inpaint.image_u8, inpaint.mask_u8) = scripts/inpaint.py run by
    the original: the mask's binarisation at 0.5, the condition (the masked image's latent and the -1/+1
    mask), 5 DDIM steps from the recorded x_T, the composite, and (truncated as the script saves it) its
    PNG."""
    _, m, _ = zoo
    import PIL.Image

    import ldm_mini
    from ldm_mini.pipeline import inpaint_inputs

    refs, _ = references("inpainting_big")
    values = np.zeros((4, 8), np.uint8)  # the 6 probed mask values in a 4 x 8 image (multiples of f = 4)
    values[0, :6] = refs["inpaint.threshold_in"].numpy()
    _, binary = inpaint_inputs(m, PIL.Image.new("RGB", (8, 4)), PIL.Image.fromarray(values, mode="L"))
    assert torch.equal(binary[0, 0, 0, :6], refs["inpaint.threshold_out"])  # 127 -> 0, 128 -> 1

    image = PIL.Image.fromarray(refs["inpaint.image_u8"].numpy(), mode="RGB")
    mask = PIL.Image.fromarray(refs["inpaint.mask_u8"].numpy(), mode="L")
    c = m.inpaint_condition(*inpaint_inputs(m, image, mask))
    assert (c[:, :-1] - refs["inpaint.c_masked_latent"]).abs().max() <= 1e-5
    assert torch.equal(c[:, -1:], refs["inpaint.c_mask"])
    settings = dict(num_inference_steps=5, latents=refs["inpaint.x_T"], progress=False)
    z = ldm_mini.inpaint(m, image, mask, output_type="latent", **settings)
    ref = refs["inpaint.samples"]
    assert (z - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    out = ldm_mini.inpaint(m, image, mask, output_type="pt", **settings)  # the composite in [0, 1]
    assert (out - refs["inpaint.inpainted"]).abs().max() <= 1e-5
    script_png = (out[0].permute(1, 2, 0) * 255).floor().to(torch.uint8)  # the script's astype(uint8)
    assert torch.equal(script_png, refs["inpaint.inpainted_u8"])
    # ldm_mini's PNG rounds instead: the kept pixels are the input's (the script's lose one level on ~1/5)
    png = torch.from_numpy(np.array(ldm_mini.inpaint(m, image, mask, **settings)[0]))
    keep = refs["inpaint.mask_u8"] < 128
    assert torch.equal(png[keep], refs["inpaint.image_u8"][keep])
    assert (png.int() - refs["inpaint.inpainted_u8"].int()).abs().max() <= 1


@pytest.mark.parametrize("zoo", ["inpainting_big"], indirect=True)
def test_inpaint_refuses_bad_masks_before_any_compute(zoo):
    _, m, _ = zoo
    import ldm_mini

    image, mask = torch.zeros(1, 3, 64, 64), torch.ones(1, 1, 64, 64)
    for bad, match in [(mask[..., :32], "must be \\(B, 1, H, W\\)"), (mask * 0.5, "must be binary"),
                       (mask[:, 0], "must be \\(B, 1, H, W\\)")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ldm_mini.inpaint(m, image, bad, progress=False)
    with pytest.raises(ValueError, match="multiples of 4"):
        ldm_mini.inpaint(m, image[..., :62], mask[..., :62], progress=False)
    with pytest.raises(ValueError, match="in \\[-1, 1\\]"):
        ldm_mini.inpaint(m, image + 3, mask, progress=False)
    with pytest.raises(ValueError, match="latents must be a tensor of shape \\(1, 3, 16, 16\\)"):
        ldm_mini.inpaint(m, image, mask, latents=torch.zeros(1, 3, 8, 8), progress=False)
