"""A/B timing that survives a shared machine: single-thread CPU time, the variants interleaved.

    python -m benchmarks.ab_cpu_time                                # diffusers, ldm_mini plain, ldm_mini fast
    python -m benchmarks.ab_cpu_time --before ../old-checkout --only text2im bert --reps 7

With 2 threads on a machine that others use, wall-clock times swing 2-4x at random (RESULTS.md). Here torch
runs one thread and each call is timed with time.process_time, which counts only the time this process ran;
the variants take turns call by call (the order rotating), so that a slower phase of the machine (memory
bandwidth, caches, clock) falls on all of them alike. Variants, all holding the SAME full-size random tensors
(bench_vs_diffusers' weights): diffusers 0.42.1, this checkout's plain layers, this checkout with
ldm_mini.fast's layers, and with --before the UNet / LDMBert of another checkout of ldm_mini (imported from
its folder as the package `ldm_before`, with its own fast layers if it has an ldm_mini/fast.py; its keys
are diffusers' names or this checkout's, whichever fits). Prints the median seconds and the ratios.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from .bench_vs_diffusers import build_ref, config, maxdiff, unet_case

CASES = ("text2im", "celebahq", "superres", "bert")


def import_before(folder: Path) -> types.ModuleType:
    """Another checkout's ldm_mini as the package `ldm_before` (its __init__ is not run: no hub, no CLI)."""
    package = types.ModuleType("ldm_before")
    package.__path__ = [str(folder / "ldm_mini")]
    sys.modules["ldm_before"] = package
    return package


def holding(make, state: dict) -> torch.nn.Module:
    """make() on the meta device, then `state`'s own tensors under diffusers' or ldm_mini's key names."""
    from ldm_mini.loading import from_diffusers_names

    with torch.device("meta"):
        model = make()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError:
        model.load_state_dict(from_diffusers_names(state), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def variants(case: str, before: Path | None):
    """{name: call()} for one case; every model holds the reference's tensors."""
    from ldm_mini import fast

    if case == "bert":
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

        bert_config = config("ldm-text2im-large-256/bert/config.json")
        ref = build_ref(lambda c: LDMBertModel(LDMBertConfig(**c)), bert_config, 12)
        state = {k.removeprefix("model."): v for k, v in ref.state_dict().items() if k.startswith("model.")}
        ids = torch.randint(0, 30522, (2, 77), generator=torch.Generator().manual_seed(2))
        inputs, call_ref = (ids,), lambda: ref(ids).last_hidden_state
        module, make = "bert", lambda m: m.LDMBert(m.LDMBertConfig())
    else:
        ref, _, inputs, _ = unet_case(case)
        state = ref.state_dict()
        call_ref = lambda: ref(*inputs).sample  # noqa: E731
        preset = {"text2im": "TEXT2IM_256", "celebahq": "CELEBAHQ_256", "superres": "SUPERRES_4X"}[case]
        module, make = "unet", lambda m: m.UNet(getattr(m, preset))
    ours = importlib.import_module(f"ldm_mini.{module}")
    calls = {"diffusers": call_ref}
    if before is not None:
        old = holding(lambda: make(importlib.import_module(f"ldm_before.{module}")), state)
        try:
            importlib.import_module("ldm_before.fast").enable(old)
        except ModuleNotFoundError:  # from before ldm_mini/fast.py: its fast paths are inside the model files
            pass
        calls["before"] = lambda: old(*inputs)
    plain = holding(lambda: make(ours), state)
    fast_model = fast.enable(holding(lambda: make(ours), state))
    calls["plain"], calls["fast"] = (lambda: plain(*inputs)), (lambda: fast_model(*inputs))
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ab_cpu_time", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--only", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--before", type=Path, help="another ldm_mini checkout (a folder holding ldm_mini/)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per variant (median)")
    args = parser.parse_args(argv)
    if args.before is not None:
        if not (args.before / "ldm_mini" / "unet.py").is_file():
            parser.error(f"--before {args.before}: no ldm_mini/unet.py there")
        import_before(args.before.resolve())
    torch.set_num_threads(1)
    print("| case | diffusers s | before s | plain s | fast s | before / fast | before / diffusers | "
          "fast / diffusers | plain / diffusers | max abs diff: plain, fast, before |")  # fmt: skip
    print("|---" * 10 + "|")
    for case in args.only:
        calls = variants(case, args.before)
        names = list(calls)
        with torch.no_grad():
            outs = {name: fn() for name, fn in calls.items()}  # the warm-up calls
            times = {name: [] for name in names}
            for rep in range(args.reps):
                for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate the order
                    t0 = time.process_time()
                    calls[name]()
                    times[name].append(time.process_time() - t0)
        s = dict.fromkeys(("diffusers", "before", "plain", "fast"), float("nan"))
        s.update({name: statistics.median(t) for name, t in times.items()})
        ratios = [s["before"] / s["fast"], s["before"] / s["diffusers"], s["fast"] / s["diffusers"],
                  s["plain"] / s["diffusers"]]  # fmt: skip
        diffs = [
            f"{maxdiff(outs[n], outs['diffusers']):.1e}" for n in ("plain", "fast", "before") if n in outs
        ]
        row = [case, *(f"{v:.3f}" for v in s.values()), *(f"{r:.3f}" for r in ratios), ", ".join(diffs)]
        print("| " + " | ".join(row) + " |", flush=True)
        del calls, outs
    return 0


if __name__ == "__main__":
    sys.exit(main())
