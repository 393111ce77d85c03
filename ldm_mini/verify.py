"""`ldm-mini verify FILE`: ldm_mini against diffusers on the same weights, stage by stage.

Both implementations get the same weights, the same inputs and the same seed; each stage's outputs are
compared and the largest absolute difference is checked against a stated tolerance:

    tokenizer     prompts -> token ids (B, 77)                    must be equal (integers)
    text encoder  ids -> LDMBert context (B, 77, D)               1e-4
    unet step     eps_theta(z_t, t, y) at two timesteps           1e-4
    decoder       D(z / scale_factor), in [-1, 1]                 1e-4
    sample        the whole pipeline, a few DDIM steps, in [0, 1] 1e-3

Why these tolerances (float32). With the plain layers (load(..., fast=False), `--no-fast`) ldm_mini computes
diffusers' operations in diffusers' order and the stages agree bit for bit; the CPU speed layer (fast.py, on
by default on a CPU) and other devices' kernels round differently: on the tiny test models the differences
are 0 to ~3e-6 (tests/test_cli.py); in the full-size models (a 32-layer
LDMBert, a 1.4B UNet) the rounding accumulates over many more layers, so 1e-4 leaves a margin on outputs
of order 1..10. A real mistake (a wrong head split, a missing bias, an off-by-one timestep, a wrong scale
factor) moves the outputs by 1e-3 to 1e-1 or more. The sample goes through
several steps, each dividing by sqrt(alpha-bar) and amplifying the step differences, and is compared in
[0, 1] pixel space: 1e-3 is a quarter of one 8-bit level (1/255), so the saved PNGs agree.

Where the diffusers side comes from:
  - by default it is BUILT from the file: ldm_mini's configs mapped back to diffusers constructor
    arguments (the inverse of weights_tools.diffusers_format) and the file's tensors loaded with
    strict=True (ldm_mini's key names mapped back to diffusers' by loading.to_diffusers_names). This
    checks the implementation.
  - with `reference=` a diffusers pipeline folder (or a hub id) it is the ORIGINAL the file was converted
    from, loaded by diffusers itself. This checks the conversion too: a perturbed or mis-converted
    weight in the file makes the stages that use it fail.

diffusers and transformers are imported only inside the functions below (verification is their only use
in ldm_mini); without them, verify says how to install them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from .hub import fetch, load, resolve
from .loading import from_diffusers_names, read_metadata, to_diffusers_names
from .model import LatentDiffusion
from .pipeline import superres, txt2img, unconditional
from .schedule import ddim_timesteps

STAGE_ATOL = 1e-4  # float32 module outputs of order 1..10 (see above)
SAMPLE_ATOL = 1e-3  # images in [0, 1]: a quarter of one 8-bit level
DIFFUSERS_VERSION = "0.42.1"  # the version the parity tests pin
DEFAULT_PROMPT = "a painting of a squirrel eating a burger"  # the ldm-text2im-large-256 model card
PIPELINES = {"txt2img": "LDMTextToImagePipeline", "unconditional": "LDMPipeline",
             "superres": "LDMSuperResolutionPipeline"}  # fmt: skip


@dataclasses.dataclass
class Stage:
    name: str
    shape: tuple[int, ...]
    diff: float  # max abs difference ldm_mini - diffusers (a count of differing ids for the tokenizer)
    atol: float
    scale: float | None  # max |diffusers output|, to read the difference against
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.diff <= self.atol  # NaN fails too


def _diffusers():
    """import diffusers (and check transformers), or say how to get them."""
    try:
        import diffusers
        import transformers  # noqa: F401  (LDMBert's config and the BERT tokenizer are transformers classes)
    except ImportError as e:
        raise RuntimeError(
            f"verify compares ldm_mini with diffusers, which is not installed ({e}): "
            f"pip install 'diffusers=={DIFFUSERS_VERSION}' transformers   (or: pip install -e '.[dev]')"
        ) from e
    return diffusers


# --- ldm_mini configs -> diffusers constructor arguments (inverse of weights_tools.diffusers_format) ---
def unet_kwargs(cfg) -> tuple[str, dict]:
    """UNetConfig -> (diffusers class name, kwargs). The head trap: diffusers' `attention_head_dim` is the
    NUMBER of heads per level in UNet2DConditionModel but the SIZE of a head in UNet2DModel."""
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [2**i in cfg.attention_resolutions for i in range(len(widths))]  # ds = 2^level
    kw = dict(sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
              block_out_channels=tuple(widths), layers_per_block=cfg.num_res_blocks,
              norm_num_groups=cfg.norm_num_groups, flip_sin_to_cos=True, freq_shift=0)  # fmt: skip
    if cfg.context_dim is not None:
        heads = cfg.num_heads if cfg.num_heads is not None else tuple(cfg.heads(w) for w in widths)
        kw.update(
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            attention_head_dim=heads,  # per level; the mid block uses the last
            cross_attention_dim=cfg.context_dim,
            transformer_layers_per_block=cfg.transformer_depth,
        )
        return "UNet2DConditionModel", kw
    if cfg.num_head_channels is not None:
        head_size = cfg.num_head_channels
    elif cfg.num_heads == 1:
        head_size = None  # UNet2DModel: one head as wide as the block
    else:  # a fixed head COUNT: UNet2DModel can only express it when every attention level has one head size
        levels = [w for w, a in zip(widths, attn, strict=True) if a] + [widths[-1]]  # + the mid block
        sizes = {w // cfg.num_heads for w in levels}
        if len(sizes) != 1:
            raise ValueError(
                f"UNetConfig(num_heads={cfg.num_heads}) gives heads of {sorted(sizes)} channels at different "
                "levels, which diffusers' UNet2DModel (one attention_head_dim) cannot express"
            )
        head_size = sizes.pop()
    kw.update(
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=head_size,
    )
    return "UNet2DModel", kw


def autoencoder_kwargs(cfg, scale_factor: float) -> tuple[str, dict]:
    """AutoencoderConfig -> ("AutoencoderKL" | "VQModel", kwargs)."""
    n = len(cfg.ch_mult)
    kw = dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
              down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
              block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
              latent_channels=cfg.z_channels, norm_num_groups=cfg.norm_num_groups,
              scaling_factor=scale_factor)  # fmt: skip
    if cfg.kind == "vq":
        return "VQModel", dict(kw, num_vq_embeddings=cfg.n_embed, vq_embed_dim=cfg.embed_dim)
    if cfg.z_channels != cfg.embed_dim:
        raise ValueError(f"diffusers' AutoencoderKL needs z_channels == embed_dim, got {cfg.z_channels} != "
                         f"{cfg.embed_dim}")  # fmt: skip
    return "AutoencoderKL", kw


def bert_kwargs(cfg) -> dict:
    """LDMBertConfig (ldm_mini) -> diffusers' LDMBertConfig arguments."""
    return dict(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, d_model=cfg.n_embed,
                encoder_layers=cfg.n_layer, encoder_attention_heads=cfg.n_heads, head_dim=cfg.head_dim,
                encoder_ffn_dim=cfg.ffn_dim)  # fmt: skip


