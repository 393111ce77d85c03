"""Where weights come from: an embedded model, a converted file, or a hub id (fetched and converted once).

    ldm_mini.load()                              the embedded shapes model, in ldm_mini/weights/
    ldm_mini.load("celebahq.safetensors")        a file written by `python -m weights_tools.convert`
    ldm_mini.load("CompVis/ldm-celebahq-256")    a diffusers pipeline on the Hugging Face hub: downloaded
                                                 once, converted once into cache_dir(), the cached file after
    ldm_mini.load_autoencoder("shapes-vq")       a first stage alone: an embedded name or a converted file

This is the one module that talks to the hub. The loader (load, resolve), the command line, `ldm-mini verify
--reference` and `python -m weights_tools.download` all come through here.

Layering: the core of ldm_mini (the networks, schedule, samplers, container, the weight format in loading.py
and the pipelines) never imports this module; this module imports the core and, to convert a download, the
converters (weights_tools.convert). Dependencies point one way: core <- weights_tools <- hub <- command line.

Only what the conversion reads is downloaded: model_index.json, every component's config, the tokenizer, and
ONE weight format per component (full precision before fp16, .safetensors before .bin). A file already in
huggingface_hub's cache is not fetched again; offline (HF_HUB_OFFLINE=1, or no network) a cached copy is
used, and without one the call fails at once with one line saying what to do instead.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

from .autoencoder import AutoencoderKL, VQModel
from .loading import EMBEDDED, load_file
from .loading import load_autoencoder as read_autoencoder
from .model import LatentDiffusion

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as on huggingface.co
KNOWN = (
    "CompVis/ldm-text2im-large-256",  # text-to-image (LDMBert + KL-f8 + cross-attention UNet)
    "CompVis/ldm-celebahq-256",  # unconditional faces (VQ-f4)
    "CompVis/ldm-super-resolution-4x-openimages",  # 4x super-resolution (VQ-f4, low-res image concatenated)
)
WEIGHT_ORDER = (".safetensors", ".bin", ".fp16.safetensors", ".fp16.bin")  # first found per folder wins


class DownloadError(Exception):
    """The hub cannot be reached and the cache does not have the repository; the CLI prints one line."""


FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".png", ".yaml", ".json")


def is_hub_id(spec: str) -> bool:
    """owner/name, unless it reads as a local path: it exists, its folder exists here (models/celebahq.sft,
    a typo, is a missing file, not a repository), or it ends like a file name."""
    path = Path(spec)
    local = path.exists() or path.parent.is_dir() or spec.lower().endswith(FILE_SUFFIXES)
    return bool(HUB_ID.match(spec)) and not local


def wanted_files(files: list[str]) -> list[str]:
    """The subset of a repository's files that weights_tools.convert reads."""
    keep = [f for f in files if f.endswith(".json") or f.startswith("tokenizer/")]  # configs, shard indexes
    for folder in sorted({f.split("/")[0] for f in files if "/" in f}):
        weights = [f for f in files if f.startswith(folder + "/") and f.endswith((".safetensors", ".bin"))]
        for ending in WEIGHT_ORDER:
            chosen = [f for f in weights if f.endswith(ending) and (".fp16." in ending or ".fp16." not in f)]
            if chosen:
                keep += chosen
                break
    return sorted(set(keep))


def fetch(repo_id: str, revision: str | None = None) -> Path:
    """The pipeline folder of repo_id in huggingface_hub's cache, downloading what is missing."""
    from huggingface_hub import HfApi, snapshot_download  # only needed for the hub

    try:  # one request lists the files; it fails fast when offline (no retries)
        files = [s.rfilename for s in HfApi().repo_info(repo_id, revision=revision).siblings or []]
    except Exception as online:  # offline, no network, unknown repo: fall back to the cache
        try:
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:
            reason = (str(online).strip() or type(online).__name__).splitlines()[0].split(". ")[0]
            raise DownloadError(
                f"cannot download {repo_id} and it is not in the cache ({reason}). Without network: download "
                f"the folder elsewhere (`hf download {repo_id} --local-dir FOLDER`), copy it here, then run "
                "`python -m weights_tools.convert FOLDER OUT.safetensors`"
            ) from online
    if "model_index.json" not in files:
        raise DownloadError(f"{repo_id}: not a diffusers pipeline repository (no model_index.json)")
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=wanted_files(files)))


def download(
    repo_id: str,
    out: str | os.PathLike | None = None,
    revision: str | None = None,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Fetch and convert; returns the written file (default: ./<repo name>.safetensors)."""
    from weights_tools.convert import convert  # the converters sit below this module, never above it

    out = Path(out) if out is not None else Path(repo_id.split("/")[-1] + ".safetensors")
    if out.exists() and not force:  # checked before any download
        raise FileExistsError(f"{out} exists: pass --force to overwrite it")
    return convert(fetch(repo_id, revision), out, dtype=dtype, force=force)


def cache_dir() -> Path:
    """Where hub models are kept once converted: $LDM_MINI_CACHE, else $XDG_CACHE_HOME/ldm_mini."""
    if os.environ.get("LDM_MINI_CACHE"):
        return Path(os.environ["LDM_MINI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm_mini"


def from_hub(repo_id: str) -> Path:
    """A hub pipeline, downloaded and converted into the cache the first time; the cached file after."""
    out = cache_dir() / (repo_id.replace("/", "--") + ".safetensors")
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading and converting {repo_id} once, into {out}", file=sys.stderr)
        download(repo_id, out)
    return out


def resolve(weights: str | os.PathLike | None = None) -> Path:
    """None or an embedded name ("shapes") -> the file in the package; an existing path -> itself; a hub id
    (e.g. "CompVis/ldm-text2im-large-256") -> downloaded and converted once into cache_dir()."""
    spec = "shapes" if weights is None else str(weights)
    if spec in EMBEDDED:
        path = EMBEDDED[spec]
        if not path.exists():
            raise FileNotFoundError(f"the embedded model {spec!r} is missing from {path}")
        return path
    if is_hub_id(spec):
        return from_hub(spec)
    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(
            f"no weight file {path}: pass a converted .safetensors file, an embedded name "
            f"({', '.join(EMBEDDED)}) or a hub id (owner/name), or convert one with "
            "`python -m weights_tools.convert`"
        )
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a folder: convert it first with "
            f"`python -m weights_tools.convert {path} OUT.safetensors`"
        )
    return path


def load(
    weights: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    fast: bool | None = None,
) -> LatentDiffusion:
    """An eval-mode model from an embedded name (default "shapes"), a converted file or a hub id (resolve).

    device: where the parameters go (default CPU); dtype: cast floating-point weights (default: as stored);
    fast: ldm_mini.fast's CPU layers (None: where faster; False: plain layers, bit-identical to diffusers).
    """
    return load_file(resolve(weights), device=device, dtype=dtype, fast=fast)


def load_autoencoder(
    weights: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> AutoencoderKL | VQModel:
    """An eval-mode first stage alone from an embedded name ("shapes-vq") or a converted autoencoder file
    (a CompVis first-stage checkpoint through weights_tools.convert). device, dtype: as load's."""
    return read_autoencoder(resolve(weights), device=device, dtype=dtype)
