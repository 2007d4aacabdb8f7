"""The guide-distillation table of docs/guide_distillation.md: CFG (2 passes) vs TinyGuide vs FullGuide (1 pass).

For every base (the embedded digits model and its thick-stroke fine-tune), guidance number g and DDIM step
count, samples `num_per_class` images per class from the same seeds with
- CFG: `GuidedDiffusionPipeline(cfg_scale=g)`, two UNet passes per step (one doubled batch);
- TinyGuide / FullGuide: `GuideDistilledPipeline(guidance_scale=g)` with the guide halved to that step count
  (`<guides>/<tiny|full>/steps-<n>`; the 32-step guide is the CFG-distilled one). Guides are always the ones
  trained on the original base: on the fine-tuned base they are plugged in without retraining.
and reports the evaluator's guided accuracy, FID on evaluator features against the real images of that
base's data (original or thick digits), FLOPs per sampling step per image (`torch.utils.flop_counter`),
guide parameters as % of the UNet, and wall time per image.

    OMP_NUM_THREADS=1 python scripts/guide_table.py --workers 2 > runs/guide_table.md
    # re-measure some rows (e.g. after retraining a chain) and print the whole table from the merged JSON:
    OMP_NUM_THREADS=1 python scripts/guide_table.py --methods TinyGuide --steps 16 8 4 --update --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from diffusers import DDIMScheduler
from torch.utils.flop_counter import FlopCounterMode

from plugguide.datamodules.digits import DigitsDataModule
from plugguide.datamodules.transformed_digits import ThickDigitsDataModule
from plugguide.metrics.generation import GenerationMetrics
from plugguide.models.classifier import load_classifier
from plugguide.models.diffusion_model import load_scheduler, load_unet
from plugguide.models.guides import load_guide, predict_guided_noise
from plugguide.pipelines.guide_distilled import GuideDistilledPipeline
from plugguide.pipelines.guided_diffusion import GuidedDiffusionPipeline

BASES = {"original": DigitsDataModule, "fine-tuned (thick)": ThickDigitsDataModule}
METHODS = ("CFG", "TinyGuide", "FullGuide")


def real_images(datamodule_class) -> torch.Tensor:
    """All train + test images of the base's data, in [-1, 1], the FID reference."""
    datamodule = datamodule_class()
    datamodule.setup()
    splits = datamodule.load_splits()
    return torch.cat([datamodule.to_tensor(splits[name].with_format(None)["image"]) for name in ("train", "test")])


