"""The statistic that refuses a synthesized set that looks like noise, on the shipped models, printed as markdown.

    python scripts/synthesis_sanity.py [--images 256] [--steps 20]

Each row synthesizes the first shard of a set as `SynthesizedImageDataModule` does (the main job's sampler: DDIM-20;
DDPM-50 beside it; Euler for the flow model) and reports the fraction of saturated pixels (|x| > 0.99,
`saturated_fraction`), which the data module compares with `max_saturated_fraction` before training, and the mean
max-softmax confidence of the main job's teacher (assets/digits/classifier-resnet) against chance. The "wrong" rows
load the epsilon-predicting UNet with its scheduler's `prediction_type` overridden, the fault a wrong scheduler config
makes: the sampler then reads the UNet's epsilon as a clean image (`sample`) or as v (`v_prediction`).
"""

from __future__ import annotations

import argparse
import sys

import torch

from plugguide.datamodules.synthesized import MAX_SATURATED_FRACTION, saturated_fraction
from plugguide.metrics.reporting import markdown_table
from plugguide.models import load_classifier, load_scheduler, load_unet
from plugguide.models.seeding import image_seed
from plugguide.pipelines import GuidedDiffusionPipeline

TEACHER = "assets/digits/classifier-resnet"
# (model, sampler, steps or None for --steps, prediction_type override or None)
ROWS = [
    ("assets/digits/ddpm-uncond", "DDIMScheduler", None, None),
    ("assets/digits/ddpm-uncond", "DDPMScheduler", 50, None),
    ("assets/digits/flow-uncond", "FlowMatchEulerDiscreteScheduler", None, None),
    ("assets/digits/ddpm-uncond", "DDIMScheduler", None, "sample"),
    ("assets/digits/ddpm-uncond", "DDPMScheduler", 50, "sample"),
    ("assets/digits/ddpm-uncond", "DDIMScheduler", None, "v_prediction"),
    ("assets/digits/ddpm-uncond", "DDPMScheduler", 50, "v_prediction"),
]


@torch.inference_mode()
def first_shard(model: str, sampler: str, steps: int, prediction_type: str | None, images: int) -> torch.Tensor:
    """`images` images in [-1, 1], seeded per image as the data module seeds them (set seed 0)."""
    overrides = {"prediction_type": prediction_type} if prediction_type else None
    pipeline = GuidedDiffusionPipeline(load_unet(model), load_scheduler(model, sampler, overrides=overrides))
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(image_seed(0, i)) for i in range(images)]
    return (
        pipeline(batch_size=images, num_inference_steps=steps, generator=generators, output_type="pt").images * 2 - 1
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images of the first shard")
    parser.add_argument("--steps", type=int, default=20, help="steps of the rows that do not fix their own")
    args = parser.parse_args()
    teacher = load_classifier(TEACHER).eval()
    rows = []
    for model, sampler, steps, prediction_type in ROWS:
        images = first_shard(model, sampler, steps or args.steps, prediction_type, args.images)
        with torch.inference_mode():
            probabilities = teacher(images).softmax(1)
        saturated = saturated_fraction(images)
        trained = load_scheduler(model, sampler).config.get("prediction_type", "velocity (flow)")
        rows.append(
            [
                model.split("/")[-1],
                f"{sampler.removesuffix('Scheduler')}-{steps or args.steps}",
                trained,
                prediction_type or trained,
                f"{saturated:.3f}",
                f"{float(probabilities.max(1).values.mean()):.3f} (chance {1 / probabilities.shape[1]:.2f})",
                "refused" if saturated > MAX_SATURATED_FRACTION else "accepted",
            ]
        )
        print(f"done: {rows[-1]}", file=sys.stderr)
    print(
        f"`python scripts/synthesis_sanity.py --images {args.images} --steps {args.steps}`; "
        f"{args.images} images per row (seeds of set 0), "
        f"threshold `max_saturated_fraction` = {MAX_SATURATED_FRACTION}.\n"
    )
    headers = [
        "model",
        "sampler",
        "trained prediction_type",
        "sampled as",
        "saturated fraction (\\|x\\| > 0.99)",
        "teacher confidence",
        "check",
    ]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
