"""Training the off-the-shelf classifiers and the evaluator on clean labelled images."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics.classification import MulticlassAccuracy

from plugguide.models.classifier import TimmClassifier
from plugguide.models.seeding import step_generator
from plugguide.modules.pretraining_steps import PretrainingSteps


def random_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shifts each image by up to `max_shift` pixels in x and y (background -1 fills the border)."""
    batch, _, height, width = images.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (batch, 2), generator=generator, device=images.device).float()
    theta = torch.zeros(batch, 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2.0 * shifts[:, 0] / width
    theta[:, 1, 2] = -2.0 * shifts[:, 1] / height
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1.0, grid, mode="nearest", padding_mode="zeros", align_corners=False) - 1.0


class ClassifierPretraining(PretrainingSteps, L.LightningModule):
    """Cross-entropy training of a `TimmClassifier` on labelled images.

    With no augmentation this makes the "off-the-shelf" classifiers the guidance methods start from
    (trained on clean images only). With noise and shift augmentation it makes the evaluator, a model
    of another architecture that only scores generated images and is harder to fool.

    Args:
        classifier (`TimmClassifier`): the network to train.
        optimizer (`OptimizerCallable`, defaults to `torch.optim.AdamW`): optimiser factory, e.g. AdamW.
        noise_std (`float`, defaults to 0.0): maximum std of Gaussian noise added per image (drawn uniformly in [0,
            noise_std]).
        max_shift (`int`, defaults to 0): maximum translation in pixels.
        label_smoothing (`float`, defaults to 0.0): cross-entropy label smoothing.
        seed (`int`, defaults to 0): seed of the augmentation (with the step and the rank), so that a resumed run
            augments as an uninterrupted one would.
    """

    trained_network = "classifier"

    def __init__(
        self,
        classifier: TimmClassifier,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        noise_std: float = 0.0,
        max_shift: int = 0,
        label_smoothing: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if noise_std < 0:
            raise ValueError(f"Expected `noise_std` to be >= 0, but got {noise_std}.")
        if max_shift < 0:
            raise ValueError(f"Expected `max_shift` to be >= 0, but got {max_shift}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"Expected `label_smoothing` to be in [0, 1), but got {label_smoothing}.")
        if seed < 0:
            raise ValueError(f"Expected `seed` to be >= 0, but got {seed}.")
        self.save_hyperparameters(ignore=["classifier", "optimizer"])
        self.classifier = classifier
        self.optimizer = optimizer
        # Keyed "<stage>_acc": a ModuleDict key "train" would shadow nn.Module.train.
        self.accuracy = torch.nn.ModuleDict(
            {f"{stage}_acc": MulticlassAccuracy(classifier.num_classes) for stage in ("train", "val", "test")}
        )

    def augment(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.hparams.max_shift > 0:
            images = random_translate(images, self.hparams.max_shift, generator)
        if self.hparams.noise_std > 0:
            std = (
                torch.rand(images.shape[0], 1, 1, 1, generator=generator, device=images.device)
                * self.hparams.noise_std
            )
            images = images + std * torch.randn(images.shape, generator=generator, device=images.device)
        return images

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        if stage == "train":
            images = self.augment(
                batch["image"],
                step_generator(self.hparams.seed, self.global_step, self.global_rank, batch["image"].device),
            )
        else:
            images = batch["image"]
        logits = self.classifier(images)
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        accuracy = self.accuracy[f"{stage}_acc"]
        accuracy(logits, batch["label"])
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", sync_dist=stage != "train")
        self.log(f"{stage}/acc", accuracy, prog_bar=True, on_step=False, on_epoch=True)
        return loss
