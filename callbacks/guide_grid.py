"""Fixed-seed grids of guide-only (one-pass) sampling next to classifier-free guidance (two passes)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from plugguide.callbacks.labelled_grid import labelled_grid
from plugguide.callbacks.periodic_grid import PeriodicGrid
from plugguide.models import load_classifier
from plugguide.pipelines.finite import check_cfg_scale


class GuideSampleGrid(PeriodicGrid):
    """For several guidance scales g, samples the module's guide pipeline and CFG from the same noise and logs both.

    The module provides `sampling_pipeline()` (a `GuideDistilledPipeline`) and `cfg_pipeline()` (a
    `GuidedDiffusionPipeline`); both draw their initial noise as `randn_tensor` from a generator seeded with
    `seed`, so each image on the left (guide, one pass per step) has its CFG twin (two passes) at the same
    place on the right. Rows are classes. With `evaluator_path`, the evaluator's agreement with the row's
    class is logged as `<tag>/guided_accuracy_guide_g<g>` and `<tag>/guided_accuracy_cfg_g<g>`.
    Class-conditional models only.

    Args:
        guidance_scales (`list[float]`, defaults to `(3.0, 5.0, 9.0)`): the classifier-free guidance weights g to draw,
            as diffusers' `guidance_scale` (1 = off).
        num_per_class (`int`, defaults to 4): columns per side.
        num_classes (`int`, defaults to 10): rows.
        num_inference_steps (`int`, *optional*): DDIM steps; None uses the module's `num_inference_steps` (the halved
            count).
        every_n_epochs (`int`, defaults to 1): draw after every n-th validation epoch; the last grids are always drawn
            at fit end.
        seed (`int`, defaults to 0): seed of the grids' noise.
        evaluator_path (`str`, *optional*): optional independent classifier (`assets/digits/evaluator`).
        tag (`str`, defaults to `"guide_vs_cfg"`): TensorBoard tag prefix.
    """

    def __init__(
        self,
        guidance_scales: list[float] = (3.0, 5.0, 9.0),
        num_per_class: int = 4,
        num_classes: int = 10,
        num_inference_steps: int | None = None,
        every_n_epochs: int = 1,
        seed: int = 0,
        evaluator_path: str | None = None,
        tag: str = "guide_vs_cfg",
    ) -> None:
        super().__init__(every_n_epochs)
        if not guidance_scales:
            raise ValueError(
                f"Expected `guidance_scales` to be a non-empty list of finite numbers >= 1, but got {guidance_scales}."
            )
        for scale in guidance_scales:
            check_cfg_scale(scale, "guidance_scales")
        self.guidance_scales = list(guidance_scales)
        self.num_per_class = num_per_class
        self.num_classes = num_classes
        self.num_inference_steps = num_inference_steps
        self.seed = seed
        self.evaluator_path = evaluator_path
        self.tag = tag
        self._evaluator = None

    def sample(
        self, pl_module: L.LightningModule, guidance_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(guide images, CFG images, labels), images (B, C, H, W) in [0, 1] from the same noise."""
        steps = self.num_inference_steps or pl_module.num_inference_steps
        labels = torch.arange(self.num_classes).repeat_interleave(self.num_per_class)
        outputs = []
        for pipeline in (pl_module.sampling_pipeline(), pl_module.cfg_pipeline()):
            pipeline.set_progress_bar_config(disable=True)
            generator = torch.Generator(pl_module.device).manual_seed(self.seed)
            outputs.append(
                pipeline(
                    class_labels=labels,
                    num_inference_steps=steps,
                    generator=generator,
                    output_type="pt",
                    guidance_scale=guidance_scale,
                ).images
            )
        return outputs[0], outputs[1], labels

    def side_by_side(self, guide: torch.Tensor, cfg: torch.Tensor) -> torch.Tensor:
        """One grid: per class row (named on its left), the guide's samples, a blank column, then CFG's."""
        blank = torch.ones_like(guide[:1])
        rows = []
        for row in range(self.num_classes):
            cells = slice(row * self.num_per_class, (row + 1) * self.num_per_class)
            rows += [*guide[cells], blank[0], *cfg[cells]]
        labels = [f"class {k}" for k in range(self.num_classes)]
        return labelled_grid(torch.stack(rows), nrow=2 * self.num_per_class + 1, row_labels=labels)

    @rank_zero_only
    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        experiment = getattr(trainer.logger, "experiment", None)
        metrics = {}
        with torch.no_grad():
            for g in self.guidance_scales:
                guide, cfg, labels = self.sample(pl_module, g)
                if experiment is not None and hasattr(experiment, "add_image"):
                    experiment.add_image(f"{self.tag}/g={g:g}", self.side_by_side(guide, cfg), trainer.global_step)
                if self.evaluator_path:
                    evaluator = self.evaluator(pl_module.device)
                    for name, images in (("guide", guide), ("cfg", cfg)):
                        predicted = evaluator(images * 2 - 1).argmax(-1).cpu()
                        metrics[f"{self.tag}/guided_accuracy_{name}_g{g:g}"] = (
                            (predicted == labels).float().mean().item()
                        )
        if metrics and trainer.logger is not None:
            trainer.logger.log_metrics(metrics, trainer.global_step)
        pl_module.train(was_training)

    def evaluator(self, device: torch.device):
        if self._evaluator is None:
            self._evaluator = load_classifier(self.evaluator_path, "evaluator_path").eval()
        return self._evaluator.to(device)
