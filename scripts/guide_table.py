"""The guide-distillation table of docs/results/guide_distillation.md: CFG (2 passes) vs TinyGuide vs FullGuide (1 pass).

    python scripts/guide_table.py [--samples-per-class 50] [--guidance-scales 3 5 7 9] [--steps 32 16 8 4]
                                  [--guides runs/guides] [--spacing leading|trailing]

For every base (the embedded digits model and its thick-stroke fine-tune), guidance scale g (diffusers'
`guidance_scale`: `eps(null) + g (eps(c) - eps(null))`, 1 = off) and DDIM step count, samples the same seeds with
- CFG: `GuidedDiffusionPipeline(guidance_scale=g)`, two UNet passes per step (one doubled batch);
- TinyGuide / FullGuide: `GuideDistilledPipeline(guidance_scale=g)` with the guide halved to that step count
  (`<guides>/<tiny|full>/steps-<n>`; the 32-step guide is the CFG-distilled one). Guides are always the ones
  trained on the original base: on the fine-tuned base they are plugged in without retraining.
Missing guide chains are trained first, with the commands of docs/guide_distillation.md. Rows are scored under
the protocol of `scripts/protocol.py` (the reference set is that base's own test digits), plus FLOPs per sampling step
per image (`torch.utils.flop_counter`), guide parameters as % of the UNet, and sampling time per image (on a busy
machine only the ratios mean something). Raw results go to `<output-dir>/results.json`, grids to `<output-dir>/grids/`.
`--spacing trailing` halves and samples on diffusers' "trailing" timesteps (every step count starts at t = T - 1)
instead of the default "leading" ones, with its own chains under `<guides>-trailing`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
from diffusers import DDIMScheduler
from protocol import describe, measure, pipeline_sampler, reference_metrics, targets
from results_page import add_page_arguments, publish_table
from torch.utils.flop_counter import FlopCounterMode

from plugguide.cli import main as lightning
from plugguide.datamodules import DigitsDataModule, ThickDigitsDataModule
from plugguide.metrics.reporting import estimate, markdown_table
from plugguide.models import load_guide, load_scheduler, load_unet, predict_guided_noise, sampler_on_grid
from plugguide.pipelines import GuidedDiffusionPipeline, GuideDistilledPipeline

BASES = {
    "original": ("assets/digits/ddpm-cond", DigitsDataModule),
    "fine-tuned (thick)": ("assets/digits/ddpm-cond-thick", ThickDigitsDataModule),
}
METHODS = ("CFG", "TinyGuide", "FullGuide")
# The chains of docs/guide_distillation.md: CFG distillation to 32 steps, then three halving stages.
CHAINS = {
    "tiny": {"distillation": [], "halving": []},
    "full": {
        "distillation": [
            "--model.init_args.guide",
            "plugguide.models.guides.FullGuide",
            "--model.init_args.optimizer.init_args.lr",
            "0.0005",
        ],
        "halving": ["--model.init_args.guide_name", "full", "--model.init_args.optimizer.init_args.lr", "0.0002"],
    },
}


def train_chain(guides: str, name: str, spacing: str = "leading", leading_guides: str | None = None) -> None:
    """Trains the missing stages of a guide chain (32 -> 16 -> 8 -> 4 DDIM steps) into `guides/<name>/steps-<n>`.

    The halving stages take the student's timesteps with `spacing`; the 32-step CFG-distilled guide knows no spacing,
    so a "trailing" chain starts from the leading chain's (`leading_guides`), trained there first where missing.
    """
    first = os.path.join(guides, name, "steps-32")
    if spacing != "leading" and not os.path.isdir(first):
        leading_first = os.path.join(leading_guides, name, "steps-32")
        if not os.path.isdir(leading_first):
            train_distilled_guide(leading_guides, name)
        shutil.copytree(leading_first, first)
    if not os.path.isdir(first):
        train_distilled_guide(guides, name)
    spacing_args = (
        [] if spacing == "leading" else [f"--model.init_args.scheduler_config={{timestep_spacing: {spacing}}}"]
    )
    for teacher, student in ((32, 16), (16, 8), (8, 4)):
        if not os.path.isdir(os.path.join(guides, name, f"steps-{student}")):
            lightning(
                [
                    "fit",
                    "-c",
                    "configs/halving/base.yaml",
                    "-c",
                    f"configs/halving/{teacher}to{student}.yaml",
                    *CHAINS[name]["halving"],
                    *spacing_args,
                    f"--model.init_args.guide_root={guides}",
                    f"--trainer.default_root_dir=runs/halving-{spacing}/{name}/{teacher}to{student}",
                    "--trainer.callbacks=[]",
                    *quiet_export(guides),
                ]
            )


def quiet_export(guides: str) -> list[str]:
    """Overrides that export a stage's guide under `guides` and turn the progress bar off."""
    return [
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks+=plugguide.callbacks.ExportPretrained",
        f"--trainer.callbacks.directory={os.path.abspath(guides)}",
    ]


