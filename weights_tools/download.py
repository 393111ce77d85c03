"""python -m weights_tools.download REPO_ID [OUT.safetensors] [--revision R] [--dtype ...] [--force]

Fetches a diffusers Latent Diffusion pipeline from the Hugging Face hub into huggingface_hub's cache and
converts it into one ldm_mini file (weights_tools.convert) in one step. The command line of ldm_mini.hub,
the one module that talks to the hub (what is downloaded, the cache, offline behaviour: see there):

    CompVis/ldm-text2im-large-256               text-to-image (LDMBert + KL-f8 + cross-attention UNet)
    CompVis/ldm-celebahq-256                    unconditional faces (VQ-f4)
    CompVis/ldm-super-resolution-4x-openimages  4x super-resolution (VQ-f4, low-res image concatenated)
"""

from __future__ import annotations

import argparse
import sys

from ldm_mini.hub import KNOWN, DownloadError, download
from ldm_mini.loading import DTYPES


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
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="store floating-point weights in this dtype")
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
