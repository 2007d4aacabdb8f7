"""Why naive dense guidance does not fail on the digits: what the off-the-shelf models and the experts see in x_t.

    python scripts/dense_guidance_diagnostics.py [--images 180] [--timesteps 100 300 500 700 900]
                                                 [--segmentation-experts runs/ppap-segmentation/version_0/experts]
                                                 [--depth-experts runs/ppap-depth/version_0/experts]

On held-out real digits (the validation split) noised to x_t at each timestep, with the same noise for every model:
- agreement: the off-the-shelf model's prediction on x_t against its own prediction on the clean digit (the class
  for the classifier; pixel accuracy for the segmenter; map correlation for the depth stand-in), and the same for the
  PPAP experts (the expert of t);
- the guidance gradient d/dx_t log p(target | x_t) toward the clean digit's map, naive (the off-the-shelf model on
  x_t) and PPAP (the expert of t): its norm, the cosine between the two, and the cosine of each with the target's
  stroke pattern (+1 on the target's strokes, -1 elsewhere; for the depth map, minus its centred distances), i.e. how
  much of the gradient simply says "bright where the target has strokes".
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from plugguide.datamodules import DigitsDataModule
from plugguide.metrics.reporting import markdown_table
from plugguide.models import MultiExpertModel, load_off_the_shelf, load_scheduler
from plugguide.pipelines.guidance import ExpertGuidance, NaiveClassifierGuidance
from plugguide.pipelines.tasks import ClassificationTask, DenseRegressionTask, SegmentationTask

DIFFUSION_MODEL = "assets/digits/ddpm-uncond"


def stroke_pattern(maps: torch.Tensor) -> torch.Tensor:
    """+1 on a label map's strokes and -1 elsewhere; for a distance map, minus its centred values (near strokes high)."""
    if maps.is_floating_point():
        return -(maps - maps.flatten(1).mean(1).view(-1, 1, 1))
    return torch.where(maps != 0, 1.0, -1.0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=180)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    parser.add_argument("--segmentation-experts", default="runs/ppap-segmentation/version_0/experts")
    parser.add_argument("--depth-experts", default="runs/ppap-depth/version_0/experts")
    args = parser.parse_args()

    data = DigitsDataModule(batch_size=args.images)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    images = batch["image"]
    scheduler = DDPMScheduler.from_config(load_scheduler(DIFFUSION_MODEL, "DDPMScheduler").config)
    generator = torch.Generator().manual_seed(0)
    noises = {t: torch.randn(images.shape, generator=generator) for t in args.timesteps}
    models = [
        ("classifier", "assets/digits/classifier-resnet", None, ClassificationTask()),
        ("segmenter", "assets/digits/segmenter", args.segmentation_experts, SegmentationTask()),
        ("depth", "assets/digits/depth", args.depth_experts, DenseRegressionTask()),
    ]
    rows = []
    for name, path, experts_path, task in models:
        teacher = load_off_the_shelf(path).eval()
        experts = MultiExpertModel.from_pretrained(experts_path) if experts_path else None
        with torch.no_grad():
            clean = task.prediction(teacher(images))
        naive, ppap = (
            NaiveClassifierGuidance(teacher, task=task),
            ExpertGuidance(experts, task=task) if experts else None,
        )
        for t in args.timesteps:
            timesteps = torch.full((len(images),), t)
            x_t = scheduler.add_noise(images, noises[t], timesteps)
            with torch.no_grad():
                row = [name, str(t), f"{task.agreement(teacher(x_t), clean):.3f}"]
                row.append(f"{task.agreement(experts(x_t, timesteps), clean):.3f}" if experts else "-")
            if (
                experts is None
            ):  # a class target has no stroke pattern; the classifier row shows only what noise does to it
                rows.append(row + ["-"] * 4)
                continue
            naive_grad, ppap_grad = (
                naive.gradient(x_t, timesteps, x_t, clean),
                ppap.gradient(x_t, timesteps, x_t, clean),
            )
            pattern = stroke_pattern(clean)
            rows.append(
                row
                + [
                    f"{naive_grad.flatten(1).norm(dim=1).mean():.1f} / {ppap_grad.flatten(1).norm(dim=1).mean():.1f}",
                    f"{cosine(naive_grad, ppap_grad):.2f}",
                    f"{cosine(naive_grad, pattern):.2f}",
                    f"{cosine(ppap_grad, pattern):.2f}",
                ]
            )
    headers = [
        "model",
        "t",
        "agreement on x_t, off-the-shelf",
        "agreement, PPAP expert",
        "gradient norm, naive / PPAP",
        "cos(naive, PPAP)",
        "cos(naive, strokes)",
        "cos(PPAP, strokes)",
    ]
    print(f"{args.images} held-out digits (validation split), noised with the same noise for every model.\n")
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
