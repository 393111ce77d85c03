"""Safe reading of weight files, shared by the converters.

Pickle-based files (.bin, .ckpt, .pt) are read ONLY with torch.load(weights_only=True): its
unpickler rebuilds tensors and plain containers and refuses any other global, so a file that
carries a pickled callable (the classic `__reduce__` payload) raises instead of running code.
Everything else is safetensors.

One exception keeps PyTorch Lightning checkpoints (CompVis .ckpt files) readable: besides "state_dict"
they may hold training bookkeeping that names Lightning or omegaconf classes (the ModelCheckpoint
callback as a dict key, hyper-parameters as a DictConfig). weights_only refuses those names. When every
refused name lies in INERT_NAMESPACES, the file is read again with each such name bound to `Inert`, a
local class that swallows its arguments and state: nothing is imported and no code of the file runs.
The tensors are still rebuilt by torch's own weights_only unpickler. An Inert object inside
"state_dict" (or in a file without one) is refused: weights must be plain tensors.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# Training bookkeeping of Lightning checkpoints: classes from these packages become Inert placeholders.
INERT_NAMESPACES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.")


class ConversionError(ValueError):
    """A problem with the input that the user can fix; the CLI prints it as one line."""


class Inert:
    """Stands in for a Lightning/omegaconf object while unpickling: swallows arguments and state, never
    calls, imports or runs anything. Only ever found outside "state_dict", which the converters ignore."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def read_tensors(path: str | Path) -> dict:
    """Read a .safetensors file or a pickle checkpoint (weights_only) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:
            raise ConversionError(
                f"{path}: not a readable .safetensors file ({e}); truncated download?"
            ) from e
    if path.suffix not in PICKLE_SUFFIXES:
        raise ConversionError(f"{path}: unknown weight file type {path.suffix!r} (.safetensors, .bin, .ckpt)")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: the file is empty; truncated download?")
    try:
        return _load_weights_only(path)
    except pickle.UnpicklingError as e:
        # weights_only's message has the refused global in it, e.g. "... GLOBAL posix.system ..."
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused is None:  # an opcode it cannot read: not a pickle at all, or a damaged one
            raise ConversionError(
                f"{path}: cannot read it (not a PyTorch pickle); truncated or corrupt?"
            ) from e
        raise ConversionError(
            f"{path}: refused to unpickle it: it holds more than tensors (the global {refused.group(1)}). "
            "Weight files are only read with torch.load(weights_only=True); a file that needs more could "
            "run code."
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        reason = (
            str(e).split(". ")[0].splitlines()[0] if str(e) else "it ends too early"
        )  # its first sentence
        raise ConversionError(
            f"{path}: cannot read it ({type(e).__name__}: {reason}); truncated or corrupt?"
        ) from e


def _load_weights_only(path: Path):
    """torch.load(weights_only=True); a zip checkpoint whose only refused globals are Lightning/omegaconf
    bookkeeping is read again with those names bound to Inert (see the module docstring)."""
    is_zip = zipfile.is_zipfile(path)
    mmap = is_zip and _can_mmap(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        if not is_zip:
            raise
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # reads opcodes, runs nothing
        if not names or not all(name.startswith(INERT_NAMESPACES) for name in names):
            raise
    with torch.serialization.safe_globals([(Inert, name) for name in names]):
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    weights = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if weights is obj or _holds_inert(weights):
        raise pickle.UnpicklingError(f"Inert stand-in for GLOBAL {sorted(names)[0]} inside the weights")
    return obj


def _can_mmap(path: Path) -> bool:
    """Whether torch.load can map the zip's tensors: only when every entry is stored uncompressed, as
    torch.save writes them (a zip recompressed with deflate, as the tests' CompVis fixtures are, is read
    into memory instead)."""
    with zipfile.ZipFile(path) as z:
        return all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())


def _holds_inert(obj) -> bool:
    if isinstance(obj, Inert) or obj is Inert:
        return True
    if isinstance(obj, dict):
        return any(_holds_inert(k) or _holds_inert(v) for k, v in obj.items())
    if isinstance(obj, list | tuple | set):
        return any(_holds_inert(v) for v in obj)
    return False


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e
