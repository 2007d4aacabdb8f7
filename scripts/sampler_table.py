"""The same guidance across model families and samplers, on the digits default, printed as markdown.

    python scripts/sampler_table.py [--experts runs/ppap/experts] [--samples-per-class 50] [--out runs/sampler_table]
                                    [--samplers DDPM-50 ...] [--methods unguided calibrated PPAP-5] [--scales 1 3 10 30]

Rows: unguided, calibrated off-the-shelf guidance (`CalibratedGuidance` on the ResNet, the paper's defaults) and
PPAP-5 experts (`--experts`, as `lightning fit -c configs/ppap.yaml` exports them), across DDPM-50, DDIM-25,
DPM-Solver++-20, Euler-Karras-25 and Heun/EDM-18 (Heun with EDM's Karras step sizes, 35 evaluations) on
`assets/digits/ddpm-uncond`, and flow-matching Euler-25 on `assets/digits/flow-uncond`. The method
"calibrated-edm" (EluCD's EDM Algorithm 2, which moves the sample by a fraction of its size, hence its own
`--edm-scales`) and "calibrated-edm-continuous" (that schedule as a function of t on the usual x0_hat classifier and
score shift) can be added with `--methods`. Every guided row is swept over the scales with the same seeds and
reported at its best scale (guided accuracy, then FID); every sample is scored by the independent evaluator
(`GenerationMetrics`: guided accuracy, FID on evaluator features vs the real test digits); ms per image is the
wall time of sampling divided by the images, measured in this run (compare rows of one run on an idle machine).
The PPAP experts were distilled on `ddpm-uncond`'s noise schedule; on the flow model they are routed by the flow
model's own timestep t = s T. Finished entries are kept in `<out>/results.json`, so the script resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from plugguide.datamodules import DigitsDataModule
from plugguide.metrics import GenerationMetrics
from plugguide.models import load_classifier, load_scheduler, load_unet
from plugguide.pipelines import GuidedDiffusionPipeline, sample_batch
from plugguide.pipelines.guidance import CalibratedGuidance, ExpertGuidance

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
METHODS = ("unguided", "calibrated", "PPAP-5", "calibrated-edm", "calibrated-edm-continuous")


def guidance_for(method: str, experts: str):
    if method == "calibrated":
        return CalibratedGuidance(f"{ASSETS}/classifier-resnet")
    if method == "calibrated-edm":  # Algorithm 2 with the authors' ImageNet-64 settings
        return CalibratedGuidance(f"{ASSETS}/classifier-resnet", schedule="edm", softplus_beta=5.0, marginal_discount=0.0)
    if method == "calibrated-edm-continuous":  # the EDM schedule as a function of t, on x0_hat and the score shift
        return CalibratedGuidance(f"{ASSETS}/classifier-resnet", schedule="edm_continuous")
    if method == "PPAP-5":
        return ExpertGuidance(experts)
    return None


def evaluate(pipeline: GuidedDiffusionPipeline, scale: float, labels: torch.Tensor, real: torch.Tensor, evaluator, steps: int, batch_size: int) -> dict:
    """Samples one image per label (seed = its index) and scores them; ms per image is the sampling wall time."""
    metrics = GenerationMetrics(evaluator, 10)
    metrics.update_real(real)
    seconds = 0.0
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        started = time.perf_counter()
        images = sample_batch(pipeline, {"label": chunk, "seed": torch.arange(start, start + len(chunk))}, num_inference_steps=steps, guidance_scale=scale)
        seconds += time.perf_counter() - started
        metrics.update_generated(images, chunk)
    return metrics.compute() | {"ms_per_image": 1000 * seconds / len(labels)}


def best_scale(sweep: dict) -> str:
    return max(sweep, key=lambda s: (sweep[s]["guided_accuracy"], -sweep[s]["fid"]))


def write_table(results: dict, args, num_samples: int, num_real: int) -> None:
    """Prints the table and writes `<out>/table.md` (after every entry, so a partial run keeps what it measured)."""
    lines = [
        f"{num_samples} samples ({args.samples_per_class} per class, seeds 0..{num_samples - 1}) per entry, scored by the independent evaluator "
        f"(assets/digits/evaluator); FID on evaluator features vs the {num_real} real test digits; guided rows at their best scale "
        "(guided accuracy, then FID) of the sweep below.\n",
        "| sampler | model | method | best scale | guided accuracy | FID | ms per image |",
        "|---|---|---|---|---|---|---|",
    ]
    sweeps = []
    for sampler in args.samplers:
        for method in args.methods:
            sweep = results.get(f"{sampler}/{method}")
            if not sweep:
                continue
            best = best_scale(sweep) if method != "unguided" else "0.0"
            row = sweep[best]
            scale = "-" if method == "unguided" else f"{float(best):g}"
            lines.append(f"| {sampler} | {SAMPLERS[sampler][0]} | {method} | {scale} | {row['guided_accuracy']:.3f} | {row['fid']:.2f} | {row['ms_per_image']:.1f} |")
            if method != "unguided":
                sweeps.append(f"| {sampler} | {method} | " + ", ".join(f"s={float(s):g}: {r['guided_accuracy']:.2f} / {r['fid']:.1f}" for s, r in sweep.items()) + " |")
    lines += ["\nSweep (guided accuracy / FID at each scale):\n", "| sampler | method | sweep |", "|---|---|---|", *sweeps]
    with open(os.path.join(args.out, "table.md"), "w") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", default="runs/ppap/experts", help="PPAP-5 experts (lightning fit -c configs/ppap.yaml)")
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS[:3]), choices=METHODS)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 10.0, 30.0], help="sweep of the score-shift methods")
    parser.add_argument("--edm-scales", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3], help="sweep of calibrated-edm (a fraction of the sample's RMS per step)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", default="runs/sampler_table")
    args = parser.parse_args()
    if "PPAP-5" in args.methods and not os.path.isfile(os.path.join(args.experts, "experts.json")):
        parser.error(f"`--experts`={args.experts!r} holds no experts.json; train them with `lightning fit -c configs/ppap.yaml` or drop PPAP-5 from --methods.")

    data = DigitsDataModule(batch_size=1000)
    data.setup("test")
    real = next(iter(data.test_dataloader()))["image"]
    evaluator = load_classifier(f"{ASSETS}/evaluator")
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    if results.get("samples") not in (None, len(labels)):
        parser.error(f"{results_path} holds {results['samples']} samples per entry; use another --out for {len(labels)}.")
    results["samples"] = len(labels)

    for sampler in args.samplers:
        model, scheduler_name, overrides, steps = SAMPLERS[sampler]
        path = f"{ASSETS}/{model}"
        unet = load_unet(path)
        for method in args.methods:
            scales = [0.0] if method == "unguided" else args.edm_scales if method == "calibrated-edm" else args.scales
            done = results.setdefault(f"{sampler}/{method}", {})
            missing = [s for s in scales if str(s) not in done]
            if not missing:
                continue
            pipeline = GuidedDiffusionPipeline(unet, load_scheduler(path, scheduler_name, overrides=overrides), guidance_for(method, args.experts))
            pipeline.set_progress_bar_config(disable=True)
            for scale in missing:
                done[str(scale)] = evaluate(pipeline, scale, labels, real, evaluator, steps, args.batch_size)
                with open(f"{results_path}.tmp", "w") as file:
                    json.dump(results, file, indent=1)
                os.replace(f"{results_path}.tmp", results_path)
                print(f"{sampler} / {method} / s={scale:g}: {done[str(scale)]}", flush=True)
            write_table(results, args, len(labels), len(real))
    write_table(results, args, len(labels), len(real))
    print(f"\nRaw numbers: {results_path}")


if __name__ == "__main__":
    main()