def train_distilled_guide(guides: str, name: str) -> None:
    """The chain's first stage, CFG distillation to a 32-step guide, exported to `guides/<name>/steps-32`."""
    lightning(
        [
            "fit",
            "-c",
            "configs/guide_distillation.yaml",
            *CHAINS[name]["distillation"],
            "--trainer.callbacks=[]",
            *quiet_export(guides),
        ]
    )


def gap_table(results: dict, args: argparse.Namespace) -> list[str]:
    """Guided accuracy of each guide minus CFG's (points) at the same step count, and the guide's at the fewest steps
    minus CFG's at the most: the targets of docs/results/guide_distillation.md."""
    if "CFG" not in args.methods:
        return []

    def accuracy(base, g, steps, method):
        return 100 * results[f"{base} | g={g:g} | {steps} steps | {method}"]["guided_accuracy"]

    fewest, most = min(args.steps), max(args.steps)
    rows = [
        [
            base,
            f"{g:g}",
            method,
            *(f"{accuracy(base, g, n, method) - accuracy(base, g, n, 'CFG'):+.1f}" for n in args.steps),
            f"{accuracy(base, g, fewest, method) - accuracy(base, g, most, 'CFG'):+.1f}",
        ]
        for base in args.bases
        for g in args.guidance_scales
        for method in args.methods
        if method != "CFG"
    ]
    headers = ["base", "g", "guide", *(f"vs CFG, {n} steps" for n in args.steps), f"{fewest} steps vs CFG at {most}"]
    return [
        "",
        "Guided accuracy of each guide minus CFG's, in points (1 point = 5 of 500 samples):",
        "",
        markdown_table(headers, rows),
    ]