def step_flops(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def evaluate_base(name: str, args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)
    path, datamodule_class = args.original_base if name == "original" else args.finetuned_base, BASES[name]
    unet = load_unet(path).eval().requires_grad_(False)
    scheduler_config = load_scheduler(path, "DDIMScheduler").config
    evaluator = load_classifier(args.evaluator, "evaluator")
    metrics = GenerationMetrics(evaluator, evaluator.num_classes)
    metrics.update_real(real_images(datamodule_class))
    unet_params = sum(p.numel() for p in unet.parameters())
    labels = torch.arange(10).repeat_interleave(args.num_per_class)

    def generators():
        return [torch.Generator().manual_seed(args.seed + index) for index in range(len(labels))]

    probe = (torch.randn(1, 1, 16, 16), torch.tensor(500), torch.tensor([3]))
    cfg_pipeline = GuidedDiffusionPipeline(unet, DDIMScheduler.from_config(scheduler_config))
    cfg_flops = step_flops(lambda: cfg_pipeline.predict_noise(*probe, cfg_scale=4.0))
    rows = []
    for steps in args.steps:
        pipelines = {"CFG": (cfg_pipeline, None)} if "CFG" in args.methods else {}
        for method in [m for m in METHODS[1:] if m in args.methods]:
            guide_path = os.path.join(args.guides, method.removesuffix("Guide").lower(), f"steps-{steps}")
            if os.path.isdir(guide_path):
                guide = load_guide(guide_path, unet, "guides").eval()
                pipelines[method] = (GuideDistilledPipeline(unet, guide, DDIMScheduler.from_config(scheduler_config)), guide)
            else:
                print(f"[{name}] missing {guide_path}; {method} at {steps} steps left out", file=sys.stderr)
        for method, (pipeline, guide) in pipelines.items():
            pipeline.set_progress_bar_config(disable=True)
            if guide is None:
                flops, params = cfg_flops, 0.0
            else:
                flops = step_flops(lambda: predict_guided_noise(unet, guide, probe[0], probe[1], 4.0, probe[2]))
                params = 100.0 * sum(p.numel() for p in guide.parameters()) / unet_params
            for g in args.scales:
                kwargs = {"cfg_scale": g} if guide is None else {"guidance_scale": g}
                start = time.perf_counter()
                with torch.no_grad():
                    images = torch.cat([
                        pipeline(class_labels=labels[i : i + args.batch_size], generator=generators()[i : i + args.batch_size], num_inference_steps=steps, output_type="pt", **kwargs).images
                        for i in range(0, len(labels), args.batch_size)
                    ]) * 2 - 1
                seconds = time.perf_counter() - start
                metrics.reset()
                metrics.update_generated(images, labels)
                scores = metrics.compute()
                row = {
                    "base": name, "g": g, "steps": steps, "method": method, "guided_accuracy": scores["guided_accuracy"], "fid": scores["fid"],
                    "gflops_per_step": flops / 1e9, "flops_vs_cfg": flops / cfg_flops, "guide_params_pct": params, "ms_per_image": 1000 * seconds / len(labels),
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{len(rows)} rows; {10 * args.num_per_class} samples per row (seeds {args.seed}..{args.seed + 10 * args.num_per_class - 1}, same for every method); "
        "DDIM (eta = 0); FID on evaluator features against that base's real digits; FLOPs per step per image.",
        "",
        "| base | g | steps | method | guided acc. | FID | MFLOPs/step | vs CFG | guide params (% UNet) | ms/image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['base']} | {row['g']:g} | {row['steps']} | {row['method']} | {100 * row['guided_accuracy']:.1f} | {row['fid']:.2f} | "
            f"{1000 * row['gflops_per_step']:.1f} | {row['flops_vs_cfg']:.2f} | {row['guide_params_pct']:.1f} | {row['ms_per_image']:.1f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Targets of the issue, per base and g: accuracy gaps to CFG at the same steps and to 32-step CFG."""
    index = {(r["base"], r["g"], r["steps"], r["method"]): r for r in rows}
    lines = ["| base | g | method | acc. gap to CFG @32 (points) | @16 | @8 | @4 | gap @8 to CFG@32 |", "|---|---|---|---|---|---|---|---|"]
    for base in dict.fromkeys(r["base"] for r in rows):
        for g in dict.fromkeys(r["g"] for r in rows):
            for method in METHODS[1:]:
                gaps = []
                for steps in (32, 16, 8, 4):
                    row, cfg = index.get((base, g, steps, method)), index.get((base, g, steps, "CFG"))
                    gaps.append(f"{100 * (row['guided_accuracy'] - cfg['guided_accuracy']):+.1f}" if row and cfg else "n/a")
                row8, cfg32 = index.get((base, g, 8, method)), index.get((base, g, 32, "CFG"))
                vs32 = f"{100 * (row8['guided_accuracy'] - cfg32['guided_accuracy']):+.1f}" if row8 and cfg32 else "n/a"
                lines.append(f"| {base} | {g:g} | {method} | " + " | ".join(gaps) + f" | {vs32} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    parser.add_argument("--original-base", default="assets/digits/ddpm-cond")
    parser.add_argument("--finetuned-base", default="assets/digits/ddpm-cond-thick")
    parser.add_argument("--guides", default="runs/guides", help="root of the guide chains (<root>/<tiny|full>/steps-<n>)")
    parser.add_argument("--evaluator", default="assets/digits/evaluator")
    parser.add_argument("--scales", nargs="+", type=float, default=[2.0, 4.0, 6.0, 8.0])
    parser.add_argument("--steps", nargs="+", type=int, default=[32, 16, 8, 4])
    parser.add_argument("--num-per-class", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="one process per base (each single-threaded)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", default="runs/guide_table.json")
    parser.add_argument("--update", action="store_true", help="replace the measured rows in --json and print the merged table")
    args = parser.parse_args()
    if args.workers > 1 and len(args.bases) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(args.workers, len(args.bases))) as pool:
            rows = sum(pool.starmap(evaluate_base, [(name, args) for name in args.bases]), [])
    else:
        rows = sum((evaluate_base(name, args) for name in args.bases), [])
    if args.update and os.path.isfile(args.json):
        with open(args.json) as file:
            old = json.load(file)
        fresh = {(r["base"], r["g"], r["steps"], r["method"]): r for r in rows}
        rows = [fresh.pop((r["base"], r["g"], r["steps"], r["method"]), r) for r in old] + list(fresh.values())
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as file:
        json.dump(rows, file, indent=1)
    print(markdown(rows, args))
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