def scheduler_kwargs(s) -> dict:
    """ScheduleConfig -> DDIMScheduler arguments (the training betas and the source's DDIM convention)."""
    return dict(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                beta_schedule={"cosine": "squaredcos_cap_v2"}.get(s.beta_schedule, s.beta_schedule),
                steps_offset=s.steps_offset, set_alpha_to_one=s.set_alpha_to_one,
                timestep_spacing=s.timestep_spacing, clip_sample=s.clip_sample)  # fmt: skip


def _load_into(module_fn, state: dict, what: str):
    """Build a diffusers module on the meta device (no random init), then assign the tensors, strictly."""
    with torch.device("meta"):
        module = module_fn()
    module.load_state_dict(state, strict=True, assign=True)
    if left := [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]:
        raise RuntimeError(f"diffusers {what}: {left[:3]} were not in the file")
    return module.eval()


def reference_from_file(path: str | Path, m: LatentDiffusion):
    """The diffusers pipeline of the same kind, built from ldm_mini's configs and the file's tensors."""
    d = _diffusers()
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    tensors = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    if read_metadata(path).get("format") == "ldm_mini/1":  # already diffusers' names: as load_file reads it
        tensors = from_diffusers_names(tensors)

    def part(prefix):  # one component, in diffusers' key names
        state = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
        return to_diffusers_names(state)

    unet_class, unet_kw = unet_kwargs(m.unet.config)
    vae_class, vae_kw = autoencoder_kwargs(m.autoencoder.config, m.scale_factor)
    unet = _load_into(lambda: getattr(d, unet_class)(**unet_kw), part("unet"), unet_class)
    vae = _load_into(lambda: getattr(d, vae_class)(**vae_kw), part("autoencoder"), vae_class)
    scheduler = d.DDIMScheduler(**scheduler_kwargs(m.schedule))
    if m.kind == "unconditional":
        return d.LDMPipeline(vqvae=vae, unet=unet, scheduler=scheduler)
    if m.kind == "superres":
        return d.LDMSuperResolutionPipeline(vqvae=vae, unet=unet, scheduler=scheduler)
    tc = m.text_encoder.config
    state = {f"model.{k}": v for k, v in part("text_encoder").items()}  # LDMBertModel wraps the encoder
    # ... and adds an LM head, to_logits, which the pipeline never calls and the file does not hold: zeros
    state.update(
        {
            "to_logits.weight": torch.zeros(tc.vocab_size, tc.n_embed),
            "to_logits.bias": torch.zeros(tc.vocab_size),
        }
    )
    bert = _load_into(lambda: LDMBertModel(LDMBertConfig(**bert_kwargs(tc))), state, "LDMBertModel")
    tokenizer = None
    if m.tokenizer is not None:
        from transformers import BertTokenizer

        with tempfile.TemporaryDirectory() as tmp:  # the slow BertTokenizer reads its vocab from a file
            vocab = Path(tmp) / "vocab.txt"
            vocab.write_text(m.tokenizer.vocab_text, encoding="utf-8")
            tokenizer = BertTokenizer(str(vocab))
    return d.LDMTextToImagePipeline(vqvae=vae, bert=bert.eval(), tokenizer=tokenizer, unet=unet,
                                    scheduler=scheduler)  # fmt: skip


