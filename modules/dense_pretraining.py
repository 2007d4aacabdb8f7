"""Training the dense off-the-shelf models (segmenter, depth stand-in) on clean labelled images."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from plugguide.models.dense_model import DenseModel
from plugguide.modules.pretraining_steps import PretrainingSteps
from plugguide.pipelines.tasks import Task, default_task


class DensePretraining(PretrainingSteps, L.LightningModule):
    """Supervised training of a `DenseModel` on clean images and their maps: the "off-the-shelf" dense guides.

    Clean images only, as any off-the-shelf model is trained: whatever these models learn about noise, PPAP's
    experts must learn it from them, data-free. The loss is the task's supervised loss against the labels the data
    carries under the task's `label_key` (per-pixel cross-entropy for a segmenter, the regression loss for a map).

    Args:
        model (`DenseModel`): the network to train.
        optimizer (`OptimizerCallable`, defaults to `torch.optim.AdamW`): optimiser factory, e.g. AdamW.
        task (`Task`, *optional*): what the model predicts and its loss; None: the model's own (`default_task`).
        export_dtype (`str`, defaults to `"float32"`): the precision the exported weights are stored in: "float32", or
            "float16" to halve the asset (loading casts them back to float32; `scripts/measure_assets.py` measures the
            stored model).
    """

    trained_network = "model"

    def __init__(
        self,
        model: DenseModel,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        task: Task | None = None,
        export_dtype: Literal["float32", "float16"] = "float32",
    ) -> None:
        super().__init__()
        if export_dtype not in ("float32", "float16"):
            raise ValueError(f"Expected `export_dtype` to be 'float32' or 'float16', but got {export_dtype!r}.")
        self.save_hyperparameters(ignore=["model", "optimizer", "task"])
        self.model = model
        self.optimizer = optimizer
        self.task = default_task(model) if task is None else task

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        key = self.task.label_key
        if key not in batch:
            raise ValueError(
                f"{type(self.task).__name__} trains on the batches' {key!r} maps, but the data gives {sorted(batch)}; use DigitMapsDataModule."
            )
        outputs = self.model(batch["image"])
        loss = self.task.supervised_loss(outputs, batch[key])
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=on_step, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        # Pixel accuracy for a segmenter, the maps' correlation for a regressor.
        self.log(
            f"{stage}/agreement",
            self.task.agreement(outputs, batch[key]),
            prog_bar=True,
            on_step=False,
            on_epoch=True,
            sync_dist=True,
        )
        return loss
