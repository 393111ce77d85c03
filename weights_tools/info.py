"""python -m weights_tools.info FILE.safetensors

Says what an ldm_mini weight file holds: model kind, configs, schedule, scale factor, tokenizer, parameter
counts, dtypes and size per component (for a first-stage autoencoder alone: its config, counts and size).
It reads only the file's header (safetensors: an 8-byte little-endian length, then a JSON table {name:
{dtype, shape, data_offsets}, "__metadata__": {...}}); no model is built
and no weight is read, so it is instant even for a 3 GB file.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from pathlib import Path

COMPONENTS = ("unet", "autoencoder", "text_encoder")
FORMATS = ("ldm_mini/1", "ldm_mini/2")  # = ldm_mini.loading.FORMATS, not imported: this reads no tensors
AUTOENCODER_KIND = "autoencoder"  # = ldm_mini.loading.AUTOENCODER_KIND: keys without a component prefix


def read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """-> ({tensor name: {dtype, shape, data_offsets}}, metadata) from the header alone."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path}: not a .safetensors file (header length {n}, file size {size})")
        try:
            table = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: the safetensors header is not valid JSON ({e}); truncated?") from e
    return table, table.pop("__metadata__", None) or {}


def summary(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    table, meta = read_header(path)
    if meta.get("format") not in FORMATS:
        raise ValueError(
            f"{path}: not an ldm_mini file (format {meta.get('format')!r}); convert it first with "
            "`python -m weights_tools.convert`"
        )
    lines = [
        f"{path}: {meta['format']}, {path.stat().st_size / 2**20:.1f} MiB",
        f"kind          {meta.get('kind')}",
        f"source        {meta.get('source') or '-'}",
    ]
    if meta.get("kind") == AUTOENCODER_KIND:
        lines += component("autoencoder", table, meta.get("autoencoder_config"))
        return "\n".join(lines)
    lines.append(f"scale_factor  {meta.get('scale_factor')}")
    schedule = json.loads(meta.get("schedule", "{}"))
    lines.append("schedule      " + ", ".join(f"{k}={v}" for k, v in schedule.items()))
    vocab = meta.get("tokenizer_vocab")
    lines.append(
        f"tokenizer     {f'WordPiece, {len(vocab.splitlines())} tokens' if vocab else 'none (token ids)'}"
        if meta.get("text_encoder_config")
        else "tokenizer     -"
    )
    total = 0
    for part in COMPONENTS:
        tensors = {k: v for k, v in table.items() if k.startswith(part + ".")}
        lines += component(part, tensors, meta.get(f"{part}_config"))
        total += sum(math.prod(t["shape"]) for t in tensors.values())
    lines.append(f"{'total':13} {total / 1e6:9.2f} M parameters")
    return "\n".join(lines)


def component(part: str, tensors: dict[str, dict], config: str | None) -> list[str]:
    """The summary lines of one component: parameter count, dtypes, size, tensor count, then its config."""
    if not tensors:
        return [f"{part:13} -"]
    count = sum(math.prod(t["shape"]) for t in tensors.values())
    nbytes = sum(t["data_offsets"][1] - t["data_offsets"][0] for t in tensors.values())
    dtypes = "/".join(sorted({t["dtype"] for t in tensors.values()}))
    return [
        f"{part:13} {count / 1e6:9.2f} M parameters  {dtypes:5} {nbytes / 2**20:8.1f} MiB  "
        f"{len(tensors)} tensors",
        f"{'':13} {config}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_tools.info",
        description="Show what an ldm_mini weight file holds (header only).",
    )
    parser.add_argument("file", help="an ldm_mini .safetensors file")
    args = parser.parse_args(argv)
    try:
        print(summary(args.file))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
