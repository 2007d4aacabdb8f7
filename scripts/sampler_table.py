"""The same guidance across model families and samplers, on the digits default, printed as markdown.

    python scripts/sampler_table.py [--experts runs/ppap/version_0/experts] [--samples-per-class 50] [--output-dir runs/sampler_table]
                                    [--samplers DDPM-50 ...] [--methods unguided calibrated PPAP-5] [--classifier-scales 1 3 10 30]

Rows: unguided, calibrated off-the-shelf guidance (`CalibratedGuidance` on the ResNet, the paper's defaults) and
PPAP-5 experts (`--experts`, as `lightning fit -c configs/ppap.yaml` exports them), across DDPM-50, DDIM-25,
DPM-Solver++-20, Euler-Karras-25 and Heun/EDM-18 (Heun with EDM's Karras step sizes, 35 evaluations) on
`assets/digits/ddpm-uncond`, and flow-matching Euler-25 on `assets/digits/flow-uncond`. The method
"calibrated-edm" (EluCD's EDM Algorithm 2, which moves the sample by a fraction of its size, hence its own
`--edm-scales`), "calibrated-edm-continuous" (that schedule as a function of t on the usual x0_hat classifier and
score shift) and "calibrated-no-sine" (the paper's defaults with `sine_gamma` 0; it differs from "calibrated" on
DDPM-50 only, the one sampler that takes the sine term) can be added with `--methods`. Every entry is sampled with
the same seeds and scored under the protocol of `scripts/protocol.py` (independent evaluator; FID/KID in three
feature spaces with 95% intervals). Every guided row is swept over the scales and reported at the scale
`plugguide.metrics.reporting.BEST_SCALE_RULE` picks against the unguided row of the same sampler, so each sampler's
unguided row is always measured. ms per image is the wall time of sampling divided by the images, measured in this
run (compare rows of one run on an idle machine).
The PPAP experts were distilled on `ddpm-uncond`'s noise schedule; on the flow model they are routed by the flow
model's own timestep t = s T. Finished entries are kept in `<output-dir>/results.json`, so the script resumes; a grid of
each entry goes to `<output-dir>/grids/`.
"""

from __future__ import annotations

import argparse
import json
import os

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

from plugguide.metrics.reporting import best_scale, markdown_table
from plugguide.models import load_scheduler, load_unet
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import CalibratedEDMGuidance, CalibratedGuidance, ExpertGuidance

ASSETS = "assets/digits"
# name: (model, sampler class, scheduler config overrides, steps)
SAMPLERS = {
    "DDPM-50": ("ddpm-uncond", "DDPMScheduler", {}, 50),
    "DDIM-25": ("ddpm-uncond", "DDIMScheduler", {}, 25),
    "DPM-Solver++-20": ("ddpm-uncond", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, 20),
    "Euler-Karras-25": ("ddpm-uncond", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, 25),
    "Heun/EDM-18": ("ddpm-uncond", "HeunDiscreteScheduler", {"use_karras_sigmas": True}, 18),
    "flow-Euler-25": ("flow-uncond", "FlowMatchEulerDiscreteScheduler", {}, 25),
}
METHODS = ("unguided", "calibrated", "PPAP-5", "calibrated-edm", "calibrated-edm-continuous", "calibrated-no-sine")


def guidance_for(method: str, experts: str):
    if method == "calibrated":
        return CalibratedGuidance(f"{ASSETS}/classifier-resnet")
    if method == "calibrated-no-sine":  # the paper's defaults without the sine term (sine_gamma = 0)
        return CalibratedGuidance(f"{ASSETS}/classifier-resnet", sine_gamma=0.0)
    if method == "calibrated-edm":  # Algorithm 2 with the authors' ImageNet-64 settings
        return CalibratedEDMGuidance(f"{ASSETS}/classifier-resnet", softplus_beta=5.0, marginal_discount=0.0)
    if method == "calibrated-edm-continuous":  # the EDM schedule as a function of t, on x0_hat and the score shift
        return CalibratedGuidance(f"{ASSETS}/classifier-resnet", schedule="edm_continuous")
    if method == "PPAP-5":
        return ExpertGuidance(experts)
    return None


