"""Guidance through diffusers' own pipeline (`guided`) beside the project's pipeline, on the same work, as markdown.

    python scripts/stock_pipeline_table.py [--experts runs/ppap/version_0/experts] [--samples-per-class 50] [--classifier-scale 3]
                                           [--output-dir runs/stock_pipeline_table] [--page docs/results/stock_pipelines.md]

Rows: unguided, calibrated off-the-shelf guidance (`CalibratedGuidance` on the shipped ResNet, the paper's defaults)
and, with `--experts`, PPAP-5 experts, each sampled twice on `assets/digits/ddpm-uncond` with DDIM-25: by the stock
`diffusers.DDIMPipeline` inside `with guided(pipe, guidance, classifier_scale, targets)`, and by
`GuidedDiffusionPipeline` with the same guidance and scale. Every row has the same seeds (sample i seeded with i, one
generator per sample) and is scored under the protocol of `scripts/protocol.py` (independent evaluator; FID/KID in
three feature spaces with 95% intervals). "stock vs project" is the largest pixel difference between the two pipelines'
samples of a method. Euler-25 has no row: no stock diffusers pipeline samples an unconditional pixel-space UNet with a
sigma-space sampler (`DDIMPipeline` converts any scheduler to DDIM and passes it `eta`; `DDPMPipeline` neither scales
the initial noise by `init_noise_sigma` nor the input by `scale_model_input`); `guided` runs Euler inside the pipelines
that do (Stable Diffusion, SDXL, IF; tests/test_guided_stock_pipelines.py). Finished rows are kept in
`<output-dir>/results.json`, so the script resumes; `--page` rewrites the table between its markers.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from diffusers import DDIMPipeline
from protocol import (
    QUALITY_HEADERS,
    describe,
    measure,
    pipeline_sampler,
    quality_cells,
    reference_metrics,
    slug,
    targets,
)
from results_page import add_page_arguments, write_between_markers

from plugguide.metrics.reporting import markdown_table
from plugguide.models.seeding import seeded_generators
from plugguide.pipelines import GuidedDiffusionPipeline, guided
from plugguide.pipelines.guidance import CalibratedGuidance, ExpertGuidance

MODEL = "assets/digits/ddpm-uncond"
CLASSIFIER = "assets/digits/classifier-resnet"
STEPS = 25
PIPELINES = ("stock DDIMPipeline + guided", "GuidedDiffusionPipeline")


def stock_sampler(pipe: DDIMPipeline, guidance, scale: float):
    """sample(labels, seeds) -> images in [-1, 1] by the stock pipeline, guided toward `labels` inside `guided`."""

    def sample(labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        generators = seeded_generators(seeds, pipe.unet.device)
        if guidance is None:
            images = pipe(
                batch_size=len(labels), generator=generators, num_inference_steps=STEPS, output_type="np"
            ).images
        else:
            with guided(pipe, guidance, classifier_scale=scale, targets=labels):
                images = pipe(
                    batch_size=len(labels), generator=generators, num_inference_steps=STEPS, output_type="np"
                ).images
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2) * 2 - 1

    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--experts",
        default=None,
        help="PPAP-5 experts (the `experts/` folder of `lightning fit -c configs/ppap.yaml`); no PPAP rows without",
    )
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument(
        "--classifier-scale",
        type=float,
        default=3.0,
        help="classifier scale s (`classifier_scale`) of every guided row (the sampler table's best DDIM-25 scale)",
    )
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument(
        "--output-dir", default="runs/stock_pipeline_table", help="run folder: results.json, samples, grids/"
    )
    add_page_arguments(parser, "stock-pipeline-table")
    args = parser.parse_args()
    if args.experts is not None and not os.path.isfile(os.path.join(args.experts, "experts.json")):
        parser.error(
            f"`--experts`={args.experts!r} holds no experts.json; train them with `lightning fit -c "
            f"configs/ppap.yaml`."
        )
    methods = {"unguided": None, "calibrated": CalibratedGuidance(CLASSIFIER)} | (
        {"PPAP-5": ExpertGuidance(args.experts)} if args.experts else {}
    )
    labels, seeds = targets(args.samples_per_class)
    results_path = os.path.join(args.output_dir, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    if results.get("samples") not in (None, len(labels)) or results.get("scale") not in (None, args.classifier_scale):
        parser.error(
            f"{results_path} holds {results['samples']} samples at scale {results['scale']}; use another --output-dir."
        )
    results |= {"samples": len(labels), "scale": args.classifier_scale}
    os.makedirs(args.output_dir, exist_ok=True)

    metrics = reference_metrics()
    stock = DDIMPipeline.from_pretrained(MODEL)
    stock.set_progress_bar_config(disable=True)
    samples = {}
    for method, guidance in methods.items():
        scale = 0.0 if guidance is None else args.classifier_scale
        project = GuidedDiffusionPipeline(stock.unet, stock.scheduler, guidance)
        project.set_progress_bar_config(disable=True)
        samplers = {
            PIPELINES[0]: stock_sampler(stock, guidance, scale),
            PIPELINES[1]: pipeline_sampler(project, num_inference_steps=STEPS, classifier_scale=scale),
        }
        for pipeline, sample in samplers.items():
            key = f"{method}/{pipeline}"
            samples_path = os.path.join(args.output_dir, f"{slug(key)}.pt")
            if key in results and os.path.isfile(samples_path):
                samples[key] = torch.load(samples_path)
                continue

            def keep(images: torch.Tensor, key: str = key) -> dict:
                samples[key] = images
                return {}

            grid = os.path.join(args.output_dir, "grids", f"{slug(key)}.png")
            results[key] = measure(
                metrics, sample, labels, seeds, batch_size=args.batch_size, grid_path=grid, on_images=keep
            )
            torch.save(samples[key], samples_path)
            with open(f"{results_path}.tmp", "w") as file:
                json.dump(results, file, indent=1)
            os.replace(f"{results_path}.tmp", results_path)
            print(key, {k: round(v, 4) for k, v in results[key].items() if isinstance(v, float)}, flush=True)

    rows = []
    for method in methods:
        difference = (samples[f"{method}/{PIPELINES[0]}"] - samples[f"{method}/{PIPELINES[1]}"]).abs().max().item()
        for pipeline in PIPELINES:
            row = results[f"{method}/{pipeline}"]
            cell = "-" if method == "unguided" else f"{args.classifier_scale:g}"
            rows.append(
                [
                    "DDIM-25",
                    pipeline,
                    method,
                    cell,
                    *quality_cells(row),
                    f"{difference:.1e}",
                ]
            )
    text = "\n".join(
        [
            describe(len(labels), f"DDIM-25 on {MODEL}"),
            f"Command: `python scripts/stock_pipeline_table.py --samples-per-class {args.samples_per_class} --classifier-scale "
            f"{args.classifier_scale:g}"
            + (f" --experts {args.experts}" if args.experts else "")
            + (f" --page {args.page}`" if args.page else "`")
            + " (time per image: `python benchmarks/stock_pipelines.py` on an idle machine).",
            "",
            markdown_table(
                [
                    "sampler",
                    "pipeline",
                    "method",
                    "classifier_scale",
                    *QUALITY_HEADERS,
                    "stock vs project: max pixel difference",
                ],
                rows,
            ),
        ]
    )
    if args.page:
        write_between_markers(args.page, args.marker, text)
    print(text)


if __name__ == "__main__":
    main()
