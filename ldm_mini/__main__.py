"""The command line: `python -m ldm_mini COMMAND ...`, or `ldm-mini COMMAND ...` once installed.

    ldm-mini txt2img "a red circle above a blue square" -n 4          the embedded shapes model
    ldm-mini txt2img "a painting of a squirrel eating a burger" \\
        --weights CompVis/ldm-text2im-large-256 --guidance 6 --eta 0.3  the model card's settings
    ldm-mini sample --weights CompVis/ldm-celebahq-256 --steps 200
    ldm-mini upscale small.png --weights CompVis/ldm-super-resolution-4x-openimages --eta 1
    ldm-mini info celebahq.safetensors
    ldm-mini verify celebahq.safetensors                               ldm_mini vs diffusers, stage by stage

--weights takes a converted .safetensors file, an embedded model's name ("shapes", the default) or a hub
id, which is downloaded and converted once (weights_tools.download) into the cache folder
($LDM_MINI_CACHE, else $XDG_CACHE_HOME/ldm_mini, else ~/.cache/ldm_mini).

A setting not given on the command line comes from the file's optional "recommended" metadata (JSON, e.g.
{"steps": 20, "guidance": 4.0}), else from the pipeline's default, and the image size defaults to the size
the model was trained at: exactly as the Python call (pipeline.settings resolves and checks both, before any
weight is read). --steps is the pipelines' num_inference_steps, --guidance their guidance_scale. Image i of
-n N uses seed + i, so each PNG can be remade on its own: its text chunks record the prompt, seed, steps,
sampler (and --sigmas when given), guidance, eta and weights. `--sampler dpmpp_2m --sigmas karras` runs
DPM-Solver++(2M) on Karras et al.'s sigma schedule (every name of samplers.SAMPLERS is a --sampler).

Many images: a batch job. `torchrun --nproc_per_node=N -m ldm_mini txt2img PROMPT -n 1000 --out DIR/` (any
sampling command) runs N processes: with --device cuda (or auto on a GPU machine) each on cuda:LOCAL_RANK,
joined by NCCL, else by gloo. --skip-existing makes a one-process run such a job too.
    seeds     seed .. seed+n-1 (--seed defaults to 0 in a job, so that the same command resumes it) go in
              batches of --batch-size consecutive seeds of one prompt. The batches left to make (in a new
              job all) are dealt round robin, the k-th to rank k % WORLD_SIZE, so a rerun spreads what is
              left evenly. An image depends on its seed, not on its rank: the same bytes as a single
              process's, on any number of processes (same device kind, dtype and, on a CPU, thread count).
              --batch-size B > 1 runs B seeds in one pipeline call (image i drawn from generator i, the same
              noise), but batched kernels round differently: an image may differ from its batch-of-one image
              by one level in a few pixels. Batches are fixed by the seeds, so for one B the images are the
              same on any number of processes; such a PNG records its batch ("batch": "seeds 8-11").
    rerun     DIR must be a folder. Images already there are kept (a temporary file renamed in place is the
              only way a PNG gets there, so each is whole), the missing ones made; a batch with one image
              missing is made whole, the others of it not rewritten. A kept file must hold this job's seed,
              input and settings, else the job refuses to start (exit 2); --force remakes every image. A
              killed process (torchrun then stops the others) loses only the batch it was making.
    manifest  After every rank has written its images (a gather), rank 0 reads them back and writes
              DIR/manifest.jsonl, one JSON line per image in the job's order: {"file", "seed", "prompt",
              "settings" (the PNG's other text chunks), "sha256" (of the PNG)}; lines of other jobs' images
              still in DIR are kept, before. One job per folder at a time. Rank 0 prints one summary line.
--prompts FILE (txt2img): one prompt a line (blank lines and # comments skipped; a repeated prompt is made
once); every prompt with every seed, in the file's order, as SLUG-HASH-SEED.png (HASH: 8 hex digits of the
prompt's sha256, so names stay unique and survive edits of the file). A plain run (no torchrun, no
--skip-existing) behaves as before: no manifest; a taken name refused (numbered on in outputs/).

Exit codes: 0 done; 1 a failure while running (verify: a stage failed); 2 a bad argument (argparse's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import secrets
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import distributed, pipeline, samplers
from .hub import DownloadError, is_hub_id, load, resolve
from .loading import DTYPES, EMBEDDED, build_empty, read_metadata, recommended_of, write_atomically
from .verify import DEFAULT_PROMPT

DEFAULT_OUT = "outputs"
MANIFEST = "manifest.jsonl"  # a batch job's list of images, in its --out folder
MAX_IMAGES = 100_000  # -n: more is surely a typo (and the list of output names alone would fill memory)
KINDS = {
    "txt2img": "txt2img",
    "sample": "unconditional",
    "upscale": "superres",
    "class": "class",
    "inpaint": "inpaint",
    "semantic": "semantic",
    "layout": "layout",
}  # command -> model kind
PIPELINES = {"txt2img": pipeline.txt2img, "sample": pipeline.unconditional, "upscale": pipeline.superres,
             "class": pipeline.class_conditional, "inpaint": pipeline.inpaint,
             "semantic": pipeline.semantic_synthesis, "layout": pipeline.layout_to_image}  # fmt: skip
# Measured (benchmarks/RESULTS.md, "CPU threads"): on an idle 2-core machine all cores are 1.3-1.7x faster
# than one; with one other busy process, one thread is 3.3x faster for the embedded models (the threads wait
# for the core the other process holds at every kernel's barrier). So torch's default stays; --threads: when.
THREADS_HELP = ("torch CPU threads (default: torch's, all cores: fastest on an idle machine; 1 when other "
                "processes keep the CPU busy, 3x faster then for the embedded models)")  # fmt: skip
GUIDED = ("txt2img", "class")  # the commands with --guidance
SIZED = ("txt2img", "sample", "class", "layout")  # with --height/--width (the others: the input's size)
# the pipelines' argument names -> the command line's flags, for their error messages
FLAGS = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "eta": "--eta",
         "sampler": "--sampler", "sigmas": "--sigmas", "height": "--height", "width": "--width"}  # fmt: skip
EXAMPLES = {
    "txt2img": 'ldm-mini txt2img "a red circle above a blue square" -n 2 --steps 20 --guidance 4 --seed 0\n'
    "  torchrun --nproc_per_node=4 -m ldm_mini txt2img --prompts prompts.txt -n 1000 --out many/",
    "sample": "ldm-mini sample --weights CompVis/ldm-celebahq-256 --steps 200 -n 4",
    "upscale": "ldm-mini upscale small.png --weights CompVis/ldm-super-resolution-4x-openimages --eta 1",
    "class": "ldm-mini class 207 --weights cin256-v2.safetensors -n 4   (207: golden retriever)",
    "inpaint": "ldm-mini inpaint photo.png mask.png --weights inpainting_big.safetensors   (white = fill)",
    "semantic": "ldm-mini semantic labels.png --weights semantic_synthesis256.safetensors",
    "layout": "ldm-mini layout boxes.json --weights layout2img-openimages256.safetensors --steps 200",
    "info": "ldm-mini info celebahq.safetensors",
    "verify": "ldm-mini verify text2im.safetensors --steps 5\n"
    "  ldm-mini verify text2im.safetensors --reference ./ldm-text2im-large-256  (checks the conversion too)",
}

BATCH_JOBS = f"""

