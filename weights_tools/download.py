"""python -m weights_tools.download REPO_ID [OUT.safetensors] [--revision R] [--dtype ...] [--force]

Fetches a diffusers Latent Diffusion pipeline from the Hugging Face hub into huggingface_hub's cache and
converts it into one ldm_mini file (weights_tools.convert) in one step:

    CompVis/ldm-text2im-large-256               text-to-image (LDMBert + KL-f8 + cross-attention UNet)
    CompVis/ldm-celebahq-256                    unconditional faces (VQ-f4)
    CompVis/ldm-super-resolution-4x-openimages  4x super-resolution (VQ-f4, low-res image concatenated)

Only what the conversion reads is downloaded: model_index.json, every component's config, the tokenizer,
and ONE weight format per component (full precision before fp16, .safetensors before .bin). A file already
in the cache is not fetched again; offline (HF_HUB_OFFLINE=1, or no network), a cached copy is used. If
there is none, the command fails at once with one line saying what to do instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# torch and ldm_mini are imported only once the files are there: offline, the command fails in a second.
DTYPES = ("bfloat16", "float16", "float32")  # = ldm_mini.loading.DTYPES
KNOWN = (
    "CompVis/ldm-text2im-large-256",
    "CompVis/ldm-celebahq-256",
    "CompVis/ldm-super-resolution-4x-openimages",
)
WEIGHT_ORDER = (".safetensors", ".bin", ".fp16.safetensors", ".fp16.bin")  # first found per folder wins


def wanted_files(files: list[str]) -> list[str]:
    """The subset of a repo's files that convert_folder reads."""
    keep = [f for f in files if f.endswith(".json") or f.startswith("tokenizer/")]  # configs, shard indexes
    for folder in sorted({f.split("/")[0] for f in files if "/" in f}):
        weights = [f for f in files if f.startswith(folder + "/") and f.endswith((".safetensors", ".bin"))]
        for ending in WEIGHT_ORDER:
            chosen = [f for f in weights if f.endswith(ending) and (".fp16." in ending or ".fp16." not in f)]
            if chosen:
                keep += chosen
                break
    return sorted(set(keep))


class DownloadError(Exception):
    """The hub cannot be reached and the cache does not have the repository; the CLI prints one line."""


def fetch(repo_id: str, revision: str | None = None) -> Path:
    """The pipeline folder of repo_id in huggingface_hub's cache, downloading what is missing."""
    from huggingface_hub import HfApi, snapshot_download

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
    out: str | Path | None = None,
    revision: str | None = None,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Fetch and convert; returns the written file (default: ./<repo name>.safetensors)."""
    out = Path(out) if out is not None else Path(repo_id.split("/")[-1] + ".safetensors")
    if out.exists() and not force:  # checked before any download
        raise FileExistsError(f"{out} exists: pass --force to overwrite it")
    folder = fetch(repo_id, revision)
    from .convert import convert

    return convert(folder, out, dtype=dtype, force=force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_tools.download",
        description="Download a Latent Diffusion pipeline from the hub and convert it to one ldm_mini file.",
        epilog=f"repositories: {', '.join(KNOWN)}",
    )
    parser.add_argument("repo_id", help="hub repository, e.g. CompVis/ldm-celebahq-256")
    parser.add_argument(
        "out", nargs="?", help="output .safetensors file (default: ./<repo name>.safetensors)"
    )
    parser.add_argument("--revision", help="branch, tag or commit (default: main)")
    parser.add_argument("--dtype", choices=DTYPES, help="store floating-point weights in this dtype")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.endswith(".safetensors"):
        parser.error(f"OUT must end in .safetensors: {args.out}")
    try:
        out = download(args.repo_id, args.out, args.revision, args.dtype, args.force)
    except (DownloadError, FileExistsError, FileNotFoundError, ValueError) as e:  # ConversionError included
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
