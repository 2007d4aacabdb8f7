"""Does a guide's gradient move the independent evaluator, or only the guide? (why DeiT guides worse)

    python scripts/guide_transfer.py [--guides assets/digits/classifier-resnet assets/digits/classifier-deit]
                                     [--timesteps 0 300 500 700] [--steps 0.05 0.1 0.2]

Hypothesis: a guide steers samples toward what an independent judge sees as the target only as far as its input
gradient is a semantic direction rather than an adversarial one; a guide whose gradient raises its own
log p(target) but not the evaluator's guides worse at any scale. Test, on the 180 held-out digits (validation
split): noise each to x_t (the same noise for every guide), form x0_hat with the frozen UNet, clipped, as guidance
on x0_hat sees it, pick a target class other than the digit's (label + 1 + i mod 9, fixed), and take one normalised
gradient step `x0_hat + eta * sqrt(D) * g / ||g||` (eta: the step's RMS per pixel, the same for every guide).
Reported per guide, timestep and step: the guide's accuracy on x0_hat (what it reads there), the mean change of the
guide's own log p(target) and of the evaluator's, and the fraction of images each then reads as the target.
"""

from __future__ import annotations

import argparse

import torch

from plugguide.datamodules import DigitsDataModule
from plugguide.metrics.calibration import guide_input
from plugguide.metrics.reporting import markdown_table
from plugguide.models import load_classifier, load_scheduler, load_unet
from plugguide.pipelines.guidance import PredictedCleanImageGuidance

DIFFUSION_MODEL = "assets/digits/ddpm-uncond"
EVALUATOR = "assets/digits/evaluator"


def log_probability(classifier: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return classifier(images).log_softmax(-1).gather(1, targets[:, None])[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--guides", nargs="+", default=["assets/digits/classifier-resnet", "assets/digits/classifier-deit"]
    )
    parser.add_argument("--timesteps", type=int, nargs="+", default=[0, 300, 500, 700])
    parser.add_argument("--steps", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    args = parser.parse_args()

    data = DigitsDataModule(batch_size=1000)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    images, labels = batch["image"], batch["label"]
    targets = (labels + 1 + torch.arange(len(labels)) % 9) % 10
    unet = load_unet(DIFFUSION_MODEL).eval().requires_grad_(False)
    alphas_cumprod = load_scheduler(DIFFUSION_MODEL, "DDPMScheduler").alphas_cumprod
    evaluator = load_classifier(EVALUATOR).eval().requires_grad_(False)
    guides = {path.rsplit("/", 1)[-1]: load_classifier(path).eval().requires_grad_(False) for path in args.guides}
    x0_guidance = PredictedCleanImageGuidance(next(iter(guides.values())))  # only its `input` is read by guide_input

    rows = []
    for t in args.timesteps:
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(t))
        abar = alphas_cumprod[t]
        with torch.no_grad():
            x0_hat = (
                guide_input(x0_guidance, abar.sqrt() * images + (1 - abar).sqrt() * noise, t, abar, unet)
                if t
                else images
            )
            evaluator_before = log_probability(evaluator, x0_hat, targets)
        for name, guide in guides.items():
            inputs = x0_hat.clone().requires_grad_(True)
            own_before = log_probability(guide, inputs, targets)
            (grad,) = torch.autograd.grad(own_before.sum(), inputs)
            direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * grad[0].numel() ** 0.5
            with torch.no_grad():
                accuracy = float((guide(x0_hat).argmax(-1) == labels).float().mean())
                for eta in args.steps:
                    moved = x0_hat + eta * direction
                    own_after, evaluator_after = (
                        log_probability(guide, moved, targets),
                        log_probability(evaluator, moved, targets),
                    )
                    rows.append(
                        [
                            name,
                            str(t),
                            f"{accuracy:.3f}",
                            f"{eta:g}",
                            f"{float((own_after - own_before).mean()):+.2f}",
                            f"{float((evaluator_after - evaluator_before).mean()):+.2f}",
                            f"{float((guide(moved).argmax(-1) == targets).float().mean()):.3f}",
                            f"{float((evaluator(moved).argmax(-1) == targets).float().mean()):.3f}",
                        ]
                    )
    print(
        markdown_table(
            [
                "guide",
                "t",
                "guide accuracy on x0_hat",
                "step (RMS per pixel)",
                "guide's own change of log p(target)",
                "evaluator's change of log p(target)",
                "guide reads target",
                "evaluator reads target",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
