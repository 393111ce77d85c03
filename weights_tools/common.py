"""Safe reading of weight files, shared by the converters.

Pickle-based files (.bin, .ckpt, .pt) are read ONLY with torch.load(weights_only=True): its
unpickler rebuilds tensors and plain containers and refuses any other global, so a file that
carries a pickled callable (the classic `__reduce__` payload) raises instead of running code.
Everything else is safetensors.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class ConversionError(ValueError):
    """A problem with the input that the user can fix; the CLI prints it as one line."""


def read_tensors(path: str | Path) -> dict:
    """Read a .safetensors file or a pickle checkpoint (weights_only) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:
            raise ConversionError(f"{path}: not a readable .safetensors file ({e}); truncated download?") from e
    if path.suffix not in PICKLE_SUFFIXES:
        raise ConversionError(f"{path}: unknown weight file type {path.suffix!r} (.safetensors, .bin, .ckpt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # weights_only's error text names the refused global, e.g. "Unsupported global: GLOBAL os.system"
        reason = str(e).splitlines()[0] if str(e) else "unsupported content"
        raise ConversionError(
            f"{path}: refused to unpickle it: it holds more than tensors ({reason}). Weight files are "
            "only read with torch.load(weights_only=True); a file that needs more could run code."
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise ConversionError(f"{path}: cannot read it ({type(e).__name__}: {e}); truncated or corrupt?") from e


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e


def rename(state: dict[str, Tensor], table: list[tuple[str, str]]) -> dict[str, Tensor]:
    """Apply (old fragment, new fragment) rows to every key, top to bottom; each row replaces at most
    once per key. A row whose new fragment is None drops the key."""
    out = {}
    for key, value in state.items():
        for old, new in table:
            if old in key:
                if new is None:
                    break
                key = key.replace(old, new, 1)
        else:
            out[key] = value
    return out