def step_flops(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    parser.add_argument(
        "--guides", default="runs/guides", help="root of the guide chains (<root>/<tiny|full>/steps-<n>)"
    )
    parser.add_argument(
        "--guidance-scales",
        nargs="+",
        type=float,
        default=[3.0, 5.0, 7.0, 9.0],
        help="classifier-free guidance scales g, as diffusers' guidance_scale (1 = off)",
    )
    parser.add_argument("--steps", nargs="+", type=int, default=[32, 16, 8, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--spacing",
        default="leading",
        choices=["leading", "trailing"],
        help="DDIM timestep spacing of the halving stages and of sampling; trailing chains go to <guides>-trailing",
    )
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--output-dir", default="runs/guide_table", help="run folder: results.json, grids/, table.md")
    add_page_arguments(parser, "guide-table")
    args = parser.parse_args()
    guides = args.guides if args.spacing == "leading" else f"{args.guides}-{args.spacing}"
    for method in args.methods:
        if method != "CFG":
            train_chain(guides, method.removesuffix("Guide").lower(), args.spacing, args.guides)

    labels, seeds = targets(args.samples_per_class)
    results_path = os.path.join(args.output_dir, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    rows, grids = [], {}
    for base in args.bases:
        path, datamodule_class = BASES[base]
        unet = load_unet(path).eval().requires_grad_(False)
        spacing = {} if args.spacing == "leading" else {"timestep_spacing": args.spacing}
        scheduler_config = load_scheduler(path, "DDIMScheduler", overrides=spacing).config
        metrics = reference_metrics(datamodule_class())
        unet_params = sum(p.numel() for p in unet.parameters())
        probe = (torch.randn(1, 1, 16, 16), torch.tensor(500), torch.tensor([3]))
        cfg_pipeline = GuidedDiffusionPipeline(unet, DDIMScheduler.from_config(scheduler_config))
        cfg_flops = step_flops(lambda: cfg_pipeline.predict_output(*probe, cfg_weight=4.0))
        for steps in args.steps:
            chain_guides = {
                method: load_guide(
                    os.path.join(guides, method.removesuffix("Guide").lower(), f"steps-{steps}"), unet, "guides"
                ).eval()
                for method in args.methods
                if method != "CFG"
            }
            # A halved guide samples on the timesteps it was halved on; CFG samples on the same ones.
            grid = next((guide.timesteps for guide in chain_guides.values() if guide.timesteps), None)
            grids[steps] = grid
            for method in args.methods:
                if method == "CFG":
                    sampler = sampler_on_grid(DDIMScheduler.from_config(scheduler_config), grid)
                    pipeline, flops, params = GuidedDiffusionPipeline(unet, sampler), cfg_flops, 0.0
                else:
                    guide = chain_guides[method]
                    pipeline = GuideDistilledPipeline(unet, guide, DDIMScheduler.from_config(scheduler_config))
                    flops = step_flops(lambda: predict_guided_noise(unet, guide, probe[0], probe[1], 4.0, probe[2]))
                    params = 100.0 * sum(p.numel() for p in guide.parameters()) / unet_params
                pipeline.set_progress_bar_config(disable=True)
                for g in args.guidance_scales:
                    key = f"{base} | g={g:g} | {steps} steps | {method}"
                    if key not in results:
                        results[key] = measure(
                            metrics,
                            pipeline_sampler(pipeline, num_inference_steps=steps, guidance_scale=g),
                            labels,
                            seeds,
                            grid_path=os.path.join(
                                args.output_dir, "grids", f"{base.split()[0]}-g{g:g}-{steps}-{method}.png"
                            ),
                        )
                        os.makedirs(args.output_dir, exist_ok=True)
                        with open(results_path + ".tmp", "w") as file:
                            json.dump(results, file, indent=1)
                        os.replace(results_path + ".tmp", results_path)
                        print(
                            key, {k: round(v, 4) for k, v in results[key].items() if isinstance(v, float)}, flush=True
                        )
                    r = results[key]
                    rows.append(
                        [
                            base,
                            f"{g:g}",
                            steps,
                            method,
                            estimate(r, "guided_accuracy", 3),
                            estimate(r, "fid_autoencoder"),
                            estimate(r, "fid_pixels"),
                            estimate(r, "fid_evaluator"),
                            f"{flops / 1e6:.1f}",
                            f"{flops / cfg_flops:.2f}",
                            f"{params:.1f}",
                            f"{1000 * r['seconds_per_image']:.1f}",
                        ]
                    )
    text = "\n".join(
        [
            describe(len(labels), f"DDIM (eta = 0, {args.spacing} timesteps)")
            + " The reference set of each base is its own test digits (thick strokes for the fine-tuned base)."
            + "".join(
                f" At {steps} steps every method samples the halved guides' timesteps {', '.join(map(str, grid))}."
                for steps, grid in grids.items()
                if grid
            ),
            "",
            markdown_table(
                [
                    "base",
                    "g",
                    "steps",
                    "method",
                    "guided accuracy",
                    "FID autoencoder",
                    "FID pixels",
                    "FID evaluator",
                    "MFLOPs/step",
                    "vs CFG",
                    "guide params (% UNet)",
                    "ms/image",
                ],
                rows,
            ),
            *gap_table(results, args),
        ]
    )
    publish_table(text, args.output_dir, args.page, args.marker)
    print(text)


if __name__ == "__main__":
    main()