many images, a batch job: under torchrun (one process per GPU), or with --skip-existing
  torchrun --nproc_per_node=N -m ldm_mini COMMAND ... -n 1000 --out DIR/
  Batches of --batch-size consecutive seeds go round robin over the processes; each image is the one a
  single process makes for its seed, byte for byte. Images already in DIR are kept: the same command again
  makes only the missing ones (--force: all). Rank 0 writes DIR/{MANIFEST}, one JSON line per image
  (file, seed, prompt, settings, sha256). --seed defaults to 0."""


# --- where the weights come from --------------------------------------------------------------------
def weights_path(spec: str | None, parser: argparse.ArgumentParser) -> Path:
    """--weights / FILE -> a converted file (hub.resolve): an embedded name, an existing path, or a hub id."""
    try:
        return resolve(spec)
    except (FileNotFoundError, IsADirectoryError) as e:
        parser.error(
            f"{e}. Give a converted .safetensors file or a hub id such as CompVis/ldm-text2im-large-256"
        )
    except (DownloadError, ValueError, OSError) as e:  # weights_tools' ConversionError is a ValueError
        raise SystemExit(f"error: {e}") from e  # exit 1: a failed download is not a bad argument


def pick_device(name: str, parser: argparse.ArgumentParser) -> torch.device:
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        parser.error(f"--device {name}: no {name.upper()} device is available here; use --device cpu")
    return torch.device(name)


# --- output files ----------------------------------------------------------------------------------
def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "image"


def next_free(path: Path) -> Path:
    """path, or the first of name-1.png, name-2.png, ... that does not exist (as the CompVis scripts number
    their outputs): for the default --out, so that the same command twice keeps both images."""
    n, free = 0, path
    while free.exists():
        n += 1
        free = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return free


def output_paths(out: str | None, stem: str, seeds: list[int], force: bool, parser, job=False) -> list[Path]:
    """--out: a .png file (with -n N: name-0.png ... name-{N-1}.png) or a folder (stem-SEED.png in it).
    No --out: outputs/stem-SEED.png, numbered on (stem-SEED-1.png, ...) rather than refused when taken.
    A batch job (job=True, --out a folder): taken names are neither refused nor numbered on but kept."""
    if out is None:
        paths = [next_free(Path(DEFAULT_OUT) / f"{stem}-{s}.png") for s in seeds]
        check_writable(paths, out, parser)
        return paths
    target = Path(out)
    if target.suffix.lower() == ".png":
        many = [target.with_name(f"{target.stem}-{i}.png") for i in range(len(seeds))]
        paths = [target] if len(seeds) == 1 else many
    elif target.suffix and not target.is_dir():
        parser.error(f"--out {out}: give a folder or a .png file (PNG keeps the settings in a text chunk)")
    else:
        paths = [target / f"{stem}-{s}.png" for s in seeds]
    if not force and not job and (taken := [str(p) for p in paths if p.exists()]):
        verb = "exists" if len(taken) == 1 else "exist"
        parser.error(f"{', '.join(taken)} already {verb}: pass --force to overwrite, or choose another --out")
    check_writable(paths, out, parser)
    return paths


def check_writable(paths: list[Path], out: str | None, parser) -> None:
    for folder in sorted({p.parent for p in paths}):  # writable? found out now, not after sampling
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".ldm-mini-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            parser.error(f"--out {out or DEFAULT_OUT}: cannot write into {folder} ({e.strerror or e}); "
                         "choose another --out")  # fmt: skip


def check_kept(paths: list[Path], texts: list[dict], parser) -> None:
    """A batch job keeps the files already there, so each must be this job's image: the same seed, input
    and settings in its text chunks (else exit 2: another job's folder, or changed flags)."""
    from PIL import Image

    for path, want in zip(paths, texts, strict=True):
        if not path.exists():
            continue
        try:
            with Image.open(path) as png:
                have = png.text
        except (OSError, ValueError) as e:
            parser.error(f"cannot read {path} to keep it: {e}; delete it, or pass --force to remake it")
        if bad := [k for k in want if have.get(k) != str(want[k])]:
            k = bad[0]
            parser.error(f"{path} was made with other settings ({k} {have.get(k)}, not {want[k]}): choose "
                         "another --out, or pass --force to remake it")  # fmt: skip


def save_png(image, path: Path, fields: dict, force: bool) -> None:
    """Write the PNG with one text chunk per setting (read back with PIL: Image.open(path).text), atomically
    and, without --force, never over a file (not even one another run wrote meanwhile)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in fields.items():
        info.add_text(key, str(value))  # tEXt, or iTXt when the value is not latin-1 (a unicode prompt)
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), force=force)


# --- txt2img, sample, upscale -----------------------------------------------------------------------
class Item(NamedTuple):
    """One image of a run."""

    index: int  # its place in the run: prompt after prompt (--prompts), seed after seed
    group: int  # which input (the prompt's number): a batch holds images of one input
    seed: int
    first: tuple  # the pipeline's positional arguments for one image (a prompt, a batch size of 1, ...)
    fields: dict  # its PNG text fields, but the seed
    path: Path


def is_job(args) -> bool:
    """A batch job (torchrun, or --skip-existing): --out is a folder, kept files are skipped, a manifest."""
    return distributed.launched() or args.skip_existing


def prepare(args, parser) -> tuple[Path, dict, list[Item]]:
    """Every check before any weight is read. -> (file, the pipeline's keyword arguments, the images)."""
    kind = KINDS[args.command]
    if not 1 <= args.num_images <= MAX_IMAGES:
        parser.error(f"-n/--num-images must be >= 1 and at most {MAX_IMAGES:,}, got {args.num_images}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    job = is_job(args)
    if args.skip_existing and args.force:
        parser.error("--skip-existing keeps the files already there, --force remakes them: choose one")
    out_file = args.out is not None and Path(args.out).suffix.lower() == ".png"
    if job and (args.out is None or out_file):
        how = "torchrun" if distributed.launched() else "--skip-existing"
        parser.error(f"a batch job ({how}) needs --out DIR/, a folder: it writes NAME-SEED.png there and "
                     "skips the images already written")  # fmt: skip
    prompts = read_prompts(args, parser) if args.command == "txt2img" else [None]
    if args.prompts is not None and out_file:
        parser.error("--prompts writes one file per prompt and seed: give --out a folder")
    if len(prompts) * args.num_images > MAX_IMAGES:
        parser.error(f"{len(prompts)} prompts x {args.num_images} seeds is over {MAX_IMAGES:,} images")
    if args.seed is not None and not 0 <= args.seed <= 2**64 - args.num_images:
        parser.error(
            f"--seed must be from 0 to 2**64 - 1 - (n - 1) = {2**64 - args.num_images}, got {args.seed}"
        )
    path = weights_path(args.weights, parser)
    try:  # the model on the meta device: its kind and sizes, no weight read
        m = build_empty(read_metadata(path))
    except ValueError as e:
        parser.error(str(e))
    if m.kind != kind:
        use = {v: k for k, v in KINDS.items()}[m.kind]
        parser.error(f"{path.name} holds a model of kind {m.kind!r}, not {kind!r}: use `ldm-mini {use}`")
    given = dict(num_inference_steps=args.steps, eta=args.eta, sampler=args.sampler, sigmas=args.sigmas)
    if args.command in GUIDED:
        given["guidance_scale"] = args.guidance
    if args.command in SIZED:
        given.update(height=args.height, width=args.width)
    try:  # the pipeline's own resolution and checks: the file's recommended settings, the trained size
        s = pipeline.settings(m, kind, **given)
    except ValueError as e:  # the same message, in the command line's names
        message = re.sub(r"\b(\w+)='([^']*)'", r"\1 \2", str(e))  # sampler='ddim' -> sampler ddim
        parser.error(re.sub(r"\b(\w+)\b", lambda w: FLAGS.get(w[1], w[1]), message))
    call = {k: s.get(k, s["options"].get(k)) for k in given}  # every setting explicit: the PNG records them
    fields = dict(model=kind, weights=args.weights or "shapes", steps=s["num_inference_steps"], eta=s["eta"],
                  sampler=s["sampler"])  # fmt: skip
    if args.sigmas is not None:
        fields["sigmas"] = args.sigmas
    if args.command in GUIDED:
        fields["guidance"] = s["guidance_scale"]
    # a batch job's default seed is fixed, so that the same command twice resumes it rather than starting anew
    seed = args.seed if args.seed is not None else 0 if job else secrets.randbelow(2**31)
    seeds = [seed + i for i in range(args.num_images)]
    items = []
    for group, prompt in enumerate(prompts):
        own = dict(fields)
        try:  # the pipeline's inputs, checked by the same code as a Python call's, on the meta-device model
            first, stem = inputs(args, path, m, s, own, parser, prompt)
        except ValueError as e:
            parser.error(str(e))
        if args.prompts is not None:  # two prompts may slug alike; the hash keeps their names apart
            stem = f"{stem}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"
        paths = output_paths(args.out, stem, seeds, args.force, parser, job)
        items += [Item(len(items) + i, group, seed, first, own, out) for i, (seed, out) in
                  enumerate(zip(seeds, paths, strict=True))]  # fmt: skip
    if job and not args.force:
        check_kept([i.path for i in items], [{**i.fields, "seed": i.seed} for i in items], parser)
    return path, call, items


def read_prompts(args, parser) -> list[str]:
    """The prompt, or --prompts FILE's: one a line, blank lines and # comments skipped, repeats made once."""
    if (args.prompt is None) == (args.prompts is None):
        parser.error("give a prompt or --prompts FILE (one prompt a line), not both" if args.prompt else
                     "give a prompt, or --prompts FILE (one prompt a line)")  # fmt: skip
    if args.prompts is None:
        return [args.prompt]
    try:
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"cannot read the prompts {args.prompts}: {e}")
    prompts = list(dict.fromkeys(t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")))
    if not prompts:
        parser.error(f"{args.prompts} holds no prompt (one a line; blank lines and # comments are skipped)")
    return prompts


def inputs(args, path: Path, m, s: dict, fields: dict, parser, prompt=None) -> tuple[tuple, str]:
    """The pipeline's positional arguments for one image, read from the command line's files and checked
    against the model (on the meta device: nothing is computed), and the output files' stem. Records the
    inputs in the PNG's text fields. txt2img: for `prompt`."""
    if args.command == "txt2img":
        if m.tokenizer is None:
            parser.error(f"{path.name} has no tokenizer (it takes token ids): use the Python API")
        fields["prompt"] = prompt
        return (prompt,), slug(prompt)
    if args.command == "sample":
        return (1,), "sample"  # batch size 1: one pipeline call per seed
    if args.command == "upscale":
        image = read_image(args.image, "RGB", parser)
        pipeline.low_res_image(image, unit=2 ** (len(m.unet.config.channel_mult) - 1))  # its size
        fields["image"] = args.image
        return (image,), f"{slug(Path(args.image).stem)}-x{m.downsample_factor}"
    if args.command == "class":
        m.encode_class([args.label])  # the label's range
        pipeline.unconditional_label(m, s["guidance_scale"])  # guidance needs the "no class" label
        fields["class"] = args.label
        return ([args.label],), f"class{args.label}"
    if args.command == "inpaint":
        image, mask = read_image(args.image, "RGB", parser), read_image(args.mask, "L", parser)
        pipeline.inpaint_inputs(m, image, mask)  # sizes
        fields.update(image=args.image, mask=args.mask)
        return (image, mask), f"{slug(Path(args.image).stem)}-inpainted"
    if args.command == "semantic":
        labels = read_image(args.segmentation, None, parser)
        if labels.mode not in ("L", "P", "I", "I;16"):
            parser.error(f"{args.segmentation} is a {labels.mode} image: a label map is a one-channel PNG "
                         "whose pixel values are the class ids (mode L, P or I)")  # fmt: skip
        segmentation = torch.from_numpy(np.asarray(labels).astype(np.int64))[None]  # (1, H, W)
        m.encode_segmentation(segmentation)  # the classes and the size
        fields["segmentation"] = args.segmentation
        return (segmentation,), slug(Path(args.segmentation).stem)
    layout = read_layout(args.layout, parser)
    m.layout_tokens([layout])  # every class and box
    fields["layout"] = json.dumps(layout)
    return (layout,), slug(Path(args.layout).stem)


def read_image(path: str, mode: str | None, parser):
    """A PIL image in `mode` (None: as stored), or exit 2 naming the file and what is wrong with it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL's warning at 89M pixels, its error at twice that
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
            return image if mode is None else image.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        parser.error(f"cannot read the image {path}: {e}")


def read_layout(path: str, parser) -> list:
    """A layout file: JSON, one image's objects, each [class, [x0, y0, w, h]] or [class, [x0, y0, w, h],
    is_group_of], box coordinates relative to the image in [0, 1] (conditioning.LayoutTokenizer)."""
    try:
        layout = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        parser.error(f"cannot read the layout {path}: {e}")
    if not isinstance(layout, list) or not all(isinstance(o, list) and len(o) in (2, 3) for o in layout):
        parser.error(f"{path}: a layout is a JSON list of objects [class, [x0, y0, w, h]] (optionally with "
                     "is_group_of as a third entry), e.g. [[5, [0.1, 0.2, 0.5, 0.4]]]")  # fmt: skip
    return [(o[0], tuple(o[1]) if isinstance(o[1], list) else o[1], *o[2:]) for o in layout]


def batches(items: list[Item], size: int) -> list[list[Item]]:
    """Consecutive images of one input, at most `size` in each. Fixed by the seeds alone, so an image's batch
    (and with it its pixels, when size > 1) is the same on any number of processes."""
    out: list[list[Item]] = []
    for item in items:
        if out and len(out[-1]) < size and out[-1][0].group == item.group:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def batched(m, command: str, first: tuple, b: int) -> tuple:
    """One image's positional arguments -> those of b images of that input: b prompts, labels or layouts, or a
    batch of b low-res images, images and masks, label maps (converted by the pipelines' own functions)."""
    if command == "sample":
        return (b,)
    if command == "upscale":
        low = pipeline.low_res_image(first[0], unit=2 ** (len(m.unet.config.channel_mult) - 1))
        return (low.repeat(b, 1, 1, 1),)  # (1, 3, h, w) -> (b, 3, h, w)
    if command == "inpaint":
        return tuple(x.repeat(b, 1, 1, 1) for x in pipeline.inpaint_inputs(m, *first))  # (b, 3 | 1, H, W)
    if command == "semantic":
        return (first[0].repeat(b, 1, 1),)  # (1, H, W) -> (b, H, W)
    if command == "class":
        return (first[0] * b,)  # [label] -> b labels
    return ([first[0]] * b,)  # txt2img: b prompts; layout: b layouts


def make_images(m, command: str, batch: list[Item], call: dict, parser) -> list:
    """One batch's PIL images. Each seed seeds its own generator, on the CPU (the same noise on every
    device); a list of generators draws image i from generator i alone, as a batch of one would."""
    generators = [torch.Generator().manual_seed(item.seed) for item in batch]
    seeds = f"seed {batch[0].seed}" if len(batch) == 1 else f"seeds {batch[0].seed}-{batch[-1].seed}"
    try:  # the pipelines check their arguments before computing anything
        if len(batch) == 1:  # exactly the call of a batch of one
            return PIPELINES[command](m, *batch[0].first, generator=generators[0], **call)  # tqdm bar
        first = batched(m, command, batch[0].first, len(batch))
        return PIPELINES[command](m, *first, generator=generators, **call)
    except ValueError as e:
        parser.error(str(e))
    except (MemoryError, RuntimeError) as e:  # out of memory, or a non-finite image the pipeline refused
        reason = (str(e).splitlines() or ["out of memory"])[0][:200]
        hint = "; choose a smaller image, --dtype bfloat16, or a GPU" if "memory" in reason.lower() else ""
        hint += "; or a smaller --batch-size" if hint and len(batch) > 1 else ""
        raise SystemExit(f"error: {reason}{hint} (nothing was written for {seeds})") from e


def write(image, item: Item, text: dict, args) -> Path | None:
    """Save one PNG -> its path, or None where a batch job finds that another process wrote it meanwhile."""
    out = item.path
    try:
        while True:
            try:
                save_png(image, out, text, args.force)
                return out
            except FileExistsError:
                if is_job(args):
                    return None  # kept, as any file already there
                if args.out is not None:
                    raise
                out = next_free(out)  # another run took the name meanwhile: the next number
    except OSError as e:  # a full disk, a size limit, or the name taken meanwhile: nothing half-written
        raise SystemExit(f"error: could not write {out}: {e.strerror or e}") from e


def sample_batches(args, parser, path: Path, device, call: dict, total: int, mine: list) -> list[int]:
    """Make this process's batches, write their PNGs -> the indices of the images written (not kept)."""
    rank = distributed.rank_and_world()[0]
    skip, where = is_job(args) and not args.force, f"[rank {rank}] " if distributed.launched() else ""
    m, written = None, []
    for batch in mine:
        wanted = [not (skip and item.path.exists()) for item in batch]  # written before: kept
        if not any(wanted):
            continue
        if m is None:  # not before there is work: a finished job's rerun reads no weights
            m = load(path, device=device, dtype=args.dtype, fast=False if args.no_fast else None)
        first, last = batch[0], batch[-1]
        if total > 1 and len(batch) == 1:
            print(f"{where}image {first.index + 1}/{total}, seed {first.seed}", file=sys.stderr)
        elif total > 1:
            print(f"{where}images {first.index + 1}-{last.index + 1}/{total}, seeds {first.seed}-{last.seed}",
                  file=sys.stderr)  # fmt: skip
        images = make_images(m, args.command, batch, call, parser)
        for item, image, want in zip(batch, images, wanted, strict=True):
            if not want:  # a batch is made whole, or an image's batch would change (and its pixels with it)
                continue
            size = f"{image.size[0]}x{image.size[1]}"
            text = {**item.fields, "seed": item.seed, "size": size, "software": "ldm_mini"}
            if len(batch) > 1:  # its pixels depend on the batch it was made in: remade with the same
                text["batch"] = f"seeds {first.seed}-{last.seed}"
            if (out := write(image, item, text, args)) is not None:
                print(f"wrote {out} ({size}, seed {item.seed})")
                written.append(item.index)
    return written


def set_threads(args, parser) -> None:
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def run_sampling(args, parser) -> int:
    set_threads(args, parser)
    path, call, items = prepare(args, parser)
    rank, world = distributed.rank_and_world()
    try:
        device = distributed.device_for_rank(pick_device(args.device, parser))
    except ValueError as e:  # more processes than GPUs
        parser.error(str(e))
    if distributed.launched():
        call["progress"] = rank == 0  # one tqdm bar over the steps, not one per process
    distributed.init(device)
    try:
        keep = is_job(args) and not args.force
        todo = [b for b in batches(items, args.batch_size) if not (keep and all(i.path.exists() for i in b))]
        distributed.barrier()  # every process lists what is left before any of them writes: one split
        mine = todo[rank::world]  # round robin: the k-th batch left to make on rank k % world
        written = distributed.gather(sample_batches(args, parser, path, device, call, len(items), mine))
    finally:
        distributed.close()
    if is_job(args) and rank == 0:  # after the gather: every process has written its images
        manifest = write_manifest(Path(args.out), items)
        made = sum(len(w) for w in written)
        on = f" by {world} processes" if world > 1 else ""
        print(f"{len(items)} images in {args.out}: {made} written{on}, {len(items) - made} already there; "
              f"manifest {manifest}")  # fmt: skip
    return 0


def write_manifest(folder: Path, items: list[Item]) -> Path:
    """folder/manifest.jsonl: one JSON line per image of this job, in its order, read back from the files
    (their text chunks and sha256); the lines of other jobs' images still in the folder are kept, first."""
    from PIL import Image

    lines = []
    for item in items:
        with Image.open(item.path) as png:
            text = png.text
        settings = {k: v for k, v in text.items() if k not in ("prompt", "seed", "software")}
        lines.append(dict(file=item.path.name, seed=item.seed, prompt=text.get("prompt"), settings=settings,
                          sha256=hashlib.sha256(item.path.read_bytes()).hexdigest()))  # fmt: skip
    path, ours = folder / MANIFEST, {line["file"] for line in lines}
    others = []
    if path.exists():
        for old in path.read_text().splitlines():
            try:
                line = json.loads(old)
            except json.JSONDecodeError:
                continue
            file = line.get("file") if isinstance(line, dict) else None
            if isinstance(file, str) and file not in ours and (folder / file).exists():
                others.append(line)
    text = "".join(json.dumps(line) + "\n" for line in others + lines)
    write_atomically(path, lambda tmp: tmp.write_text(text), force=True)
    return path


# --- info, verify -----------------------------------------------------------------------------------
def run_info(args, parser) -> int:
    from weights_tools.info import summary  # reads the header only

    path = weights_path(args.file, parser)
    try:
        if args.vocab:  # the tokenizer's vocabulary, one token per line (line number = id)
            vocab = read_metadata(path).get("tokenizer_vocab")
            if not vocab:
                parser.error(
                    f"{path.name} has no tokenizer vocabulary (kind {read_metadata(path).get('kind')!r})"
                )
            print(vocab, end="")
            return 0
        print(summary(path))
        if recommended := read_metadata(path).get("recommended"):
            print(f"{'recommended':13} {recommended}")
    except ValueError as e:
        parser.error(str(e))
    return 0


def run_verify(args, parser) -> int:
    from .verify import verify

    set_threads(args, parser)
    path = weights_path(args.file, parser)
    device = pick_device(args.device, parser)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not math.isfinite(args.guidance):
        parser.error(f"--guidance must be a finite number, got {args.guidance}")
    if args.size is not None and args.size < 1:
        parser.error(f"--size must be a positive number of pixels, got {args.size}")
    ref = args.reference
    if ref is not None and not Path(ref).is_dir() and not is_hub_id(ref):
        parser.error(f"--reference {ref}: give a diffusers pipeline folder or a hub id (owner/name)")
    try:
        stages = verify(path, reference=ref, device=str(device), steps=args.steps, seed=args.seed,
                        size=args.size, prompt=args.prompt, guidance=args.guidance)  # fmt: skip
    except RuntimeError as e:  # diffusers is not installed
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        parser.error(str(e))
    return 0 if all(s.passed for s in stages) else 1


# --- the parser -------------------------------------------------------------------------------------
def embedded_recommended() -> dict:
    """The embedded shapes model's recommended settings, read from its header (for --help)."""
    try:
        return recommended_of(read_metadata(EMBEDDED["shapes"])) or {}
    except (KeyError, ValueError):
        return {}


def add_sampling_options(p: argparse.ArgumentParser, command: str) -> None:
    defaults = pipeline.DEFAULTS[KINDS[command]]

    def default(name: str, file_name: str) -> str:  # the real default: the embedded model's, if it has one
        shapes = embedded_recommended() if command == "txt2img" else {}
        own = f" ({shapes[file_name]} for the embedded shapes model)" if file_name in shapes else ""
        return f"(default: the file's recommended setting{own}, else {defaults[name]})"

    p.add_argument("--weights", help="converted .safetensors file, embedded name or hub id (default: shapes)")
    p.add_argument("--steps", type=int, help="sampling steps, the pipelines' num_inference_steps "
                   + default("num_inference_steps", "steps"))  # fmt: skip
    if command in GUIDED:
        p.add_argument("--guidance", type=float, help="classifier-free guidance scale, 1: none "
                       + default("guidance_scale", "guidance"))  # fmt: skip
    p.add_argument("--eta", type=float, help="DDIM eta: 0 deterministic (default), 1 DDPM-like")
    p.add_argument("--sampler", choices=tuple(samplers.SAMPLERS), help="default: the file's, else ddim")
    p.add_argument("--sigmas", choices=samplers.SIGMA_SCHEDULES, help="the sigma schedule of a sigma-space "
                   "sampler (lms ... unipc): Karras et al.'s (rho = 7) or exponential (default: the "
                   "model's)")  # fmt: skip
    p.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i (default: "
                   "random; 0 in a batch job, so that the same command resumes it)")  # fmt: skip
    p.add_argument("-n", "--num-images", type=int, default=1, help="how many images (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="images per pipeline call (default 1). Faster "
                   "on a GPU; an image may then differ from its batch-of-one image by a level in a few "
                   "pixels (batched kernels round differently), but never with the number of "
                   "processes")  # fmt: skip
    p.add_argument("--skip-existing", action="store_true", help="a resumable batch job, as under torchrun: "
                   "--out DIR/ a folder, the images already there kept, the missing ones made, "
                   f"DIR/{MANIFEST} written; --seed defaults to 0")  # fmt: skip
    if command in SIZED:
        p.add_argument("--height", type=int, help="in pixels (default: the size the model was trained at)")
        p.add_argument("--width", type=int, help="in pixels (default: the size the model was trained at)")
    p.add_argument("--out", help=f"a folder or a .png file (default: {DEFAULT_OUT}/, where a taken name is "
                   "numbered on instead of refused)")  # fmt: skip
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="default auto")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--dtype", choices=tuple(DTYPES), help="cast the weights (default: as stored)")
    p.add_argument(
        "--no-fast",
        action="store_true",
        help="plain PyTorch layers: bit-identical to diffusers, slower on some CPUs",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    if command != "txt2img":
        p.set_defaults(prompts=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm-mini",
        description="Latent Diffusion Models from scratch: sample, upscale, inspect and verify weights.",
        epilog=f"example: {EXAMPLES['txt2img']}",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        jobs = BATCH_JOBS.replace("COMMAND", name) if name in KINDS else ""  # the sampling commands
        epilog = f"example:\n  {EXAMPLES[name]}{jobs}"
        p = sub.add_parser(name, help=text, description=text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        p.set_defaults(parser=p)  # errors name the command: "ldm-mini txt2img: error: ..."
        return p

    p = command("txt2img", "Generate images from a text prompt.")
    p.add_argument("prompt", nargs="?", help="the text prompt")
    p.add_argument("--prompts", metavar="FILE", help="instead of a prompt: a file of prompts, one a line "
                   "(# comments); each prompt with each seed, as SLUG-HASH-SEED.png")  # fmt: skip
    add_sampling_options(p, "txt2img")
    p = command("sample", "Generate unconditional samples (e.g. ldm-celebahq-256).")
    add_sampling_options(p, "sample")
    p = command("upscale", "Super-resolution of an image (ldm-super-resolution-4x-openimages: 4x).")
    p.add_argument("image", help="the low-resolution image (cut down to a multiple of 32 pixels)")
    add_sampling_options(p, "upscale")
    p = command("class", "Class-conditional samples (cin256-v2: an ImageNet class, guided by 'no class').")
    p.add_argument("label", type=int, help="the class id (ImageNet: 0 .. 999)")
    add_sampling_options(p, "class")
    p = command("inpaint", "Fill the masked part of an image (inpainting_big, as scripts/inpaint.py).")
    p.add_argument("image", help="the image (RGB; sides multiples of 32 for the released model)")
    p.add_argument("mask", help="the mask, the image's size: white (>= 128) = fill, black = keep")
    add_sampling_options(p, "inpaint")
    p = command("semantic", "An image from a segmentation map (semantic_synthesis256: landscapes).")
    p.add_argument("segmentation", help="a label map: one-channel PNG, pixel value = class id")
    add_sampling_options(p, "semantic")
    p = command("layout", "An image from a layout of boxes (layout2img-openimages256).")
    p.add_argument("layout", help="a JSON file: [[class, [x0, y0, w, h]], ...], coordinates in [0, 1]")
    add_sampling_options(p, "layout")

    p = command("info", "Show what a weight file holds: kind, configs, parameters, dtype, size.")
    p.add_argument("file", help="converted .safetensors file, embedded name or hub id")
    p.add_argument("--vocab", action="store_true", help="print the tokenizer's vocabulary, one token a line")
    p = command("verify", "Compare ldm_mini with diffusers on the same weights, stage by stage.")
    p.add_argument("file", help="converted .safetensors file, embedded name or hub id")
    p.add_argument("--reference", help="the diffusers folder or hub id the file was converted from "
                   "(default: diffusers models built from the file itself)")  # fmt: skip
    p.add_argument("--steps", type=int, default=5, help="DDIM steps of the full sample (default 5)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument(
        "--size", type=int, help="image side in pixels; upscale: the input's (default: the model's)"
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"txt2img prompt (default {DEFAULT_PROMPT!r})")
    p.add_argument("--guidance", type=float, default=3.0, help="txt2img guidance scale (default 3)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="default auto")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    return parser


def warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # a library warning (an unknown word, say) as one line, not a stack frame


def main(argv: list[str] | None = None) -> int:
    format_before, warnings.formatwarning = warnings.formatwarning, warning_line
    try:
        return run(argv)
    except KeyboardInterrupt:  # every file is written atomically: what was written is whole, the rest absent
        print(
            "interrupted: the images written so far are complete; nothing else was written", file=sys.stderr
        )
        return 130
    finally:
        warnings.formatwarning = format_before


def run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error(f"choose a command: {', '.join([*KINDS, 'info', 'verify'])} (see --help)")
    if args.command in KINDS:
        return run_sampling(args, args.parser)
    return {"info": run_info, "verify": run_verify}[args.command](args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