def reference_from_source(source: str | Path, m: LatentDiffusion, notes: list[str]):
    """The original diffusers pipeline: a folder, or a hub id fetched into huggingface_hub's cache."""
    d = _diffusers()
    folder = Path(source)
    if not folder.is_dir():
        folder = fetch(str(source))
    pipe = d.DiffusionPipeline.from_pretrained(folder)  # float32, as saved
    if type(pipe).__name__ != PIPELINES[m.kind]:
        raise ValueError(f"the reference {source} is a {type(pipe).__name__}, but the file holds a model of "
                         f"kind {m.kind!r} ({PIPELINES[m.kind]})")  # fmt: skip
    # The same sampler on both sides: DDIM with the reference's settings (its scheduler may be another class)
    pipe.scheduler = d.DDIMScheduler.from_config(pipe.scheduler.config)
    sf = pipe.vqvae.config.get("scaling_factor")
    if m.kind == "unconditional" and sf != m.scale_factor:
        notes.append(f"LDMPipeline divides the latent by the VQ config's scaling_factor {sf} (diffusers "
                     f"issue 6725); the reference runs with the file's {m.scale_factor}, as the model was "
                     "trained")  # fmt: skip
        pipe.vqvae.register_to_config(scaling_factor=m.scale_factor)
    return pipe


# --- the stages -----------------------------------------------------------------------------------------
def _stage(name, ours, ref, atol, note="") -> Stage:
    ours, ref = torch.as_tensor(ours).float().cpu(), torch.as_tensor(ref).float().cpu()
    if ours.shape != ref.shape:
        return Stage(
            name, tuple(ref.shape), float("inf"), atol, None, f"shape {tuple(ours.shape)} vs diffusers"
        )
    return Stage(name, tuple(ref.shape), (ours - ref).abs().max().item(), atol, ref.abs().max().item(), note)


