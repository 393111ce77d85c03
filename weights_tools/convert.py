"""python -m weights_tools.convert SOURCE OUT.safetensors [--config MODEL.yaml] [--dtype ...] [--force]

SOURCE is a diffusers pipeline folder (LDMTextToImagePipeline, LDMPipeline, LDMSuperResolutionPipeline)
or an original CompVis/latent-diffusion checkpoint (.ckpt with its --config .yaml). The output is ONE
.safetensors file that `ldm_mini.load()` reads, or, for a CompVis first-stage checkpoint (the yaml's
model.target an ldm.models.autoencoder class), `ldm_mini.load_autoencoder()`. It is written atomically and
never over an existing file unless --force is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm_mini.loading import DTYPES, write_file

from .common import PICKLE_SUFFIXES, ConversionError


def convert(
    source: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    dtype: str | None = None,
    force: bool = False,
    ema: bool | None = None,
    scale_factor: float | None = None,
) -> Path:
    """Convert SOURCE into OUT; returns OUT. Raises ConversionError (or FileExistsError) on bad input."""
    source, out = Path(source), Path(out)
    if out.exists() and not force:  # checked first: no work is wasted on a refused output
        raise FileExistsError(f"{out} exists: pass --force to overwrite it")
    if source.is_dir():
        if config is not None or ema is not None:
            raise ConversionError(
                "--config/--ema/--no-ema apply to CompVis .ckpt files, not diffusers folders"
            )
        from .diffusers_format import convert_folder

        tensors, meta = convert_folder(source)
    elif source.suffix in PICKLE_SUFFIXES:
        if config is None:
            raise ConversionError(f"{source}: a CompVis checkpoint needs its yaml: pass --config MODEL.yaml")
        from .compvis import convert_checkpoint, convert_first_stage, is_first_stage

        if not is_first_stage(config):
            tensors, meta = convert_checkpoint(source, config, ema=ema)
        elif ema is not None or scale_factor is not None:
            raise ConversionError(
                f"{config}: a first-stage autoencoder has no EMA weights and no latent scale factor: convert "
                "it without --ema/--no-ema/--scale-factor"
            )
        else:
            tensors, meta = convert_first_stage(source, config)
    elif not source.exists():
        raise ConversionError(f"{source}: no such file or folder")
    else:
        raise ConversionError(f"{source}: expected a diffusers pipeline folder or a CompVis .ckpt file")
    if scale_factor is not None:
        meta["scale_factor"] = repr(float(scale_factor))
    return write_file(out, tensors, meta, force=force, dtype=DTYPES[dtype] if dtype else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_tools.convert",
        description="Convert Latent Diffusion weights (a diffusers folder or a CompVis .ckpt, also a first "
        "stage's) to one file.",
        epilog="example: python -m weights_tools.convert ./ldm-celebahq-256 celebahq.safetensors "
        "--dtype float16",
    )
    parser.add_argument("source", help="diffusers pipeline folder, or CompVis .ckpt (with --config)")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--config", help="the CompVis .yaml of a .ckpt (e.g. txt2img-1p4B-eval.yaml)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="store floating-point weights in this dtype")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument(
        "--ema",
        dest="ema",
        action="store_true",
        default=None,
        help="use the EMA weights (the default when the checkpoint has them)",
    )
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="keep the raw (non-EMA) weights")
    parser.add_argument("--scale-factor", type=float, help="override the latent scale factor")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error(f"OUT must end in .safetensors: {args.out}")
    try:
        out = convert(args.source, args.out, args.config, args.dtype, args.force, args.ema, args.scale_factor)
    except (ConversionError, OSError, ValueError) as e:  # OSError: a full disk, no permission, a name taken
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
