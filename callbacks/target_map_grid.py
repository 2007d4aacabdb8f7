"""Target map | naive guided sample | PPAP guided sample, for dense experts, in TensorBoard."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from plugguide.callbacks.labelled_grid import labelled_grid
from plugguide.callbacks.periodic_grid import PeriodicGrid
from plugguide.metrics import DenseMapMetrics
from plugguide.metrics.figures import render_maps
from plugguide.pipelines import sample_batch
from plugguide.pipelines.finite import check_scale


class TargetMapGrid(PeriodicGrid):
    """Samples toward target maps with the off-the-shelf model and with the experts, and logs them side by side.

    The paper's Figures 10-11 during training: each row is one held-out real digit (the first `num_samples` of the
    validation split), its target map (the teacher's map of it: colours per class, or grey levels of the depth
    stand-in, near = white), the sample guided by the teacher itself on x_t (naive) and the sample guided by the
    experts, both from the same seeded noise, so a row differs only by the guide. With an evaluator (the module's
    `scores`), the two samples' agreement with the maps, read off their pixels, is logged as
    `<tag>/<score>_naive` and `<tag>/<score>_experts` (`miou`, or `depth_correlation`). Drawn on global rank 0
    after every `every_n_epochs`-th validation and at the end of fit.

    The module provides `teacher`, `task`, `sampling_pipeline()`, `naive_sampling_pipeline()` and its
    `num_inference_steps` and `classifier_scale` hyper-parameters (`ExpertDistillation` does).

    Args:
        num_samples (`int`, defaults to 8): rows of the grid.
        classifier_scale (`float`, *optional*): gradient scale of the experts; default: the module's
            `classifier_scale`.
        naive_classifier_scale (`float`, *optional*): gradient scale of the naive guide; default: the experts'. The
            off-the-shelf model's gradients on noisy inputs grow large, so its best scale is much smaller
            (`scripts/dense_table.py` sweeps both).
        every_n_epochs (`int`, defaults to 1): draw after every n-th validation epoch.
        seed (`int`, defaults to 0): seed of the samples' noise (sample i: seed + i).
        tag (`str`, defaults to `"target_maps"`): TensorBoard tag.
    """

    def __init__(
        self,
        num_samples: int = 8,
        classifier_scale: float | None = None,
        naive_classifier_scale: float | None = None,
        every_n_epochs: int = 1,
        seed: int = 0,
        tag: str = "target_maps",
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"Expected `num_samples` to be >= 1, but got {num_samples}.")
        super().__init__(every_n_epochs)
        for name, value in (
            ("classifier_scale", classifier_scale),
            ("naive_classifier_scale", naive_classifier_scale),
        ):
            if value is not None:
                check_scale(name, value)
        self.num_samples = num_samples
        self.classifier_scale = classifier_scale
        self.naive_classifier_scale = naive_classifier_scale
        self.seed = seed
        self.tag = tag

    def real_images(self, trainer: L.Trainer) -> torch.Tensor:
        images = []
        for batch in trainer.datamodule.val_dataloader():
            images.append(batch["image"])
            if sum(len(i) for i in images) >= self.num_samples:
                break
        return torch.cat(images)[: self.num_samples]

    @rank_zero_only
    @torch.no_grad()
    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        images = self.real_images(trainer).to(pl_module.device)
        maps = pl_module.task.prediction(pl_module.teacher(images))
        targets = {
            "label": torch.full((len(images),), -1, device=pl_module.device),
            "seed": [self.seed + i for i in range(len(images))],
            "target_map": maps,
        }
        scale = pl_module.hparams.classifier_scale if self.classifier_scale is None else self.classifier_scale
        naive_scale = scale if self.naive_classifier_scale is None else self.naive_classifier_scale
        samples = {}
        for name, pipeline, classifier_scale in (
            ("naive", pl_module.naive_sampling_pipeline(), naive_scale),
            ("experts", pl_module.sampling_pipeline(), scale),
        ):
            pipeline.set_progress_bar_config(disable=True)
            samples[name] = sample_batch(
                pipeline,
                targets,
                num_inference_steps=pl_module.hparams.num_inference_steps,
                classifier_scale=classifier_scale,
            )
        columns = [
            render_maps(maps),
            (samples["naive"] / 2 + 0.5).expand(-1, 3, -1, -1),
            (samples["experts"] / 2 + 0.5).expand(-1, 3, -1, -1),
        ]
        grid = labelled_grid(torch.stack(columns, dim=1).flatten(0, 1), nrow=3)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image(self.tag, grid, trainer.global_step)
        module_scores = getattr(pl_module, "scores", None)
        if module_scores is not None and trainer.logger is not None:
            kind = "depth" if maps.is_floating_point() else "segmentation"
            scores = DenseMapMetrics(kind, module_scores.evaluator)
            score = "depth_correlation" if kind == "depth" else "miou"
            values = {
                f"{self.tag}/{score}_{name}": float(scores.scores(sampled, maps)[score].mean())
                for name, sampled in samples.items()
            }
            trainer.logger.log_metrics(values, trainer.global_step)
        pl_module.train(was_training)