@contextlib.contextmanager
def quiet_libraries():
    """diffusers/transformers: errors only, no loading bars, for the duration (their settings restored)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


@contextlib.contextmanager
def strict_float32():
    """TF32 off for the duration (CUDA): cuDNN convolutions default to it, ~1e-3 errors; restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def compare(m: LatentDiffusion, pipe, steps=5, seed=0, size=None, prompt=DEFAULT_PROMPT, guidance=3.0):
    """Run both sides stage by stage on the same inputs; returns a list of Stage.

    size: the image side in pixels (txt2img, unconditional; a multiple of the autoencoder factor), or the
    low-resolution input's side (superres; the latent has its size). Default: the size the model was trained
    at (UNetConfig.image_size latents).
    """
    pipe.set_progress_bar_config(disable=True)
    dev, f, c = m.device, m.downsample_factor, m.latent_channels
    size = size or m.unet.config.image_size * (1 if m.kind == "superres" else f)
    if m.kind != "superres" and size % f:
        raise ValueError(f"size must be a multiple of the autoencoder factor {f}, got {size}")
    h = size if m.kind == "superres" else size // f  # latent side

    def gen():
        return torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen()).to(dev)

    stages, cond = [], None
    if m.kind == "txt2img":
        prompts = [prompt, ""]  # the conditional prompt and guidance's unconditional one
        ids = None
        if m.tokenizer is not None and pipe.tokenizer is not None:
            ids = m.tokenize(prompts)
            ref = pipe.tokenizer(prompts, padding="max_length", max_length=ids.shape[1], truncation=True,
                                 return_tensors="pt").input_ids  # fmt: skip
            n = (ids.cpu() != ref).sum().item() if ids.shape == ref.shape else float("inf")
            stages.append(Stage("tokenizer", tuple(ref.shape), n, 0, None, "ids that differ"))
        if ids is None:  # no tokenizer: arbitrary ids
            n = m.text_encoder.config.max_seq_len
            ids = torch.randint(m.text_encoder.config.vocab_size, (2, n), generator=gen()).to(dev)
        cond = m.encode_text(ids)  # (2, 77, D)
        stages.append(_stage("text encoder", cond, pipe.bert(ids)[0], STAGE_ATOL))
    elif m.kind == "superres":
        cond = (torch.rand((2, 3, h, h), generator=gen()) * 2 - 1).to(dev)  # a low-res image in [-1, 1]

    x = randn(2, c, h, h)
    T = m.alphas_cumprod.shape[0]
    ts = ddim_timesteps(steps, T, m.schedule.steps_offset, m.schedule.timestep_spacing)
    t = torch.tensor([ts[0], ts[len(ts) // 2]], device=dev)
    ours = m.predict_noise(x, t, cond)
    if m.kind == "txt2img":
        ref = pipe.unet(x, t, encoder_hidden_states=cond).sample
    else:
        ref = pipe.unet(x if cond is None else torch.cat([x, cond], dim=1), t).sample
    stages.append(_stage("unet step", ours, ref, STAGE_ATOL, f"t = {t.tolist()}"))

    z = randn(1, c, h, h)
    ours = m.decode(z)
    ref = pipe.vqvae.decode(z / m.scale_factor).sample  # VQ: decode() quantises first, as ours
    stages.append(_stage("decoder", ours, ref, STAGE_ATOL, "[-1, 1]"))

    common = dict(num_inference_steps=steps, eta=0.0, output_type="np")
    ddim = dict(sampler="ddim", progress=False)  # ours: DDIM as the reference, whatever the file recommends
    if m.kind == "txt2img" and m.tokenizer is None:
        stages.append(Stage("sample", (), 0.0, SAMPLE_ATOL, None, "skipped: the model has no tokenizer"))
        return stages
    if m.kind == "txt2img":
        x_T = randn(1, c, h, h)
        ours = txt2img(m, prompt, guidance_scale=guidance, height=size, width=size, latents=x_T,
                       **ddim, **common)  # fmt: skip
        # diffusers hard-codes latent = height // 8: pass the latents and the height that passes its check
        ref = pipe(prompt, guidance_scale=guidance, height=8 * h, width=8 * h, latents=x_T, **common).images
        note = f"{steps} DDIM steps, guidance {guidance}, [0, 1]"
    elif m.kind == "unconditional":
        ours = unconditional(m, 1, height=size, width=size, generator=gen(), **ddim, **common)
        pipe.unet.register_to_config(sample_size=h)  # LDMPipeline draws (1, c, sample_size, sample_size)
        ref = pipe(batch_size=1, generator=gen(), **common).images
        note = f"{steps} DDIM steps, [0, 1]"
    else:
        low = cond[:1]
        ours = superres(m, low, generator=gen(), **ddim, **common)
        ref = pipe(image=low, generator=gen(), **common).images
        note = f"{steps} DDIM steps, [0, 1]"
    stages.append(_stage("sample", ours, ref, SAMPLE_ATOL, note))
    return stages


def format_table(stages: list[Stage]) -> str:
    lines = [
        f"{'stage':14} {'output shape':18} {'max abs diff':>12} {'tolerance':>9} {'max |ref|':>9}  result"
    ]
    for s in stages:
        shape = "x".join(map(str, s.shape)) or "-"
        diff = f"{s.diff:.0f}" if s.atol == 0 else f"{s.diff:.2e}"
        scale = "-" if s.scale is None else f"{s.scale:.3g}"
        result = "pass" if s.passed else "FAIL"
        atol = f"{s.atol:.0e}" if s.atol else "0"
        lines.append(f"{s.name:14} {shape:18} {diff:>12} {atol:>9} {scale:>9}  {result}  {s.note}")
    return "\n".join(lines)


def verify(weights, reference=None, device="cpu", steps=5, seed=0, size=None, prompt=DEFAULT_PROMPT,
           guidance=3.0, log=print) -> list[Stage]:  # fmt: skip
    """Load `weights` (a path or an embedded name) in float32, build or load the diffusers side, compare,
    print the table with `log`; returns the stages (all passed: s.passed)."""
    d = _diffusers()
    path = resolve(weights)
    m = load(path, device=device, dtype=torch.float32)
    notes: list[str] = []
    with quiet_libraries():
        pipe = (
            reference_from_file(path, m) if reference is None else reference_from_source(reference, m, notes)
        )
        pipe.to(device)
        with strict_float32():
            stages = compare(m, pipe, steps=steps, seed=seed, size=size, prompt=prompt, guidance=guidance)
    side = "built from the same file" if reference is None else f"loaded from {reference}"
    log(f"ldm_mini vs diffusers {d.__version__} ({side}): {path.name}, {m.kind}, {device}, float32, "
        f"seed {seed}")  # fmt: skip
    log(format_table(stages))
    for note in notes:
        log(f"note: {note}")
    failed = [s.name for s in stages if not s.passed]
    log(f"verify: {'FAIL (' + ', '.join(failed) + ')' if failed else 'all stages pass'}")
    return stages