def write_table(results: dict, args, num_samples: int) -> str:
    """Writes `<output-dir>/table.md` and returns its text (after every entry, so a partial run keeps what it measured)."""
    rows, sweeps = [], []
    for sampler in args.samplers:
        unguided = results.get(f"{sampler}/unguided", {}).get("0.0")
        if unguided is None:
            continue
        for method in args.methods:
            sweep = results.get(f"{sampler}/{method}")
            if not sweep:
                continue
            if method == "unguided":
                scale, cell = "0.0", "-"
            else:
                scale, admissible = best_scale(sweep, unguided)
                cell = f"{float(scale):g}" + ("" if admissible else "*")
                sweeps.append(
                    [
                        sampler,
                        method,
                        ", ".join(
                            f"s={float(s):g}: {r['guided_accuracy']:.2f} / {r['fid_autoencoder']:.1f}"
                            for s, r in sweep.items()
                        ),
                    ]
                )
            row = sweep[scale]
            rows.append(
                [
                    sampler,
                    SAMPLERS[sampler][0],
                    method,
                    cell,
                    *quality_cells(row),
                    f"{1000 * row['seconds_per_image']:.1f}",
                ]
            )
    text = "\n".join(
        [
            describe(num_samples, "Samplers as named in each row (steps in the name)"),
            "A guided row's best scale is judged against the unguided row of its own sampler.",
            "",
            markdown_table(["sampler", "model", "method", "best scale", *QUALITY_HEADERS, "ms per image"], rows),
            "",
            "Sweep (guided accuracy / FID autoencoder at each scale):",
            "",
            markdown_table(["sampler", "method", "sweep"], sweeps),
        ]
    )
    path = os.path.join(args.output_dir, "table.md")
    with open(path + ".tmp", "w") as file:
        file.write(text + "\n")
    os.replace(path + ".tmp", path)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--experts", default="runs/ppap/version_0/experts", help="PPAP-5 experts (lightning fit -c configs/ppap.yaml)"
    )
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS[:3]), choices=METHODS)
    parser.add_argument(
        "--classifier-scales",
        type=float,
        nargs="+",
        default=[1.0, 3.0, 10.0, 30.0],
        help="classifier scales s (`classifier_scale`) swept by the score-shift methods",
    )
    parser.add_argument(
        "--edm-scales",
        type=float,
        nargs="+",
        default=[0.01, 0.03, 0.1, 0.3],
        help="sweep of calibrated-edm (a fraction of the sample's RMS per step)",
    )
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument(
        "--output-dir", default="runs/sampler_table", help="run folder: results.json, grids/, table.md"
    )
    add_page_arguments(parser, "sampler-table")
    args = parser.parse_args()
    if "PPAP-5" in args.methods and not os.path.isfile(os.path.join(args.experts, "experts.json")):
        parser.error(
            f"`--experts`={args.experts!r} holds no experts.json; train them with `lightning fit -c configs/ppap.yaml` or drop PPAP-5 from --methods."
        )
    args.methods = list(
        dict.fromkeys(["unguided", *args.methods])
    )  # every sampler's guided rows are judged against it
    labels, seeds = targets(args.samples_per_class)
    results_path = os.path.join(args.output_dir, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    if results.get("samples") not in (None, len(labels)):
        parser.error(
            f"{results_path} holds {results['samples']} samples per entry; use another --output-dir for {len(labels)}."
        )
    stale = [
        key for key, sweep in results.items() if key != "samples" and any("intervals" not in r for r in sweep.values())
    ]
    if stale:
        parser.error(
            f"{results_path} holds entries scored before scripts/protocol.py (e.g. {stale[0]!r}); use another --output-dir."
        )
    results["samples"] = len(labels)
    os.makedirs(args.output_dir, exist_ok=True)

    metrics = reference_metrics()
    for sampler in args.samplers:
        model, scheduler_name, overrides, steps = SAMPLERS[sampler]
        path = f"{ASSETS}/{model}"
        unet = load_unet(path)
        for method in args.methods:
            scales = (
                [0.0]
                if method == "unguided"
                else args.edm_scales
                if method == "calibrated-edm"
                else args.classifier_scales
            )
            key = f"{sampler}/{method}"
            done = results.setdefault(key, {})
            missing = [s for s in scales if str(s) not in done]
            if not missing:
                continue
            pipeline = GuidedDiffusionPipeline(
                unet, load_scheduler(path, scheduler_name, overrides=overrides), guidance_for(method, args.experts)
            )
            pipeline.set_progress_bar_config(disable=True)
            for scale in missing:
                done[str(scale)] = measure(
                    metrics,
                    pipeline_sampler(pipeline, num_inference_steps=steps, classifier_scale=scale),
                    labels,
                    seeds,
                    batch_size=args.batch_size,
                    grid_path=os.path.join(args.output_dir, "grids", f"{slug(key)}-s{scale:g}.png"),
                )
                with open(f"{results_path}.tmp", "w") as file:
                    json.dump(results, file, indent=1)
                os.replace(f"{results_path}.tmp", results_path)
                print(
                    key,
                    scale,
                    {k: round(v, 4) for k, v in done[str(scale)].items() if isinstance(v, float)},
                    flush=True,
                )
            write_table(results, args, len(labels))
    text = write_table(results, args, len(labels))
    if args.page:
        write_between_markers(args.page, args.marker, text)
    print(text)
    print(f"\nRaw results: {results_path}; grids: {args.output_dir}/grids/")


if __name__ == "__main__":
    main()
