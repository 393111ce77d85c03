"""ldm_mini's weight file: one .safetensors holding a whole LatentDiffusion model (or a first stage alone),
and its loaders.

The file format (written by weights_tools from diffusers folders or CompVis .ckpt files, and by
train.py for the embedded model):

    tensors   "unet.*", "autoencoder.*" and the conditioning encoder's "text_encoder.*", "class_embedder.*" or
              "segmentation_encoder.*": ldm_mini's own key names (= its module names),
              which are the modern diffusers names but for the fragments of DIFFUSERS_RENAMES below
              (weights_tools translates every other layout through tables)
    metadata  (safetensors allows str -> str only, so configs are JSON)
        format               "ldm_mini/2" ("ldm_mini/1" files, from before the renames, hold diffusers'
                             names unchanged: load_file renames their keys through the same table)
        kind                 one of model.KINDS: "txt2img" | "unconditional" | "superres" | "class" |
                             "inpaint" | "semantic" | "layout"
        unet_config          UNetConfig as JSON
        autoencoder_config   AutoencoderConfig as JSON
        text_encoder_config  LDMBertConfig as JSON (txt2img and layout only)
        class_embedder_config, segmentation_encoder_config, layout_config
                             conditioning.py's configs as JSON (class, semantic, layout only)
        schedule             ScheduleConfig as JSON: training betas + the source's DDIM convention
        scale_factor         the latent scale factor, e.g. "0.18215"
        tokenizer_vocab      the WordPiece vocab.txt (txt2img with a tokenizer)
        source               where the weights came from (free text)
        recommended          optional JSON of sampler settings the model is meant to be sampled with,
                             e.g. {"steps": 20, "guidance": 4.0} (the command line's defaults)

A first-stage autoencoder alone (CompVis models/first_stage_models, converted by weights_tools) is a file of
kind "autoencoder" (AUTOENCODER_KIND): its tensors carry the autoencoder's own names ("encoder.*",
"decoder.*", "quant_conv.*", ...: those of AutoencoderKL / VQModel) and its metadata only format, kind,
autoencoder_config and source. load_autoencoder reads it; load_file refuses it, and the other way round.

Loading builds every module on the meta device (no wasted random init), checks that the file has
exactly the keys and shapes the model expects, then assigns the file's tensors (mmap'd by
safetensors) as parameters. With `fast` (the default on a CPU, see ldm_mini/fast.py) it then swaps in the
CPU speed layers: the same parameters, other kernels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import types
import typing
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import fast as fast_layers
from .autoencoder import AutoencoderConfig, AutoencoderKL, VQModel, build_autoencoder
from .bert import LDMBert, LDMBertConfig
from .conditioning import (
    ClassEmbedder,
    ClassEmbedderConfig,
    LayoutConfig,
    LayoutTokenizer,
    SpatialRescaler,
    SpatialRescalerConfig,
)
from .model import LatentDiffusion
from .schedule import ScheduleConfig
from .tokenizer import Tokenizer
from .unet import UNet, UNetConfig

FORMAT = "ldm_mini/2"
MAX_CONFIG_CHARS = 1_000_000  # a config is a few hundred characters
FORMATS = ("ldm_mini/1", FORMAT)  # what load_file reads; it writes FORMAT
WEIGHTS_DIR = Path(__file__).parent / "weights"
EMBEDDED = {  # shipped inside the package, trained by train.py: name -> file
    "shapes": WEIGHTS_DIR / "shapes.safetensors",  # text-to-image, KL-f4
    "shapes-vq": WEIGHTS_DIR / "shapes-vq.safetensors",  # the VQ-f4 autoencoder alone (kind "autoencoder")
    "shapes-uncond": WEIGHTS_DIR / "shapes-uncond.safetensors",  # unconditional, on shapes-vq
    "shapes-superres": WEIGHTS_DIR / "shapes-superres.safetensors",  # 4x super-resolution, on shapes-vq
    "shapes-inpaint": WEIGHTS_DIR / "shapes-inpaint.safetensors",  # inpainting, on shapes-vq
    "shapes-semantic": WEIGHTS_DIR / "shapes-semantic.safetensors",  # segmentation map -> image, on shapes-vq
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTOENCODER_KIND = "autoencoder"  # a file holding a first stage alone (not one of model.KINDS)


# --- key names: ldm_mini's = diffusers' but for these fragments -------------------------------------------
# diffusers (as CompVis) keeps a few layers in Sequentials whose other slots hold no weights; ldm_mini names
# the layer. (diffusers fragment, ldm_mini fragment); a fragment is matched once per key, dots included.
DIFFUSERS_RENAMES = [
    (".to_out.0.", ".to_out."),  # attention output Linear (diffusers' to_out.1 is a Dropout)
    (".ff.net.0.proj.", ".ff.proj_in."),  # the GEGLU's joint value + gate Linear
    (".ff.net.2.", ".ff.proj_out."),  # feed-forward output Linear (net.1 is Dropout(0))
]


def rename(state: dict[str, Tensor], table: list[tuple[str, str | None]]) -> dict[str, Tensor]:
    """Apply (old fragment, new fragment) rows to every key, top to bottom; each row replaces at most once
    per key, and a fragment with a leading dot also matches at the start of a key. A row whose new fragment
    is None drops the key. The one key-renaming rule: this table and the converters' (weights_tools)."""
    out = {}
    for key, value in state.items():
        key = "." + key  # so that ".to_out.0." also matches a key that starts with it
        for old, new in table:
            if old in key:
                if new is None:
                    break
                key = key.replace(old, new, 1)
        else:
            out[key[1:]] = value
    return out


def from_diffusers_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict with diffusers' key names (of a UNet, autoencoder or LDMBert) -> ldm_mini's names."""
    return rename(state, DIFFUSERS_RENAMES)


def to_diffusers_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """ldm_mini's key names -> diffusers' (what diffusers' modules load with strict=True)."""
    return rename(state, [(new, old) for old, new in DIFFUSERS_RENAMES])


# --- configs <-> metadata ---------------------------------------------------------------------------
def config_to_json(config) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(cls, text: str, field: str = "config"):
    """JSON -> frozen config dataclass; lists become tuples. Metadata is data from a file: every value's type
    is checked against the dataclass's annotation, so a wrong one is a ValueError naming the field, not a
    TypeError deep inside a module's constructor."""
    if len(text) > MAX_CONFIG_CHARS:
        raise ValueError(f"the file's {field} is {len(text):,} characters long: not an ldm_mini config")
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the file's {field} is not valid JSON ({e})") from e
    if not isinstance(values, dict):
        raise ValueError(f"the file's {field} must be a JSON object, got {type(values).__name__}")
    return config_from_values(cls, values, f"the file's {field}")


def config_from_values(cls, values: dict, where: str):
    """A config dataclass from plain values (JSON, yaml), each checked against its annotation first, so that
    a wrong one is one ValueError naming it (`where`: the file or yaml it came from), never a TypeError deep
    in a constructor. The converters build every config through here too."""
    hints = typing.get_type_hints(cls)
    if unknown := sorted(set(values) - set(hints)):
        raise ValueError(f"{where}: {cls.__name__} has no field(s) {unknown}: written by a newer ldm_mini?")
    for name, value in values.items():
        if not _fits(value, hints[name]):
            want = hints[name].__name__ if isinstance(hints[name], type) else str(hints[name])
            raise ValueError(f"{where}: {cls.__name__}.{name} must be {want}, got {value!r}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except (TypeError, ValueError) as e:  # a missing field, or values that do not fit together
        raise ValueError(f"{where} does not describe a {cls.__name__}: {e}") from None


def _fits(value, hint) -> bool:
    """Whether a JSON value has the annotated type: int, float, bool, str, None, tuple[X, ...], unions."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return isinstance(value, list | tuple) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return isinstance(value, hint)


def make_metadata(
    kind: str,
    unet: UNetConfig,
    autoencoder: AutoencoderConfig,
    schedule: ScheduleConfig,
    scale_factor: float,
    text_encoder: LDMBertConfig | None = None,
    vocab: str | None = None,
    source: str = "",
    recommended: dict | None = None,
    class_embedder: ClassEmbedderConfig | None = None,
    segmentation_encoder: SpatialRescalerConfig | None = None,
    layout: LayoutConfig | None = None,
) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "kind": kind,
        "unet_config": config_to_json(unet),
        "autoencoder_config": config_to_json(autoencoder),
        "schedule": config_to_json(schedule),
        "scale_factor": repr(float(scale_factor)),
        "source": source,
    }
    if text_encoder is not None:
        meta["text_encoder_config"] = config_to_json(text_encoder)
    if vocab is not None:
        meta["tokenizer_vocab"] = vocab
    encoders = (("class_embedder_config", class_embedder),
                ("segmentation_encoder_config", segmentation_encoder), ("layout_config", layout))  # fmt: skip
    for field, config in encoders:
        if config is not None:
            meta[field] = config_to_json(config)
    if recommended:
        meta["recommended"] = json.dumps(recommended, sort_keys=True)
    return meta


def make_autoencoder_metadata(autoencoder: AutoencoderConfig, source: str = "") -> dict[str, str]:
    """The metadata of a file that holds a first-stage autoencoder alone."""
    return {"format": FORMAT, "kind": AUTOENCODER_KIND, "autoencoder_config": config_to_json(autoencoder),
            "source": source}  # fmt: skip


def check_format(meta: dict[str, str], autoencoder: bool) -> None:
    """A ValueError unless `meta` is ldm_mini's, of an autoencoder alone (autoencoder=True) or of a latent
    diffusion model (False); the message names the function that reads the file."""
    if meta.get("format") not in FORMATS:
        raise ValueError(
            f"not an ldm_mini weight file (format {meta.get('format')!r}): convert diffusers folders and "
            "CompVis .ckpt files first with `python -m weights_tools.convert SOURCE OUT.safetensors`"
        )
    if autoencoder and meta.get("kind") != AUTOENCODER_KIND:
        raise ValueError(f"the file holds a {meta.get('kind')!r} latent diffusion model, not an autoencoder "
                         "alone: read it with ldm_mini.load (then use model.autoencoder)")  # fmt: skip
    if not autoencoder and meta.get("kind") == AUTOENCODER_KIND:
        raise ValueError("the file holds a first-stage autoencoder alone, not a latent diffusion model: read "
                         "it with ldm_mini.load_autoencoder")  # fmt: skip


def build_empty_autoencoder(meta: dict[str, str]) -> AutoencoderKL | VQModel:
    """The autoencoder a file of kind "autoencoder" describes, on the meta device."""
    check_format(meta, autoencoder=True)
    if not isinstance(meta.get("autoencoder_config"), str):
        raise ValueError("the file's metadata lacks 'autoencoder_config': it was not written by ldm_mini")
    cfg = config_from_json(AutoencoderConfig, meta["autoencoder_config"], "autoencoder_config")
    with torch.device("meta"):
        return build_autoencoder(cfg)


def build_empty(meta: dict[str, str]) -> LatentDiffusion:
    """The model a file describes, with its parameters on the meta device (no memory, no init)."""
    check_format(meta, autoencoder=False)
    if missing := [k for k in ("kind", "unet_config", "autoencoder_config", "schedule", "scale_factor")
                   if not isinstance(meta.get(k), str)]:  # fmt: skip
        raise ValueError(f"the file's metadata lacks {missing}: it was not written by ldm_mini")
    try:
        scale_factor = float(meta["scale_factor"])
    except ValueError:
        raise ValueError(f"the file's scale_factor {meta['scale_factor'][:40]!r} is not a number") from None
    text_cfg = meta.get("text_encoder_config")
    configs = dict(
        unet=config_from_json(UNetConfig, meta["unet_config"], "unet_config"),
        autoencoder=config_from_json(AutoencoderConfig, meta["autoencoder_config"], "autoencoder_config"),
        text=config_from_json(LDMBertConfig, text_cfg, "text_encoder_config") if text_cfg else None,
        schedule=config_from_json(ScheduleConfig, meta["schedule"], "schedule"),
    )
    vocab = meta.get("tokenizer_vocab")
    # the conditioning encoders other than the text encoder (conditioning.py), each present for its kind only
    optional = {field: config_from_json(cls, meta[field], field) if meta.get(field) else None
                for field, cls in (("class_embedder_config", ClassEmbedderConfig),
                                   ("segmentation_encoder_config", SpatialRescalerConfig),
                                   ("layout_config", LayoutConfig))}  # fmt: skip
    class_cfg, seg_cfg, layout_cfg = optional.values()
    with torch.device("meta"):
        unet = UNet(configs["unet"])
        autoencoder = build_autoencoder(configs["autoencoder"])
        text_encoder = LDMBert(configs["text"]) if text_cfg else None
        class_embedder = ClassEmbedder(class_cfg) if class_cfg else None
        segmentation_encoder = SpatialRescaler(seg_cfg) if seg_cfg else None
    return LatentDiffusion(
        kind=meta["kind"],
        unet=unet,
        autoencoder=autoencoder,
        schedule=configs["schedule"],
        scale_factor=scale_factor,
        text_encoder=text_encoder,
        tokenizer=Tokenizer.from_vocab(vocab) if vocab else None,
        recommended=recommended_of(meta),
        class_embedder=class_embedder,
        segmentation_encoder=segmentation_encoder,
        layout_tokenizer=LayoutTokenizer(layout_cfg) if layout_cfg else None,
    )


def recommended_of(meta: dict[str, str]) -> dict | None:
    """The file's recommended sampler settings (JSON), or a ValueError that names the field."""
    if not meta.get("recommended"):
        return None
    try:
        return json.loads(meta["recommended"])
    except json.JSONDecodeError as e:
        raise ValueError(f"the file's 'recommended' metadata is not valid JSON ({e})") from e


def metadata_of(model: LatentDiffusion, source: str = "", recommended: dict | None = None) -> dict[str, str]:
    """The metadata that describes a live model (used to save a trained model); recommended: the model's own
    model.recommended unless given."""
    return make_metadata(
        kind=model.kind,
        unet=model.unet.config,
        autoencoder=model.autoencoder.config,
        schedule=model.schedule,
        scale_factor=model.scale_factor,
        text_encoder=model.text_encoder.config if model.text_encoder is not None else None,
        vocab=model.tokenizer.vocab_text if model.tokenizer is not None else None,
        source=source,
        recommended=model.recommended if recommended is None else recommended,
        class_embedder=model.class_embedder.config if model.class_embedder is not None else None,
        segmentation_encoder=(
            model.segmentation_encoder.config if model.segmentation_encoder is not None else None
        ),
        layout=model.layout_tokenizer.config if model.layout_tokenizer is not None else None,
    )


# --- strict key checks ------------------------------------------------------------------------------
def check_state_dict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Raise, naming the keys, unless `state` has exactly the keys and shapes `model` expects, and floating
    point tensors where the model has them (integer weights would load, then compute nonsense)."""
    want = model.state_dict()
    kinds = {
        k for k in want.keys() & state.keys() if want[k].is_floating_point() != state[k].is_floating_point()
    }
    if kinds:
        k = sorted(kinds)[0]
        raise ValueError(f"{source}: {len(kinds)} tensors have the wrong kind of dtype, e.g. {k}: "
                         f"{state[k].dtype} where the model has {want[k].dtype}")  # fmt: skip
    missing = sorted(want.keys() - state.keys())
    extra = sorted(state.keys() - want.keys())
    bad = sorted(k for k in want.keys() & state.keys() if tuple(want[k].shape) != tuple(state[k].shape))
    if missing or extra or bad:
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(want[k].shape)}" for k in bad[:3]]
        raise ValueError(
            f"{source} does not fit {type(model).__name__}: "
            f"{len(missing)} missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}, "
            f"{len(bad)} with the wrong shape {shapes}"
        )


# --- writing ----------------------------------------------------------------------------------------
def write_file(
    path: str | os.PathLike,
    tensors: dict[str, Tensor],
    meta: dict[str, str],
    force: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a weight file atomically and, without force, never over an existing file (write_atomically).

    Checks the tensors against the model the metadata describes first, so a file that would not load
    is never written. Floating-point tensors are cast to `dtype` when given.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists: pass --force (force=True) to overwrite it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder of {path} does not exist: create it first")
    model = build_empty_autoencoder(meta) if meta.get("kind") == AUTOENCODER_KIND else build_empty(meta)
    check_state_dict(model, tensors, source=f"the tensors for {path.name}")
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), force=force)


def _put_new(tmp: Path, path: Path) -> None:
    """Give the written file `tmp` the name `path` in one step, or FileExistsError if the name is taken."""
    try:
        os.link(tmp, path)  # fails if the name exists, whoever created it and whenever
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system: claim the name exclusively, then replace it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, path)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object], force: bool = False) -> Path:
    """write(tmp) into a temporary file beside `path`, then put it in place in one step.

    A crash, a full disk, a size limit or Ctrl-C while writing leaves the old file (or none), never half a
    file. Without force the last step is a hard link, which fails if the name exists: an existing file is
    never replaced, not even one that another process wrote in the meantime (two runs to one name: the
    second refuses). With force it is os.replace. Used for weight files and for the command line's PNGs.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        umask = os.umask(0)  # mkstemp makes the file private (0600): give it the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if force:
            os.replace(tmp, path)
        else:
            try:
                _put_new(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists: pass --force (force=True) to overwrite it") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save(
    model: LatentDiffusion,
    path: str | os.PathLike,
    force: bool = False,
    dtype: torch.dtype | None = None,
    source: str = "",
    recommended: dict | None = None,
) -> Path:
    """Save a live model in ldm_mini's format (what load() reads back)."""
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return write_file(path, tensors, metadata_of(model, source, recommended), force=force, dtype=dtype)


# --- reading ----------------------------------------------------------------------------------------
def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    try:  # the operating system's reasons first: "permission denied" is not a truncated file
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path} is not a readable .safetensors file ({e}); is it truncated?") from e


def load_file(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    fast: bool | None = None,
) -> LatentDiffusion:
    """Read one weight file as an eval-mode model. (ldm_mini.load finds the file: an embedded name, a path or
    a hub id, see hub.py.)

    device: where the parameters go (default CPU); dtype: cast floating-point weights (default: as stored
    in the file, float32 for float32 files); fast: swap in ldm_mini.fast's CPU layers (None: where they are
    faster, fast.default_on(device); False: plain PyTorch layers, bit-identical to diffusers).
    """
    device = check_device(device)
    meta = read_metadata(path)
    model = build_empty(meta)
    assign_weights(model, path, meta, device, dtype)
    model.alphas_cumprod = model.alphas_cumprod.to(device)  # the only non-persistent buffer
    if fast is None:
        fast = fast_layers.default_on(device)
    if fast:
        fast_layers.enable(model)
    return model.eval().requires_grad_(False)


def load_autoencoder(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> AutoencoderKL | VQModel:
    """Read a file of kind "autoencoder" (a converted CompVis first stage) as an eval-mode AutoencoderKL or
    VQModel. device, dtype: as load_file's."""
    device = check_device(device)
    meta = read_metadata(path)
    model = build_empty_autoencoder(meta)
    assign_weights(model, path, meta, device, dtype)
    return model.eval().requires_grad_(False)


def check_device(device: str | torch.device | None) -> torch.device:
    """The device to load onto (default CPU), or a ValueError when this machine has none of that kind."""
    device = torch.device(device or "cpu")
    for kind, available in (("cuda", torch.cuda.is_available), ("mps", torch.backends.mps.is_available)):
        if device.type == kind and not available():
            raise ValueError(f"device={str(device)!r}: no {kind.upper()} device is available here (torch "
                             f"{torch.__version__}); use device='cpu'")  # fmt: skip
    return device


def assign_weights(model: nn.Module, path: str | os.PathLike, meta: dict[str, str], device: torch.device,
                   dtype: torch.dtype | str | None) -> None:  # fmt: skip
    """Put the file's tensors (mmap'd by safetensors) into the meta-device `model` as its parameters, after
    checking their keys and shapes; floating-point ones cast to `dtype` when given."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta["format"] == "ldm_mini/1":  # diffusers' names, from before DIFFUSERS_RENAMES
        state = from_diffusers_names(state)
    check_state_dict(model, state, source=str(path))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
